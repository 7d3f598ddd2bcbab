"""The Ceph harness (tools/ceph.py) itself: a real cluster takes images that
qemu-img, qemu-io and QEMU read and write through librbd, snapshots and diffs
them as Ceph does, and leaves no process or file behind when stopped.

The QEMU tests start the build BB_QEMU selects with an RBD disk both ways VM
managers attach one: Proxmox VE 8's ``-drive file=rbd:...`` and libvirt's
``-blockdev`` rbd node under a raw node.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tools.ceph import CephError, Cluster
from tools.vm import MiB, Vm

# The fixtures ceph_cluster and ceph_image.
pytest_plugins = ("tests.ceph_fixtures",)

KiB = 1024


def gone(pid: int) -> bool:
    """The process has exited (a zombie has: the daemons are not our children)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def qemu_io(uri: str, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    proc = subprocess.run([*args, uri], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "failed" not in proc.stdout, proc.stdout + proc.stderr
    return proc.stdout


def export(cluster: Cluster, image: str, path: Path) -> bytes:
    """The image's bytes as Ceph has them (rbd export: librbd, not QEMU)."""
    cluster.run("rbd", "export", "--no-progress", f"rbd/{image}", str(path))
    return path.read_bytes()


def test_image_written_by_qemu_reads_back_exactly(ceph_cluster: Cluster,
                                                   ceph_image: Callable[[int], str],
                                                   workdir: Path) -> None:
    image = ceph_image(8 * MiB)
    uri = ceph_cluster.qemu_uri(image)
    assert uri == f"rbd:rbd/{image}:conf={ceph_cluster.conf}"
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", uri],
                                     capture_output=True, text=True, check=True).stdout)
    assert info["virtual-size"] == 8 * MiB

    # qemu-img writes random data from a file over the whole image...
    data = bytearray(os.urandom(8 * MiB))
    src = workdir / "src.raw"
    src.write_bytes(data)
    subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri],
                   check=True, timeout=60)
    # ...qemu-io overwrites parts of it, across an object boundary (4 MiB) too.
    qemu_io(uri, "write -P 0xab 4032k 128k", "write -z 7M 64k")
    data[4032 * KiB:4160 * KiB] = b"\xab" * (128 * KiB)
    data[7 * MiB:7 * MiB + 64 * KiB] = bytes(64 * KiB)

    assert export(ceph_cluster, image, workdir / "export.raw") == data
    back = workdir / "back.raw"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(back)],
                   check=True, timeout=60)
    assert back.read_bytes() == data
    qemu_io(uri, "read -P 0xab 4032k 128k")


def test_snapshot_diff_lists_exactly_the_writes(ceph_cluster: Cluster,
                                                ceph_image: Callable[[int], str]) -> None:
    image = ceph_image(16 * MiB)
    uri = ceph_cluster.qemu_uri(image)
    # The first two objects (4 MiB each) whole: a later write that grew an
    # object would also put the bytes between its old and new end in the diff.
    qemu_io(uri, "write -P 0x01 0 8M")
    assert ceph_cluster.snapshots(image) == []
    ceph_cluster.run("rbd", "snap", "create", f"rbd/{image}@s1")
    snaps = ceph_cluster.snapshots(image)
    assert [(s["name"], s["size"]) for s in snaps] == [("s1", 16 * MiB)]

    qemu_io(uri, "write -P 0x02 64k 4k", "write -P 0x03 4190208 8k", "write -P 0x04 12M 1M")
    diff = json.loads(ceph_cluster.run("rbd", "diff", "--from-snap", "s1", "--format", "json",
                                       f"rbd/{image}"))
    assert [(d["offset"], d["length"], d["exists"]) for d in diff] == [
        (64 * KiB, 4 * KiB, "true"),
        (4190208, 4 * KiB, "true"),      # the write across the first object boundary,
        (4 * MiB, 4 * KiB, "true"),      # in each object
        (12 * MiB, 1 * MiB, "true"),     # a new object
    ]
    # And from the image's creation: all that was ever written, by object.
    full = json.loads(ceph_cluster.run("rbd", "diff", "--format", "json", f"rbd/{image}"))
    assert [(d["offset"], d["length"]) for d in full] == [
        (0, 4 * MiB), (4 * MiB, 4 * MiB), (12 * MiB, 1 * MiB)]


def test_stop_ends_the_daemons_and_removes_the_folder(tmp_path: Path) -> None:
    with Cluster(parent=tmp_path) as cluster:
        folder = cluster.conf.parent
        assert folder.parent == tmp_path
        pids = dict(cluster.pids)
        assert set(pids) == {"mon.a", "osd.0"}
        assert not any(gone(p) for p in pids.values())
        assert cluster.start_seconds is not None and cluster.start_seconds < 30
        cluster.create_image("probe", 1 * MiB)
    assert all(gone(p) for p in pids.values()), pids
    assert not folder.exists()
    assert list(tmp_path.iterdir()) == []
    assert cluster.running() == {}
    cluster.stop()  # idempotent


def test_stop_after_a_failed_start(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cluster = Cluster(parent=tmp_path)

    def fail() -> None:
        raise CephError("injected: the OSD would not start")

    monkeypatch.setattr(cluster, "_start_osd", fail)  # after the monitor runs
    with pytest.raises(CephError, match="injected"):
        cluster.start()
    assert set(cluster.pids) == {"mon.a"}
    assert gone(cluster.pids["mon.a"])
    assert list(tmp_path.iterdir()) == []
    cluster.stop()


class RbdVm(Vm):
    """One RBD image on a virtio-scsi disk (qdev id ``disk``), attached with
    ``disk_args``, a manager's arguments; the image exists already."""

    def __init__(self, workdir: Path, disk: str, disk_args: list[str]) -> None:
        super().__init__(workdir, disks={disk: 0})
        self.disk_args = disk_args

    def create_images(self) -> None:
        pass

    def command_line(self) -> list[str]:
        return [*self.common_args(), *self.disk_args, *self.extra_args]


def proxmox_args(cluster: Cluster, image: str) -> tuple[str, list[str]]:
    """The disk's qdev id and its arguments."""
    # Proxmox VE 8 (qemu-server 8.x, print_drive_commandline_full) for a disk on
    # an RBD storage without krbd and without a cache option: cache=none,
    # which librbd maps to rbd_cache=false, and aio=io_uring (kept off only
    # for krbd with a host cache, LVM and CIFS); detect-zeroes=on without discard.
    return "scsi0", ["-device", "virtio-scsi-pci,id=scsihw0",
            "-drive", f"file={cluster.qemu_uri(image)},if=none,id=drive-scsi0,format=raw,"
                      "cache=none,aio=io_uring,detect-zeroes=on",
            "-device", "scsi-hd,bus=scsihw0.0,channel=0,scsi-id=0,lun=0,drive=drive-scsi0,"
                       "id=scsi0"]


def libvirt_args(cluster: Cluster, image: str) -> tuple[str, list[str]]:
    # libvirt 9.0's <disk type='network'><source protocol='rbd' name='rbd/IMAGE'>
    # with <config file=.../>, <driver cache='none' discard='unmap'>.
    cache = {"direct": True, "no-flush": False}
    storage = {**cluster.blockdev(image, "libvirt-1-storage"), "cache": cache,
               "auto-read-only": True, "discard": "unmap"}
    fmt = {"node-name": "libvirt-1-format", "read-only": False, "discard": "unmap",
           "cache": cache, "driver": "raw", "file": "libvirt-1-storage"}
    device = {"driver": "scsi-hd", "bus": "scsi0.0", "channel": 0, "scsi-id": 0, "lun": 0,
              "device_id": "drive-scsi0-0-0-0", "drive": "libvirt-1-format", "id": "scsi0-0-0-0",
              "write-cache": "on"}
    return "scsi0-0-0-0", ["-device", "virtio-scsi-pci,id=scsi0",
            "-blockdev", json.dumps(storage), "-blockdev", json.dumps(fmt),
            "-device", json.dumps(device)]


@pytest.mark.parametrize("manager", ["proxmox", "libvirt"])
def test_qemu_runs_an_rbd_disk(ceph_cluster: Cluster, ceph_image: Callable[[int], str],
                               workdir: Path, manager: str) -> None:
    image = ceph_image(8 * MiB)
    uri = ceph_cluster.qemu_uri(image)
    qemu_io(uri, "write -P 0x11 0 1M")
    name, args = (proxmox_args if manager == "proxmox" else libvirt_args)(ceph_cluster, image)
    vm = RbdVm(workdir, name, args)
    vm.start()
    try:
        assert vm.status() == "running"
        blocks: list[dict[str, Any]] = vm.qmp("query-block")
        disk = next(b for b in blocks if b.get("qdev", "").endswith(name) and "inserted" in b)
        inserted = disk["inserted"]
        assert inserted["drv"] == "raw"
        assert inserted["cache"]["direct"] is True
        assert inserted["image"]["virtual-size"] == 8 * MiB
        nodes = vm.qmp("query-named-block-nodes", flat=True)
        rbd = [n for n in nodes if n["drv"] == "rbd"]
        assert len(rbd) == 1, nodes
        assert image in rbd[0]["file"]
        if manager == "proxmox":
            assert disk["device"] == "drive-scsi0"
        else:
            assert inserted["node-name"] == "libvirt-1-format"
            assert rbd[0]["node-name"] == "libvirt-1-storage"

        # The guest's view: what qemu-io wrote before, then a write of its own.
        out = vm.qemu_io(name, "read -P 0x11 0 64k")
        assert "read 65536/65536" in out and "failed" not in out, out
        vm.write(name, 2 * MiB, 64 * KiB, 0x5A)
    finally:
        vm.stop()
    data = export(ceph_cluster, image, workdir / "export.raw")
    assert data[:1 * MiB] == b"\x11" * MiB
    assert data[2 * MiB:2 * MiB + 64 * KiB] == b"\x5a" * (64 * KiB)
    assert data[1 * MiB:2 * MiB] == bytes(MiB) and data[2 * MiB + 64 * KiB:] == bytes(
        6 * MiB - 64 * KiB)
