"""Raw disks, as Proxmox VE's default storages give them (a raw file, a block
device as an LVM LV or a ZFS zvol is): full backups, and incrementals from
checkpoints that live in QEMU's memory (no image keeps a bitmap), broken with
the reason when that QEMU process is gone, so the next backup is a full that
says why, never a short incremental.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import domain_state, wait_for
from tests.vm_manager.manager import assert_restore_equals_live, backup, disk_level
from tools.daemon import Daemon
from tools.vm import MiB, Vm
from tools.vm_configs import ProxmoxVm


def connect(daemon: Daemon, vm: Vm) -> None:
    with daemon.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
    wait_for(lambda: domain_state(daemon, "vm1") == "running", what="vm1 running")


@pytest.mark.parametrize("on", ["file", "block-device"])
def test_raw_disks_back_up_full_then_incremental_then_full_after_qemu_restarts(
        make_vm: Callable[..., Vm], daemon: Daemon, workdir: Path, request: pytest.FixtureRequest,
        on: str) -> None:
    images = {"sdb": request.getfixturevalue("loop_device")} if on == "block-device" else {}
    vm = make_vm(kind=ProxmoxVm, fmt="raw", images=images,
                 disks={"sda": 32 * MiB, "sdb": 32 * MiB})
    connect(daemon, vm)
    vm.write("sda", 0, MiB, 0x11)
    vm.write("sdb", 3 * MiB, 256 * 1024, 0x12)
    dest = workdir / "backups"
    first = backup(daemon, dest)
    assert [disk_level(first, d) for d in ("sda", "sdb")] == ["full", "full"]
    vm.write("sda", 7 * MiB, 128 * 1024, 0x13)
    second = backup(daemon, dest, "--level", "auto")
    assert [disk_level(second, d) for d in ("sda", "sdb")] == ["inc", "inc"]
    assert second["disks"]["sda"]["bytes_read"] == 128 * 1024
    assert second["disks"]["sdb"]["bytes_read"] == 0
    for d in ("sda", "sdb"):
        assert_restore_equals_live(daemon, vm, dest, d)
    with daemon.client() as c:
        cp = c.call("checkpoint.lookup", domain="vm1", name=second["checkpoint"])
        assert cp["state"] == "valid"

    # The daemon restarting changes nothing: QEMU still holds the bitmaps.
    assert daemon.stop() == 0
    daemon.start()
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    vm.write("sdb", 9 * MiB, 64 * 1024, 0x14)
    third = backup(daemon, dest, "--level", "auto")
    assert [disk_level(third, d) for d in ("sda", "sdb")] == ["inc", "inc"]
    assert third["disks"]["sdb"]["bytes_read"] == 64 * 1024

    # QEMU restarting ends them: what the guest wrote meanwhile is unknown.
    vm.stop()
    vm.start()
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    vm.write("sda", 11 * MiB, 64 * 1024, 0x15)
    with daemon.client() as c:
        cp = c.call("checkpoint.lookup", domain="vm1", name=third["checkpoint"])
    assert cp["state"] == "broken"
    assert "memory of the QEMU process" in cp["reason"]
    fourth = backup(daemon, dest, "--level", "auto")
    assert [disk_level(fourth, d) for d in ("sda", "sdb")] == ["full", "full"]
    assert "memory of the QEMU process" in fourth["disks"]["sda"]["reason"]
    for d in ("sda", "sdb"):
        assert_restore_equals_live(daemon, vm, dest, d)
    # And the chain goes on from the new full.
    vm.write("sda", 13 * MiB, 64 * 1024, 0x16)
    fifth = backup(daemon, dest, "--level", "auto")
    assert [disk_level(fifth, d) for d in ("sda", "sdb")] == ["inc", "inc"]
    assert fifth["disks"]["sda"]["bytes_read"] == 64 * 1024
    assert_restore_equals_live(daemon, vm, dest, "sda")
