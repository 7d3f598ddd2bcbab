"""Checkpoints of RBD disks that the Ceph cluster keeps too.

A raw disk's checkpoint lives as a bitmap in QEMU's memory (see
:mod:`.segments`), lost with the process. On a disk whose node is an RBD
image the daemon can reach, each checkpoint also leaves two RBD snapshots of
the image: ``bb-cp-<ms>-<name>`` (the bitmap's own name) just *before* the
instant, and ``bb-end-<ms>-<name>`` just *after* it. Both are taken outside
the held-I/O window, so the guest waits no longer, and the change set they
give is never short: writes after the first snapshot include every write
after the instant, and writes up to the second include every write up to it.

When the bitmaps are gone (QEMU restarted, crashed, the VM moved host) the
daemon rebuilds them on connect from the cluster's diffs: checkpoint i's
segment is what was written after its ``bb-cp-`` snapshot up to the first of
our snapshots taken after checkpoint i+1's instant (its ``bb-end-``, else
a later one), the newest's is what was written since, into a bitmap that
records from before the diff is read. The bitmaps are then as the daemon
would have kept them, and the usual checks and adoption
(:mod:`.checkpoints`) take over. The snapshots are the record: a daemon
that lost its state finds the checkpoints in them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import asdict
from typing import Any

from .. import rbd
from ..model import Disk
from ..names import CHECKPOINT_BITMAP_PREFIX, PREFIX, parse_checkpoint_bitmap
from ..qemu.blockops import Bitmaps
from ..store import Store
from .domains import Domain
from .segments import in_memory

log = logging.getLogger("blockbackupd.checkpoints")

#: Kind of the store records of RBD snapshots of ours that must go (a deleted
#: checkpoint's, when the cluster could not be reached): removed on connect,
#: before anything is rebuilt from the snapshots, so no deleted checkpoint
#: comes back.
LEFTOVER_RECORD = "rbd-snapshots"

END_PREFIX = f"{PREFIX}end-"

#: How a checkpoint's changes on one disk are kept (checkpoint.lookup's ``tracking``).
IN_IMAGE, IN_MEMORY, IN_CLUSTER = "image", "memory", "cluster"

#: Sets bits of a node's bitmap: (domain, node, bitmap, size, granularity, extents).
BitmapWriter = Callable[[Domain, str, str, int, int, list[list[int]]], Awaitable[None]]


def end_snapshot(bitmap: str) -> str:
    """The name of the snapshot taken just after the instant of the
    checkpoint whose bitmap (and first snapshot) is ``bitmap``."""
    return END_PREFIX + bitmap.removeprefix(CHECKPOINT_BITMAP_PREFIX)


def image(disk: Disk) -> rbd.RbdImage | None:
    """The RBD image of a disk whose checkpoints live in QEMU's memory."""
    return rbd.image_of(disk.file) if in_memory(disk) else None


def image_from(payload: Mapping[str, Any]) -> rbd.RbdImage:
    return rbd.RbdImage(**payload)


class ClusterRecords:
    """The RBD snapshots of the checkpoints of every domain's RBD disks."""

    def __init__(self, store: Store) -> None:
        self._store = store
        #: (domain, disk) -> bitmaps whose first snapshot the cluster holds.
        self._kept: dict[tuple[str, str], set[str]] = {}
        self.writer: BitmapWriter | None = None

    def tracking(self, domain: str, disk: Disk | None, name: str, bitmap: str) -> str:
        """``image``, ``cluster`` or ``memory``: where the changes of checkpoint
        ``bitmap`` on ``disk`` (as QEMU shows it now; None: not seen) are kept."""
        if disk is None or not in_memory(disk):
            return IN_IMAGE if disk is not None else IN_MEMORY
        return IN_CLUSTER if bitmap in self._kept.get((domain, disk.name), set()) \
            else IN_MEMORY

    # -- a checkpoint's instant --------------------------------------------------

    async def before_instant(self, domain: str, bitmap: str,
                             images: Mapping[str, rbd.RbdImage]) -> dict[str, rbd.RbdImage]:
        """Take the first snapshot on each image; returns the disks where that
        worked (the others keep the checkpoint in QEMU's memory only, logged)."""
        made = await self._each(domain, images, lambda img: rbd.create_snapshot(img, bitmap),
                                f"snapshot {bitmap}")
        for disk in made:
            self._kept.setdefault((domain, disk), set()).add(bitmap)
        return made

    async def after_instant(self, domain: str, bitmap: str,
                            images: Mapping[str, rbd.RbdImage]) -> None:
        """Take the second snapshot (a missing one only widens a rebuilt
        change set to the next snapshot of ours: never short)."""
        end = end_snapshot(bitmap)
        await self._each(domain, images, lambda img: rbd.create_snapshot(img, end),
                         f"snapshot {end}")

    async def forget(self, domain: str, bitmap: str,
                     images: Mapping[str, rbd.RbdImage]) -> None:
        """Remove a checkpoint's snapshots; those the cluster would not let go
        are recorded and removed at a later connect, before any rebuild."""
        for disk in images:
            self._kept.get((domain, disk), set()).discard(bitmap)
        names = [bitmap, end_snapshot(bitmap)]
        records = {disk: self._store.add_intent(domain, LEFTOVER_RECORD,
                                                {"image": asdict(img), "names": names})
                   for disk, img in images.items()}
        done = await self._each(domain, images, lambda img: rbd.remove_snapshots(img, names),
                                f"removing snapshots {', '.join(names)}")
        for disk in done:
            self._store.drop_intent(records[disk])

    async def _each(self, domain: str, images: Mapping[str, rbd.RbdImage],
                    call: Callable[[rbd.RbdImage], None], what: str) -> dict[str, rbd.RbdImage]:
        """Run a blocking cluster call for each image side by side; the disks where it worked."""
        items = list(images.items())
        results = await asyncio.gather(*(asyncio.to_thread(call, img) for _, img in items),
                                       return_exceptions=True)
        done = {}
        for (disk, img), result in zip(items, results, strict=True):
            if isinstance(result, rbd.RbdError):
                log.warning("domain %s: disk %s (RBD image %s): %s failed: %s", domain, disk,
                            img, what, result)
            elif isinstance(result, BaseException):
                raise result
            else:
                done[disk] = img
        return done

    # -- on connect --------------------------------------------------------------

    async def remove_leftovers(self, domain: str) -> None:
        """Retry the removals an earlier deletion could not finish."""
        for record in self._store.intents(domain):
            if record.kind != LEFTOVER_RECORD:
                continue
            img = image_from(record.payload["image"])
            try:
                await asyncio.to_thread(rbd.remove_snapshots, img, record.payload["names"])
            except rbd.RbdError as err:
                log.warning("domain %s: RBD snapshots %s of a deleted checkpoint still on %s: "
                            "%s", domain, ", ".join(record.payload["names"]), img, err)
                continue
            self._store.drop_intent(record.id)

    async def rebuild(self, domain: Domain, disks: Iterable[Disk],
                      granularity: Callable[[str, str], int | None],
                      broken: Callable[[str, str], bool]) -> bool:
        """Give back to QEMU the bitmaps of checkpoints the cluster keeps and
        QEMU lacks (see the module's doc); whether any was rebuilt.
        ``granularity(disk, bitmap)``: the one recorded, if any; ``broken(disk,
        bitmap)``: the store already distrusts it (never rebuilt)."""
        rebuilt = False
        for disk in disks:
            img = image(disk)
            if img is None:
                continue
            try:
                names = await asyncio.to_thread(rbd.snapshots, img)
            except rbd.RbdError as err:
                log.warning("domain %s: disk %s: cannot read the checkpoints its RBD image "
                            "keeps: %s", domain.name, disk.name, err)
                continue
            ours = sorted((n for n in names if parse_checkpoint_bitmap(n) is not None),
                          key=lambda n: (parse_checkpoint_bitmap(n) or ("", 0.0))[1])
            self._kept[(domain.name, disk.name)] = set(ours)
            present = set(names)
            for i, bitmap in enumerate(ours):
                if bitmap in disk.bitmaps or broken(disk.name, bitmap):
                    continue
                # The first snapshot of ours taken after the next instant: the
                # next checkpoint's end, then the one after it's first, ...
                later = [end_snapshot(b) for b in ours[i + 1:i + 2]] + \
                    [s for b in ours[i + 2:] for s in (b, end_snapshot(b))]
                until = next((s for s in later if s in present), None)
                recording = i == len(ours) - 1
                await self._rebuild_one(domain, disk, img, bitmap, until, recording,
                                        granularity(disk.name, bitmap) or 65536)
                rebuilt = True
        return rebuilt

    async def _rebuild_one(self, domain: Domain, disk: Disk, img: rbd.RbdImage, bitmap: str,
                           until: str | None, recording: bool, granularity: int) -> None:
        if self.writer is None:
            return
        bitmaps = Bitmaps(domain.session)
        # A recording bitmap takes the guest's writes from before the diff is
        # read, so nothing falls between the two.
        await bitmaps.add(disk.node, bitmap, disabled=not recording, granularity=granularity)
        try:
            extents = await asyncio.to_thread(rbd.changed, img, bitmap, until)
            await self.writer(domain, disk.node, bitmap, disk.size, granularity, extents)
        except BaseException:
            await bitmaps.remove(disk.node, bitmap)
            raise
        log.info("domain %s: disk %s: rebuilt checkpoint bitmap %s from RBD image %s "
                 "(%d bytes changed %s)", domain.name, disk.name, bitmap, img,
                 sum(length for _, length in extents),
                 "since" if until is None else f"up to snapshot {until}")
