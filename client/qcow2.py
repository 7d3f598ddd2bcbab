"""Writing a new qcow2 image in one pass, with its layout known in advance.

A backup knows, before it reads a byte, which clusters of the disk it will
write (the pull plan). So instead of sending every byte through a qcow2
driver in another process (qemu-nbd: one more copy through a socket, and
metadata updated cluster by cluster), the copier writes the data clusters
straight into their final place in the file and the metadata once at the end.

The image is qcow2 version 3 with 64 KiB clusters and 16-bit refcounts,
what ``qemu-img create -f qcow2`` makes, optionally with a backing file
(relative name) and its format. Layout: header cluster (header, extensions,
backing file name), L1 table, refcount table, refcount blocks, L2 tables,
then the data clusters in disk order. Clusters the plan marks as zero get
the L2 "zero" flag (they read as zeros, hiding the backing file); clusters
it does not name stay unallocated (they read from the backing file, or as
zeros). ``qemu-img check`` finds nothing to repair in these images (tested).

Format reference: QEMU's docs/interop/qcow2.txt.
"""

from __future__ import annotations

import bisect
import errno
import os
import struct
import threading

from .value import Value

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path

CLUSTER_BITS = 16
CLUSTER = 1 << CLUSTER_BITS
_L2_ENTRIES = CLUSTER // 8
_REFS_PER_BLOCK = CLUSTER // 2  # 16-bit refcounts
_COPIED = 1 << 63
_ZERO = 1
_EXT_BACKING_FORMAT = 0xE2792ACA
_HEADER_LENGTH = 104
_MAGIC = b"QFI\xfb"
#: O_DIRECT needs offsets, lengths and buffer addresses in whole blocks.
_BLOCK = 4096
#: The reads a copier should make into this writer (pull.copy asks): 1 MiB
#: when the data goes around the page cache (fewer, larger writes to the
#: disk); 512 KiB when it is copied into the page cache (tmpfs), so each piece
#: is still in the processor's cache when it is written and checksummed.
#: Measured, README "Performance".
REQUEST_DIRECT = 1024 * 1024
REQUEST_BUFFERED = 512 * 1024


def _pwrite_all(fd: int, view: memoryview, at: int) -> None:
    """pwrite until every byte is written (a short write is allowed by POSIX)."""
    while view:
        n = os.pwrite(fd, view, at)
        view, at = view[n:], at + n


def _clusters(n: int) -> int:
    return -(-n // CLUSTER)


class Cluster(Value):
    """A run of guest clusters ``[first, first + count)``; zero: no data."""

    __slots__ = ("first", "count", "zero")

    def __init__(self, first: int, count: int, zero: bool) -> None:
        self.first, self.count, self.zero = first, count, zero


def cluster_runs(runs: list[tuple[int, int, bool]], size: int) -> list[Cluster]:
    """Byte runs (offset, length, zero) widened to whole clusters, in order,
    merged; a cluster touched by any data run holds data."""
    data: list[tuple[int, int]] = []
    zero: list[tuple[int, int]] = []
    for offset, length, is_zero in runs:
        first, end = offset // CLUSTER, _clusters(min(offset + length, size))
        if end > first:
            (zero if is_zero else data).append((first, end))
    data = _merge(data)
    out = [Cluster(a, b - a, False) for a, b in data]
    # A zero cluster that is partly data holds data: cut data spans out of zero spans.
    starts = [a for a, _ in data]
    for a, b in _merge(zero):
        pos = a
        i = max(0, bisect.bisect_right(starts, a) - 1)
        while pos < b:
            while i < len(data) and data[i][1] <= pos:
                i += 1
            if i < len(data) and data[i][0] <= pos:
                pos = data[i][1]
                continue
            stop = min(b, data[i][0]) if i < len(data) else b
            out.append(Cluster(pos, stop - pos, True))
            pos = stop
    out.sort(key=lambda c: c.first)
    return out


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


class Qcow2Writer:
    """One new image: reserve the layout, take the data, then :meth:`finish`.

    :meth:`write` puts guest bytes at their host place (any order, any
    thread-free caller); only clusters of the plan's data runs may be written.
    """

    def __init__(self, path: Path, size: int, plan: list[Cluster],
                 backing: str | None = None, backing_format: str = "qcow2") -> None:
        self.path, self.size, self.plan = path, size, plan
        self.backing, self.backing_format = backing, backing_format
        self._metadata: bytes | None = None
        guest_clusters = _clusters(size)
        self.l1_size = max(1, -(-guest_clusters // _L2_ENTRIES))
        l2_needed = sorted({c // _L2_ENTRIES for run in plan
                            for c in range(run.first, run.first + run.count, _L2_ENTRIES)}
                           | {(run.first + run.count - 1) // _L2_ENTRIES for run in plan})
        self._l2_index = {l1: i for i, l1 in enumerate(l2_needed)}
        data_clusters = sum(r.count for r in plan if not r.zero)
        # Metadata before the data; refcount blocks must also count themselves.
        self.l1_offset = CLUSTER
        l1_clusters = _clusters(self.l1_size * 8)
        fixed = 1 + l1_clusters + len(l2_needed) + data_clusters
        refblocks = 1
        while True:
            reftable_clusters = _clusters(refblocks * 8)
            total = fixed + reftable_clusters + refblocks
            if -(-total // _REFS_PER_BLOCK) <= refblocks:
                break
            refblocks += 1
        self.total_clusters = total
        self.reftable_offset = self.l1_offset + l1_clusters * CLUSTER
        self.reftable_clusters = reftable_clusters
        self.refblock_offset = self.reftable_offset + reftable_clusters * CLUSTER
        self.refblocks = refblocks
        self.l2_offset = self.refblock_offset + refblocks * CLUSTER
        self.data_offset = self.l2_offset + len(l2_needed) * CLUSTER
        # Guest cluster -> host offset, per data run (runs are in guest order).
        self._starts: list[int] = []
        self._runs: list[tuple[Cluster, int]] = []
        host = self.data_offset
        for run in plan:
            if not run.zero:
                self._starts.append(run.first)
                self._runs.append((run, host))
                host += run.count * CLUSTER
        self.file_size = self.data_offset + data_clusters * CLUSTER
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        # Buffered writes take the file's lock in the kernel, where writers
        # that wait for it spin: one at a time here, the others sleep.
        self._buffered = threading.Lock()
        self._direct = -1
        try:
            os.ftruncate(self.fd, self.file_size)
            # Data goes around the page cache when it can: the disk then writes
            # while the network copies, instead of at the final fsync.
            self._direct = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except OSError:  # a file system without O_DIRECT (tmpfs): buffered
            pass

    def host_offset(self, offset: int, length: int) -> int:
        """Where guest bytes [offset, offset+length) go; they must lie in one data run.

        :raise ValueError: they are outside the plan's data.
        """
        i = bisect.bisect_right(self._starts, offset // CLUSTER) - 1
        if i < 0:
            raise ValueError(f"offset {offset} is not in the plan")
        run, host = self._runs[i]
        if offset + length > (run.first + run.count) * CLUSTER:
            raise ValueError(f"{length} bytes at {offset} leave the plan's run")
        return host + offset - run.first * CLUSTER

    @property
    def request_size(self) -> int:
        """The size of the pieces this writer takes best (see REQUEST_DIRECT)."""
        return REQUEST_DIRECT if self._direct >= 0 else REQUEST_BUFFERED

    def write(self, offset: int, data: memoryview | bytes) -> None:
        """Put guest bytes in place; thread-safe. Page-aligned buffers of whole
        4 KiB blocks go straight to the disk (O_DIRECT), the rest buffered
        (one buffered write at a time)."""
        self._put(self.host_offset(offset, len(data)), memoryview(data))

    def write_many(self, runs: list[tuple[int, int]], data: memoryview) -> None:
        """Put guest runs (offset, length), whose bytes follow one another in
        ``data``; thread-safe. Runs that land back to back in the file (the
        plan's data runs in guest order do) go in one write: an
        incremental's scattered clusters cost the disk one write per piece,
        not one per cluster."""
        at = start = 0
        host = end = -1
        for offset, length in runs:
            there = self.host_offset(offset, length)
            if there != end:
                if host >= 0:
                    self._put(host, data[start:at])
                host, start = there, at
            end = there + length
            at += length
        if host >= 0:
            self._put(host, data[start:at])

    def _put(self, at: int, view: memoryview) -> None:
        if self._direct >= 0 and at % _BLOCK == 0 and len(view) % _BLOCK == 0:
            try:
                _pwrite_all(self._direct, view, at)
                return
            except OSError as err:  # EINVAL: the buffer's address is not aligned
                if err.errno != errno.EINVAL:
                    raise
        with self._buffered:
            _pwrite_all(self.fd, view, at)

    def metadata(self) -> bytes:
        """The bytes of the file before its data: header cluster, L1 table,
        refcount table and blocks, L2 tables. Known from the plan alone, so a
        checksum of the whole file can start before any data is read."""
        if self._metadata is None:
            self._metadata = self._render()
        return self._metadata

    def _render(self) -> bytes:
        out = bytearray(self.data_offset)
        header = self._header()
        out[:len(header)] = header
        for table, index in self._l2_index.items():
            struct.pack_into(">Q", out, self.l1_offset + table * 8,
                             (self.l2_offset + index * CLUSTER) | _COPIED)
        host_of = {r.first: h for r, h in self._runs}
        zero_entry = struct.pack(">Q", _ZERO)
        for run in self.plan:
            host = host_of.get(run.first) if not run.zero else None
            # The run's entries, one L2 table's part at a time, packed at once
            # (entry by entry, 1 GiB took 5 ms).
            c, end = run.first, run.first + run.count
            while c < end:
                stop = min(end, (c // _L2_ENTRIES + 1) * _L2_ENTRIES)
                n = stop - c
                at = self.l2_offset + self._l2_index[c // _L2_ENTRIES] * CLUSTER \
                    + (c % _L2_ENTRIES) * 8
                if host is None:
                    out[at:at + 8 * n] = zero_entry * n
                else:
                    first = (host + (c - run.first) * CLUSTER) | _COPIED
                    out[at:at + 8 * n] = struct.pack(f">{n}Q",
                                                     *range(first, first + n * CLUSTER, CLUSTER))
                c = stop
        for b in range(self.refblocks):
            struct.pack_into(">Q", out, self.reftable_offset + b * 8,
                             self.refblock_offset + b * CLUSTER)
        out[self.refblock_offset:self.refblock_offset + self.total_clusters * 2] = \
            b"\x00\x01" * self.total_clusters
        return bytes(out)

    def finish(self) -> None:
        """Write the metadata, flush the file to disk and close it.

        :raise OSError: the file could not be written.
        """
        self.complete()
        self.sync()

    def complete(self) -> None:
        """Write the metadata: the file is whole after this (not yet durable).

        :raise OSError: the file could not be written.
        """
        try:
            _pwrite_all(self.fd, memoryview(self.metadata()), 0)
        except BaseException:
            self.abort()
            raise

    def sync(self) -> None:
        """Flush the file to disk and close it (waits on the disk, not the CPU).

        :raise OSError:
        """
        try:
            os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1
            if self._direct >= 0:
                os.close(self._direct)
                self._direct = -1

    def abort(self) -> None:
        """Close and remove the unfinished file."""
        for fd in (self.fd, self._direct):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.fd = self._direct = -1
        self.path.unlink(missing_ok=True)

    def _header(self) -> bytes:
        extensions = b""
        if self.backing is not None:
            fmt = self.backing_format.encode()
            extensions += struct.pack(">II", _EXT_BACKING_FORMAT, len(fmt)) + fmt
            extensions += b"\0" * (-len(fmt) % 8)
        extensions += struct.pack(">II", 0, 0)
        name = self.backing.encode() if self.backing is not None else b""
        backing_offset = _HEADER_LENGTH + len(extensions) if name else 0
        if backing_offset + len(name) > CLUSTER:
            raise ValueError("backing file name too long")
        header = struct.pack(
            ">4sIQIIQIIQQIIQQQQII", _MAGIC, 3, backing_offset, len(name), CLUSTER_BITS,
            self.size, 0, self.l1_size, self.l1_offset, self.reftable_offset,
            self.reftable_clusters, 0, 0, 0, 0, 0, 4, _HEADER_LENGTH)
        assert len(header) == _HEADER_LENGTH
        return header + extensions + name


def backing_file(path: Path) -> str | None:
    """The backing file name in a qcow2 file's header (None: none).

    :raise ValueError: the file is not qcow2.
    """
    with open(path, "rb") as f:
        header = f.read(20)
        if len(header) < 20 or header[:4] != _MAGIC:
            raise ValueError(f"{path.name} is not a qcow2 file")
        offset, length = struct.unpack(">QI", header[8:20])
        if not offset:
            return None
        f.seek(offset)
        return f.read(length).decode(errors="replace")
