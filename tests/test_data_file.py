"""Persistent checkpoints for raw volumes: ``bbctl disk enable-tracking``
makes a qcow2 metadata image whose raw data file is the volume itself; a VM
run on it keeps its checkpoints across QEMU restarts, and the volume stays
raw, byte for byte what the guest wrote.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import domain_state, wait_for
from tests.vm_manager.manager import assert_restore_equals, backup, disk_level
from tools.daemon import Daemon
from tools.vm import MiB, Vm
from tools.vm_configs import DataFileVm


def bbctl_offline(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blockbackup_client.bbctl", *args],
                          capture_output=True, text=True)


def digest(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.mark.parametrize("on", ["file", "block-device"])
def test_a_raw_volume_run_through_its_metadata_image_keeps_checkpoints_across_restarts(
        make_vm: Callable[..., Vm], daemon: Daemon, workdir: Path,
        request: pytest.FixtureRequest, on: str) -> None:
    if on == "block-device":
        volume = request.getfixturevalue("loop_device")
    else:
        volume = workdir / "volume.raw"
        with open(volume, "wb") as f:
            f.truncate(32 * MiB)
    # Data the volume already holds, which enabling tracking must not touch.
    subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x21 0 2M", str(volume)],
                   check=True, capture_output=True)
    before = digest(volume)
    meta = workdir / "sda-meta.qcow2"
    r = bbctl_offline("--json", "disk", "enable-tracking", str(volume), "--output", str(meta))
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    assert made["data_file"] == str(volume) and made["size"] == 32 * MiB
    assert "<dataStore type=" in made["libvirt"]
    assert digest(volume) == before
    assert list(workdir.glob("*.data-tmp")) == []

    vm = make_vm(kind=DataFileVm, volumes={"sda": volume}, metas={"sda": meta})
    # While QEMU holds the volume, a second metadata image is refused.
    again = bbctl_offline("disk", "enable-tracking", str(volume), "--output",
                          str(workdir / "other.qcow2"))
    assert again.returncode == 1 and "lock" in again.stderr
    assert not (workdir / "other.qcow2").exists()
    with daemon.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    dest = workdir / "backups"
    assert disk_level(backup(daemon, dest), "sda") == "full"
    vm.write("sda", 5 * MiB, 64 * 1024, 0x22)
    second = backup(daemon, dest, "--level", "auto")
    assert disk_level(second, "sda") == "inc" and second["disks"]["sda"]["bytes_read"] == 64 * 1024

    # QEMU restarts: the checkpoint is in the metadata image, still exact.
    vm.stop()
    vm.start()
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    vm.write("sda", 9 * MiB, 128 * 1024, 0x23)
    third = backup(daemon, dest, "--level", "auto")
    assert disk_level(third, "sda") == "inc", third["stderr"]
    assert third["disks"]["sda"]["bytes_read"] == 128 * 1024
    vm.qmp("stop")
    try:
        # The volume itself is the guest's disk, raw: the restore equals it.
        assert_restore_equals(daemon, dest, "sda", str(volume))
    finally:
        vm.qmp("cont")


def test_enable_tracking_refuses_what_it_must_not_touch(workdir: Path) -> None:
    qcow = workdir / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "1M"], check=True)
    r = bbctl_offline("disk", "enable-tracking", str(qcow), "--output", str(workdir / "m.qcow2"))
    assert r.returncode == 1 and "is qcow2, not raw" in r.stderr
    r = bbctl_offline("disk", "enable-tracking", str(workdir / "nope.raw"), "--output",
                      str(workdir / "m.qcow2"))
    assert r.returncode == 1 and "No such file" in r.stderr
    raw = workdir / "disk.raw"
    raw.write_bytes(b"\x01" * MiB)
    taken = workdir / "taken.qcow2"
    taken.write_bytes(b"mine")
    r = bbctl_offline("disk", "enable-tracking", str(raw), "--output", str(taken))
    assert r.returncode == 1 and "already exists" in r.stderr
    assert taken.read_bytes() == b"mine" and raw.read_bytes() == b"\x01" * MiB
    assert not (workdir / "m.qcow2").exists()
