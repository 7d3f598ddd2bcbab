"""Plain value types shared by every layer (no I/O, no imports of other layers)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class DomainState(enum.StrEnum):
    """A domain's state as the contract names it."""

    RUNNING = "running"
    PAUSED = "paused"
    DISCONNECTED = "disconnected"


@dataclass(frozen=True)
class Image:
    """One image of a disk's backing chain: its format node, file and the
    bitmaps QEMU holds for it (name -> QEMU's description)."""

    node: str
    file: str
    format: str
    size: int
    read_only: bool
    bitmaps: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, compare=False)
    #: QEMU decrypts it (a LUKS-encrypted qcow2, or a ``luks`` node).
    encrypted: bool = False


@dataclass(frozen=True)
class Disk:
    """One guest disk as QEMU shows it right now.

    ``name`` is the qdev id, the disk's identity. ``node`` is the disk's own
    top node (below any filter a snapshot put in the device's I/O path); it
    changes across VM restarts and is never used as identity.
    """

    name: str
    qdev: str
    node: str
    file: str
    format: str
    size: int
    read_only: bool
    #: The node at the top of the device's I/O path now: ``node`` itself, or
    #: the newest snapshot filter stacked on it.
    top: str = ""
    #: The images from ``node`` down its backing files, top first.
    chain: tuple[Image, ...] = ()

    @property
    def encrypted(self) -> bool:
        """Whether the guest's data is encrypted at rest in any of its images:
        then no scratch of a snapshot of it may hold that data in the clear."""
        return any(image.encrypted for image in self.chain)

    @property
    def bitmaps(self) -> Mapping[str, Mapping[str, Any]]:
        """The bitmaps of the top image, the one that takes the guest's writes."""
        return self.chain[0].bitmaps if self.chain else {}

    def image_index(self, file: str) -> int | None:
        """Where an image file sits in the chain (0: the top), or None."""
        return next((i for i, image in enumerate(self.chain) if image.file == file), None)


class SnapshotState(enum.StrEnum):
    ACTIVE = "active"
    BROKEN = "broken"


@dataclass(frozen=True)
class SnapshotDiskSpec:
    """One ``<disk>`` of a ``<domainblocksnapshot>`` request."""

    name: str
    scratch: str | None = None


@dataclass(frozen=True)
class SnapshotSpec:
    """A parsed ``<domainblocksnapshot>``; ``disks`` None means every disk."""

    name: str | None
    disks: tuple[SnapshotDiskSpec, ...] | None
    #: ``<quiesce/>``: freeze the guest's filesystems around the instant.
    quiesce: bool = False


@dataclass(frozen=True)
class SnapshotDiskView:
    """What a snapshot document says of one disk."""

    name: str
    scratch: str


@dataclass(frozen=True)
class SnapshotView:
    """A snapshot as the ``<domainblocksnapshot>`` document shows it."""

    name: str
    created: int
    state: SnapshotState
    held_io_window: float
    disks: tuple[SnapshotDiskView, ...]
    #: Seconds the guest's filesystems were frozen (None: not quiesced).
    frozen_window: float | None = None


@dataclass(frozen=True)
class NbdAddress:
    """Where a domain's NBD server listens: a UNIX socket, or TCP (host, port, tls)."""

    transport: str  # "unix" or "tcp"
    socket: str | None = None
    host: str | None = None
    port: int | None = None
    tls: bool = False

    def as_result(self) -> dict[str, object]:
        if self.transport == "unix":
            return {"transport": "unix", "socket": self.socket}
        return {"transport": "tcp", "host": self.host, "port": self.port, "tls": self.tls}


@dataclass(frozen=True)
class ExportDiskSpec:
    """One ``<disk>`` of a ``<domainblockexport>``."""

    disk: str
    snapshot: str
    checkpoint: str | None = None
    exportname: str | None = None


@dataclass(frozen=True)
class ExportSpec:
    address: NbdAddress | None
    disks: tuple[ExportDiskSpec, ...]
