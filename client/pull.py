"""Pulling a disk's extents from an NBD export, fast.

A backup reads a plan: the runs of the source to copy and the runs that read
as zeros. The copy runs on several NBD connections to the source with several
requests in flight on each (libnbd's async API, one thread, ``select`` over
the sockets), so neither the round trip nor one server coroutine limits it,
and hands each piece to a sink (the qcow2 writer). Zero runs are never read.

Blocking; the caller's thread runs the whole copy. Ctrl-C (KeyboardInterrupt)
stops it at once; the connections close when the handles go.
"""

from __future__ import annotations

import mmap
import os
import select
import threading
from collections import deque
from functools import partial
from queue import SimpleQueue

import nbd

from .nbdio import NbdServer, connect, context_runs
from .value import Value

# Imported for the type checker only: typing, dataclasses (inspect) and
# concurrent.futures (logging) would cost every backup's start ~15 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Protocol

    class Sink(Protocol):
        """Where the data goes: guest bytes at a guest offset; called from
        several threads at once. A sink may also have ``request_size``: the
        size of the pieces it takes best; and ``write_many(runs, data)``:
        several runs (offset, length) whose bytes follow one another in
        ``data``, in one call."""

        def write(self, offset: int, data: memoryview) -> None: ...

#: Defaults that keep memory bounded (connections × depth × request = 32 MiB
#: at most); the fastest of the settings tried here (bench/, README
#: "Performance"). The request size is the sink's ``request_size`` if it has
#: one (the qcow2 writer: 1 MiB around the page cache, 512 KiB through it).
CONNECTIONS = 4
DEPTH = 8
REQUEST = 1024 * 1024
#: The largest NBD read: a piece may take several. QEMU 7.2's NBD server
#: serves 512 KiB reads at 1.6x the rate of 1 MiB ones here, and 256 KiB
#: ones no faster (measured: README, "Performance").
READ = 512 * 1024
#: Threads writing into the target (the sink's write must be thread-safe):
#: with O_DIRECT each waits on the disk, so several keep it busy.
WRITERS = 4

#: base:allocation flag (NBD protocol): the range reads as zeros.
STATE_ZERO = 2


class PullError(Exception):
    """The source or the target failed a request; the message says which and why."""


class Run(Value):
    """A byte range of the disk; ``zero``: write zeros, read nothing."""

    __slots__ = ("offset", "length", "zero")

    def __init__(self, offset: int, length: int, zero: bool = False) -> None:
        self.offset, self.length, self.zero = offset, length, zero


def plan(server: NbdServer | str, export: str, changes: str | None = None) -> list[Run]:
    """The runs to copy from an export: with ``changes`` (a dirty-bitmap meta
    context) only the changed blocks, zero ones as zero writes; without, every
    block that holds data (for a target that reads as zeros).

    :raise PullError: the export or a context could not be read.
    """
    contexts = ("base:allocation",) + ((changes,) if changes else ())
    try:
        h = connect(server, export, contexts)
        try:
            if changes is None:
                allocation = context_runs(h, "base:allocation")
                return [Run(o, n) for o, n, flags in allocation if not flags & STATE_ZERO]
            dirty = [(o, n) for o, n, flags in context_runs(h, changes) if flags & 1]
            if not dirty:
                return []
            # The allocation only where something changed (a 1 TiB disk with
            # a few changes asks a few GiB, not all of it).
            allocation = context_runs(h, "base:allocation", dirty[0][0],
                                      dirty[-1][0] + dirty[-1][1])
        finally:
            h.shutdown()
    except (nbd.Error, RuntimeError) as err:
        raise PullError(f"reading the extents of {export}: {err}") from err
    return _intersect(allocation, dirty)


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


def _requests(runs: list[Run], request: int) -> deque[list[Run]]:
    """The data runs as pieces of at most ``request`` bytes: a long run cut,
    short ones (an incremental's scattered clusters) packed together, so a
    piece costs the loop, the writer and the checksum one step however
    small its runs are."""
    out: deque[list[Run]] = deque()
    room = 0
    for run in runs:
        if run.zero:
            continue
        for offset in range(run.offset, run.offset + run.length, request):
            length = min(request, run.offset + run.length - offset)
            if length <= room:
                out[-1].append(Run(offset, length))
                room -= length
            else:
                out.append([Run(offset, length)])
                room = request - length
    return out


def request_size(sink: Sink) -> int:
    """The read size for ``sink``: its ``request_size``, else REQUEST."""
    size = getattr(sink, "request_size", None)
    return size if isinstance(size, int) and size > 0 else REQUEST


class _Slots:
    """A connection's buffers and requests. Completion callbacks hold this,
    never the handle, so dropping the handle closes its connection at once."""

    __slots__ = ("free", "busy", "ready")

    def __init__(self, free: list[mmap.mmap]) -> None:
        self.free = free
        self.busy = 0
        self.ready: deque[_Piece] = deque()


def copy(server: NbdServer | str, export: str, runs: list[Run], sink: Sink,
         progress: Callable[[int], None] = lambda n: None,
         ordered: Callable[[memoryview], None] | None = None, *,
         connections: int = CONNECTIONS, depth: int = DEPTH, request: int | None = None) -> int:
    """Read the data runs from the export and hand them to ``sink`` (zero runs
    are the sink's business: nothing is read for them). ``ordered``, if
    given, sees every byte read exactly once, in the order of ``runs`` (in a
    thread of its own), e.g. to checksum the result without reading it back.
    ``request`` (bytes per NBD read): by default :func:`request_size`.
    Returns the bytes read.

    :raise PullError: a read or a write failed (the first error).
    """
    try:
        return _copy(server, export, runs, sink, progress, ordered, max(1, connections),
                     max(1, depth), request or request_size(sink))
    except nbd.Error as err:
        raise PullError(f"copying {export}: {err}") from err


class _Piece:
    """One request's data on its way: written and (maybe) seen in order."""

    __slots__ = ("state", "slot", "runs", "length", "index", "left")

    def __init__(self, state: _Slots, slot: mmap.mmap, runs: list[Run], length: int, index: int,
                 left: int) -> None:
        self.state, self.slot, self.runs, self.length = state, slot, runs, length
        self.index = index
        self.left = left  # jobs still holding the slot


class _Workers:
    """Threads taking jobs in the order given (a small ThreadPoolExecutor
    that does not import concurrent.futures and logging)."""

    def __init__(self, count: int, name: str) -> None:
        self._jobs: SimpleQueue[Callable[[], None] | None] = SimpleQueue()
        self._cancelled = False
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True)
                         for i in range(count)]
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if not self._cancelled:
                job()

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)

    def shutdown(self) -> None:
        """Drop the jobs not started, wait for the running ones."""
        self._cancelled = True
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()


def _copy(server: NbdServer | str, export: str, runs: list[Run], sink: Sink,
          progress: Callable[[int], None], ordered: Callable[[memoryview], None] | None,
          connections: int, depth: int, request: int) -> int:
    part = min(request, READ)
    todo = _requests(runs, request)
    read_bytes = 0
    if not todo:
        return read_bytes
    connections = min(connections, len(todo))
    handles: list[tuple[nbd.NBD, _Slots]] = []
    failures: list[str] = []

    def read(state: _Slots, slot: mmap.mmap, runs: list[Run], length: int, index: int,
             parts: list[int], offset: int, err: object) -> int:
        code = getattr(err, "value", 0)
        if code:
            failures.append(f"reading at {offset}: errno {code}")
        parts[0] -= 1
        if parts[0]:
            return 1
        if failures:
            state.busy -= 1
            state.free.append(slot)
        else:
            state.ready.append(_Piece(state, slot, runs, length, index, 2 if ordered else 1))
        return 1

    # Writes go to a pool of threads (pwrite releases the GIL) and the ordered
    # consumer to one more, so the disk, the checksum and the sockets all move
    # at once; each job that finishes wakes the loop through a pipe.
    done: deque[_Piece] = deque()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)

    def job(piece: _Piece, what: Callable[[memoryview], None], verb: str) -> None:
        try:
            what(memoryview(piece.slot)[:piece.length])
        except BaseException as err:
            failures.append(f"{verb} {piece.length} bytes at {piece.runs[0].offset}: {err}")
        done.append(piece)
        os.write(wake_w, b"\0")

    many = getattr(sink, "write_many", None)

    def write(runs: list[Run], data: memoryview) -> None:
        if many is not None and len(runs) > 1:
            many([(run.offset, run.length) for run in runs], data)
            return
        at = 0
        for run in runs:
            sink.write(run.offset, data[at:at + run.length])
            at += run.length

    writers = _Workers(WRITERS, "bb-write")
    seer = _Workers(1, "bb-ordered")
    arrived: dict[int, _Piece] = {}
    next_seen = 0
    issued = 0
    try:
        for _ in range(connections):
            h = connect(server, export)
            # The buffers are ours and reused; a failed read fails the copy anyway.
            h.set_pread_initialize(False)
            # Page-aligned buffers (mmap), so writes may bypass the page cache.
            handles.append((h,
                            _Slots([mmap.mmap(-1, request) for _ in range(depth)])))
        while not failures:
            moved = 0
            while done:
                piece = done.popleft()
                piece.left -= 1
                if piece.left == 0:
                    piece.state.free.append(piece.slot)
                    piece.state.busy -= 1
                    moved += piece.length
            for h, state in handles:
                while state.ready:
                    piece = state.ready.popleft()
                    writers.submit(partial(job, piece, partial(write, piece.runs), "writing"))
                    if ordered is not None:
                        arrived[piece.index] = piece
                while ordered is not None and next_seen in arrived:
                    seer.submit(partial(job, arrived.pop(next_seen), ordered, "checking"))
                    next_seen += 1
                while todo and state.busy < depth:
                    runs = todo.popleft()
                    slot = state.free.pop()
                    state.busy += 1
                    view = memoryview(slot)
                    length = sum(r.length for r in runs)
                    parts = [sum(-(-r.length // part) for r in runs)]
                    at = 0
                    for run in runs:
                        for offset in range(run.offset, run.offset + run.length, part):
                            n = min(part, run.offset + run.length - offset)
                            h.aio_pread(nbd.Buffer.from_buffer(view[at:at + n]), offset,
                                        lambda err, s=state, slot=slot, runs=runs, n=length,
                                        i=issued, p=parts, o=offset:
                                        read(s, slot, runs, n, i, p, o, err))
                            at += n
                    issued += 1
                    read_bytes += length
            if moved:
                progress(moved)
            if not todo and not any(state.busy for _, state in handles):
                break
            _wait([h for h, _ in handles], wake_r)
        if failures:
            raise PullError(f"copying {export}: {failures[0]}")
        return read_bytes
    finally:
        for pool in (writers, seer):  # no job runs after we return
            pool.shutdown()
        os.close(wake_r)
        os.close(wake_w)
        for h, _ in handles:
            if not failures and not h.aio_in_flight():
                h.shutdown()
        handles.clear()  # the last references: libnbd closes the sockets now


def _wait(handles: list[nbd.NBD], wake: int) -> None:
    """Block until some socket can move (and let libnbd move it) or a write is done."""
    readers: dict[int, nbd.NBD | None] = {wake: None}
    writers: dict[int, nbd.NBD] = {}
    for h in handles:
        direction = h.aio_get_direction()
        if direction & nbd.AIO_DIRECTION_READ:
            readers[h.aio_get_fd()] = h
        if direction & nbd.AIO_DIRECTION_WRITE:
            writers[h.aio_get_fd()] = h
    r, w, _ = select.select(list(readers), list(writers), [])
    for fd in r:
        h = readers[fd]
        if h is None:
            try:
                os.read(wake, 4096)
            except BlockingIOError:
                pass
        else:
            h.aio_notify_read()
    for fd in w:
        writers[fd].aio_notify_write()
