"""What a snapshot is: the records the snapshot service keeps and the other
services read (exports, copies, checkpoints), and the answer of snapshot.lookup.

A snapshot holds, per disk, the QEMU nodes made for it (:class:`SnapshotDisk`:
scratch, copy-before-write filter, view, probe window and sink) and the
bitmaps that bound its changes; :class:`Instant` is what the checkpoint
service does to bitmaps at a snapshot's instant.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import NoSuchDisk
from ..model import Disk, SnapshotDiskView, SnapshotState, SnapshotView
from . import scratch
from .domains import Domain
from .leases import Lease
from .undo import Undo


@dataclass(frozen=True)
class SnapshotSettings:
    scratch_dirs: list[Path]
    cbw_timeout: int
    probe_interval: float
    probe_timeout: float


@dataclass
class SnapshotDisk:
    """One disk of a snapshot and the QEMU nodes made for it."""

    disk: Disk
    #: The node the filter sits on: the disk's node, or the filter of an
    #: older snapshot of the same disk (filters stack, newest on top).
    source: str
    scratch: Path
    scratch_node: str
    filter_node: str
    view_node: str
    probe_window: str
    probe_sink: str
    #: The checkpoint whose segment was recording on this disk at the instant
    #: (the snapshot's own, with checkpoint=true), and the bitmap on the disk
    #: node holding what that segment had recorded up to the instant (None:
    #: nothing). Changes from checkpoint X to this snapshot are the segments
    #: from X up to ``boundary`` (excluded) plus ``tail``.
    boundary: str | None = None
    tail: str | None = None
    #: The store's record of the scratch file, kept while the file exists, so
    #: that a daemon killed at any moment removes it on the next connect.
    record: int | None = None
    #: For an encrypted disk: the QEMU secret object holding the scratch's
    #: random LUKS key (the key lives only there and in the daemon's memory).
    secret: str | None = None

    def nodes(self) -> list[str]:
        """Our nodes, in the order they can be deleted."""
        return [self.probe_sink, self.probe_window, self.view_node, self.filter_node,
                self.scratch_node]


@dataclass
class Snapshot:
    domain: str
    name: str
    created: float
    held_io_window: float
    disks: list[SnapshotDisk]
    state: SnapshotState = SnapshotState.ACTIVE
    broken_reason: str | None = None
    #: Disks whose device the VM manager unplugged while the snapshot lived:
    #: disk -> why its view is gone.
    removed: dict[str, str] = field(default_factory=dict)
    #: Seconds the guest's filesystems stayed frozen for the instant (None:
    #: not quiesced).
    frozen_window: float | None = None
    #: How many filesystems the guest agent froze for it.
    frozen_filesystems: int = 0
    #: Taken of a stopped domain's images, in the daemon's storage process:
    #: it lives as long as the connection that made it (see the offline service).
    offline: bool = False
    #: Deleted unless renewed in time (see the lease module); None: lives until deleted.
    lease: Lease | None = None

    @property
    def quiesced(self) -> bool:
        return self.frozen_window is not None

    def disk(self, name: str) -> SnapshotDisk:
        for d in self.disks:
            if d.disk.name == name:
                return d
        if name in self.removed:
            raise NoSuchDisk(f"snapshot {self.name!r} no longer has disk {name!r}: "
                             f"{self.removed[name]}")
        raise NoSuchDisk(f"snapshot {self.name!r} has no disk {name!r}")

    def view(self) -> SnapshotView:
        return SnapshotView(
            name=self.name, created=int(self.created), state=self.state,
            held_io_window=self.held_io_window, frozen_window=self.frozen_window,
            disks=tuple(SnapshotDiskView(d.disk.name, str(d.scratch)) for d in self.disks))


@dataclass
class DomainSnapshots:
    """One domain's snapshots and the filters they left behind."""

    snapshots: dict[str, Snapshot] = field(default_factory=dict)
    #: Deleted snapshots whose filter still sits under a newer snapshot's
    #: filter: a filter cannot leave the middle of a stack (QEMU cannot
    #: reopen copy-before-write onto another child), so it goes, with its
    #: scratch image, as soon as nothing newer sits on it.
    retired: list[SnapshotDisk] = field(default_factory=list)


BeforeDelete = Callable[[Domain, Snapshot], Awaitable[None]]
BeforePartDelete = Callable[[Domain, Snapshot, str], Awaitable[None]]


@dataclass
class Instant:
    """What happens to bitmaps at a snapshot's instant (see the checkpoint service).

    ``actions`` and ``after`` run in one ``transaction`` inside the held-I/O
    window. A switch that holds no I/O (one disk: see
    :meth:`SnapshotService._switch`) runs ``actions`` (bitmaps that start
    recording) before the move and ``after`` (segments that stop recording,
    frozen copies) after it: a write between them is counted on both sides
    of the instant, never on neither. ``bounds`` gives each disk's
    (boundary, tail); ``undo`` reverts the actions judging by what QEMU
    shows (safe whether or not they ran); ``commit`` records the result once
    the snapshot is complete; ``abort`` forgets it; ``keep`` marks it for
    the next connect to revert, when ``undo`` could not.
    """

    actions: list[dict[str, Any]]
    bounds: dict[str, tuple[str | None, str | None]]
    undo: Callable[[], Awaitable[None]]
    commit: Callable[[], Awaitable[None]]
    abort: Callable[[], None]
    keep: Callable[[], None]
    #: Removes what the hook made outside QEMU (RBD snapshots) if the snapshot fails.
    release: Callable[[], Awaitable[None]] | None = None
    after: list[dict[str, Any]] = field(default_factory=list)

    def everything(self) -> list[dict[str, Any]]:
        """The actions of one held transaction."""
        return self.actions + self.after


#: Adds one layer of a snapshot's nodes, pushing each node's removal onto the Undo.
Layer = Callable[[Undo], Awaitable[None]]

#: (domain, snapshot name, its parts, checkpoint?, every disk as read for this snapshot)
InstantHook = Callable[[Domain, str, list[SnapshotDisk], bool, list[Disk]], Awaitable[Instant]]


#: Kind of the store records that say a scratch file exists.
SCRATCH_RECORD = "scratch"
#: Kind of the store records that say the daemon stopped the guest's vCPUs.
HELD_IO_RECORD = "held-io"


def lookup_result(snapshot: Snapshot) -> dict[str, Any]:
    """The answer of snapshot.lookup."""
    result: dict[str, Any] = {
        "name": snapshot.name,
        "created": int(snapshot.created),
        "disks": [d.disk.name for d in snapshot.disks],
        "state": snapshot.state.value,
        "held_io_window": round(snapshot.held_io_window, 6),
        "quiesced": snapshot.quiesced,
        "scratch": [{"disk": d.disk.name, "file": str(d.scratch), "size": d.disk.size,
                     "allocated": scratch.allocated_bytes(d.scratch),
                     "encrypted": d.secret is not None} for d in snapshot.disks],
    }
    if snapshot.frozen_window is not None:
        result["frozen_window"] = round(snapshot.frozen_window, 6)
        result["frozen_filesystems"] = snapshot.frozen_filesystems
    if snapshot.broken_reason is not None:
        result["reason"] = snapshot.broken_reason
    if snapshot.removed:
        result["removed_disks"] = dict(snapshot.removed)
    if snapshot.lease is not None:
        result["lease"] = snapshot.lease.seconds
        result["expires"] = round(snapshot.lease.expires, 3)
    return result
