"""Disks in I/O threads, started as Proxmox VE and libvirt start them: the VM
lives through every backup and every client, on every QEMU build.

Whether the build under test aborts when an NBD client of an I/O-thread
export leaves is found out here the hard way, on a throwaway VM of that
build; the daemon must have decided the same (it asks a throwaway process of
its own), refuse such exports there, and back the disks up all the same
through QEMU's own copy.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nbd
import pytest

from blockbackup_client import (
    ConnectionLost,
    InvalidArgument,
    NoSuchCheckpoint,
    PermissionDenied,
    Unsupported,
)
from tests.conftest import NbdReader, domain_state, export_xml, snapshot_xml, wait_for
from tests.vm_manager.manager import assert_restore_equals_live, backup, disk_level
from tools.daemon import Daemon
from tools.vm import MiB, Vm
from tools.vm_configs import LibvirtVm, ProxmoxVm

CONFIGS = [
    pytest.param(ProxmoxVm, ("sda", "sdb"), id="proxmox-virtio-scsi-single"),
    pytest.param(LibvirtVm, ("vda", "vdb"), id="libvirt-virtio-blk"),
]


@pytest.fixture(scope="session")
def build_aborts() -> bool:
    """Whether this QEMU build dies when a client of an export of a disk in
    an I/O thread leaves: tried on a VM of its own, as a user would meet it."""
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="bb-abort-", dir="/tmp"))
    vm = ProxmoxVm(work, "probe", disks={"sda": 4 * MiB})
    vm.start()
    try:
        vm.qmp("blockdev-add", driver="null-co", **{"node-name": "n"}, size=4 * MiB)
        node = vm.top_nodes()["sda"]
        vm.qmp("nbd-server-start", addr={"type": "unix", "data": {"path": str(work / "nbd")}})
        vm.qmp("block-export-add", type="nbd", id="e", **{"node-name": node}, name="sda")
        h = nbd.NBD()
        h.connect_uri(f"nbd+unix:///sda?socket={work / 'nbd'}")
        h.pread(4096, 0)
        h.shutdown()
        del h
        deadline = time.monotonic() + 3
        while vm.running and time.monotonic() < deadline:
            time.sleep(0.05)
        return not vm.running
    finally:
        vm.stop()
        subprocess.run(["rm", "-rf", str(work)])


def make_qcow2(path: Path, size: int) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], check=True)


def connect(daemon: Daemon, vm: Vm) -> None:
    with daemon.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
    wait_for(lambda: domain_state(daemon, "vm1") == "running", what="vm1 running")


def assert_alive(vm: Vm) -> None:
    assert vm.running, vm.stdout_path.read_text(errors="replace")[-2000:]
    assert vm.status() == "running"


def nothing_of_ours(vm: Vm) -> None:
    assert {n for n in vm.node_names() if n.startswith("bb-")} == set()
    assert vm.qmp("query-fdsets") == []
    assert [j for j in vm.qmp("query-jobs") if j["id"].startswith("bb-")] == []
    assert vm.qmp("query-block-exports") == []


@pytest.mark.parametrize("kind,disks", CONFIGS)
def test_backups_of_io_thread_disks_keep_the_vm_alive_and_are_exact(
        make_vm: Callable[..., Vm], daemon: Daemon, workdir: Path, build_aborts: bool,
        kind: type[Vm], disks: tuple[str, str]) -> None:
    vm = make_vm(kind=kind, disks={disks[0]: 32 * MiB, disks[1]: 16 * MiB})
    connect(daemon, vm)
    vm.write(disks[0], 0, MiB, 0x11)
    vm.write(disks[1], 5 * MiB, 256 * 1024, 0x22)
    dest = workdir / "backups"
    first = backup(daemon, dest)
    assert_alive(vm)
    assert [disk_level(first, d) for d in disks] == ["full", "full"]
    # On a build that aborts, QEMU copies each disk itself; else NBD reads it.
    expected = "copy" if build_aborts else "nbd"
    assert {first["disks"][d]["read_by"] for d in disks} == {expected}
    if build_aborts:
        assert "I/O thread" in first["stderr"] and "copied by QEMU" in first["stderr"]
    vm.write(disks[0], 8 * MiB, 128 * 1024, 0x33)
    vm.write(disks[0], 0, 64 * 1024, 0x44)
    second = backup(daemon, dest, "--level", "auto")
    assert_alive(vm)
    assert [disk_level(second, d) for d in disks] == ["inc", "inc"]
    # Exactly the two written runs (192 KiB) were read of the first disk, nothing of the other.
    assert second["disks"][disks[0]]["bytes_read"] == 192 * 1024
    assert second["disks"][disks[1]]["bytes_read"] == 0
    for d in disks:
        assert_restore_equals_live(daemon, vm, dest, d)
    r = subprocess.run([sys.executable, "-m", "blockbackup_client.bbctl", "verify", str(dest)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    nothing_of_ours(vm)
    assert_alive(vm)


@pytest.mark.parametrize("kind,disks", CONFIGS)
def test_exports_of_io_thread_disks_survive_a_backup_applications_clients_or_are_refused(
        make_vm: Callable[..., Vm], daemon: Daemon, build_aborts: bool,
        kind: type[Vm], disks: tuple[str, str]) -> None:
    vm = make_vm(kind=kind, disks={disks[0]: 16 * MiB, disks[1]: 16 * MiB})
    connect(daemon, vm)
    vm.write(disks[0], 0, MiB, 0x55)
    with daemon.client() as c:
        c.snapshot_create("vm1", snapshot_xml("s1"))
        copy_only = c.snapshot_lookup("vm1", "s1")["copy_only"]
        if build_aborts:
            assert set(copy_only) == set(disks)
            with pytest.raises(Unsupported) as refused:
                c.export_start("vm1", export_xml([(disks[0], "s1")]))
            message = str(refused.value)
            assert "I/O thread" in message and "snapshot.copy" in message
            assert "nbd_blockdev_client_closed" in message  # what QEMU does, said plainly
            assert c.export_list("vm1") == [] and c.export_server("vm1") is None
            assert vm.qmp("query-block-exports") == []
        else:
            assert copy_only == {}
            started = c.export_start("vm1", export_xml([(disks[0], "s1")]))
            sock = started["server"]["socket"]
            uri = f"nbd+unix:///{disks[0]}-s1?socket={sock}"
            # What a backup application does against an export.
            for args in (["nbdinfo", "--list", f"nbd+unix://?socket={sock}"],
                         ["nbdinfo", uri], ["nbdinfo", uri],
                         ["nbdcopy", uri, "null:"]):
                r = subprocess.run(args, capture_output=True, text=True, timeout=60)
                assert r.returncode == 0, (args, r.stderr)
                time.sleep(0.2)  # a close that would abort QEMU has run by now
                assert_alive(vm)
            with NbdReader(sock, f"{disks[0]}-s1") as reader:
                assert reader.read(0, MiB) == b"\x55" * MiB
        c.snapshot_delete("vm1", "s1")
    assert_alive(vm)
    nothing_of_ours(vm)


def copy(c: Any, target: Path | str, disk: str = "sda", **kwargs: Any) -> Any:
    return c.call("snapshot.copy", domain="vm1", name="s1", disk=disk, target=str(target),
                  **kwargs)


def test_copy_refuses_targets_it_must_not_write_and_leaves_nothing(
        make_vm: Callable[..., Vm], daemon: Daemon, workdir: Path) -> None:
    vm = make_vm(kind=ProxmoxVm, disks={"sda": 16 * MiB})
    connect(daemon, vm)
    good = workdir / "good.qcow2"
    make_qcow2(good, 16 * MiB)
    small = workdir / "small.qcow2"
    make_qcow2(small, 8 * MiB)
    raw = workdir / "raw.img"
    raw.write_bytes(bytes(16 * MiB))
    link = workdir / "link.qcow2"
    link.symlink_to(good)
    with daemon.client() as c:
        c.snapshot_create("vm1", snapshot_xml("s1"))
        for target, why in ((workdir / "missing.qcow2", "No such file"),
                            ("good.qcow2", "absolute"),
                            (small, "holds 8388608 bytes"),
                            (raw, "not a qcow2"),
                            (link, "cannot open"),
                            (workdir, "cannot open")):
            with pytest.raises(InvalidArgument, match=why):
                copy(c, target)
            nothing_of_ours_but_the_snapshot(vm)
        with pytest.raises(NoSuchCheckpoint):
            copy(c, good, checkpoint="nope")
        nothing_of_ours_but_the_snapshot(vm)
        assert good.read_bytes()[:4] == b"QFI\xfb"
        c.snapshot_delete("vm1", "s1")
    nothing_of_ours(vm)


def nothing_of_ours_but_the_snapshot(vm: Vm) -> None:
    assert {n for n in vm.node_names() if n.startswith("bb-copy")} == set()
    assert vm.qmp("query-fdsets") == []
    assert [j for j in vm.qmp("query-jobs") if j["id"].startswith("bb-copy")] == []


def test_copy_writes_only_files_the_caller_owns(
        make_vm: Callable[..., Vm], make_daemon: Callable[..., Daemon], workdir: Path) -> None:
    vm = make_vm(kind=ProxmoxVm, disks={"sda": 16 * MiB})
    daemon = make_daemon(allowed_users=["nobody"], socket_mode="0666")
    connect(daemon, vm)
    theirs = workdir / "root-owned.qcow2"
    make_qcow2(theirs, 16 * MiB)
    mine = workdir / "nobody.qcow2"
    make_qcow2(mine, 16 * MiB)
    os.chown(mine, 65534, 65534)
    os.chmod(workdir, 0o755)
    with daemon.client() as c:
        c.snapshot_create("vm1", snapshot_xml("s1"))
    script = (
        "import sys, json\n"
        "from blockbackup_client import Client, ApplicationError\n"
        f"c = Client({str(daemon.socket)!r})\n"
        "out = []\n"
        f"for t in ({str(theirs)!r}, {str(mine)!r}):\n"
        "    try:\n"
        "        out.append(c.call('snapshot.copy', domain='vm1', name='s1', disk='sda', "
        "target=t)['bytes'])\n"
        "    except ApplicationError as e:\n"
        "        out.append(e.kind)\n"
        "print(json.dumps(out))\n")
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                        sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=Path(__file__).parent.parent)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f'["{PermissionDenied.kind}", {16 * MiB}]'
    with daemon.client() as c:
        c.snapshot_delete("vm1", "s1")
    nothing_of_ours(vm)


def test_deleting_the_snapshot_cancels_its_copy(
        make_vm: Callable[..., Vm], daemon: Daemon, workdir: Path) -> None:
    vm = make_vm(kind=ProxmoxVm, disks={"sda": 16 * MiB})
    connect(daemon, vm)
    vm.write("sda", 0, 8 * MiB, 0x66)
    target = workdir / "t.qcow2"
    make_qcow2(target, 16 * MiB)
    import threading

    outcome: dict[str, Any] = {}

    def run() -> None:
        with daemon.client(timeout=120) as c:
            try:
                # 1 MiB/s: caught running, however fast the host.
                outcome["result"] = copy(c, target, speed=MiB)
            except Exception as err:  # noqa: BLE001 - looked at below
                outcome["error"] = err

    with daemon.client() as c:
        c.snapshot_create("vm1", snapshot_xml("s1"))
        worker = threading.Thread(target=run)
        worker.start()
        running = wait_for(lambda: c.snapshot_lookup("vm1", "s1")["copies"],
                           what="the copy running")
        assert running[0]["disk"] == "sda" and running[0]["total"] in (0, 16 * MiB)
        c.snapshot_delete("vm1", "s1")
        worker.join(90)
    assert "result" not in outcome
    assert "was cancelled: snapshot 's1' is being deleted" in str(outcome.get("error"))
    nothing_of_ours(vm)
    assert_alive(vm)


def test_a_daemon_killed_mid_copy_leaves_nothing_behind(
        make_vm: Callable[..., Vm], daemon: Daemon, workdir: Path) -> None:
    vm = make_vm(kind=ProxmoxVm, disks={"sda": 16 * MiB})
    connect(daemon, vm)
    target = workdir / "t.qcow2"
    make_qcow2(target, 16 * MiB)
    assert daemon.stop() == 0
    daemon.env = {"BLOCKBACKUPD_CRASH_AT": "copy:target-added"}
    daemon.start()
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    with daemon.client() as c:
        c.snapshot_create("vm1", snapshot_xml("s1"))
        with pytest.raises(ConnectionLost):
            copy(c, target)
    assert daemon.proc is not None and daemon.proc.wait(10) == -signal.SIGKILL
    daemon.proc = None
    assert vm.qmp("query-fdsets") != []  # the copy's file was QEMU's when the daemon died
    daemon.env = {}
    daemon.start()
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    nothing_of_ours(vm)
    assert_alive(vm)


@pytest.fixture(scope="session")
def build_aborts_above_throttle() -> bool:
    """Whether this QEMU build dies when a node is added above a throttle
    filter node of a disk in an I/O thread: tried on a VM of its own."""
    import tempfile

    work = Path(tempfile.mkdtemp(prefix="bb-abort-", dir="/tmp"))
    vm = LibvirtVm(work, "probe", disks={"vda": 4 * MiB}, throttle="filter")
    vm.start()
    try:
        # The firmware starts the device's I/O thread (dataplane) when it
        # drives the disk: until then its nodes are the main loop's.
        time.sleep(1.5)
        for _ in range(10):
            try:
                vm.qmp("blockdev-add", driver="raw", **{"node-name": "above"},
                       file="libvirt-1-filter", **{"read-only": True})
                vm.qmp("blockdev-del", **{"node-name": "above"})
            except (OSError, EOFError):
                break
        time.sleep(0.2)
        return not vm.running
    finally:
        vm.stop()
        subprocess.run(["rm", "-rf", str(work)])


def test_disks_with_a_throttle_filter_in_an_io_thread_are_refused_where_qemu_would_die(
        make_vm: Callable[..., Vm], daemon: Daemon, workdir: Path,
        build_aborts_above_throttle: bool) -> None:
    vm = make_vm(kind=LibvirtVm, disks={"vda": 16 * MiB}, throttle="filter")
    connect(daemon, vm)
    time.sleep(1.5)  # the device's I/O thread runs (see the fixture)
    vm.write("vda", 0, MiB, 0x77)
    dest = workdir / "backups"
    if build_aborts_above_throttle:
        with daemon.client() as c:
            with pytest.raises(Unsupported) as refused:
                c.snapshot_create("vm1", snapshot_xml("s1"), checkpoint=True)
        assert "throttle filter" in str(refused.value) and "I/O thread" in str(refused.value)
        r = subprocess.run([sys.executable, "-m", "blockbackup_client.bbctl", "--socket",
                            str(daemon.socket), "backup", "vm1", "--dest", str(dest)],
                           capture_output=True, text=True)
        assert r.returncode != 0 and "throttle filter" in r.stderr
        with daemon.client() as c:
            assert c.snapshot_list("vm1") == [] and c.call("checkpoint.list", domain="vm1") == []
    else:
        assert [disk_level(backup(daemon, dest), "vda")] == ["full"]
        vm.write("vda", 4 * MiB, 64 * 1024, 0x78)
        assert [disk_level(backup(daemon, dest), "vda")] == ["inc"]
        assert_restore_equals_live(daemon, vm, dest, "vda")
    assert_alive(vm)
    nothing_of_ours(vm)
