"""Stopped domains: backups of their images through the daemon's storage
process, in one checkpoint chain with the online backups."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

from blockbackup_client import InvalidArgument
from tests.conftest import bbctl, domain_state, wait_for
from tests.test_backup import reference, same
from tools.daemon import Daemon
from tools.vm import MiB, Vm


def _backup(daemon: Daemon, dest: Path, level: str = "auto") -> dict:  # type: ignore[type-arg]
    r = bbctl(daemon, "--json", "backup", "vm1", "--dest", str(dest), "--level", level)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _read(record: dict) -> dict[str, int]:  # type: ignore[type-arg]
    return {d: e["bytes_read"] for d, e in record["disks"].items()}


def _restored(daemon: Daemon, dest: Path, backup_id: str, disk: str, out: Path) -> Path:
    r = bbctl(daemon, "restore", str(dest), "--disk", disk, "--at", backup_id,
              "--output", str(out))
    assert r.returncode == 0, r.stderr
    return out


def _storage_processes(daemon: Daemon) -> list[int]:
    """PIDs of the daemon's children that are storage daemons."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == daemon.pid and b"qemu-storage-daemon" in cmdline:
            out.append(int(entry.name))
    return out


def test_offline_incrementals_join_the_online_chain(defined: tuple[Daemon, Vm],
                                                    workdir: Path) -> None:
    daemon, vm = defined
    dest = workdir / "backups"
    vm.write("sda", 0, MiB, 0x11)
    vm.write("sdb", 8 * MiB, 64 * 1024, 0x12)
    first = _backup(daemon, dest, "full")
    assert first["level"] == "full"

    # Written, then shut down: the offline backup reads exactly those blocks.
    vm.write("sda", 4 * MiB, 128 * 1024, 0x21)
    vm.write("sdb", 16 * MiB, 64 * 1024, 0x22)
    vm.stop()
    wait_for(lambda: domain_state(daemon, "vm1") == "disconnected", what="vm1 disconnected")
    offline = _backup(daemon, dest)
    assert offline["level"] == "inc", offline
    assert _read(offline) == {"sda": 128 * 1024, "sdb": 64 * 1024}
    for disk in ("sda", "sdb"):
        assert same(_restored(daemon, dest, offline["id"], disk, workdir / f"off-{disk}.qcow2"),
                    vm.image(disk))
    # The images are free again: no storage process, no lock (qemu-img without -U).
    assert _storage_processes(daemon) == []
    for disk in ("sda", "sdb"):
        subprocess.run(["qemu-img", "info", str(vm.image(disk))], check=True,
                       capture_output=True)
        check = subprocess.run(["qemu-img", "check", str(vm.image(disk))],
                               capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr

    # The VM again: the next incremental starts from the offline point.
    vm.start()
    wait_for(lambda: domain_state(daemon, "vm1") == "running", what="vm1 running")
    vm.write("sda", 32 * MiB, 64 * 1024, 0x31)
    online = _backup(daemon, dest)
    assert online["level"] == "inc", online
    assert _read(online) == {"sda": 64 * 1024, "sdb": 0}
    assert same(_restored(daemon, dest, online["id"], "sda", workdir / "on-sda.qcow2"),
                reference(vm, "sda", workdir / "ref-sda.qcow2"))


def test_a_vm_cannot_start_while_an_offline_snapshot_holds_its_images(
        defined: tuple[Daemon, Vm], workdir: Path) -> None:
    daemon, vm = defined
    vm.stop()
    wait_for(lambda: domain_state(daemon, "vm1") == "disconnected", what="vm1 disconnected")
    with daemon.client() as c:
        c.snapshot_create("vm1", "<domainblocksnapshot><name>s1</name></domainblocksnapshot>",
                          checkpoint=True)
        held = next(d for d in c.domain_list() if d["name"] == "vm1")["storage_process"]
        assert held["disks"] == ["sda", "sdb"]
        # The VM manager's start fails with QEMU's lock error, nothing else.
        refused = subprocess.run(vm.command_line(), capture_output=True, text=True,
                                 timeout=60, env=vm.qemu.environ())
        assert refused.returncode == 1, refused
        assert 'Failed to get "write" lock' in refused.stderr, refused.stderr
        assert str(vm.image("sda")) in refused.stderr, refused.stderr
        c.snapshot_delete("vm1", "s1")
        wait_for(lambda: not _storage_processes(daemon), what="storage process gone")
        assert "storage_process" not in next(d for d in c.domain_list() if d["name"] == "vm1")
    vm.start()
    wait_for(lambda: domain_state(daemon, "vm1") == "running", what="vm1 running")
    with daemon.client() as c:
        assert c.call("checkpoint.lookup", domain="vm1", name="s1")["state"] == "valid"


def test_an_offline_snapshot_ends_with_the_connection_that_made_it(
        defined: tuple[Daemon, Vm]) -> None:
    daemon, vm = defined
    vm.stop()
    wait_for(lambda: domain_state(daemon, "vm1") == "disconnected", what="vm1 disconnected")
    with daemon.client() as c:
        c.snapshot_create("vm1", "<domainblocksnapshot><name>s1</name></domainblocksnapshot>")
        assert _storage_processes(daemon)
    wait_for(lambda: not _storage_processes(daemon), what="storage process gone")
    with daemon.client() as c:
        assert c.snapshot_list("vm1") == []
    vm.start()  # the images are free


def test_a_killed_daemons_successor_stops_its_storage_process(
        defined: tuple[Daemon, Vm], workdir: Path) -> None:
    daemon, vm = defined
    vm.stop()
    wait_for(lambda: domain_state(daemon, "vm1") == "disconnected", what="vm1 disconnected")
    scratch = workdir / "state" / "scratch"
    with daemon.client() as c:
        c.snapshot_create("vm1", "<domainblocksnapshot><name>s1</name></domainblocksnapshot>",
                          checkpoint=True)
        pids = _storage_processes(daemon)
        assert len(pids) == 1
        daemon.kill()
    os.kill(pids[0], 0)  # it outlived the daemon
    daemon.start()
    wait_for(lambda: not Path(f"/proc/{pids[0]}").exists(), what="leftover storage process gone")
    assert list(scratch.iterdir()) == []
    vm.start()
    wait_for(lambda: domain_state(daemon, "vm1") == "running", what="vm1 running")
    with daemon.client() as c:
        # Quit, not killed: the bitmaps were written back; the checkpoint
        # the snapshot made is kept (its bitmap is in the images).
        assert c.call("checkpoint.lookup", domain="vm1", name="s1")["state"] == "valid", \
            c.call("checkpoint.lookup", domain="vm1", name="s1")


def test_a_domain_never_seen_running_is_backed_up_from_the_images_it_names(
        daemon: Daemon, make_vm: Callable[..., Vm], workdir: Path) -> None:
    vm = Vm(workdir, "vm1")
    vm.create_images()
    for disk, pattern in (("sda", 0x41), ("sdb", 0x42)):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} 1M 192k",
                        str(vm.image(disk))], check=True, capture_output=True)
    r = bbctl(daemon, "domain", "define", "vm1", str(vm.daemon_qmp),
              "--disk", f"sda={vm.image('sda')}", "--disk", f"sdb={vm.image('sdb')},format=qcow2")
    assert r.returncode == 0, r.stderr
    dest = workdir / "backups"
    full = _backup(daemon, dest)
    assert full["level"] == "full"
    assert _read(full) == {"sda": 192 * 1024, "sdb": 192 * 1024}
    for disk in ("sda", "sdb"):
        assert same(_restored(daemon, dest, full["id"], disk, workdir / f"f-{disk}.qcow2"),
                    vm.image(disk))
    again = _backup(daemon, dest)
    assert again["level"] == "inc" and _read(again) == {"sda": 0, "sdb": 0}

    vm = make_vm("vm1")  # the same images, now running under the daemon
    wait_for(lambda: domain_state(daemon, "vm1") == "running", what="vm1 running")
    vm.write("sdb", 0, 64 * 1024, 0x51)
    online = _backup(daemon, dest)
    assert online["level"] == "inc" and _read(online) == {"sda": 0, "sdb": 64 * 1024}


def test_bad_disks_in_a_definition_change_nothing(daemon: Daemon, workdir: Path) -> None:
    image = workdir / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1M"], check=True)
    for disks, words in (
            ([{"name": "sda", "file": "relative.qcow2"}], "absolute path"),
            ([{"name": "sda", "file": str(workdir / "missing")}], "No such file"),
            ([{"name": "sda", "file": str(image), "format": "vmdk"}], "not qcow2 or raw"),
            ([{"name": "sda", "file": str(image)}, {"name": "sda", "file": str(image)}],
             "given twice")):
        with daemon.client() as c:
            try:
                c.domain_define("vm9", str(workdir / "vm9.qmp"), disks=disks)
            except InvalidArgument as err:
                assert words in err.message, err.message
            else:
                raise AssertionError(f"accepted {disks}")
            assert all(d["name"] != "vm9" for d in c.domain_list())
