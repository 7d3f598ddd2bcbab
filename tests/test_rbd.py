"""Disks on Ceph RBD images (a real one-monitor, one-OSD cluster of the
test's own, tools/ceph.py), as libvirt and Proxmox VE start them: snapshots,
full backups and incrementals, from checkpoints the cluster keeps as RBD
snapshots, so they survive QEMU restarts and the daemon's lost state; none
of our RBD snapshots outlives its checkpoint.

The disks are written all over before the first backup: RBD's diff of an
object that did not exist at a snapshot counts from the object's start (a
superset, by design), while one of an object that did is exact, and these
tests count bytes.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from blockbackup_client import ConnectionLost
from tests.conftest import bbctl, domain_state, restore_raw_onto, snapshot_xml, wait_for
from tests.vm_manager.manager import backup, disk_level
from tools.ceph import Cluster
from tools.daemon import Daemon
from tools.vm import MiB, Vm
from tools.vm_configs import ProxmoxVm, RbdVm

pytest_plugins = ("tests.ceph_fixtures",)

SIZE = 32 * MiB


def assert_restore_equals_image(daemon: Daemon, vm: Vm, dest: Path, disk: str,
                                uri: str) -> None:
    out = dest.parent / f"restored-{disk}.raw"
    r = bbctl(daemon, "restore", str(dest), "--disk", disk, "--output", str(out),
              "--format", "raw")
    assert r.returncode == 0, r.stderr
    vm.qmp("stop")  # the guest's writes all in the cluster, none arriving
    try:
        cmp = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", str(out),
                              uri], capture_output=True, text=True)
    finally:
        vm.qmp("cont")
    out.unlink()
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def ours(cluster: Cluster, image: str) -> list[str]:
    return [s["name"] for s in cluster.snapshots(image) if s["name"].startswith("bb-")]


def start_vm(make_vm: Callable[..., Vm], cluster: Cluster, image: str, manager: str) -> Vm:
    if manager == "libvirt":
        return make_vm(kind=RbdVm, rbd={"sda": (image, str(cluster.conf))})
    # Proxmox's -drive file=rbd:POOL/IMAGE:conf=... without iothread=1: the
    # test's writes (HMP qemu-io) to an RBD disk in an I/O thread kill QEMU
    # 10.0 (tools/vm_configs.py); a Linux guest covers that disk.
    return make_vm(kind=ProxmoxVm, iothread=False, fmt="raw", disks={"sda": SIZE},
                   images={"sda": Path(cluster.qemu_uri(image))})


def connect(daemon: Daemon, vm: Vm) -> None:
    with daemon.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
    wait_for(lambda: domain_state(daemon, "vm1") == "running")


def first_full_backup(daemon: Daemon, vm: Vm, dest: Path, pattern: int) -> dict[str, str]:
    """The guest writes the whole disk (see the module's docstring), bbctl takes
    the first backup, a full one; returns its checkpoint's ``tracking``."""
    vm.write("sda", 0, SIZE, pattern)
    first = backup(daemon, dest)
    assert disk_level(first, "sda") == "full"
    with daemon.client() as c:
        (cp1,) = c.call("checkpoint.list", domain="vm1")
        return dict(c.call("checkpoint.lookup", domain="vm1", name=cp1)["tracking"])


def restart(vm: Vm, daemon: Daemon) -> None:
    vm.stop()
    vm.start()
    wait_for(lambda: domain_state(daemon, "vm1") == "running")


@pytest.mark.parametrize("manager", ["libvirt", "proxmox"])
def test_rbd_checkpoints_are_kept_by_the_cluster_across_qemu_restarts(
        ceph_cluster: Cluster, ceph_image: Callable[[int], str], make_vm: Callable[..., Vm],
        daemon: Daemon, workdir: Path, manager: str) -> None:
    # (The image's fixture first: it is removed after the VM that holds it stops.)
    image = ceph_image(SIZE)
    uri = ceph_cluster.qemu_uri(image)
    vm = start_vm(make_vm, ceph_cluster, image, manager)
    connect(daemon, vm)
    dest = workdir / "backups"
    assert first_full_backup(daemon, vm, dest, 0x41) == {"sda": "cluster"}
    # One RBD snapshot just before the instant, one just after.
    assert sorted(n.split("-")[1] for n in ours(ceph_cluster, image)) == ["cp", "end"]

    vm.write("sda", 6 * MiB, 128 * 1024, 0x42)
    second = backup(daemon, dest, "--level", "auto")
    assert disk_level(second, "sda") == "inc"
    assert second["disks"]["sda"]["bytes_read"] == 128 * 1024
    assert_restore_equals_image(daemon, vm, dest, "sda", uri)

    # QEMU restarts (the bitmaps in its memory are gone); the guest writes
    # before and after the daemon sees it again.
    vm.write("sda", 9 * MiB, 64 * 1024, 0x43)
    restart(vm, daemon)
    vm.write("sda", 20 * MiB, 64 * 1024, 0x44)
    with daemon.client() as c:
        cp2 = c.call("checkpoint.list", domain="vm1")[-1]
        found = c.call("checkpoint.changes", domain="vm1", disk="sda", name=cp2)
        assert found["extents"] == [[9 * MiB, 64 * 1024], [20 * MiB, 64 * 1024]]
        assert c.call("checkpoint.lookup", domain="vm1", name=cp2)["state"] == "valid"
    third = backup(daemon, dest, "--level", "auto")
    assert disk_level(third, "sda") == "inc", third["disks"]["sda"].get("reason")
    assert third["disks"]["sda"]["bytes_read"] == 128 * 1024
    assert_restore_equals_image(daemon, vm, dest, "sda", uri)

    # Deleting the checkpoints takes their RBD snapshots with them.
    with daemon.client() as c:
        for name in c.call("checkpoint.list", domain="vm1"):
            c.call("checkpoint.delete", domain="vm1", name=name)
    assert ours(ceph_cluster, image) == []
    assert vm.running


def test_rbd_checkpoints_come_back_after_the_daemon_lost_its_state_and_qemu_restarted(
        ceph_cluster: Cluster, ceph_image: Callable[[int], str], make_vm: Callable[..., Vm],
        daemon: Daemon, workdir: Path) -> None:
    image = ceph_image(SIZE)
    uri = ceph_cluster.qemu_uri(image)
    vm = start_vm(make_vm, ceph_cluster, image, "libvirt")
    connect(daemon, vm)
    vm.write("sda", 0, SIZE, 0x51)
    dest = workdir / "backups"
    backup(daemon, dest)
    vm.write("sda", 3 * MiB, 64 * 1024, 0x52)
    backup(daemon, dest, "--level", "auto")
    with daemon.client() as c:
        before = {n: c.call("checkpoint.lookup", domain="vm1", name=n)["created"]
                  for n in c.call("checkpoint.list", domain="vm1")}
    vm.write("sda", 12 * MiB, 128 * 1024, 0x53)
    assert daemon.stop() == 0
    shutil.rmtree(daemon.daemon_keys["state_dir"])
    vm.stop()
    vm.start()
    daemon.start()
    connect(daemon, vm)
    vm.write("sda", 30 * MiB, 64 * 1024, 0x54)
    with daemon.client() as c:
        after = {n: c.call("checkpoint.lookup", domain="vm1", name=n)["created"]
                 for n in c.call("checkpoint.list", domain="vm1")}
        assert after == before
        newest = list(after)[-1]
        found = c.call("checkpoint.changes", domain="vm1", disk="sda", name=newest)
        assert found["extents"] == [[12 * MiB, 128 * 1024], [30 * MiB, 64 * 1024]]
    third = backup(daemon, dest, "--level", "auto")
    assert disk_level(third, "sda") == "inc", third["disks"]["sda"].get("reason")
    assert third["disks"]["sda"]["bytes_read"] == 192 * 1024
    assert_restore_equals_image(daemon, vm, dest, "sda", uri)


def test_a_failed_snapshot_leaves_no_rbd_snapshot(
        ceph_cluster: Cluster, ceph_image: Callable[[int], str], make_vm: Callable[..., Vm],
        daemon: Daemon) -> None:
    image = ceph_image(SIZE)
    vm = start_vm(make_vm, ceph_cluster, image, "proxmox")
    assert daemon.stop() == 0
    daemon.env = {"BLOCKBACKUPD_FAIL_AT": "snapshot:view-added"}
    daemon.start()
    connect(daemon, vm)
    with daemon.client() as c:
        with pytest.raises(Exception, match="snapshot:view-added"):
            c.snapshot_create("vm1", snapshot_xml("s1"), checkpoint=True)
        assert c.call("checkpoint.list", domain="vm1") == []
    assert ours(ceph_cluster, image) == []
    assert vm.running


@pytest.mark.parametrize("step", ["checkpoint-create:cluster-kept", "checkpoint-create:stored",
                                  "checkpoint-delete:before-store"])
def test_a_daemon_killed_mid_checkpoint_leaves_the_cluster_matching_its_checkpoints(
        ceph_cluster: Cluster, ceph_image: Callable[[int], str], make_vm: Callable[..., Vm],
        daemon: Daemon, step: str) -> None:
    image = ceph_image(SIZE)
    vm = start_vm(make_vm, ceph_cluster, image, "libvirt")
    vm.write("sda", 0, SIZE, 0x61)
    connect(daemon, vm)
    deleting = step.startswith("checkpoint-delete")
    if deleting:
        with daemon.client() as c:
            c.snapshot_create("vm1", snapshot_xml("cp1"), checkpoint=True)
            c.snapshot_delete("vm1", "cp1")
    assert daemon.stop() == 0
    daemon.env = {"BLOCKBACKUPD_CRASH_AT": step}
    daemon.start()
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    with daemon.client() as c, pytest.raises(ConnectionLost):
        if deleting:
            c.call("checkpoint.delete", domain="vm1", name="cp1")
        else:
            c.snapshot_create("vm1", snapshot_xml("cp1"), checkpoint=True)
    assert daemon.proc is not None and daemon.proc.wait(10) == -signal.SIGKILL
    daemon.proc = None
    daemon.env = {}
    daemon.start()
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    with daemon.client() as c:
        listed = c.call("checkpoint.list", domain="vm1")
    kept = sorted(n.split("-")[1] for n in ours(ceph_cluster, image))
    if step == "checkpoint-create:stored":
        # Finished by the restart: its first RBD snapshot is there, the one
        # after the instant never was (a rebuild then reads up to now).
        assert listed == ["cp1"] and kept == ["cp"]
        vm.write("sda", 5 * MiB, 64 * 1024, 0x62)
        restart(vm, daemon)
        vm.write("sda", 7 * MiB, 64 * 1024, 0x63)
        with daemon.client() as c:
            found = c.call("checkpoint.changes", domain="vm1", disk="sda", name="cp1")
        assert found["extents"] == [[5 * MiB, 64 * 1024], [7 * MiB, 64 * 1024]]
    else:
        assert listed == [] and kept == []
    assert vm.running



def test_rbd_checkpoints_stay_in_memory_where_the_cluster_is_out_of_reach(
        ceph_cluster: Cluster, ceph_image: Callable[[int], str], make_vm: Callable[..., Vm],
        daemon: Daemon, workdir: Path) -> None:
    """QEMU reaches the cluster, the daemon cannot (here: the ``conf`` QEMU
    opened the image with is gone; on hosts, a keyring the daemon cannot
    read or libvirt's ``key-secret``): the checkpoints are kept in QEMU's
    memory, said so (``tracking: memory``), incrementals exact while that
    QEMU runs; after a QEMU restart the checkpoint is broken with the reason
    and ``auto`` takes a full backup saying why. No RBD snapshot of ours."""
    image = ceph_image(SIZE)
    uri = ceph_cluster.qemu_uri(image)
    conf = workdir / "qemu-only.conf"
    shutil.copy(ceph_cluster.conf, conf)
    vm = make_vm(kind=RbdVm, rbd={"sda": (image, str(conf))})
    connect(daemon, vm)
    conf.rename(workdir / "away.conf")  # QEMU holds its connection; the daemon has none
    dest = workdir / "backups"
    assert first_full_backup(daemon, vm, dest, 0x71) == {"sda": "memory"}
    assert ours(ceph_cluster, image) == []
    assert "RBD image" in daemon.log()  # the failed cluster call, logged

    vm.write("sda", 5 * MiB, 128 * 1024, 0x72)
    second = backup(daemon, dest, "--level", "auto")
    assert disk_level(second, "sda") == "inc", second["disks"]["sda"].get("reason")
    assert second["disks"]["sda"]["bytes_read"] == 128 * 1024
    assert_restore_equals_image(daemon, vm, dest, "sda", uri)

    vm.stop()
    (workdir / "away.conf").rename(conf)  # QEMU needs it to start again
    vm.start()
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    vm.write("sda", 9 * MiB, 64 * 1024, 0x73)
    with daemon.client() as c:
        cp2 = c.call("checkpoint.list", domain="vm1")[-1]
        looked = c.call("checkpoint.lookup", domain="vm1", name=cp2)
        assert looked["state"] == "broken", looked
        print("broken:", looked.get("broken_disks"))
    third = backup(daemon, dest, "--level", "auto")
    assert disk_level(third, "sda") == "full"
    reason = third["disks"]["sda"]["reason"]
    print("reason:", reason)
    assert "tracked in the memory of the QEMU process, and that process has ended" in reason
    assert_restore_equals_image(daemon, vm, dest, "sda", uri)
    assert vm.running


def test_a_backup_restores_into_a_new_rbd_image(
        defined: tuple[Daemon, Vm], ceph_cluster: Cluster, workdir: Path) -> None:
    """bbctl restore --output rbd:POOL/IMAGE: qemu-img creates the RBD image
    and writes the point into it, raw."""
    daemon, vm = defined
    dest = workdir / "backups"
    vm.write("sda", 0, MiB, 0x61)
    vm.write("sda", 40 * MiB, 192 * 1024, 0x62)
    point = backup(daemon, dest)["id"]
    name = "restored-sda"
    uri = ceph_cluster.qemu_uri(name)
    try:
        restore_raw_onto(daemon, dest, point, uri)
    finally:
        if name in ceph_cluster.images():
            ceph_cluster.remove_image(name)
