"""Pulling a disk's extents from an NBD export into an image, fast.

A backup reads a plan: the runs of the source to copy and the runs to write
as zeros. The copy runs on several NBD connections to the source and as many
to the target, with several requests in flight on each (libnbd's async API,
one thread, ``select`` over all the sockets), so neither the network round
trip nor one server thread limits it. Zero runs are never read: they become
NBD_CMD_WRITE_ZEROES on the target, which a qcow2 keeps as zero clusters.

Blocking; the caller's thread runs the whole copy. Ctrl-C (KeyboardInterrupt)
stops it at once; the connections close when the handles go.
"""

from __future__ import annotations

import select
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import nbd

#: Defaults that keep memory bounded (connections × depth × request = 32 MiB)
#: and reach the disk's speed on QEMU's NBD server (see bench/).
CONNECTIONS = 4
DEPTH = 4
REQUEST = 2 * 1024 * 1024
#: One NBD_CMD_WRITE_ZEROES may span far more than a read (it moves no data).
ZERO_REQUEST = 1 << 30
#: NBD_CMD_BLOCK_STATUS asks at most this much at once.
_STATUS_CHUNK = 1 << 30

#: base:allocation flags (NBD protocol).
STATE_HOLE = 1
STATE_ZERO = 2


class PullError(Exception):
    """The source or the target failed a request; the message says which and why."""


@dataclass(frozen=True)
class Run:
    offset: int
    length: int
    zero: bool = False  # write zeros, read nothing


@dataclass
class Stats:
    bytes_read: int = 0
    bytes_zeroed: int = 0
    requests: int = 0


def context_runs(h: nbd.NBD, context: str) -> list[tuple[int, int, int]]:
    """(offset, length, flags) of one meta context over the whole export, merging
    neighbours with equal flags. The handle must have negotiated ``context``.

    :raise PullError: the server sent no status for part of the export.
    """
    size = h.get_size()
    runs: list[tuple[int, int, int]] = []
    offset = 0
    seen: list[tuple[int, int]] = []

    def collect(name: str, start: int, entries: list[int], err: object) -> int:
        if name == context:
            seen.extend(zip(entries[0::2], entries[1::2], strict=True))
        return 0

    while offset < size:
        seen.clear()
        h.block_status(min(size - offset, _STATUS_CHUNK), offset, collect)
        if not seen:
            raise PullError(f"no block status for {context} at offset {offset}")
        for length, flags in seen:
            length = min(length, size - offset)
            if runs and runs[-1][2] == flags and runs[-1][0] + runs[-1][1] == offset:
                runs[-1] = (runs[-1][0], runs[-1][1] + length, flags)
            else:
                runs.append((offset, length, flags))
            offset += length
            if offset >= size:
                break
    return runs


def _open(socket_path: str, export: str, contexts: tuple[str, ...] = ()) -> nbd.NBD:
    h = nbd.NBD()
    h.set_export_name(export)
    # The buffers are ours and reused; a failed read fails the backup anyway.
    h.set_pread_initialize(False)
    for context in contexts:
        h.add_meta_context(context)
    h.connect_unix(socket_path)
    for context in contexts:
        if not h.can_meta_context(context):
            raise PullError(f"the NBD server does not offer {context} on {export}")
    return h


def plan(socket_path: str, export: str, changes: str | None = None) -> list[Run]:
    """The runs to copy from an export: with ``changes`` (a dirty-bitmap meta
    context) only the changed blocks, zero ones as zero writes; without, every
    block that holds data (for a target that reads as zeros).

    :raise PullError: the export or a context could not be read.
    """
    contexts = ("base:allocation",) + ((changes,) if changes else ())
    try:
        h = _open(socket_path, export, contexts)
        try:
            allocation = context_runs(h, "base:allocation")
            dirty = context_runs(h, changes) if changes else None
        finally:
            h.shutdown()
    except nbd.Error as err:
        raise PullError(f"reading the extents of {export}: {err}") from err
    if dirty is None:
        return [Run(o, n) for o, n, flags in allocation if not flags & STATE_ZERO]
    return _intersect(allocation, [(o, n) for o, n, flags in dirty if flags & 1])


def _intersect(allocation: list[tuple[int, int, int]],
               dirty: list[tuple[int, int]]) -> list[Run]:
    """Dirty runs split by allocation: data parts to read, zero parts to zero."""
    out: list[Run] = []
    i = 0
    for start, length in dirty:
        end = start + length
        while i < len(allocation) and allocation[i][0] + allocation[i][1] <= start:
            i += 1
        j = i
        pos = start
        while pos < end and j < len(allocation):
            a_off, a_len, flags = allocation[j]
            stop = min(end, a_off + a_len)
            zero = bool(flags & STATE_ZERO)
            if out and out[-1].zero == zero and out[-1].offset + out[-1].length == pos:
                out[-1] = Run(out[-1].offset, out[-1].length + stop - pos, zero)
            else:
                out.append(Run(pos, stop - pos, zero))
            pos = stop
            if stop == a_off + a_len:
                j += 1
    return out


def _requests(runs: list[Run], request: int) -> deque[Run]:
    """The plan cut into NBD requests of at most ``request`` bytes (zeros: larger)."""
    out: deque[Run] = deque()
    for run in runs:
        step = ZERO_REQUEST if run.zero else request
        for offset in range(run.offset, run.offset + run.length, step):
            out.append(Run(offset, min(step, run.offset + run.length - offset), run.zero))
    return out


@dataclass
class _Slots:
    """A lane's buffers and requests. Completion callbacks hold this, never the
    handles, so dropping a lane closes its connections at once."""

    free: list[bytearray]
    busy: int = 0
    ready: deque[tuple[bytearray, Run]] = field(default_factory=deque)


@dataclass
class _Lane:
    """One source connection and one target connection."""

    src: nbd.NBD
    dst: nbd.NBD
    slots: _Slots


def copy(socket_path: str, export: str, target_socket: str, runs: list[Run],
         progress: Callable[[int], None] = lambda n: None, *, connections: int = CONNECTIONS,
         depth: int = DEPTH, request: int = REQUEST) -> Stats:
    """Copy ``runs`` from the export to the same offsets of the target and flush it.

    :raise PullError: a request failed on either side (the first error).
    """
    try:
        return _copy(socket_path, export, target_socket, runs, progress,
                     max(1, connections), max(1, depth), request)
    except nbd.Error as err:
        raise PullError(f"copying {export}: {err}") from err


def _copy(socket_path: str, export: str, target_socket: str, runs: list[Run],
          progress: Callable[[int], None], connections: int, depth: int,
          request: int) -> Stats:
    todo = _requests(runs, request)
    stats = Stats()
    if not todo:
        return stats
    connections = min(connections, len(todo))
    lanes: list[_Lane] = []
    failures: list[str] = []
    # Bytes written since the last progress report; reported from the loop, not
    # from libnbd's callbacks, so that a Ctrl-C never lands inside libnbd.
    moved = [0]
    try:
        for _ in range(connections):
            lanes.append(_Lane(_open(socket_path, export), _open(target_socket, ""),
                               _Slots([bytearray(request) for _ in range(depth)])))

        def written(state: _Slots, slot: bytearray | None, run: Run, err: object) -> int:
            state.busy -= 1
            if slot is not None:
                state.free.append(slot)
            code = getattr(err, "value", 0)
            if code:
                failures.append(f"writing {run.length} bytes at {run.offset}: errno {code}")
            else:
                moved[0] += run.length
            return 1

        def read(state: _Slots, slot: bytearray, run: Run, err: object) -> int:
            code = getattr(err, "value", 0)
            if code:
                state.busy -= 1
                state.free.append(slot)
                failures.append(f"reading {run.length} bytes at {run.offset}: errno {code}")
            else:
                state.ready.append((slot, run))
            return 1

        while not failures:
            for lane in lanes:
                state = lane.slots
                while state.ready:
                    slot, run = state.ready.popleft()
                    lane.dst.aio_pwrite(
                        nbd.Buffer.from_buffer(memoryview(slot)[:run.length]), run.offset,
                        lambda err, s=state, slot=slot, run=run: written(s, slot, run, err))
                    stats.requests += 1
                while todo and state.busy < depth:
                    run = todo.popleft()
                    state.busy += 1
                    stats.requests += 1
                    if run.zero:
                        lane.dst.aio_zero(run.length, run.offset,
                                          lambda err, s=state, run=run: written(s, None, run, err))
                        stats.bytes_zeroed += run.length
                    else:
                        slot = state.free.pop()
                        lane.src.aio_pread(
                            nbd.Buffer.from_buffer(memoryview(slot)[:run.length]), run.offset,
                            lambda err, s=state, slot=slot, run=run: read(s, slot, run, err))
                        stats.bytes_read += run.length
            if not todo and not any(lane.slots.busy for lane in lanes):
                break
            _wait(lanes)
            if moved[0]:
                progress(moved[0])
                moved[0] = 0
        if failures:
            raise PullError(f"copying {export}: {failures[0]}")
        for lane in lanes:
            lane.dst.flush()
        return stats
    finally:
        for lane in lanes:
            for h in (lane.src, lane.dst):
                if not failures and not h.aio_in_flight():
                    h.shutdown()
        lanes.clear()  # the last references: libnbd closes the sockets now


def _wait(lanes: list[_Lane]) -> None:
    """Block until some socket can move, and let libnbd move it."""
    readers: dict[int, nbd.NBD] = {}
    writers: dict[int, nbd.NBD] = {}
    for lane in lanes:
        for h in (lane.src, lane.dst):
            direction = h.aio_get_direction()
            if direction & nbd.AIO_DIRECTION_READ:
                readers[h.aio_get_fd()] = h
            if direction & nbd.AIO_DIRECTION_WRITE:
                writers[h.aio_get_fd()] = h
    r, w, _ = select.select(list(readers), list(writers), [])
    for fd in r:
        readers[fd].aio_notify_read()
    for fd in w:
        writers[fd].aio_notify_write()
