"""Disks on Ceph RBD images (a real one-monitor, one-OSD cluster of the
test's own, tools/ceph.py), as libvirt and Proxmox VE start them: snapshots,
full backups and incrementals from checkpoints in QEMU's memory; after a
QEMU restart the next backup is a full that says why.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import bbctl, domain_state, wait_for
from tests.vm_manager.manager import backup, disk_level
from tools.ceph import Cluster
from tools.daemon import Daemon
from tools.vm import MiB, Vm
from tools.vm_configs import ProxmoxVm, RbdVm

pytest_plugins = ("tests.ceph_fixtures",)


def assert_restore_equals_image(daemon: Daemon, dest: Path, disk: str, uri: str) -> None:
    out = dest.parent / f"restored-{disk}.raw"
    r = bbctl(daemon, "restore", str(dest), "--disk", disk, "--output", str(out),
              "--format", "raw")
    assert r.returncode == 0, r.stderr
    cmp = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", str(out), uri],
                         capture_output=True, text=True)
    out.unlink()
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


@pytest.mark.parametrize("manager", ["libvirt", "proxmox"])
def test_rbd_disks_back_up_full_then_incremental_and_full_again_after_qemu_restarts(
        ceph_cluster: Cluster, ceph_image: Callable[[int], str], make_vm: Callable[..., Vm],
        daemon: Daemon, workdir: Path, manager: str) -> None:
    # (The image's fixture first: it is removed after the VM that holds it stops.)
    image = ceph_image(32 * MiB)
    uri = ceph_cluster.qemu_uri(image)
    if manager == "libvirt":
        vm = make_vm(kind=RbdVm, rbd={"sda": (image, str(ceph_cluster.conf))})
    else:
        vm = make_vm(kind=ProxmoxVm, fmt="raw", images={"sda": Path(uri)},
                     disks={"sda": 32 * MiB})
    with daemon.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    vm.write("sda", 0, MiB, 0x41)
    dest = workdir / "backups"
    assert disk_level(backup(daemon, dest), "sda") == "full"
    vm.write("sda", 6 * MiB, 128 * 1024, 0x42)
    second = backup(daemon, dest, "--level", "auto")
    assert disk_level(second, "sda") == "inc"
    assert second["disks"]["sda"]["bytes_read"] == 128 * 1024
    vm.qmp("stop")
    try:
        assert_restore_equals_image(daemon, dest, "sda", uri)
    finally:
        vm.qmp("cont")
    vm.stop()
    vm.start()
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    vm.write("sda", 9 * MiB, 64 * 1024, 0x43)
    third = backup(daemon, dest, "--level", "auto")
    assert disk_level(third, "sda") == "full"
    assert "memory of the QEMU process" in third["disks"]["sda"]["reason"]
    vm.qmp("stop")
    try:
        assert_restore_equals_image(daemon, dest, "sda", uri)
    finally:
        vm.qmp("cont")
    assert vm.running
    # Nothing of ours is left in the cluster.
    assert ceph_cluster.snapshots(image) == []
