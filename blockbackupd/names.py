"""Rules for the names clients give to domains (and later snapshots, checkpoints).

Names end up in file names (scratch images, NBD sockets) and QEMU node names,
so they are restricted to a portable set: no path separators, no ``..``, no
control characters, at most 64 characters.
"""

from __future__ import annotations

import re

NAME_MAX = 64

#: Every QEMU node, bitmap, export, job and object the daemon makes is named
#: with this prefix, so what an earlier daemon left can be told apart.
PREFIX = "bb-"
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]*")

#: A checkpoint's persistent bitmaps are named ``bb-cp-<created, ms>-<name>``,
#: so the images themselves say which checkpoints exist, in which order and
#: since when: a daemon that has no record of them (another host after a
#: migration, a lost state_dir) adopts them.
CHECKPOINT_BITMAP_PREFIX = f"{PREFIX}cp-"
_CHECKPOINT_BITMAP_RE = re.compile(rf"{re.escape(CHECKPOINT_BITMAP_PREFIX)}(\d{{1,16}})-(.+)")


def checkpoint_bitmap(name: str, created: float) -> str:
    """The name of checkpoint ``name``'s bitmaps, created at Unix time ``created``."""
    return f"{CHECKPOINT_BITMAP_PREFIX}{int(created * 1000)}-{name}"


def parse_checkpoint_bitmap(bitmap: str) -> tuple[str, float] | None:
    """(checkpoint name, creation time) a bitmap's name records, or None when
    it is not one of our checkpoint bitmaps."""
    m = _CHECKPOINT_BITMAP_RE.fullmatch(bitmap)
    if m is None:
        return None
    try:
        name = check_name(m.group(2), "checkpoint name")
    except ValueError:
        return None
    return name, int(m.group(1)) / 1000


def check_name(value: str, what: str) -> str:
    """Return value when it is a usable name.

    :raise ValueError: naming what is wrong with it.
    """
    if not value:
        raise ValueError(f"{what} must not be empty")
    if len(value) > NAME_MAX:
        raise ValueError(f"{what} is longer than {NAME_MAX} characters")
    if not _NAME_RE.fullmatch(value):
        raise ValueError(
            f"{what} {value[:80]!r} may only contain letters, digits and '_.+-' "
            "and must not start with '.', '+' or '-'"
        )
    return value
