"""The VM configurations the fault tests run on, and what this QEMU build
lets the daemon do with each.

* ``minimal``: the suite's own :class:`~tools.vm.Vm` (``-blockdev`` qcow2 on
  ``scsi-hd``, no I/O thread).
* ``proxmox``: :class:`~tools.vm_configs.ProxmoxVm`, qcow2: ``-drive``
  (``cache=none,aio=io_uring``), one ``virtio-scsi-pci`` per disk, each in
  an I/O thread.
* ``libvirt``: :class:`~tools.vm_configs.LibvirtVm`, qcow2:
  ``libvirt-N-storage``/``libvirt-N-format`` on ``virtio-blk-pci`` in an I/O
  thread, throttled on the device (``block_set_io_throttle``, <iotune>).
* ``proxmox-raw``: ProxmoxVm on raw images: a checkpoint lives in QEMU's
  memory (non-persistent bitmaps), as the daemon's restart keeps it.
* ``encrypted``: :class:`~tools.vm_configs.EncryptedVm`: a LUKS qcow2 disk
  (its snapshot's scratch is LUKS under a random key held in a QEMU secret
  object) beside a plain qcow2 one.

What differs by build is decided by the daemon's own verdicts
(:mod:`blockbackupd.qemu.iothreads`), asked here of the test's VM's binary:
for disks in I/O threads, whether ``export.start`` is refused (7.2: its NBD
server aborts when a client of such an export leaves; ``snapshot.copy``
reads them instead), and whether a snapshot's nodes are added inside the
held-I/O window (7.2: a node added above such a disk while its thread does
I/O can abort QEMU). The tests assert the daemon behaves as its verdict says.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from blockbackupd.qemu import iothreads
from tools.vm import Vm
from tools.vm_configs import EncryptedVm, LibvirtVm, ProxmoxVm


@dataclass(frozen=True)
class Config:
    id: str
    kind: type[Vm]
    #: The two disks' names (their devices' ids): the first is written most.
    disks: tuple[str, str]
    #: Whether each disk's device runs in an I/O thread.
    io_threads: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)

    def start(self, make_vm: Callable[..., Vm], **extra: Any) -> Vm:
        return make_vm(kind=self.kind, disks={d: 64 * 1024 * 1024 for d in self.disks},
                       **self.kwargs, **extra)


MINIMAL = Config("minimal", Vm, ("sda", "sdb"))
PROXMOX = Config("proxmox", ProxmoxVm, ("sda", "sdb"), io_threads=True)
LIBVIRT = Config("libvirt", LibvirtVm, ("vda", "vdb"), io_threads=True,
                 kwargs={"throttle": "device"})
PROXMOX_RAW = Config("proxmox-raw", ProxmoxVm, ("sda", "sdb"), io_threads=True,
                     kwargs={"fmt": "raw"})
#: sda encrypted, sdb plain: a snapshot makes one LUKS scratch (qemu-img
#: times its PBKDF for about a second, twice) and one plain in the same instant.
ENCRYPTED = Config("encrypted", EncryptedVm, ("sda", "sdb"), kwargs={"plain": ("sdb",)})

ALL = (MINIMAL, PROXMOX, LIBVIRT, PROXMOX_RAW, ENCRYPTED)
BY_ID = {c.id: c for c in ALL}


def params(cases: list[tuple[Config, Any]]) -> list[Any]:
    """pytest params of (config, case), with ids ``<config>-<case id>``."""
    return [pytest.param(config, case, id=f"{config.id}-{case_id(case)}")
            for config, case in cases]


def case_id(case: Any) -> str:
    return case if isinstance(case, str) else "-".join(str(x) for x in case)


def verdict(vm: Vm, check: str) -> iothreads.Verdict:
    """The daemon's verdict for this VM's QEMU binary (probed once per test
    process and binary, as the daemon does it)."""
    return asyncio.run(iothreads.verdict(vm.pid, check))


def exports_refused(config: Config, vm: Vm) -> str | None:
    """Why ``export.start`` must answer unsupported for the VM's disks on
    this build (None: it must export them)."""
    if not config.io_threads:
        return None
    found = verdict(vm, iothreads.NBD_CLIENTS)
    return None if found.safe else found.detail


def adds_held(config: Config, vm: Vm) -> bool:
    """Whether a snapshot's filters and views above the VM's disks are added
    inside the held-I/O window (the guest's vCPUs stopped) on this build."""
    return config.io_threads and not verdict(vm, iothreads.THROTTLE_GRAPH).safe


def format_nodes(vm: Vm) -> dict[str, str]:
    """disk -> the node that holds its checkpoints' bitmaps (the top of its
    I/O path before any snapshot: the format node, named by the manager or,
    for ``-drive``, by QEMU)."""
    return vm.top_nodes()
