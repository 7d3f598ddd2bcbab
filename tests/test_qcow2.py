"""The one-pass qcow2 writer against QEMU's own reading of the result:
``qemu-img check`` finds nothing, and ``qemu-img compare`` equals a raw file
built the same way, with and without a backing file."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockbackup_client.qcow2 import (
    CLUSTER,
    REQUEST_BUFFERED,
    REQUEST_DIRECT,
    Cluster,
    Qcow2Writer,
    cluster_runs,
)

runs_strategy = st.lists(st.tuples(st.integers(0, 5 * 1024 * 1024), st.integers(1, 700_000),
                                   st.booleans()), max_size=8)


def check(path: Path) -> None:
    r = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(path)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "No errors were found" in r.stdout


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(runs=runs_strategy, size=st.sampled_from([4 * 1024 * 1024, 5 * 1024 * 1024 + 4096]),
       with_backing=st.booleans(), seed=st.integers(0, 1000))
def test_writer_matches_qemu(runs: list[tuple[int, int, bool]],
                             size: int, with_backing: bool, seed: int) -> None:
    import tempfile
    work = Path(tempfile.mkdtemp(prefix="bb-qcow2-"))
    try:
        _check_one(work, runs, size, with_backing, seed)
    finally:
        for p in work.iterdir():
            p.unlink()
        work.rmdir()


def _check_one(work: Path, runs: list[tuple[int, int, bool]], size: int, with_backing: bool,
               seed: int) -> None:
    rng = random.Random(seed)
    reference = bytearray(size)
    backing = None
    if with_backing:
        base = bytes(rng.getrandbits(8) for _ in range(256)) * (size // 256)
        reference[:] = base[:size]
        raw_base = work / "base.raw"
        raw_base.write_bytes(bytes(reference))
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw_base),
                        str(work / "base.qcow2")], check=True)
        backing = "base.qcow2"
    plan = cluster_runs(runs, size)
    writer = Qcow2Writer(work / "out.qcow2", size, plan, backing)
    for c in plan:
        start, end = c.first * CLUSTER, min((c.first + c.count) * CLUSTER, size)
        if c.zero:
            reference[start:end] = bytes(end - start)
            continue
        data = bytes(rng.getrandbits(8) for _ in range(64)) * ((end - start) // 64 + 1)
        data = data[:end - start]
        # In pieces and out of order, as the copier hands them over.
        pieces = [(o, min(o + 200_000, end)) for o in range(start, end, 200_000)]
        rng.shuffle(pieces)
        for a, b in pieces:
            writer.write(a, memoryview(data)[a - start:b - start])
        reference[start:end] = data
    writer.finish()
    check(work / "out.qcow2")
    raw = work / "expected.raw"
    raw.write_bytes(bytes(reference))
    r = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", str(raw),
                        str(work / "out.qcow2")], capture_output=True, text=True, cwd=work)
    assert r.returncode == 0, r.stdout + r.stderr
    if backing:
        info = subprocess.run(["qemu-img", "info", "--output=json", str(work / "out.qcow2")],
                              capture_output=True, text=True, check=True).stdout
        assert '"backing-filename": "base.qcow2"' in info
        assert '"backing-filename-format": "qcow2"' in info


def test_cluster_runs_widen_merge_and_prefer_data() -> None:
    K = CLUSTER
    assert cluster_runs([(100, 10, False), (K + 5, 2 * K, False), (10 * K, 3 * K, True),
                         (11 * K + 1, 1, False)], 20 * K) == [
        Cluster(0, 4, False), Cluster(10, 1, True), Cluster(11, 1, False),
        Cluster(12, 1, True)]
    # A run past the end of a disk whose size is not a whole number of clusters.
    assert cluster_runs([(K, 10 * K, False)], 2 * K + 512) == [Cluster(1, 2, False)]


def test_writer_refuses_bytes_outside_the_plan(tmp_path: Path) -> None:
    w = Qcow2Writer(tmp_path / "x.qcow2", 8 * CLUSTER, [Cluster(2, 2, False)])
    try:
        for offset, length in ((0, 1), (3 * CLUSTER, CLUSTER + 1)):
            try:
                w.write(offset, memoryview(bytes(length)))
            except ValueError:
                continue
            raise AssertionError(f"{length} bytes at {offset} accepted")
    finally:
        w.abort()
    assert not os.path.exists(tmp_path / "x.qcow2")


def test_writer_uses_o_direct_for_aligned_buffers(tmp_path: Path) -> None:
    import mmap
    w = Qcow2Writer(tmp_path / "x.qcow2", 4 * CLUSTER, [Cluster(0, 4, False)])
    try:
        assert w._direct >= 0  # ext4 under /tmp here
        buf = mmap.mmap(-1, CLUSTER)
        buf[:] = b"\x5a" * CLUSTER
        w.write(0, memoryview(buf))             # aligned: O_DIRECT
        w.write(CLUSTER + 512, b"\x6b" * 1000)  # unaligned: buffered
        w.finish()
    except BaseException:
        w.abort()
        raise
    check(tmp_path / "x.qcow2")
    expected = bytearray(4 * CLUSTER)
    expected[:CLUSTER] = b"\x5a" * CLUSTER
    expected[CLUSTER + 512:CLUSTER + 1512] = b"\x6b" * 1000
    (tmp_path / "e.raw").write_bytes(bytes(expected))
    assert subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2",
                           str(tmp_path / "e.raw"), str(tmp_path / "x.qcow2")],
                          capture_output=True).returncode == 0


def test_writer_asks_for_reads_that_suit_it(tmp_path: Path) -> None:
    from blockbackup_client import pull
    w = Qcow2Writer(tmp_path / "x.qcow2", 4 * CLUSTER, [Cluster(0, 4, False)])
    try:
        # ext4 under /tmp here: around the page cache, large reads.
        assert w.request_size == REQUEST_DIRECT
        w._direct = -1  # as on a tmpfs: through the page cache, smaller ones
        assert w.request_size == REQUEST_BUFFERED

        from blockbackup_client.backup import _FileSink

        class Plain:  # a sink with no preference
            def write(self, offset: int, data: memoryview) -> None:
                pass

        assert pull.request_size(_FileSink(w)) == REQUEST_BUFFERED  # what backup.py hands in
        assert pull.request_size(w) == REQUEST_BUFFERED
        assert pull.request_size(Plain()) == pull.REQUEST
    finally:
        w.abort()


def test_write_many_puts_scattered_runs_in_place_in_as_few_writes(tmp_path: Path) -> None:
    """An incremental's scattered clusters, packed into one buffer by the pull:
    runs that land back to back in the file go in one write, each byte at
    its guest place, through O_DIRECT and buffered."""
    import mmap
    plan = [Cluster(1, 1, False), Cluster(3, 2, False), Cluster(6, 1, True),
            Cluster(9, 1, False), Cluster(12, 1, False)]
    # The plan's data clusters lie in the file in guest order: 1, 3, 4, 9, 12.
    calls = [[1, 3, 12], [4, 9]]
    expected = bytearray(16 * CLUSTER)
    for direct in (True, False):
        path = tmp_path / f"x{direct}.qcow2"
        w = Qcow2Writer(path, 16 * CLUSTER, plan)
        try:
            if not direct:
                os.close(w._direct)
                w._direct = -1
            writes: list[tuple[int, int]] = []
            put = w._put
            w._put = lambda at, view, put=put, writes=writes: (  # type: ignore[method-assign]
                writes.append((at, len(view))), put(at, view))[1]
            for clusters in calls:
                buf = mmap.mmap(-1, len(clusters) * CLUSTER)
                for i, c in enumerate(clusters):
                    buf[i * CLUSTER:(i + 1) * CLUSTER] = bytes([0x30 + c]) * CLUSTER
                    expected[c * CLUSTER:(c + 1) * CLUSTER] = bytes([0x30 + c]) * CLUSTER
                w.write_many([(c * CLUSTER, CLUSTER) for c in clusters], memoryview(buf))
            d = w.data_offset
            assert writes == [(d, 2 * CLUSTER), (d + 4 * CLUSTER, CLUSTER),  # 1, 3 | 12
                              (d + 2 * CLUSTER, 2 * CLUSTER)]                # 4, 9
            w.finish()
        except BaseException:
            w.abort()
            raise
        check(path)
        (tmp_path / "e.raw").write_bytes(bytes(expected))
        assert subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "qcow2",
                               str(tmp_path / "e.raw"), str(path)],
                              capture_output=True).returncode == 0
