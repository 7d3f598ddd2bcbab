"""Property: whatever the sequence of guest writes, snapshots, checkpoint
creations and deletions, every change set the daemon exports equals what a
model of the writes says changed. Against a real VM and daemon."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from blockbackupd.qemu.nbdread import dirty_extents
from tests.conftest import export_xml, snapshot_xml
from tests.test_checkpoints import K, runs
from tools.daemon import Daemon, defined_domain
from tools.vm import MiB, Vm

DISKS = ("sda", "sdb")
CLUSTERS = 48

write = st.tuples(st.just("write"), st.sampled_from(DISKS), st.integers(0, CLUSTERS - 1))
op = st.one_of(
    write, write,
    st.tuples(st.just("checkpoint"), st.booleans()),  # True: keep its snapshot
    st.just(("snapshot",)), st.just(("snapshot",)),
    st.tuples(st.just("delete-snapshot"), st.integers(0, 5)),
    st.tuples(st.just("delete-checkpoint"), st.integers(0, 5)),
)


@pytest.fixture(scope="module")
def bench_domain() -> Iterator[tuple[Daemon, Vm]]:
    with defined_domain({d: 8 * MiB for d in DISKS}, prefix="bb-prop-",
                        log_level="info") as (vm, daemon):
        yield daemon, vm


# BB_PROPERTY_EXAMPLES=1000 for a longer run by hand.
@settings(max_examples=int(os.environ.get("BB_PROPERTY_EXAMPLES", "60")), deadline=None,
          suppress_health_check=list(HealthCheck))
@given(ops=st.lists(op, min_size=1, max_size=20))
# Sequences known to matter, always run: deleting the checkpoint that was
# recording at a live snapshot's instant, oldest first, and with stacked views.
@example(ops=[("checkpoint", False), ("write", "sda", 1), ("checkpoint", False),
              ("write", "sda", 2), ("snapshot",), ("write", "sda", 3),
              ("delete-checkpoint", 1)])
@example(ops=[("checkpoint", True), ("write", "sda", 1), ("checkpoint", True),
              ("write", "sdb", 2), ("delete-checkpoint", 0), ("snapshot",),
              ("write", "sda", 1), ("delete-checkpoint", 0), ("delete-snapshot", 0)])
def test_change_sets_match_a_model(bench_domain: tuple[Daemon, Vm],
                                   ops: list[tuple[object, ...]]) -> None:
    daemon, vm = bench_domain
    log: list[tuple[str, int]] = []
    checkpoints: list[tuple[str, int]] = []  # (name, mark), oldest first
    snapshots: list[tuple[str, int, list[str]]] = []  # (name, mark, checkpoints older)
    counter = iter(range(1000))
    with daemon.client() as c:
        try:
            for step in ops:
                kind = step[0]
                if kind == "write":
                    disk, cluster = str(step[1]), int(step[2])  # type: ignore[call-overload]
                    vm.write(disk, cluster * K, K, cluster + 1)
                    log.append((disk, cluster))
                elif kind == "checkpoint":
                    name = f"c{next(counter)}"
                    c.snapshot_create("vm1", snapshot_xml(name), checkpoint=True)
                    checkpoints.append((name, len(log)))
                    if step[1] and len(snapshots) < 3:
                        snapshots.append((name, len(log), [n for n, _ in checkpoints]))
                    else:
                        c.snapshot_delete("vm1", name)
                elif kind == "snapshot" and len(snapshots) < 3:
                    name = f"s{next(counter)}"
                    c.snapshot_create("vm1", snapshot_xml(name))
                    snapshots.append((name, len(log), [n for n, _ in checkpoints]))
                elif kind == "delete-snapshot" and snapshots:
                    name = snapshots.pop(int(step[1]) % len(snapshots))[0]  # type: ignore[call-overload]
                    c.snapshot_delete("vm1", name)
                elif kind == "delete-checkpoint" and checkpoints:
                    name = checkpoints.pop(int(step[1]) % len(checkpoints))[0]  # type: ignore[call-overload]
                    c.call("checkpoint.delete", domain="vm1", name=name)
            check(daemon, c, log, checkpoints, snapshots)
        finally:
            for name, _, _ in snapshots:
                c.snapshot_delete("vm1", name)
            for name, _ in checkpoints:
                c.call("checkpoint.delete", domain="vm1", name=name)
    assert not [b for n in vm.qmp("query-named-block-nodes", flat=True)
                for b in n.get("dirty-bitmaps", []) if "name" in b]


def since(log: list[tuple[str, int]], disk: str, start: int, end: int | None = None) -> set[int]:
    return {cl for d, cl in log[start:end] if d == disk}


def check(daemon: Daemon, c: Callable[..., object] | object, log: list[tuple[str, int]],
          checkpoints: list[tuple[str, int]],
          snapshots: list[tuple[str, int, list[str]]]) -> None:
    from blockbackup_client import Client
    assert isinstance(c, Client)
    assert c.call("checkpoint.list", domain="vm1") == [n for n, _ in checkpoints]
    for disk in DISKS:
        for name, mark in checkpoints:
            got = c.call("checkpoint.changes", domain="vm1", disk=disk, name=name)["extents"]
            assert got == runs(since(log, disk, mark)), (disk, name, "now")
        for snap, smark, older in snapshots:
            for name, mark in checkpoints:
                if name not in older:
                    continue  # newer than the snapshot
                want = runs(since(log, disk, mark, smark))
                got = c.call("checkpoint.changes", domain="vm1", disk=disk, name=name,
                             until=snap)["extents"]
                assert got == want, (disk, name, snap)
    # One pair through a real NBD export as well.
    if snapshots and checkpoints and checkpoints[0][0] in snapshots[-1][2]:
        snap, smark, _ = snapshots[-1]
        name, mark = checkpoints[0]
        started = c.export_start("vm1", export_xml([("sda", snap, {"checkpoint": name})]))
        try:
            got = dirty_extents(started["server"]["socket"], f"sda-{snap}",
                                f"qemu:dirty-bitmap:{name}")
            assert got == runs(since(log, "sda", mark, smark))
        finally:
            c.export_stop("vm1", export_xml([("sda", snap)]))
