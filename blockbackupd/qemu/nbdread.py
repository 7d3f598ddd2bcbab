"""Reading a dirty-bitmap meta context from QEMU's own NBD server (libnbd),
and setting a bitmap's bits through it.

QMP has no command that lists a bitmap's dirty extents; QEMU's NBD server
does, as ``qemu:dirty-bitmap:<name>`` block status. The daemon exports a
null node (it reads as zeros, so no guest data is exposed) carrying the
bitmap and reads the extents here. Nor has QMP a command that marks extents
dirty: a write to a null node marks them in its enabled bitmaps, and writes
zeros of a writable export of one cost no data. Blocking: call them in a thread.
"""

from __future__ import annotations

import nbd

# The client's reader of NBD exports (the same distribution): one way to
# read a meta context for the backup application and for the daemon.
from blockbackup_client.nbdio import connect, context_runs

#: Largest zero write: the protocol's limit (4 GiB - 1), rounded down to whole MiB.
_CHUNK = (4 << 30) - (1 << 20)


def dirty_extents(socket_path: str, export: str, context: str) -> list[list[int]]:
    """[[offset, length], ...] of the dirty runs, merged, in order.

    :raise RuntimeError: the export could not be read (libnbd's message).
    """
    try:
        return _dirty_extents(socket_path, export, context)
    except nbd.Error as err:
        raise RuntimeError(str(err)) from err


def _dirty_extents(socket_path: str, export: str, context: str) -> list[list[int]]:
    h = connect(socket_path, export, (context,))
    try:
        return [[offset, length] for offset, length, flags in context_runs(h, context)
                if flags & 1]
    finally:
        h.shutdown()


def mark_extents(socket_path: str, export: str, extents: list[list[int]]) -> None:
    """Write zeros over each [offset, length] of a writable export (of a null
    node: nothing is stored, and its enabled bitmaps take the extents).

    :raise RuntimeError: the export could not be written (libnbd's message).
    """
    try:
        h = connect(socket_path, export)
        try:
            for offset, length in extents:
                end = offset + length
                while offset < end:
                    step = min(end - offset, _CHUNK)
                    h.zero(step, offset)
                    offset += step
            h.flush()
        finally:
            h.shutdown()
    except nbd.Error as err:
        raise RuntimeError(str(err)) from err
