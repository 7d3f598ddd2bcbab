"""Live migration on shared storage, started by the VM manager while a live
snapshot of ours exists.

QEMU 7.2 cannot hand a disk over while a snapshot's filter sits in its I/O
path: the migration fails at its very end (``bdrv_inactivate_all() failed``)
and the guest stays on the source. The manager's migration wins: on QEMU's
``MIGRATION`` event (sent when the manager turns on the ``events``
capability, as libvirt does) every live snapshot gives way, broken with the
reason ``migrating``, and the migration completes. The persistent bitmaps
travel in the shared images, and a daemon on the destination adopts the
checkpoints from them and takes an exact incremental.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from blockbackup_client import Busy
from tests.conftest import domain_state, export_xml, snapshot_xml, wait_for
from tests.vm_manager.manager import assert_restore_equals, backup
from tools.daemon import Daemon
from tools.vm import MiB, Vm

KiB = 1024


class Destination(Vm):
    """A QEMU waiting for an incoming migration, on the source's images."""

    def __init__(self, source: Vm, name: str) -> None:
        self.uri = f"unix:{source.workdir / (name + '.mig')}"
        super().__init__(source.workdir, name, disks=dict(source.disks),
                         extra_args=["-incoming", self.uri])
        self.source = source

    def image(self, disk: str) -> Path:
        return self.source.image(disk)


@pytest.fixture
def hosts(make_vm: Callable[..., Vm], make_daemon: Callable[..., Daemon],
          workdir: Path) -> Iterator[tuple[Vm, Daemon]]:
    """The source VM (two disks) defined in its host's daemon."""
    src = make_vm("src")
    daemon = make_daemon()
    with daemon.client() as c:
        c.domain_define("vm1", str(src.daemon_qmp))
    wait_for(lambda: domain_state(daemon, "vm1") == "running", what="vm1 running")
    yield src, daemon


#: Bytes/s: this guest's RAM is nearly all zero pages and would migrate in
#: about 15 ms, less than the daemon needs to react; a real guest's memory
#: takes seconds. At this rate it takes about a second.
BANDWIDTH = 256 * KiB


def checkpoints(daemon: Daemon) -> list[str]:
    with daemon.client() as c:
        return list(c.call("checkpoint.list", domain="vm1"))


def migrate(src: Vm, dst: Vm, events: bool = True, timeout: float = 30) -> dict[str, Any]:
    """The VM manager's live migration; QEMU's final word on it."""
    if events:
        src.qmp("migrate-set-capabilities",
                capabilities=[{"capability": "events", "state": True}])
    src.qmp("migrate-set-parameters", **{"max-bandwidth": BANDWIDTH})
    src.qmp("migrate", uri=dst.uri)  # type: ignore[attr-defined]
    deadline = time.monotonic() + timeout
    while True:
        info: dict[str, Any] = src.qmp("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        assert time.monotonic() < deadline, info
        time.sleep(0.02)


def qmp_time(event: dict[str, Any]) -> float:
    """When QEMU sent an event, in seconds since the epoch."""
    stamp = event["timestamp"]
    return float(stamp["seconds"]) + stamp["microseconds"] / 1e6


def log_times(daemon: Daemon, text: str) -> list[float]:
    """When the daemon logged each line holding text, in seconds since the
    epoch (its log stamps local time to the millisecond)."""
    times = []
    for line in daemon.log().splitlines():
        if text in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
            times.append(stamp.timestamp())
    return times


def test_a_migration_started_under_a_live_snapshot_completes(
        hosts: tuple[Vm, Daemon], workdir: Path) -> None:
    src, daemon = hosts
    src.write("sda", 0, MiB, 0x11)
    src.write("sdb", 0, 64 * KiB, 0x12)
    dest = workdir / "backups"
    first = backup(daemon, dest)  # its checkpoint stays: the next incremental's base
    src.write("sda", 2 * MiB, 64 * KiB, 0x21)
    with daemon.client() as c:
        c.snapshot_create("vm1", snapshot_xml("live"), checkpoint=True)
        c.export_start("vm1", export_xml([("sda", "live")]))
        c.events_subscribe(["vm1"])
        dst = Destination(src, "dst").start()
        # The destination host's daemon knows the domain before it arrives
        # (from its config file, say): connected to the incoming QEMU.
        (workdir / "host2").mkdir()
        other = Daemon(workdir / "host2").start()
        try:
            with other.client() as c2:
                c2.domain_define("vm1", str(dst.daemon_qmp))
                wait_for(lambda: domain_state(other, "vm1") == "paused", what="dst connected")
                assert c2.call("checkpoint.list", domain="vm1") == []  # not its disks yet
            src.qmp("query-status")  # collects the events sent so far (the snapshot's
            src.monitor.events.clear()  # type: ignore[union-attr]  # held-I/O STOP, RESUME)
            info = migrate(src, dst)
            assert info["status"] == "completed", info
            # The guest runs on the destination, the source is done with it.
            wait_for(lambda: dst.status() == "running", what="destination running")
            assert src.status() == "postmigrate"
            # The guest stopped once, for QEMU's own downtime only: the
            # snapshot had given way (filters out of the graph) while it
            # still ran on the source.
            src.qmp("query-status")  # collects the events sent meanwhile
            stops = [e for e in src.monitor.events  # type: ignore[union-attr]
                     if e["event"] == "STOP"]
            assert len(stops) == 1, src.monitor.events  # type: ignore[union-attr]
            stopped = qmp_time(stops[0])
            dropped = log_times(daemon, "snapshot vm1/live: disk ")
            assert len(dropped) == 2 and max(dropped) < stopped, (dropped, stopped)
            events = [c.next_event(timeout=10) for _ in range(2)]
            assert {(e["type"], e["disk"]) for e in events} == {
                ("snapshot-broken", "sda"), ("snapshot-broken", "sdb")}
            assert all(e["reason"].startswith("migrating: ") for e in events)
            lookup = c.snapshot_lookup("vm1", "live")
            assert lookup["state"] == "broken" and lookup["reason"].startswith("migrating")
            assert set(lookup["removed_disks"]) == {"sda", "sdb"}
            assert c.export_list("vm1") == []
            # Nothing of ours is left in the source's graph; the scratch files went.
            assert not any(n.startswith("bb-") for n in src.node_names())
            assert list(Path(daemon.daemon_keys["scratch_dir"]).iterdir()) == []
            c.snapshot_delete("vm1", "live")
            # The source's QEMU no longer owns the disks: nothing is served or
            # judged there, and the checkpoints stay valid in its daemon's store.
            with pytest.raises(Busy, match="migrat"):
                c.snapshot_create("vm1", snapshot_xml("late"))
            with pytest.raises(Busy, match="has migrated away"):
                c.call("checkpoint.changes", domain="vm1", disk="sda", name="live")
            names = [first["id"], "live"]
            docs = [c.call("checkpoint.get_xml", domain="vm1", name=n) for n in names]
            assert all("<state>valid</state>" in d for d in docs), docs

            # The destination's daemon adopts the checkpoints from the images
            # (the bitmaps came along) once the guest runs there, and takes
            # an exact incremental.
            wait_for(lambda: checkpoints(other) == names,
                     what="the destination's daemon to adopt the checkpoints")
            dst.write("sda", 4 * MiB, 64 * KiB, 0x31)
            with other.client() as c2:
                assert [c2.call("checkpoint.get_xml", domain="vm1", name=n)
                        for n in names] == docs
                changes = c2.call("checkpoint.changes", domain="vm1", disk="sda",
                                  name=first["id"])
                assert changes["extents"] == [[2 * MiB, 64 * KiB], [4 * MiB, 64 * KiB]]
            record = backup(other, dest)
            assert record["level"] == "inc"
            assert {d: e["bytes_read"] for d, e in record["disks"].items()} == {
                "sda": 128 * KiB, "sdb": 0}
            dst.qmp("stop")
            try:
                for disk in ("sda", "sdb"):
                    assert_restore_equals(other, dest, disk, str(dst.image(disk)))
            finally:
                dst.qmp("cont")
        finally:
            other.stop()
            dst.stop()
    print(json.dumps({"downtime_ms": info.get("downtime"), "total_ms": info.get("total-time"),
                      "dropped_before_stop_ms": round((stopped - max(dropped)) * 1000)}))


def test_without_migration_events_the_snapshot_stays_and_the_migration_fails(
        hosts: tuple[Vm, Daemon]) -> None:
    """Why the daemon needs the MIGRATION event: without it QEMU refuses to
    hand the disks over at the end, and the guest stays on the source."""
    src, daemon = hosts
    with daemon.client() as c:
        c.snapshot_create("vm1", snapshot_xml("live"))
        dst = Destination(src, "dst").start()
        try:
            info = migrate(src, dst, events=False)
            assert info["status"] == "failed", info
            # QEMU says why on its own output only.
            assert "bdrv_inactivate_all() failed" in src.stdout_path.read_text(errors="replace")
            wait_for(lambda: src.status() == "running", what="the guest back on the source")
            assert c.snapshot_lookup("vm1", "live")["state"] == "active"
            c.snapshot_delete("vm1", "live")
        finally:
            dst.kill()
