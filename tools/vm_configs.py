"""VMs started the way VM managers start them, not the suite's minimal way.

* :class:`ProxmoxVm`: Proxmox VE 8's command line for "VirtIO SCSI single"
  with ``iothread=1``: one ``-drive`` per disk (``cache=none,aio=io_uring,
  detect-zeroes=on,discard=on``), one ``virtio-scsi-pci`` controller per
  disk, each with its own I/O thread; ``iothread=False`` is the same disk
  without ``iothread=1`` (its controller in QEMU's main loop). Raw or qcow2
  images.
* :class:`LibvirtVm`: libvirt's ``-blockdev`` pair per disk
  (``libvirt-N-storage`` / ``libvirt-N-format``) on ``virtio-blk-pci`` with
  ``<driver iothread='1'>``, throttled as ``<iotune>`` does it (libvirt
  9.0: ``block_set_io_throttle`` on the device once QEMU runs) or, with
  ``throttle="filter"``, as ``<throttlefilters>`` (libvirt 11.2+) does: a
  ``throttle`` filter node of a throttle group above the format node.

Disk names are the devices' qdev ids, as always. Guest writes go through
the device with qemu-io, as in :class:`~tools.vm.Vm`: HMP's qemu-io runs
them in QEMU's main thread. On QEMU 10.0 that is no stand-in for a guest on
an RBD disk in an I/O thread: librbd's completion wakes the request in the
disk's thread, racing the main thread (replayed without the daemon: QEMU
10.0.2 died within 15 snapshot cycles after such writes, 3 runs of 3 on a
loaded host; without the I/O thread 450 cycles survived). Tests of RBD disks
that write with qemu-io take ``iothread=False``; a Linux guest writes to RBD
in an I/O thread in tests/guest/test_io_thread_guest.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tools.vm import Vm


class ManagerVm(Vm):
    """The part both managers share: images of a chosen format."""

    def __init__(self, workdir: Path, name: str = "vm1", *, fmt: str = "qcow2",
                 images: dict[str, Path] | None = None, **kwargs: Any) -> None:
        super().__init__(workdir, name, **kwargs)
        self.fmt = fmt
        #: Disks on given paths (a block device, as an LVM LV or a zvol is).
        self.images = images or {}

    def image(self, disk: str) -> Path:
        return self.images.get(disk, self.workdir / f"{self.name}-{disk}.{self.fmt}")

    def create_images(self) -> None:
        for disk, size in self.disks.items():
            if disk not in self.images and not self.image(disk).exists():
                subprocess.run(["qemu-img", "create", "-q", "-f", self.fmt,
                                str(self.image(disk)), str(size)], check=True)

    def command_line(self) -> list[str]:
        args = self.common_args()
        for i, disk in enumerate(self.disks):
            args += self.disk_args(i, disk)
        return args + self.extra_args

    def disk_args(self, index: int, disk: str) -> list[str]:
        raise NotImplementedError


class ProxmoxVm(ManagerVm):
    def __init__(self, workdir: Path, name: str = "vm1", *, iothread: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(workdir, name, **kwargs)
        self.iothread = iothread

    def disk_args(self, index: int, disk: str) -> list[str]:
        controller = f"virtio-scsi-pci,id=virtioscsi{index}"
        if not self.iothread:
            head = ["-device", controller]
        else:
            head = ["-object", f"iothread,id=iothread-virtioscsi{index}",
                    "-device", f"{controller},iothread=iothread-virtioscsi{index}"]
        return [
            *head,
            "-drive", f"file={self.image(disk)},if=none,id=drive-{disk},format={self.fmt},"
                      "cache=none,aio=io_uring,detect-zeroes=on,discard=on",
            "-device", f"scsi-hd,bus=virtioscsi{index}.0,channel=0,scsi-id=0,lun=0,"
                       f"drive=drive-{disk},id={disk}",
        ]


class RbdVm(ManagerVm):
    """Disks on Ceph RBD images, as libvirt 9.0 gives them: an ``rbd`` node
    (``libvirt-N-storage``) under a ``raw`` format node, on ``scsi-hd``.
    ``rbd`` maps disks to (image name, ceph.conf). (Proxmox's ``-drive
    file=rbd:POOL/IMAGE:conf=…`` is :class:`ProxmoxVm` with that URI as the
    disk's image.)"""

    def __init__(self, workdir: Path, name: str = "vm1", *, rbd: dict[str, tuple[str, str]],
                 **kwargs: Any) -> None:
        super().__init__(workdir, name, fmt="raw", disks={d: 0 for d in rbd}, **kwargs)
        self.rbd = rbd

    def image(self, disk: str) -> Path:
        return Path(f"rbd:rbd/{self.rbd[disk][0]}:conf={self.rbd[disk][1]}")

    def create_images(self) -> None:
        pass  # the test made them in its cluster

    def disk_args(self, index: int, disk: str) -> list[str]:
        n = index + 1
        image, conf = self.rbd[disk]
        storage = {"driver": "rbd", "pool": "rbd", "image": image, "conf": conf,
                   "node-name": f"libvirt-{n}-storage", "cache": {"direct": True,
                                                              "no-flush": False},
                   "auto-read-only": True, "discard": "unmap"}
        fmt = {"node-name": f"libvirt-{n}-format", "read-only": False, "discard": "unmap",
               "cache": {"direct": True, "no-flush": False}, "driver": "raw",
               "file": f"libvirt-{n}-storage"}
        args = ["-blockdev", json.dumps(storage), "-blockdev", json.dumps(fmt)]
        if index == 0:
            args += ["-device", "virtio-scsi-pci,id=scsi0"]
        return args + ["-device", f"scsi-hd,bus=scsi0.0,drive=libvirt-{n}-format,id={disk}"]


class LibvirtVm(ManagerVm):
    #: Bytes per second of the throttling: high enough that the tests'
    #: writes are not slowed, present all the same.
    THROTTLE = 512 * 1024 * 1024

    def __init__(self, workdir: Path, name: str = "vm1", *, throttle: str = "device",
                 **kwargs: Any) -> None:
        super().__init__(workdir, name, **kwargs)
        self.throttle = throttle

    def disk_args(self, index: int, disk: str) -> list[str]:
        n = index + 1
        storage = {"driver": "file", "filename": str(self.image(disk)),
                   "node-name": f"libvirt-{n}-storage", "auto-read-only": True,
                   "discard": "unmap"}
        fmt = {"node-name": f"libvirt-{n}-format", "read-only": False,
               "discard": "unmap", "driver": self.fmt, "file": f"libvirt-{n}-storage"}
        args = ["-object", f"iothread,id=iothread{n}",
                "-blockdev", json.dumps(storage), "-blockdev", json.dumps(fmt)]
        top = f"libvirt-{n}-format"
        if self.throttle == "filter":
            top = f"libvirt-{n}-filter"
            args += ["-object", json.dumps({"qom-type": "throttle-group", "id": f"throttle-{n}",
                                            "limits": {"bps-total": self.THROTTLE}}),
                     "-blockdev", json.dumps({"driver": "throttle", "node-name": top,
                                              "throttle-group": f"throttle-{n}",
                                              "file": f"libvirt-{n}-format"})]
        return args + ["-device", f"virtio-blk-pci,iothread=iothread{n},drive={top},id={disk}"]

    def start(self, timeout: float = 30.0) -> LibvirtVm:
        super().start(timeout)
        if self.throttle == "device":
            for disk in self.disks:
                backend = f"/machine/peripheral/{disk}/virtio-backend"
                self.qmp("block_set_io_throttle", id=backend, bps=self.THROTTLE, bps_rd=0,
                         bps_wr=0, iops=0, iops_rd=0, iops_wr=0)
        return self

    def qemu_io(self, disk: str, command: str) -> str:
        # qemu-io reaches a virtio-blk disk through its backend's QOM path.
        return super().qemu_io(f"{disk}/virtio-backend", command)


class EncryptedVm(Vm):
    """qcow2 disks encrypted with LUKS (``encrypt.format=luks``), as libvirt's
    ``<encryption format='luks'>`` and OpenStack's encrypted volumes run them:
    QEMU decrypts with a secret object, so the guest sees plaintext. Disks
    named in ``plain`` are plain qcow2 beside them (an encrypted volume
    attached next to a plain system disk)."""

    PASSPHRASE = "blockbackupd-test-passphrase"

    def __init__(self, workdir: Path, name: str = "vm1", *, plain: tuple[str, ...] = (),
                 **kwargs: Any) -> None:
        super().__init__(workdir, name, **kwargs)
        self.plain = plain

    def create_images(self) -> None:
        for disk, size in self.disks.items():
            if disk in self.plain and not self.image(disk).exists():
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                                str(self.image(disk)), str(size)], check=True)
            elif not self.image(disk).exists():
                for _ in range(10):  # its PBKDF timing can fail on a loaded host
                    made = subprocess.run(
                        ["qemu-img", "create", "-q", "-f", "qcow2",
                         "--object", f"secret,id=sec0,data={self.PASSPHRASE}",
                         "-o", "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
                         str(self.image(disk)), str(size)], capture_output=True, text=True)
                    if "accurate CPU usage" not in made.stderr:
                        break
                if made.returncode != 0:
                    raise RuntimeError(f"qemu-img create {self.image(disk)}: {made.stderr}")

    def command_line(self) -> list[str]:
        args = self.common_args() + [
            "-object", f"secret,id=sec0,data={self.PASSPHRASE}",
            "-device", "virtio-scsi-pci,id=scsi0"]
        for disk in self.disks:
            luks = "" if disk in self.plain else ",encrypt.format=luks,encrypt.key-secret=sec0"
            args += ["-blockdev", f"driver=file,filename={self.image(disk)},node-name={disk}-file",
                     "-blockdev", f"driver=qcow2,file={disk}-file,node-name={disk}-fmt{luks}",
                     "-device", f"scsi-hd,drive={disk}-fmt,id={disk}"]
        return args + self.extra_args


class DataFileVm(Vm):
    """Raw volumes run through qcow2 metadata images (``data-file``, made by
    ``bbctl disk enable-tracking``), as the command line it prints says."""

    def __init__(self, workdir: Path, name: str = "vm1", *, volumes: dict[str, Path],
                 metas: dict[str, Path], **kwargs: Any) -> None:
        super().__init__(workdir, name, disks={d: 0 for d in volumes}, **kwargs)
        self.volumes, self.metas = volumes, metas

    def image(self, disk: str) -> Path:
        return self.metas[disk]

    def create_images(self) -> None:
        pass  # the test made them

    def command_line(self) -> list[str]:
        args = self.common_args() + ["-device", "virtio-scsi-pci,id=scsi0"]
        for disk in self.disks:
            driver = "host_device" if str(self.volumes[disk]).startswith("/dev/") else "file"
            args += ["-blockdev", f"driver={driver},filename={self.volumes[disk]},"
                                  f"node-name={disk}-data",
                     "-blockdev", f"driver=file,filename={self.metas[disk]},"
                                  f"node-name={disk}-meta",
                     "-blockdev", f"driver=qcow2,file={disk}-meta,data-file={disk}-data,"
                                  f"node-name={disk}-fmt",
                     "-device", f"scsi-hd,drive={disk}-fmt,id={disk}"]
        return args + self.extra_args
