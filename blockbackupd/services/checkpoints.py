"""Checkpoints: persistent, exact change tracking between points in time.

Per disk, each checkpoint owns one persistent bitmap in the qcow2 image,
its *segment*: it records from the checkpoint's instant until the next
checkpoint's, then is disabled. Exactly one segment per disk records at any
time, so a guest write costs the same whatever the number of checkpoints.
Changes since checkpoint X = the union of X's segment and every later one.
Deleting X merges its segment into its predecessor on that disk (or drops it
when X is the oldest), so every other change set stays exact.

A snapshot keeps, per disk, the checkpoint whose segment was recording at
its instant (its *boundary*) and a frozen copy of that segment (its *tail*),
so "changes from X to snapshot S" is exact for any older X named later.

Every change is ordered so a crash at any point is recoverable: an intent is
recorded in the store before the QMP transaction, and the checkpoint rows
replace it after; on the next connect an intent is finished or forgotten by
what QEMU shows. On every connect, and before every operation that serves
or extends a change set, each segment is checked against the disk's chain as
it is now (:mod:`.segments`: the VM manager stacks and removes images
without telling); a checkpoint whose change set may be incomplete becomes
broken, never served short.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from .. import faults
from ..errors import (
    AlreadyExists,
    Busy,
    CheckpointBroken,
    InvalidArgument,
    NoSuchCheckpoint,
    NoSuchDisk,
    OperationFailed,
    Unsupported,
)
from ..model import Disk, Image
from ..names import PREFIX, check_name, checkpoint_bitmap, parse_checkpoint_bitmap
from ..qemu.blockops import Bitmaps, action, bitmap_ref
from ..qemu.graph import query_disks
from ..qemu.session import DomainSession, NoAnswer
from ..store import Store
from ..store.db import CheckpointDiskRecord, CheckpointRecord, IntentRecord
from .cluster import ClusterRecords, image_from
from .cluster import image as rbd_image
from .domains import MIGRATED_RUN_STATES, Domain, DomainService
from .events import EventBus
from .segments import PERSISTENT_FORMATS, Placement, bitmap_problem, in_memory, place, span
from .snapshot_types import Instant, Snapshot, SnapshotDisk
from .snapshots import SnapshotService
from .undo import every

log = logging.getLogger("blockbackupd.checkpoints")

#: Block jobs that move data between images without recording it in bitmaps.
_MOVING_JOBS = frozenset({"stream", "mirror"})

#: Kind of the store records of a deleted checkpoint's bitmap still in a
#: read-only backing image.
ORPHAN_RECORD = "orphan-bitmap"

BitmapReader = Callable[[Domain, int, list[dict[str, str]], int], Awaitable[list[list[int]]]]


@dataclass(frozen=True)
class Segment:
    """One checkpoint's bitmap on one disk, as the chain of that disk sees it."""

    checkpoint: CheckpointRecord
    record: CheckpointDiskRecord

    @property
    def name(self) -> str:
        return self.checkpoint.name


def chain(records: Sequence[CheckpointRecord], disk: str) -> list[Segment]:
    """The segments of one disk, oldest first."""
    out = []
    for cp in records:
        rec = cp.disk(disk)
        if rec is not None:
            out.append(Segment(cp, rec))
    return out


@dataclass(frozen=True)
class Verified:
    """The outcome of checking every segment against the graph as it is now:
    the disks, and where each valid segment lives (checkpoint, disk) -> placement.
    Every operation that serves or extends a change set starts from one."""

    disks: dict[str, Disk]
    placements: dict[tuple[str, str], Placement]

    def sources(self, checkpoint: str, disk: str) -> list[dict[str, str]]:
        """The bitmaps whose union is that segment.

        :raise CheckpointBroken: the segment is not whole (the check marked it).
        """
        placement = self.placements.get((checkpoint, disk))
        if placement is None:
            raise CheckpointBroken(f"checkpoint {checkpoint!r} cannot be trusted on disk "
                                   f"{disk!r}")
        return placement.sources()

    def bitmaps(self, node: str) -> Mapping[str, Any]:
        """The bitmaps of a node that is in some disk's chain (empty if none is)."""
        for disk in self.disks.values():
            for image in disk.chain:
                if image.node == node:
                    return image.bitmaps
        return {}


@dataclass(frozen=True)
class BitmapUsage:
    """The persistent bitmaps in a domain's images, as last read from QEMU.

    QEMU loads every persistent bitmap of an image into memory when it opens
    the image, one bit per granularity of the disk's size: about 2 MiB per
    bitmap of a 1 TiB disk at 64 KiB. ``memory`` adds that up for every
    image of every disk's chain.
    """

    bitmaps: int
    memory: int
    #: Unix time of the reading.
    checked: float

    def as_result(self) -> dict[str, Any]:
        return {"persistent_bitmaps": self.bitmaps, "bitmap_memory": self.memory,
                "checked": int(self.checked)}


def bitmap_usage(disks: Iterable[Disk]) -> BitmapUsage:
    """What the persistent bitmaps of these disks' images cost QEMU."""
    seen: set[str] = set()
    count = memory = 0
    for disk in disks:
        for image in disk.chain:
            if image.node in seen:
                continue
            seen.add(image.node)
            for desc in image.bitmaps.values():
                if desc.get("persistent"):
                    count += 1
                    bits = -(-image.size // max(int(desc.get("granularity", 65536)), 1))
                    memory += -(-bits // 64) * 8  # QEMU keeps them in 64-bit words
    return BitmapUsage(count, memory, time.time())


class CheckpointService:
    def __init__(self, domains: DomainService, snapshots: SnapshotService, events: EventBus,
                 store: Store, bitmap_memory_warning: int | None = None) -> None:
        self._domains = domains
        #: Warn when a domain's persistent bitmaps take more of QEMU's memory (bytes).
        self._memory_warning = bitmap_memory_warning
        self._usage: dict[str, BitmapUsage] = {}
        self._snapshots = snapshots
        self._events = events
        self._store = store
        #: Set by the export service: reads the union of bitmaps as extents.
        self.bitmap_reader: BitmapReader | None = None
        snapshots.instant_hook = self._prepare_instant
        domains.add_connect_hook(self.reconcile)
        domains.add_resume_hook(self._resumed)
        #: Domains whose QEMU did not own its disks at the last connect (an
        #: incoming migration): reconciled once the guest runs.
        self._unchecked: set[str] = set()
        domains.add_job_hook(self._job_completed)
        #: Per domain, the VM manager's jobs that moved data between a disk's
        #: images without recording it, since the last check.
        self._moved: dict[str, list[str]] = {}
        domains.checkpoints_of = self.names
        domains.disk_checkpoints = self._by_disk
        #: RBD snapshots that keep raw RBD disks' checkpoints across QEMU processes.
        self.cluster = ClusterRecords(store)
        #: Per domain, the disks as the last check read them.
        self._seen: dict[str, dict[str, Disk]] = {}

    # -- queries ----------------------------------------------------------------

    def records(self, domain: str) -> list[CheckpointRecord]:
        """:raise NoSuchDomain:"""
        self._domains.get(domain)
        return self._store.checkpoints(domain)

    def names(self, domain: str) -> list[str]:
        return [c.name for c in self.records(domain)]

    def _by_disk(self, domain: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for cp in self._store.checkpoints(domain):
            for d in cp.disks:
                out.setdefault(d.disk, []).append(cp.name)
        return out

    def usage(self, domain: str) -> BitmapUsage | None:
        """The domain's persistent bitmaps as last read (None: not read yet)."""
        return self._usage.get(domain)

    def warnings(self, domain: str) -> list[str]:
        """What an operator should act on about this domain's checkpoints."""
        usage = self._usage.get(domain)
        if usage is None or self._memory_warning is None or usage.memory <= self._memory_warning:
            return []
        return [f"{usage.bitmaps} persistent bitmaps take about {usage.memory / 2**20:.0f} MiB "
                f"of QEMU's memory (warning at {self._memory_warning / 2**20:.0f} MiB): "
                "delete the checkpoints no backup needs"]

    def _note_usage(self, domain: str, disks: Iterable[Disk]) -> None:
        usage = bitmap_usage(disks)
        before = self._usage.get(domain)
        self._usage[domain] = usage
        limit = self._memory_warning
        if limit is not None and usage.memory > limit and (before is None
                                                           or before.memory <= limit):
            log.warning("domain %s: %s", domain, self.warnings(domain)[0])

    def get(self, domain: str, name: str) -> CheckpointRecord:
        """:raise NoSuchDomain: :raise NoSuchCheckpoint:"""
        return self.with_parent(domain, name)[0]

    def with_parent(self, domain: str, name: str) -> tuple[CheckpointRecord, str | None]:
        """The checkpoint and the name of the one before it, from one read of the store.

        :raise NoSuchDomain: :raise NoSuchCheckpoint:
        """
        records = self.records(domain)
        for i, cp in enumerate(records):
            if cp.name == name:
                return cp, records[i - 1].name if i else None
        raise NoSuchCheckpoint(f"domain {domain!r} has no checkpoint {name!r}")

    def lookup(self, domain: str, name: str) -> dict[str, Any]:
        cp, parent = self.with_parent(domain, name)
        result: dict[str, Any] = {
            "name": cp.name, "created": int(cp.created), "parent": parent,
            "disks": [d.disk for d in cp.disks],
            "state": cp.state,
            # Added: where each disk's changes are kept (docs/hosts.md):
            # "image" (a qcow2 bitmap), "memory" (QEMU's, lost with the
            # process) or "cluster" (QEMU's, and RBD snapshots rebuild it).
            "tracking": {d.disk: self.cluster.tracking(domain, self._seen.get(domain, {}).get(
                d.disk), cp.name, d.bitmap) for d in cp.disks},
        }
        if cp.broken:
            result["reason"] = cp.broken
            # Per disk (added to the contract): a backup application takes an
            # incremental of the disks still valid and a full of the others.
            result["broken_disks"] = {d.disk: d.broken for d in cp.disks if d.broken}
        return result

    # -- the instant of a snapshot -------------------------------------------------

    async def _prepare_instant(self, domain: Domain, name: str, parts: list[SnapshotDisk],
                               checkpoint: bool, disks: list[Disk]) -> Instant:
        """Plan the bitmap actions of a snapshot's instant (see :class:`Instant`),
        checking the chains of ``disks``, as the snapshot read them.

        :raise AlreadyExists: a checkpoint, or a bitmap in an image, has that name.
        """
        records = self._store.checkpoints(domain.name)
        if checkpoint and any(c.name == name for c in records):
            raise AlreadyExists(f"domain {domain.name!r} already has a checkpoint {name!r}")
        created = time.time()
        bitmap = checkpoint_bitmap(name, created)
        verified = await self.verify(domain, disks)
        records = self._store.checkpoints(domain.name)
        # Split around the moves onto the filters for a switch that holds no
        # I/O (see Instant): what starts recording goes before, what stops
        # recording or freezes a copy after, so a change set only grows.
        actions: list[dict[str, Any]] = []
        after: list[dict[str, Any]] = []
        bounds: dict[str, tuple[str | None, str | None]] = {}
        added: list[tuple[str, str]] = []      # (node, bitmap) this instant adds
        disabled: list[tuple[str, str]] = []   # recording segments it disables
        new_disks: list[CheckpointDiskRecord] = []
        for part in parts:
            disk = part.disk
            node = disk.node
            on_node = disk.bitmaps
            segments = chain(records, disk.name)
            newest = segments[-1] if segments and segments[-1].record.broken is None else None
            placement = None if newest is None else \
                verified.placements.get((newest.name, disk.name))
            recording = newest if placement is not None and placement.records_at(node) \
                else None
            if checkpoint and newest is not None and recording is None:
                raise InvalidArgument(
                    f"checkpoint {newest.name!r}, the newest on disk {disk.name!r}, is not "
                    "recording: redefine the checkpoints newer than it first")
            if checkpoint:
                if bitmap in on_node:
                    raise AlreadyExists(f"disk {disk.name!r} already has a bitmap {bitmap!r}")
                # A chain that cannot be trusted is cleaned away; this one starts fresh.
                for seg in segments:
                    if seg.record.broken is not None and seg.record.bitmap in on_node:
                        actions.append(action("block-dirty-bitmap-remove", node=node,
                                              name=seg.record.bitmap))
                if recording is not None and placement is not None:
                    # Only the top copy takes the guest's writes. Copies in the
                    # read-only images below keep recording: a later commit
                    # writes through them, and what it moves down stays
                    # recorded (a closed segment may grow, never shrink).
                    after.append(action("block-dirty-bitmap-disable", node=node,
                                        name=placement.bitmap))
                    disabled.append((node, placement.bitmap))
                # A raw disk's (file, block device, RBD image) lives in QEMU's
                # memory: valid while this QEMU process runs, broken after.
                actions.append(action("block-dirty-bitmap-add", node=node, name=bitmap,
                                      persistent=not in_memory(disk)))
                added.append((node, bitmap))
                new_disks.append(CheckpointDiskRecord(disk.name, bitmap, disk.file, 0))
                bounds[disk.name] = (name, None)
            elif recording is not None and placement is not None:
                tail = f"{PREFIX}{secrets.token_hex(4)}-tail"
                after += [
                    action("block-dirty-bitmap-add", node=node, name=tail, disabled=True,
                           granularity=recording.record.granularity),
                    action("block-dirty-bitmap-merge", node=node, target=tail,
                           bitmaps=placement.sources()),
                ]
                added.append((node, tail))
                bounds[disk.name] = (recording.name, tail)

        intent = None
        images = {part.disk.name: img for part in parts
                  if checkpoint and (img := rbd_image(part.disk)) is not None}
        payload = {"name": name, "bitmap": bitmap, "disks": [d.disk for d in new_disks],
                   "added": added, "disabled": disabled,
                   "rbd": {disk: asdict(img) for disk, img in images.items()}}
        kept: dict[str, Any] = {}
        if checkpoint:
            intent = self._store.add_intent(domain.name, "checkpoint-create", payload)
            faults.crash_point("checkpoint-create:intent-recorded")
            # Before the instant and outside the held-I/O window: see .cluster.
            kept = await self.cluster.before_instant(domain.name, bitmap, images)
            if kept:
                faults.crash_point("checkpoint-create:cluster-kept")

        async def undo() -> None:
            await _revert_instant(domain.session, added, disabled, bitmap)

        def keep() -> None:
            # The snapshot failed but QEMU may hold the new bitmaps: the next
            # connect reverts them, as the failed request meant to.
            if intent is not None:
                self._store.update_intent(intent, {**payload, "rollback": True})

        async def commit() -> None:
            if intent is None:
                return
            faults.crash_point("checkpoint-create:before-store")
            now = await Bitmaps(domain.session).on_nodes()
            disks = []
            for rec, part in zip(new_disks, parts, strict=True):
                granularity = int(now[part.disk.node][bitmap]["granularity"])
                disks.append(CheckpointDiskRecord(rec.disk, rec.bitmap, rec.image, granularity,
                                                  span=(rec.image,)))
            self._store.add_checkpoint(domain.name, name, created, disks, intent=intent)
            log.info("checkpoint %s/%s created on %s", domain.name, name,
                     ",".join(d.disk for d in disks))
            faults.crash_point("checkpoint-create:stored")
            await self.cluster.after_instant(domain.name, bitmap, kept)

        async def release() -> None:
            # The snapshot failed: its checkpoint does not exist, nor do its RBD snapshots.
            await self.cluster.forget(domain.name, bitmap, kept)

        def abort() -> None:
            if intent is not None:
                self._store.drop_intent(intent)

        return Instant(actions, bounds, undo, commit, abort, keep, release, after)

    # -- change sets ---------------------------------------------------------------

    def sources_to_snapshot(self, domain: str, snapshot: Snapshot, disk: str,
                            name: str, verified: Verified) -> tuple[list[dict[str, str]], int]:
        """Bitmaps whose union is exactly what changed on disk from checkpoint
        ``name`` to the snapshot's instant, and their granularity.

        :raise NoSuchCheckpoint: :raise NoSuchDisk:
        :raise CheckpointBroken: the change set cannot be trusted.
        :raise InvalidArgument: the checkpoint is newer than the snapshot, or
            does not track that disk.
        """
        cp = self.get(domain, name)
        part = snapshot.disk(disk)
        now = verified.disks.get(disk)
        if now is not None and now.size != part.disk.size:
            # Bitmaps of different sizes cannot be merged: the view keeps the
            # size of its point in time, the disk's bitmaps follow the disk.
            raise OperationFailed(
                f"disk {disk!r} was resized from {part.disk.size} to {now.size} bytes after "
                f"snapshot {snapshot.name!r} was taken: its change set cannot be exported "
                "with it; take a new snapshot")
        segments = self._segments_from(domain, cp, disk)
        names = [s.name for s in segments]
        if part.boundary is None or part.boundary not in names:
            raise InvalidArgument(f"checkpoint {name!r} is newer than snapshot "
                                  f"{snapshot.name!r}, or was not recording at its instant")
        sources = [ref for s in segments[:names.index(part.boundary)]
                   for ref in verified.sources(s.name, disk)]
        if part.tail is not None:
            if part.tail not in verified.bitmaps(part.disk.node):
                raise CheckpointBroken(
                    f"checkpoint {name!r} cannot be trusted on disk {disk!r} up to snapshot "
                    f"{snapshot.name!r}: the image that held the snapshot's part of the change "
                    "set left the disk's chain")
            sources.append(bitmap_ref(part.disk.node, part.tail))
        return sources, cp.disk(disk).granularity  # type: ignore[union-attr]

    def _segments_from(self, domain: str, cp: CheckpointRecord, disk: str) -> list[Segment]:
        """The chain of disk from checkpoint cp on, refusing untrustworthy ones."""
        if cp.disk(disk) is None:
            raise InvalidArgument(f"checkpoint {cp.name!r} does not track disk {disk!r}")
        segments = chain(self._store.checkpoints(domain), disk)
        names = [s.name for s in segments]
        segments = segments[names.index(cp.name):]
        for s in segments:
            if s.record.broken is not None:
                raise CheckpointBroken(f"checkpoint {cp.name!r} cannot be trusted on disk "
                                       f"{disk!r}: {s.record.broken}")
        return segments

    async def changes(self, domain_name: str, disk: str, name: str,
                      until: str | None) -> dict[str, Any]:
        """Extents changed on disk since checkpoint ``name`` and up to ``until``
        (a later checkpoint or a snapshot) or now.

        :raise NoSuchDomain: :raise DomainNotConnected: :raise NoSuchCheckpoint:
        :raise NoSuchDisk: :raise CheckpointBroken: :raise InvalidArgument:
        :raise OperationFailed:
        """
        async with self._domains.reachable(domain_name) as domain, domain.lock:
            verified = await self.verify(domain)
            disks = verified.disks
            if disk not in disks:
                raise NoSuchDisk(f"domain {domain_name!r} has no disk {disk!r}")
            cp = self.get(domain_name, name)
            snapshot = next((s for s in self._snapshots.snapshots(domain_name)
                             if s.name == until), None) if until is not None else None
            if snapshot is not None:
                sources, granularity = self.sources_to_snapshot(domain_name, snapshot, disk,
                                                                name, verified)
            else:
                segments = self._segments_from(domain_name, cp, disk)
                if until is not None:
                    names = [s.name for s in segments]
                    if until not in self.names(domain_name):
                        raise NoSuchCheckpoint(f"domain {domain_name!r} has no checkpoint or "
                                               f"snapshot {until!r}")
                    if until not in names[1:]:
                        raise InvalidArgument(f"{until!r} is not a checkpoint of disk {disk!r} "
                                              f"newer than {name!r}")
                    segments = segments[:names.index(until)]
                else:
                    newest = verified.placements.get((segments[-1].name, disk))
                    if newest is None or not newest.records_at(disks[disk].node):
                        raise InvalidArgument(
                            f"checkpoint {segments[-1].name!r}, the newest on disk {disk!r}, "
                            "is not recording: redefine the checkpoints newer than it first")
                sources = [ref for s in segments for ref in verified.sources(s.name, disk)]
                granularity = segments[0].record.granularity if segments else 65536
            if self.bitmap_reader is None:
                raise Unsupported("reading change sets needs the export service")
            extents = await self.bitmap_reader(domain, disks[disk].size, sources, granularity)
        return {"extents": extents, "bytes": sum(length for _, length in extents)}

    # -- delete ----------------------------------------------------------------------

    async def delete(self, domain_name: str, name: str) -> None:
        """Delete a checkpoint; every other checkpoint's change set stays exact.

        :raise NoSuchDomain: :raise DomainNotConnected: :raise NoSuchCheckpoint:
        :raise OperationFailed:
        """
        async with self._domains.reachable(domain_name) as domain, domain.lock:
            self.get(domain_name, name)  # no-such-checkpoint before anything else
            verified = await self.verify(domain)
            records = self._store.checkpoints(domain_name)
            actions: list[dict[str, Any]] = []
            moves: list[tuple[SnapshotDisk, str | None, str | None]] = []
            orphans: list[dict[str, str]] = []
            for rec in records[[c.name for c in records].index(name)].disks:
                disk = verified.disks.get(rec.disk)
                held = [image for image in (disk.chain if disk is not None else ())
                        if rec.bitmap in image.bitmaps]
                if not held:
                    continue  # nothing of it left in QEMU
                segments = chain(records, rec.disk)
                i = [s.name for s in segments].index(name)
                before = segments[i - 1] if i > 0 else None
                usable = None if before is None else \
                    verified.placements.get((before.name, rec.disk))
                for snapshot in self._snapshots.snapshots(domain_name):
                    part = next((p for p in snapshot.disks if p.disk.name == rec.disk), None)
                    if part is None or part.boundary != name:
                        continue
                    # The snapshot's range must stay what it was: its tail takes
                    # the predecessor's segment before that segment grows.
                    tail = part.tail
                    if usable is not None:
                        node = part.disk.node
                        if tail is None:
                            tail = f"{PREFIX}{secrets.token_hex(4)}-tail"
                            actions.append(action(
                                "block-dirty-bitmap-add", node=node, name=tail, disabled=True,
                                granularity=before.record.granularity))  # type: ignore[union-attr]
                        actions.append(action("block-dirty-bitmap-merge", node=node,
                                              target=tail, bitmaps=usable.sources()))
                    moves.append((part, before.name if usable and before else None, tail))
                mine = verified.placements.get((name, rec.disk))
                if rec.broken is None and usable is not None and mine is not None:
                    actions += _fold(mine, usable, disk.chain,  # type: ignore[union-attr]
                                     recording=i == len(segments) - 1,
                                     granularity=rec.granularity)
                for image in held:
                    if not image.read_only:
                        actions.append(action("block-dirty-bitmap-remove", node=image.node,
                                              name=rec.bitmap))
                    else:
                        # QEMU cannot take a bitmap out of a read-only backing
                        # image: it goes once the image is writable again.
                        orphans.append({"image": image.file, "bitmap": rec.bitmap})
            gone = records[[c.name for c in records].index(name)]
            images = {rec.disk: img for rec in gone.disks
                      if (disk := verified.disks.get(rec.disk)) is not None
                      and (img := rbd_image(disk)) is not None}
            intent = self._store.add_intent(domain_name, "checkpoint-delete", {
                "name": name, "bitmap": gone.disks[0].bitmap if gone.disks else None,
                "rbd": {disk: asdict(img) for disk, img in images.items()}})
            faults.crash_point("checkpoint-delete:intent-recorded")
            try:
                await Bitmaps(domain.session).transaction(actions)
            except OperationFailed as err:
                if not isinstance(err, NoAnswer):
                    self._store.drop_intent(intent)  # QEMU refused: nothing happened
                raise
            # Otherwise (connection lost, cancelled) QEMU may have run it: the
            # intent stays, and the next connect settles it by what QEMU shows.
            for part, boundary, tail in moves:
                part.boundary, part.tail = boundary, tail
            faults.crash_point("checkpoint-delete:before-store")
            for orphan in orphans:
                self._store.add_intent(domain_name, ORPHAN_RECORD, orphan)
            # Its RBD snapshots go before its record, so none can bring it back.
            await every([self.cluster.forget(domain_name, rec.bitmap, {rec.disk: images[rec.disk]})
                         for rec in gone.disks if rec.disk in images])
            self._store.delete_checkpoint(domain_name, name, intent=intent)
        log.info("checkpoint %s/%s deleted", domain_name, name)

    # -- redefine ----------------------------------------------------------------------

    async def redefine(self, domain_name: str, name: str, created: float | None,
                       disks: list[tuple[str, str]]) -> None:
        """Record a checkpoint whose bitmaps already exist in the images.

        :raise NoSuchDomain: :raise DomainNotConnected: :raise AlreadyExists:
        :raise NoSuchDisk:
        :raise InvalidArgument: the bitmaps do not match a checkpoint in that place.
        """
        try:
            check_name(name, "checkpoint name")
        except ValueError as err:
            raise InvalidArgument(str(err)) from None
        async with self._domains.reachable(domain_name) as domain, domain.lock:
            records = self._store.checkpoints(domain_name)
            if any(c.name == name for c in records):
                raise AlreadyExists(f"domain {domain_name!r} already has a checkpoint {name!r}")
            present = {d.name: d for d in await query_disks(domain.session)}
            when = time.time() if created is None else created
            infos = []
            holders_of: dict[str, tuple[str, ...]] = {}
            for disk_name, bitmap in disks:
                disk = present.get(disk_name)
                if disk is None:
                    raise NoSuchDisk(f"domain {domain_name!r} has no disk {disk_name!r}")
                # The segment began in the lowest image that holds the bitmap.
                holders = [image for image in disk.chain if bitmap in image.bitmaps]
                problem = bitmap_problem(None, bitmap, disk.file, fmt=disk.format) \
                    if not holders else next(
                        (p for p in (bitmap_problem(h.bitmaps[bitmap], bitmap, h.file,
                                                    fmt=h.format)
                                     for h in holders) if p is not None), None)
                if problem is None and holders[0] is not disk.chain[0] and \
                        holders[0].bitmaps[bitmap].get("recording"):
                    problem = (f"bitmap {bitmap!r} records in image {holders[0].file}, which "
                               "is not the disk's top image")
                if problem is not None:
                    raise InvalidArgument(f"checkpoint {name!r} does not match disk "
                                          f"{disk_name!r}: {problem}")
                begin = holders[-1]
                info = {**begin.bitmaps[bitmap],
                        "recording": bool(holders[0].bitmaps[bitmap].get("recording"))}
                infos.append((disk, bitmap, info, begin.file))
                holders_of[disk_name] = tuple(h.file for h in holders)

            def recording(cp: CheckpointRecord) -> bool:
                return any(present[d.disk].bitmaps.get(d.bitmap, {}).get("recording")
                           for d in cp.disks if d.disk in present)

            # Its place in the chain: by creation time; within the same second a
            # recording segment is the newer one.
            new_records = any(i["recording"] for _, _, i, _ in infos)
            pos = next((k for k, c in enumerate(records) if c.created > when or (
                int(c.created) == int(when) and recording(c) and not new_records)),
                len(records))
            new = []
            for disk, bitmap, info, image in infos:
                later = chain(records[pos:], disk.name)
                known = {s.record.bitmap for s in chain(records, disk.name)}
                newer_in_image = [b for b, i in disk.bitmaps.items()
                                  if i.get("recording") and i.get("persistent")
                                  and b != bitmap and b not in known]
                if info["recording"] and later:
                    raise InvalidArgument(
                        f"checkpoint {name!r} does not match disk {disk.name!r}: bitmap "
                        f"{bitmap!r} is recording, so it must be the newest checkpoint")
                if not info["recording"] and not later and not newer_in_image:
                    # Older segments may come first; a newer, recording one must exist.
                    raise InvalidArgument(
                        f"checkpoint {name!r} does not match disk {disk.name!r}: bitmap "
                        f"{bitmap!r} is not recording and no newer segment is in the image")
                new.append(CheckpointDiskRecord(disk.name, bitmap, image,
                                                int(info["granularity"]), span=holders_of[
                                                    disk.name]))
            before = records[pos].name if pos < len(records) else None
            self._store.add_checkpoint(domain_name, name, when, new, before=before)
        log.info("checkpoint %s/%s redefined", domain_name, name)

    # -- trust ---------------------------------------------------------------------------

    async def _resumed(self, domain: Domain, _: str) -> None:
        if domain.name in self._unchecked:
            await self.reconcile(domain)

    @staticmethod
    async def _migrated(domain: Domain) -> str | None:
        """QEMU's run state when it says its disks are not its own, else None."""
        status = str((await domain.session.execute("query-status"))["status"])
        return status if status in MIGRATED_RUN_STATES else None

    async def _check_not_migrated(self, domain: Domain) -> None:
        """:raise Busy: QEMU's run state says its disks are not its own."""
        status = await self._migrated(domain)
        if status is not None:
            raise Busy(f"domain {domain.name!r} is migrating or has migrated away ({status}): "
                       "its disks and their checkpoints are the other QEMU's")

    async def reconcile(self, domain: Domain) -> None:
        """On every connect (after the snapshot service cleaned up): settle
        intents, adopt checkpoints the store does not know, and compare the
        bitmaps QEMU loaded with the store. Not while QEMU's disks are not its
        own (after an outgoing migration, before an incoming one): the
        bitmaps are invisible then, and nothing may be judged broken."""
        status = await self._migrated(domain)
        if status is not None:
            log.info("domain %s: QEMU is %s; checkpoints not checked", domain.name, status)
            self._unchecked.add(domain.name)  # done when the guest runs here
            return
        self._unchecked.discard(domain.name)
        await self.cluster.remove_leftovers(domain.name)
        disks = {d.name: d for d in await query_disks(domain.session)}
        for intent in self._store.intents(domain.name):
            if intent.kind == "checkpoint-create" and intent.payload.get("rollback"):
                await _revert_instant(domain.session, intent.payload["added"],
                                      intent.payload["disabled"],
                                      intent.payload.get("bitmap", intent.payload["name"]))
                await self._forget_in_cluster(domain.name, intent.payload)
                self._store.drop_intent(intent.id)
                log.warning("checkpoint %s/%s: its snapshot failed mid-way; reverted its "
                            "bitmaps", domain.name, intent.payload["name"])
                disks = {d.name: d for d in await query_disks(domain.session)}
            elif intent.kind in ("checkpoint-create", "checkpoint-delete"):
                finished = self._settle(domain, intent, disks)
                if finished == (intent.kind == "checkpoint-delete"):
                    # a creation that did not happen, a deletion that did
                    await self._forget_in_cluster(domain.name, intent.payload)
                elif finished and await _stop_replaced(domain.session,
                                                       intent.payload["disabled"]):
                    disks = {d.name: d for d in await query_disks(domain.session)}
        if await self.cluster.rebuild(domain, disks.values(), partial(self._granularity,
                                                                      domain.name),
                                      partial(self._distrusted, domain.name)):
            disks = {d.name: d for d in await query_disks(domain.session)}
        self._adopt(domain.name, disks)
        await self._remove_orphans(domain, disks)
        self._check(domain.name, disks)

    async def _forget_in_cluster(self, domain: str, payload: Mapping[str, Any]) -> None:
        """Remove the RBD snapshots of a checkpoint creation that did not happen."""
        bitmap = payload.get("bitmap")
        images = {disk: image_from(img) for disk, img in payload.get("rbd", {}).items()}
        if bitmap and images:
            await self.cluster.forget(domain, bitmap, images)

    def _granularity(self, domain: str, disk: str, bitmap: str) -> int | None:
        """The granularity recorded for a checkpoint's bitmap on a disk, if any."""
        return next((d.granularity for c in self._store.checkpoints(domain) for d in c.disks
                     if d.disk == disk and d.bitmap == bitmap and d.granularity), None)

    def _distrusted(self, domain: str, disk: str, bitmap: str) -> bool:
        return any(d.broken is not None for c in self._store.checkpoints(domain)
                   for d in c.disks if d.disk == disk and d.bitmap == bitmap)

    def _adopt(self, domain: str, disks: dict[str, Disk]) -> None:
        """Record the checkpoints the images hold that the store does not know
        (a daemon on another host after a migration, a lost or restored
        state_dir): each persistent ``bb-cp-<ms>-<name>`` bitmap in a disk's top
        image gives the checkpoint's name and creation time, the disks that
        hold it give its disks, and the images below that hold it too give the
        image where its segment began. They then go through the same checks as
        every checkpoint (:meth:`_check`): one whose chain is not whole is
        broken, with its reason, never trusted."""
        records = self._store.checkpoints(domain)
        known = {(d.disk, d.bitmap) for c in records for d in c.disks}
        names = {c.name for c in records}
        found: dict[str, tuple[float, list[CheckpointDiskRecord]]] = {}
        for disk in disks.values():
            if not disk.chain:
                continue
            for bitmap, desc in disk.chain[0].bitmaps.items():
                parsed = parse_checkpoint_bitmap(bitmap)
                # A raw disk's are not persistent (QEMU's memory, or rebuilt
                # from the cluster): ours all the same.
                ours = desc.get("persistent") or in_memory(disk)
                if parsed is None or not ours or (disk.name, bitmap) in known:
                    continue
                name, created = parsed
                holders = []
                for image in disk.chain:
                    if bitmap not in image.bitmaps:
                        break
                    holders.append(image.file)
                broken = None
                gap = next((image for image in disk.chain[len(holders):]
                            if bitmap in image.bitmaps), None)
                if gap is not None:
                    broken = (f"image {disk.chain[len(holders)].file} lacks bitmap {bitmap!r} "
                              f"that {gap.file} below it holds: the writes it took were not "
                              "recorded")
                entry = found.setdefault(name, (created, []))
                entry[1].append(CheckpointDiskRecord(
                    disk.name, bitmap, holders[-1], int(desc.get("granularity", 65536)),
                    broken, tuple(holders)))
        for name, (created, recs) in sorted(found.items(), key=lambda kv: (kv[1][0], kv[0])):
            if name in names:
                log.warning("domain %s: the images hold bitmaps of checkpoint %s, which the "
                            "store knows with other bitmaps; not adopted", domain, name)
                continue
            newer = next((c.name for c in self._store.checkpoints(domain)
                          if c.created > created), None)
            self._store.add_checkpoint(domain, name, created, sorted(recs, key=lambda r: r.disk),
                                       before=newer)
            names.add(name)
            log.info("domain %s: adopted checkpoint %s (created %s) on %s, found in the "
                     "images", domain, name,
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)),
                     ",".join(r.disk for r in recs))

    async def verify(self, domain: Domain, disks: Sequence[Disk] | None = None) -> Verified:
        """Read every disk's chain now (or take ``disks``, just read by the
        caller) and check each segment against it
        (:mod:`.segments`): a segment that is not whole is marked broken, with
        the checkpoints whose change sets include it, and ``checkpoint-broken``
        is sent once. Called before every operation that serves or extends a
        change set, because QEMU announces no external snapshot.

        :raise Busy: QEMU's disks are not its own now (migrated away, or
            incoming): nothing can be checked or served.
        :raise DomainNotConnected: :raise OperationFailed:
        """
        if disks is None and domain.name not in self._unchecked:
            # Both only read QEMU: sent back to back, one round trip less.
            # The run state's verdict first, if both fail.
            disks = (await every([self._check_not_migrated(domain),
                                  query_disks(domain.session)]))[1]
            assert disks is not None
        else:
            await self._check_not_migrated(domain)
            if domain.name in self._unchecked:  # the resume hook has not run yet
                await self.reconcile(domain)
            if disks is None:
                disks = await query_disks(domain.session)
        by_name = {d.name: d for d in disks}
        await self._remove_orphans(domain, by_name)
        return self._check(domain.name, by_name)

    async def _remove_orphans(self, domain: Domain, disks: dict[str, Disk]) -> None:
        """Remove the bitmaps of deleted checkpoints left in read-only backing
        images, once such an image is writable again (a commit made it the top)
        or has left every chain (nothing can reach it any more)."""
        records = [r for r in self._store.intents(domain.name) if r.kind == ORPHAN_RECORD]
        if not records:
            return
        images = {image.file: image for d in disks.values() for image in d.chain}
        in_use = {d.bitmap for c in self._store.checkpoints(domain.name) for d in c.disks}
        for record in records:
            image = images.get(record.payload["image"])
            bitmap = record.payload["bitmap"]
            if image is not None and (image.read_only or bitmap in in_use):
                continue
            if image is not None and bitmap in image.bitmaps:
                await Bitmaps(domain.session).remove(image.node, bitmap)
                log.info("checkpoint %s/%s: removed its bitmap from image %s", domain.name,
                         bitmap, image.file)
            self._store.drop_intent(record.id)

    def _job_completed(self, domain: str, job_type: str, job_id: str,
                       error: str | None) -> None:
        # A stream copies data from backing images into the top, a mirror
        # copies a disk into another image, and neither records the copy in
        # any bitmap; the images they drop may have held parts of change sets
        # that no check saw. Which disk a job ran on is gone with the job, so
        # the next check treats every disk as touched. A cancelled one
        # dropped no image.
        if job_type in _MOVING_JOBS and error != "cancelled":
            self._moved.setdefault(domain, []).append(f"{job_type} job {job_id!r}")

    def _settle(self, domain: Domain, intent: IntentRecord, disks: dict[str, Disk]) -> bool:
        """Finish a creation or deletion QEMU shows happened (True), else forget it."""
        name = intent.payload["name"]
        if intent.kind == "checkpoint-create":
            bitmap = intent.payload.get("bitmap", name)  # stores before bb-cp- names
            present = [d for d in intent.payload["disks"]
                       if d in disks and bitmap in disks[d].bitmaps]
            if present and len(present) == len(intent.payload["disks"]):
                recs = [CheckpointDiskRecord(d, bitmap, disks[d].file,
                                             int(disks[d].bitmaps[bitmap]["granularity"]))
                        for d in present]
                parsed = parse_checkpoint_bitmap(bitmap)
                self._store.add_checkpoint(domain.name, name,
                                           time.time() if parsed is None else parsed[1], recs,
                                           intent=intent.id)
                log.warning("checkpoint %s/%s: creation cut short; finished it",
                            domain.name, name)
                return True
        elif intent.kind == "checkpoint-delete":
            cp = next((c for c in self._store.checkpoints(domain.name) if c.name == name), None)
            gone = cp is None or not any(
                r.disk in disks and r.bitmap in disks[r.disk].bitmaps for r in cp.disks)
            if gone:
                self._store.delete_checkpoint(domain.name, name, intent=intent.id)
                log.warning("checkpoint %s/%s: deletion cut short; finished it",
                            domain.name, name)
                return True
        self._store.drop_intent(intent.id)
        log.warning("checkpoint %s/%s: %s cut short before QEMU acted; forgotten",
                    domain.name, name, intent.kind)
        return False

    def _check(self, domain: str, disks: dict[str, Disk]) -> Verified:
        self._note_usage(domain, disks.values())
        self._seen[domain] = disks
        records = self._store.checkpoints(domain)
        before = {c.name for c in records if c.broken}
        moved = self._moved.pop(domain, [])
        placements: dict[tuple[str, str], Placement] = {}
        for disk_name in sorted({d.disk for c in records for d in c.disks}):
            segments = chain(records, disk_name)
            disk = disks.get(disk_name)
            known = {s.record.bitmap for s in segments}
            # A newer recording bitmap in the top image that the store does not
            # know yet is a checkpoint waiting to be redefined: until then the
            # newest known segment is closed, not broken.
            pending = disk is not None and any(
                info.get("recording") and info.get("persistent") and b not in known
                for b, info in disk.bitmaps.items())
            worst = -1
            reason = ""
            for i, seg in enumerate(segments):
                problem = seg.record.broken
                if problem is None:
                    where = place(disk, seg.record,
                                  recording=i == len(segments) - 1 and not pending)
                    if isinstance(where, Placement) and moved and \
                            disk is not None and where.holders[-1] is not disk.chain[0]:
                        where = (f"a {', '.join(moved)} moved data between the disk's "
                                 "images without recording it, and the change set spans "
                                 "images below the top one")
                    if isinstance(where, Placement):
                        placements[(seg.name, disk_name)] = where
                        if span(where) != seg.record.span:
                            self._store.set_span(domain, seg.name, disk_name, span(where))
                    else:
                        problem = where
                if problem is not None:
                    worst, reason = i, problem
                    if seg.record.broken is None:
                        self._store.mark_broken(domain, seg.name, disk_name, problem)
            # Changes since an older checkpoint include the broken segment.
            for seg in segments[:max(worst, 0)]:
                placements.pop((seg.name, disk_name), None)
                if seg.record.broken is None:
                    self._store.mark_broken(domain, seg.name, disk_name,
                                            f"a later segment is broken: {reason}")
        for cp in self._store.checkpoints(domain):
            if cp.broken and cp.name not in before:
                log.error("checkpoint %s/%s broken: %s", domain, cp.name, cp.broken)
                self._events.publish(domain, "checkpoint-broken", checkpoint=cp.name,
                                     reason=cp.broken)
        return Verified(disks, placements)


def _fold(mine: Placement, into: Placement, chain: Sequence[Image], recording: bool,
          granularity: int) -> list[dict[str, Any]]:
    """Actions that merge a segment into the one before it (which then spans
    both). The merge lands in the topmost image holding the later segment;
    images between it and the earlier segment's topmost holder get an empty
    copy first, so the earlier segment stays continuous along the chain."""
    nodes = [image.node for image in chain]
    target = mine.top
    actions = [action("block-dirty-bitmap-add", node=image.node, name=into.bitmap,
                      persistent=image.format in PERSISTENT_FORMATS, disabled=True,
                      granularity=granularity)
               for image in chain[nodes.index(target.node):nodes.index(into.top.node)]
               if into.bitmap not in image.bitmaps]
    actions.append(action("block-dirty-bitmap-merge", node=target.node, target=into.bitmap,
                          bitmaps=mine.sources()))
    if recording:  # it was recording: its predecessor takes over
        actions.append(action("block-dirty-bitmap-enable", node=target.node, name=into.bitmap))
    return actions


async def _stop_replaced(session: DomainSession, disabled: Sequence[Sequence[str]]) -> bool:
    """A creation finished on connect: the segments it replaces stop recording,
    if it was cut short between a one-disk snapshot's move and its second
    transaction (until then both recorded, so no change set lost a write)."""
    ops = Bitmaps(session)
    now = await ops.on_nodes()
    recording = [(node, bitmap) for node, bitmap in disabled
                 if now.get(node, {}).get(bitmap, {}).get("recording")]
    for node, bitmap in recording:
        await ops.disable(node, bitmap)
    return bool(recording)


async def _revert_instant(session: DomainSession, added: Sequence[Sequence[str]],
                          disabled: Sequence[Sequence[str]], name: str) -> None:
    """Undo a snapshot instant's bitmap transaction, judging by what QEMU shows
    (safe whether or not it ran): what the new segment recorded goes back into
    the segment it replaced, which records again; the added bitmaps go.
    ``name``: the new checkpoint's bitmap."""
    ops = Bitmaps(session)
    now = await ops.on_nodes()
    if not any(b in now.get(n, {}) for n, b in added):
        return  # the transaction never ran
    for node, bitmap in disabled:
        newer = next((b for n, b in added if n == node and b == name), None)
        if newer is not None and newer in now.get(node, {}):
            await ops.merge(node, bitmap, [bitmap_ref(node, newer)])
        await ops.enable(node, bitmap)
    for node, bitmap in added:
        if bitmap in now.get(node, {}):
            await ops.remove(node, bitmap)
