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
