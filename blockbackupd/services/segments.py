"""Where a checkpoint's segment lives on a disk's backing chain, and whether
it is whole.

A segment is born as one persistent bitmap in the disk's top image. The VM
manager then stacks images on top (external snapshots) and takes them away
again (commit, stream, mirror), so at any moment the segment is the union of
the bitmaps of its name in the disk's chain, from the topmost image that
holds one down to the image where it began. (The same rules as libvirt's
"incremental backup internals": its external snapshots add an empty bitmap
of the same name, recording, to the new image for each recording bitmap.)

The change set is complete only if

- the image where the segment began is still in the chain;
- every image from the topmost holder down to that one holds the bitmap (an
  image without it took writes that nobody recorded), consistent and
  persistent;
- for the segment that records now (the newest of the disk), the topmost
  holder is the disk's top image and its bitmap records: an overlay that
  arrived without it takes the guest's writes unrecorded.

Disabled segments may be missing from images stacked after they stopped
recording: nothing was written to them while the segment was open. (An
image stacked while it was open is caught by the last rule, checked before
any operation could disable the segment.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..model import Disk, Image
from ..store.db import CheckpointDiskRecord


@dataclass(frozen=True)
class Placement:
    """The bitmaps of one segment in a disk's chain now, topmost first."""

    bitmap: str
    holders: tuple[Image, ...]

    def sources(self) -> list[dict[str, str]]:
        """Bitmap references for ``block-dirty-bitmap-merge``: their union is the segment."""
        return [{"node": image.node, "name": self.bitmap} for image in self.holders]

    @property
    def top(self) -> Image:
        return self.holders[0]

    def records_at(self, node: str) -> bool:
        """Whether the segment's topmost copy is on ``node`` and records."""
        return self.top.node == node and bool(self.top.bitmaps[self.bitmap].get("recording"))


def place(disk: Disk | None, record: CheckpointDiskRecord,
          recording: bool) -> Placement | str:
    """The segment's bitmaps in the disk's chain, or why its change set is
    not complete. ``recording``: the segment is the newest of the disk.
    """
    bitmap = record.bitmap
    if disk is None:
        return "the disk is not attached"
    begin = disk.image_index(record.image)
    if begin is None:
        return (f"the image {record.image} where its bitmap began left the disk's chain (a "
                f"commit, stream or mirror, or the disk replaced: its top image is now "
                f"{disk.file})")
    chain = disk.chain
    base = chain[begin]
    problem = bitmap_problem(base.bitmaps.get(bitmap), bitmap, base.file, record.granularity,
                             base.format)
    if problem is not None:
        return problem
    topmost = next(i for i in range(begin + 1) if bitmap in chain[i].bitmaps)
    for image in chain[topmost:begin]:
        if bitmap not in image.bitmaps:
            return (f"image {image.file} lacks bitmap {bitmap!r}: the writes it took while it "
                    "was on top were not recorded")
        problem = bitmap_problem(image.bitmaps[bitmap], bitmap, image.file, fmt=image.format)
        if problem is not None:
            return problem
    files = [image.file for image in chain[topmost:begin + 1]]
    for i, file in enumerate(record.span):
        if file in files:
            continue
        # An image that held part of the change set is gone (or lost the
        # bitmap). Only one way keeps it whole: an active commit of the top
        # copy into the image below, whose copy records, so the commit's
        # writes were recorded there. A stream or a mirror moves data without
        # recording it, and looks the same afterwards but for where the data went.
        committed = i == 0 and len(record.span) > 1 and topmost == 0 and \
            files[0] == record.span[1] and bool(chain[0].bitmaps[bitmap].get("recording"))
        if not committed:
            return (f"image {file}, which held part of its change set (bitmap {bitmap!r}), "
                    "left the disk's chain without its writes being recorded below (a "
                    "stream, a mirror, or a commit into an image whose copy was disabled)")
    if recording:
        if topmost != 0:
            return (f"image {chain[0].file} was put on top of the disk without bitmap "
                    f"{bitmap!r} (an external snapshot that did not carry the recording "
                    "bitmap): the writes since were not recorded")
        if not chain[0].bitmaps[bitmap].get("recording"):
            return "its bitmap stopped recording"
    return Placement(bitmap, chain[topmost:begin + 1])


#: Formats whose images keep bitmaps (persistent ones) across QEMU processes.
#: On any other (raw files, block devices, RBD images) a checkpoint's bitmap
#: lives in the memory of the QEMU process that made it, and ends with it.
PERSISTENT_FORMATS = frozenset({"qcow2"})


def bitmap_problem(info: Mapping[str, Any] | None, bitmap: str, image: str,
                   granularity: int = 0, fmt: str = "qcow2") -> str | None:
    """Why one copy of a checkpoint's bitmap, as QEMU shows it in ``image``
    (of format ``fmt``), cannot carry a change set, or None.
    ``granularity``: the one recorded, if any."""
    in_memory = fmt not in PERSISTENT_FORMATS
    if info is None:
        if in_memory:
            return (f"the disk's image {image} is {fmt}, so its changes were tracked in the "
                    "memory of the QEMU process, and that process has ended (QEMU restarted, "
                    "crashed, or the domain moved): what changed since is unknown")
        return f"bitmap {bitmap!r} is missing from the image {image}"
    if info.get("inconsistent"):
        return f"the image {image} was not closed cleanly (bitmap inconsistent)"
    if not info.get("persistent") and not in_memory:
        return f"bitmap {bitmap!r} in image {image} is not persistent"
    if granularity and int(info.get("granularity", 0)) != granularity:
        return f"bitmap granularity {info.get('granularity')} is not {granularity}"
    return None


def in_memory(disk: Disk) -> bool:
    """Whether a checkpoint made now on this disk lives only in QEMU's memory."""
    return disk.format not in PERSISTENT_FORMATS


def span(placement: Placement) -> tuple[str, ...]:
    """The image files that hold the segment now, top first (to store)."""
    return tuple(image.file for image in placement.holders)
