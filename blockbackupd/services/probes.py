"""Finding out that a snapshot broke, where QEMU does not say so.

QEMU 7.2 reports no event when a view breaks (scratch full or failing, a
copy that timed out), so while a domain has snapshots a task reads a small
window of each active view through a short block job every
``snapshot_probe_interval`` seconds: a read of a broken view fails wherever
it lands. The first failure marks the snapshot broken, with the reason, and
publishes ``snapshot-broken``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable

from ..model import SnapshotState
from ..names import PREFIX
from ..qemu.blockops import BlockOps
from .domains import Domain
from .events import EventBus
from .snapshot_types import Snapshot

log = logging.getLogger("blockbackupd.snapshots")


class Prober:
    """One probing task per domain while it has snapshots."""

    def __init__(self, events: EventBus, interval: float, timeout: float,
                 snapshots: Callable[[str], list[Snapshot]]) -> None:
        self._events = events
        self._interval = interval
        self._timeout = timeout
        self._snapshots = snapshots
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._job_ids = itertools.count(1)

    def ensure(self, domain: Domain) -> None:
        """Probe the domain's snapshots from now on (until it has none)."""
        task = self._tasks.get(domain.name)
        if task is None or task.done():
            self._tasks[domain.name] = asyncio.create_task(self._loop(domain),
                                                           name=f"probe-{domain.name}")

    def cancel(self, domain: str) -> None:
        task = self._tasks.pop(domain, None)
        if task is not None:
            task.cancel()

    async def _loop(self, domain: Domain) -> None:
        while self._snapshots(domain.name):
            await asyncio.sleep(self._interval)
            try:
                await self.probe(domain)
            except Exception as err:  # a failed round is retried, never fatal
                log.warning("domain %s: probing snapshots failed: %s", domain.name, err)

    async def probe(self, domain: Domain) -> None:
        """Read through every active view once; mark the broken ones."""
        async with domain.lock:
            ops = BlockOps(domain.session)
            for snapshot in self._snapshots(domain.name):
                if snapshot.state is not SnapshotState.ACTIVE:
                    continue
                for part in snapshot.disks:
                    job = f"{PREFIX}probe-{next(self._job_ids)}"
                    error = await ops.probe(job, part.probe_window, part.probe_sink,
                                            self._timeout)
                    if error is not None:
                        self._mark_broken(snapshot, part.disk.name, error)
                        break

    def _mark_broken(self, snapshot: Snapshot, disk: str, error: str) -> None:
        snapshot.state = SnapshotState.BROKEN
        snapshot.broken_reason = f"the view of disk {disk} can no longer be read ({error})"
        log.error("snapshot %s/%s broken: %s", snapshot.domain, snapshot.name,
                  snapshot.broken_reason)
        self._events.publish(snapshot.domain, "snapshot-broken", snapshot=snapshot.name,
                             disk=disk, reason=snapshot.broken_reason)
