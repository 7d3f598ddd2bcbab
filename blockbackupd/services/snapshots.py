"""Snapshots: consistent point-in-time views of running disks.

Per disk, a copy-before-write filter goes into the device's I/O path; it
copies the old data of every block the guest overwrites into a scratch
image, and a snapshot-access node on top of it reads the disk as it was.
All disks of a snapshot move onto their filters inside one window in which
the VM's vCPUs are stopped, so no guest write lands in one view and not in
another. Everything that can be made before (scratch images and nodes,
filters) is made before the window; the views after it.

The records live in :mod:`.snapshot_types`; finding out that a view broke,
in :mod:`.probes`; what a daemon that died left, in :mod:`.leftovers`.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

from .. import faults
from ..errors import (
    AlreadyExists,
    Busy,
    InvalidArgument,
    NoSuchDisk,
    NoSuchDomain,
    NoSuchSnapshot,
    QuiesceFailed,
    Unsupported,
)
from ..model import Disk, DomainState, SnapshotState
from ..names import PREFIX, check_name
from ..qemu import iothreads
from ..qemu.blockops import Bitmaps, BlockOps
from ..qemu.graph import BlockGraph, query_disks, read_graph, read_links, relink
from ..rbd import image_of as rbd_image_of
from ..store.db import Store
from . import leftovers, scratch
from .domains import MIGRATION_STARTING, Domain, DomainService
from .events import EventBus
from .leases import Lease
from .probes import Prober
from .quiesce import Frozen, QuiesceService, agent_socket
from .snapshot_types import (
    HELD_IO_RECORD,
    SCRATCH_RECORD,
    BeforeDelete,
    BeforePartDelete,
    DomainSnapshots,
    Instant,
    InstantHook,
    Layer,
    Snapshot,
    SnapshotDisk,
    SnapshotSettings,
)
from .undo import Undo, every

log = logging.getLogger("blockbackupd.snapshots")


#: QEMU run states in which the block graph must not change under a migration.
_MIGRATING = frozenset({"inmigrate", "postmigrate", "finish-migrate", "save-vm", "restore-vm"})




class SnapshotService:
    def __init__(self, domains: DomainService, events: EventBus, store: Store,
                 settings: SnapshotSettings, quiesce: QuiesceService | None = None) -> None:
        self._domains = domains
        self._quiesce = quiesce
        self._events = events
        self._store = store
        self._settings = settings
        self._by_domain: dict[str, DomainSnapshots] = {}
        self._before_delete: list[BeforeDelete] = []
        self._before_part_delete: list[BeforePartDelete] = []
        self._prober = Prober(events, settings.probe_interval, settings.probe_timeout,
                              self.snapshots)
        self._background: set[asyncio.Task[None]] = set()
        #: Set by the checkpoint service: the bitmap actions of each instant.
        self.instant_hook: InstantHook | None = None
        events.subscribe(None, self._on_event)
        domains.add_usage_check(self.usage)
        domains.add_connect_hook(self.clean_leftovers)
        domains.add_removal_hook(self._disk_removed)
        domains.add_job_start_hook(self._job_started)
        domains.add_migration_hook(self._migrating)
        domains.add_gone_hook(self.forget)

    def add_before_delete(self, hook: BeforeDelete) -> None:
        """Run hook (e.g. stopping exports) before a snapshot's nodes go."""
        self._before_delete.append(hook)

    def add_before_part_delete(self, hook: BeforePartDelete) -> None:
        """Run hook(domain, snapshot, disk) before one disk's nodes leave a live snapshot."""
        self._before_part_delete.append(hook)

    async def close(self) -> None:
        """Daemon stopping: delete every snapshot, so no filter, node or scratch
        file outlives the daemon that knows about it."""
        for domain, state in list(self._by_domain.items()):
            self._prober.cancel(domain)
            for name in reversed(list(state.snapshots)):  # newest first: no retired filters
                try:
                    await self.delete(domain, name)
                except NoSuchSnapshot:
                    pass  # deleted meanwhile (its creator's connection closed)
                except Exception as err:
                    log.error("snapshot %s/%s left behind at exit: %s", domain, name, err)

    # -- queries --------------------------------------------------------------

    def _state(self, domain: str) -> DomainSnapshots:
        return self._by_domain.setdefault(domain, DomainSnapshots())

    def names(self, domain: str) -> list[str]:
        """Names, oldest first. :raise NoSuchDomain:"""
        self._domains.get(domain)
        return list(self._state(domain).snapshots)

    def get(self, domain: str, name: str) -> Snapshot:
        """:raise NoSuchDomain: :raise NoSuchSnapshot:"""
        self._domains.get(domain)
        try:
            return self._state(domain).snapshots[name]
        except KeyError:
            raise NoSuchSnapshot(f"domain {domain!r} has no snapshot {name!r}") from None

    def usage(self, domain: str) -> str | None:
        n = len(self._state(domain).snapshots)
        return f"it has {n} snapshot(s)" if n else None

    def snapshots(self, domain: str) -> list[Snapshot]:
        """The domain's snapshots, oldest first (no lookup errors)."""
        return list(self._state(domain).snapshots.values())

    # -- create ---------------------------------------------------------------

    async def create(self, domain_name: str, name: str | None,
                     disks: list[tuple[str, str | None]] | None,
                     checkpoint: bool = False, quiesce: bool = False,
                     lease: float | None = None) -> Snapshot:
        """Take one point-in-time view of the listed disks (None: every writable disk);
        with ``checkpoint``, a checkpoint of the same name at the same instant;
        with ``quiesce``, the guest's filesystems frozen around the instant;
        with ``lease``, deleted when that many seconds pass without a renewal.

        :raise NoSuchDomain: :raise DomainNotConnected:
        :raise AlreadyExists: the name is taken.
        :raise InvalidArgument: bad name or scratch file.
        :raise NoSuchDisk: a listed disk is not in the domain.
        :raise Busy: the VM is migrating, or a block job not ours uses a listed disk.
        :raise Unsupported: a listed disk is read-only, or cannot keep a checkpoint.
        :raise QuiesceFailed: quiesce asked, and the guest agent is not defined,
            not reachable, refused, or did not answer in time; nothing is left.
        :raise OperationFailed: QEMU or the host refused; nothing is left behind.
        """
        domain = self._domains.get(domain_name)
        if quiesce:
            if domain.state is DomainState.DISCONNECTED:
                raise QuiesceFailed(f"domain {domain_name!r} is not running: no guest to freeze "
                                    "(its disks are as the guest left them at shutdown); take "
                                    "the snapshot without quiesce")
            agent_socket(domain)  # refused before anything is made
            if self._quiesce is None:
                raise QuiesceFailed("quiesce is not available in this daemon")
        if name is None:
            name = str(uuid.uuid4())
        try:
            check_name(name, "snapshot name")
        except ValueError as err:
            raise InvalidArgument(str(err)) from None
        async with self._domains.reachable(domain_name) as domain, domain.lock:
            self._domains.connected(domain_name)
            state = self._state(domain_name)
            if name in state.snapshots:
                raise AlreadyExists(f"domain {domain_name!r} already has a snapshot {name!r}")
            ops = BlockOps(domain.session)
            graph = await read_graph(domain.session)
            present = {d.name: d for d in graph.disks()}
            chosen = self._choose(domain_name, name, present, disks)
            for disk, _ in chosen:
                jobs = graph.jobs_on(disk, PREFIX)
                if jobs:
                    # A job's own filters sit in the disk's I/O path and go when
                    # it ends; a filter of ours on top would leave its internal
                    # bitmaps on a node QEMU then closes, and QEMU 7.2 aborts.
                    raise Busy(f"disk {disk.name!r} is in use by block job(s) "
                               f"{', '.join(jobs)} (e.g. the VM manager's backup, "
                               "mirror or commit); take the snapshot when they have ended")
            await self._refuse_inactive(ops, domain_name, graph, [d for d, _ in chosen])
            await _refuse_throttled_io_threads(domain, graph, [d for d, _ in chosen])
            snapshot = await self._build(domain, ops, name, chosen, checkpoint,
                                         list(present.values()), quiesce)
            snapshot.offline = domain.offline
            if lease is not None:
                snapshot.lease = Lease(lease, partial(self._lease_ended, snapshot))
            state.snapshots[name] = snapshot
            self._prober.ensure(domain)
        log.info("snapshot %s/%s created: disks %s, held-I/O window %.3f ms%s", domain_name, name,
                 ",".join(d.disk.name for d in snapshot.disks), snapshot.held_io_window * 1e3,
                 "" if snapshot.frozen_window is None
                 else f", filesystems frozen {snapshot.frozen_window * 1e3:.1f} ms")
        return snapshot

    @staticmethod
    async def _refuse_inactive(ops: BlockOps, domain: str, graph: BlockGraph,
                               disks: list[Disk]) -> None:
        """:raise Busy: before anything is made, when QEMU says a listed disk's
        node is inactive (QEMU 10.0's ``active: false``; 7.2 has no such field).

        After a completed migration the source's nodes are inactive, as are an
        incoming QEMU's until the guest arrives: 10.0 then refuses our filter
        above them (``Inactive 'X' can't be a file child of active 'Y'``), an
        OperationFailed, where 7.2 adds it and :meth:`_switch` answers Busy
        from the run state. The run state is read only in that case, so the
        answer is the same on both (and a snapshot costs no extra command).
        """
        inactive = [d.name for d in disks if graph.nodes.get(d.top, {}).get("active") is False]
        if not inactive:
            return
        status, migration = await asyncio.gather(ops.run_status(), ops.migration_status())
        if status in _MIGRATING:
            raise Busy(f"domain {domain!r} is migrating ({status})")
        if migration in MIGRATION_STARTING:
            raise Busy(f"domain {domain!r} is migrating (migration {migration})")
        raise Busy(f"domain {domain!r}: disk(s) {', '.join(inactive)} inactive in QEMU (their "
                   "images are another process's, e.g. after a migration); take the snapshot "
                   "where the guest runs")

    def _choose(self, domain: str, snapshot: str, present: dict[str, Disk],
                wanted: list[tuple[str, str | None]] | None) -> list[tuple[Disk, Path]]:
        if wanted is None:
            wanted = [(d.name, None) for d in present.values() if not d.read_only]
            if not wanted:
                raise InvalidArgument(f"domain {domain!r} has no writable disk to snapshot")
        chosen: list[tuple[Disk, Path]] = []
        for disk_name, requested in wanted:
            disk = present.get(disk_name)
            if disk is None:
                raise NoSuchDisk(f"domain {domain!r} has no disk {disk_name!r}")
            if disk.read_only:
                raise Unsupported(f"disk {disk_name!r} is read-only: it needs no snapshot")
            if requested is None:
                path = scratch.default_path(self._settings.scratch_dirs[0], domain, disk_name,
                                            snapshot)
                if path.exists() or path.is_symlink():
                    raise InvalidArgument(f"scratch file {str(path)!r} already exists")
            else:
                path = scratch.check_requested(requested, self._settings.scratch_dirs)
            if any(path == p for _, p in chosen):
                raise InvalidArgument(f"two disks cannot share the scratch file {str(path)!r}")
            chosen.append((disk, path))
        return chosen

    async def _build(self, domain: Domain, ops: BlockOps, name: str,
                     chosen: list[tuple[Disk, Path]], checkpoint: bool,
                     disks: list[Disk], quiesce: bool) -> Snapshot:
        undo = Undo(f"snapshot {domain.name}/{name}")
        try:
            parts = []
            for disk, path in chosen:
                base = f"{PREFIX}{secrets.token_hex(4)}"
                part = SnapshotDisk(
                    disk=disk, source=disk.top, scratch=path, scratch_node=f"{base}-scratch",
                    filter_node=f"{base}-filter", view_node=f"{base}-view",
                    probe_window=f"{base}-probe", probe_sink=f"{base}-sink")
                parts.append(part)
            for part in parts:
                part.record = self._store.add_intent(domain.name, SCRATCH_RECORD, {
                    "name": name, "disk": part.disk.name, "file": str(part.scratch)})
                undo.push_record(f"record of {part.scratch}",
                                 partial(self._store.drop_intent, part.record))
            for part in parts:
                scratch.create(part.scratch, part.disk.size)
                undo.push(f"scratch file {part.scratch}", partial(scratch.remove, part.scratch))
                if part.disk.encrypted:
                    # The guest's old data must not land in the clear: a LUKS
                    # scratch under a random key of this snapshot's own.
                    # LUKS takes a passphrase (UTF-8): 256 random bits of it.
                    key = secrets.token_urlsafe(32).encode()
                    secret = part.scratch_node.removesuffix("-scratch") + "-key"
                    await asyncio.to_thread(scratch.encrypt, part.scratch, part.disk.size, key,
                                            "key")
                    await ops.add_secret(secret, key)
                    part.secret = secret
                    undo.push(f"secret {secret}", partial(ops.delete_object, secret))
            await faults.check("snapshot:scratch-created")
            # Each layer's nodes in one batch (see undo.every): a node needs
            # only the layer below it.
            await undo.run_all([(p.scratch_node,
                                 ops.add_scratch(p.scratch_node, str(p.scratch), p.secret),
                                 partial(ops.delete_node, p.scratch_node)) for p in parts])
            # On a build that aborts when a node is added above a node in an
            # I/O thread while that thread does the guest's I/O (7.2), every
            # node above such a disk is added inside the held-I/O window.
            held_adds = await iothreads.adds_need_held_io(domain.session,
                                                          [p.disk for p in parts])

            async def add_filters(steps: Undo) -> None:
                await steps.run_all([
                    (p.filter_node, ops.add_cbw_filter(p.filter_node, p.source, p.scratch_node,
                                                       self._settings.cbw_timeout),
                     partial(ops.delete_node, p.filter_node)) for p in parts])
                await faults.check("snapshot:filter-added")

            def add_sinks() -> list[tuple[str, Awaitable[None], Callable[[], Awaitable[None]]]]:
                return [(p.probe_sink, ops.add_probe_sink(p.probe_sink),
                         partial(ops.delete_node, p.probe_sink)) for p in parts]

            async def add_views(steps: Undo) -> None:
                # Sinks are standalone nodes: with the views, unless made earlier.
                views: list[tuple[str, Awaitable[None], Callable[[], Awaitable[None]]]] = [
                    (p.view_node, ops.add_view(p.view_node, p.filter_node),
                     partial(ops.delete_node, p.view_node)) for p in parts]
                await steps.run_all(views + ([] if held_adds else add_sinks()))
                await steps.run_all([
                    (p.probe_window, ops.add_probe_window(p.probe_window, p.view_node),
                     partial(ops.delete_node, p.probe_window)) for p in parts])

            if held_adds:
                await undo.run_all(add_sinks())
                log.info("snapshot %s/%s: disk(s) %s run in I/O threads on a QEMU build that "
                         "aborts when nodes are added above them while they do I/O: adding "
                         "the snapshot's nodes with the guest's vCPUs stopped", domain.name,
                         name, ", ".join(held_adds))
            else:
                await add_filters(undo)

            instant = None
            if self.instant_hook is not None:
                instant = await self.instant_hook(domain, name, parts, checkpoint, disks)
                undo.push_record("checkpoint intent", instant.abort, instant.keep)
                if instant.release is not None:
                    undo.push("the checkpoint's records in the cluster", instant.release)
                for part in parts:
                    part.boundary, part.tail = instant.bounds.get(part.disk.name, (None, None))
            elif checkpoint:
                raise Unsupported("checkpoints are not available")

            frozen: Frozen | None = None
            if quiesce:
                # As late as can be: from here on the guest's writes wait.
                assert self._quiesce is not None
                frozen = await self._quiesce.freeze(domain, name)
                undo.push("frozen guest filesystems", partial(self._quiesce.thaw, frozen))
                await faults.check("snapshot:frozen")
            window = await self._switch(ops, domain.name, name, parts, undo, instant,
                                        (add_filters, add_views) if held_adds else None)
            if frozen is not None:
                assert self._quiesce is not None
                await self._quiesce.thaw(frozen)
            await faults.check("snapshot:switched")

            if not held_adds:
                await add_views(undo)
            await faults.check("snapshot:view-added")
            if instant is not None:
                await instant.commit()
        except BaseException as err:
            await undo.rollback(err)
            raise
        undo.discard()
        return Snapshot(domain.name, name, time.time(), window, parts,
                        frozen_window=None if frozen is None else frozen.window,
                        frozen_filesystems=0 if frozen is None else frozen.filesystems)

    async def _switch(self, ops: BlockOps, domain: str, name: str, parts: list[SnapshotDisk],
                      undo: Undo, instant: Instant | None,
                      inside: tuple[Layer, Layer] | None = None) -> float:
        """Move every disk onto its filter in one instant; returns how long guest
        I/O was held (vCPUs stopped; for one disk of a running guest, no
        vCPU stopped: the move, which drains that disk's I/O), or how long
        the moves took when the VM was not running anyway.

        ``inside``: layers of nodes to add in the same window, before the
        moves (the filters) and after them (the views), for disks above which
        this QEMU build may add nodes only while the guest is stopped. They
        are sent one layer at a time, and if one fails, what the window made
        is taken out before the guest runs again.

        The commands are sent back to back without waiting for each answer:
        QEMU's monitor runs them one after the other in order, so the moves
        all happen between ``stop`` and ``cont``, and the window costs about
        one round trip instead of one per command. Undo is based on what QEMU
        shows afterwards, since a failed or cancelled batch may have run in
        part.
        """
        status, migration = await asyncio.gather(ops.run_status(), ops.migration_status())
        if status in _MIGRATING:
            raise Busy(f"domain {domain!r} is migrating ({status})")
        if migration in MIGRATION_STARTING:
            # A filter now would make the migration fail at its end.
            raise Busy(f"domain {domain!r} is migrating (migration {migration})")
        running = status == "running"
        # One disk needs no hold: its move is atomic for its I/O (QEMU drains
        # the device's requests around it), and the bitmaps are ordered
        # around it (see Instant). Several disks in one instant need the
        # vCPUs stopped; so do builds that add nodes only inside the window.
        hold = running and (inside is not None or len(parts) > 1)

        async def restore() -> None:
            tops = {d.name: d.top for d in await query_disks(ops.session)}
            for part in parts:
                if tops.get(part.disk.name) == part.filter_node:
                    await ops.set_drive(part.disk.qdev, part.source)
            if hold and await ops.run_status() != "running":
                await ops.cont()

        if running and not hold:
            window = await self._move_unheld(ops, parts[0], undo, instant, restore)
            log.info("snapshot %s/%s: one disk, moved without stopping the guest's vCPUs",
                     domain, name)
            return window

        held = None
        if hold:
            # A guest left stopped is the one failure the guest pays for: record
            # it, so that whoever connects next resumes it if we cannot.
            held = self._store.add_intent(domain, HELD_IO_RECORD, {"snapshot": name})
            undo.push_record("record of the stopped guest",
                             partial(self._store.drop_intent, held))
        steps: list[Awaitable[None]] = [ops.set_drive(p.disk.qdev, p.filter_node)
                                        for p in parts]
        if inside is not None:
            window = await self._held_window(ops, hold, steps, undo, instant, inside, restore)
        else:
            undo.push("I/O paths and run state", restore)
            if instant is not None and instant.everything():
                undo.push("bitmaps of the instant", instant.undo)
                steps.append(Bitmaps(ops.session).transaction(instant.everything()))
            if hold:
                steps = [ops.stop(), *steps, ops.cont()]
            start = time.perf_counter()
            await every(steps)
            window = time.perf_counter() - start
        if held is not None:
            self._store.drop_intent(held)
        return window

    @staticmethod
    async def _move_unheld(ops: BlockOps, part: SnapshotDisk, undo: Undo,
                           instant: Instant | None,
                           restore: Callable[[], Awaitable[None]]) -> float:
        """The instant of a one-disk snapshot with the guest running: the new
        bitmaps, the move, then the bitmaps that stop recording. Returns how
        long the move held the disk's I/O (QEMU drains it for the move)."""
        bitmaps = Bitmaps(ops.session)
        if instant is not None and instant.everything():
            undo.push("bitmaps of the instant", instant.undo)
            await bitmaps.transaction(instant.actions)
        undo.push("I/O path", restore)
        start = time.perf_counter()
        await ops.set_drive(part.disk.qdev, part.filter_node)
        window = time.perf_counter() - start
        await faults.check("snapshot:moved")
        if instant is not None:
            await bitmaps.transaction(instant.after)
        return window

    @staticmethod
    async def _held_window(ops: BlockOps, running: bool, moves: list[Awaitable[None]],
                           undo: Undo, instant: Instant | None, inside: tuple[Layer, Layer],
                           restore: Callable[[], Awaitable[None]]) -> float:
        """The window of :meth:`_switch` with layers of nodes added inside it."""
        before, after = inside
        made = Undo(undo.what)
        start = time.perf_counter()
        if running:
            await ops.stop()
        try:
            try:
                await before(made)
                made.push("I/O paths", restore)  # restore() resumes only a running guest
                if instant is not None and instant.everything():
                    made.push("bitmaps of the instant", instant.undo)
                    moves.append(Bitmaps(ops.session).transaction(instant.everything()))
                await every(moves)
                await after(made)
            except BaseException as err:
                await made.rollback(err)  # the guest still stopped: nothing added runs
                raise
        finally:
            if running:
                await ops.cont()
        window = time.perf_counter() - start
        undo.adopt(made)
        return window

    # -- leases ---------------------------------------------------------------

    def renew(self, domain_name: str, name: str) -> Lease:
        """Start a snapshot's lease again; returns it.

        :raise NoSuchDomain: :raise NoSuchSnapshot: (a lease that ended took it).
        :raise InvalidArgument: the snapshot was made without a lease.
        """
        snapshot = self.get(domain_name, name)
        if snapshot.lease is None:
            raise InvalidArgument(f"snapshot {name!r} of domain {domain_name!r} has no lease "
                                  "to renew: it lives until deleted")
        snapshot.lease.renew()
        return snapshot.lease

    def _lease_ended(self, snapshot: Snapshot) -> None:
        if self._state(snapshot.domain).snapshots.get(snapshot.name) is not snapshot:
            return  # deleted meanwhile
        assert snapshot.lease is not None
        log.warning("snapshot %s/%s: its lease was not renewed for %g s: deleting it (its "
                    "backup application is gone or cut off)", snapshot.domain, snapshot.name,
                    snapshot.lease.seconds)
        self.delete_soon(snapshot.domain, snapshot.name, "its lease ended")

    # -- delete ---------------------------------------------------------------

    def delete_soon(self, domain_name: str, name: str,
                    why: str = "the connection that made it closed") -> None:
        """Delete a snapshot in the background (its creator went away: ``why``);
        one already deleted is no error."""
        async def run() -> None:
            if name not in self._state(domain_name).snapshots:
                return  # deleted already (and its domain may be gone with it)
            try:
                await self.delete(domain_name, name)
                log.info("snapshot %s/%s deleted: %s", domain_name, name, why)
            except (NoSuchSnapshot, NoSuchDomain):
                pass
            except Exception as err:
                log.error("snapshot %s/%s: deleting it (%s) failed: %s",
                          domain_name, name, why, err)
                left = self._state(domain_name).snapshots.get(name)
                if left is not None and left.lease is not None:
                    left.lease.renew()  # tried again when it ends again

        task = asyncio.create_task(run(), name=f"delete {domain_name}/{name}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def delete(self, domain_name: str, name: str) -> None:
        """Stop the snapshot's exports, restore each disk's I/O path, remove
        every node and scratch file. Safe to repeat after a failure.

        :raise NoSuchDomain: :raise NoSuchSnapshot: :raise DomainNotConnected:
        :raise OperationFailed: QEMU refused a step; the snapshot stays listed.
        """
        domain = self._domains.connected(domain_name)
        async with domain.lock:
            snapshot = self.get(domain_name, name)
            self._domains.connected(domain_name)
            for hook in self._before_delete:
                await hook(domain, snapshot)
            ops = BlockOps(domain.session)
            await self._retire(domain, snapshot.disks)
            del self._state(domain_name).snapshots[name]
            if snapshot.lease is not None:
                snapshot.lease.cancel()
            await self._unstack(domain, ops)
        log.info("snapshot %s/%s deleted", domain_name, name)
        if domain.offline:
            await self._domains.release(domain)

    @asynccontextmanager
    async def _held_for_removal(self, domain: Domain,
                                disks: Sequence[Disk]) -> AsyncIterator[None]:
        """Stop the guest's vCPUs while snapshot filters, already out of the
        I/O path, are removed from above RBD disks in I/O threads, on every build.

        Measured on QEMU 10.0.2 with a Linux guest writing to an RBD disk in an
        I/O thread, with a checkpoint's bitmap on it: removing the filter while
        the guest ran crashed QEMU (SIGSEGV) at the 27th snapshot; inside
        ``stop``/``cont``, 150 survived. Only that step, only there: holding
        the whole removal (the device's move back included) of qcow2 disks in
        I/O threads left 10.0's guest I/O stalled in 2 runs of 4 on a loaded
        host. No throwaway process can show a race that needs the guest's own
        I/O, so no build is trusted with it. Recorded like the held-I/O window
        of a snapshot, so a daemon killed inside it has the guest resumed by
        the next connect.
        """
        ops = BlockOps(domain.session)
        disks = [d for d in disks if rbd_image_of(d.file) is not None]
        if not disks or not await iothreads.pinned(domain.session, disks) or \
                await ops.run_status() != "running":
            yield
            return
        held = self._store.add_intent(domain.name, HELD_IO_RECORD, {"snapshot": "(filter removal)"})
        await ops.stop()
        start = time.perf_counter()
        try:
            yield
        finally:
            await ops.cont()  # if QEMU is gone, the record stays for the next connect
            self._store.drop_intent(held)
            log.debug("domain %s: snapshot filters removed with the guest's vCPUs stopped "
                      "for %.1f ms", domain.name, (time.perf_counter() - start) * 1e3)

    async def _unstack(self, domain: Domain, ops: BlockOps) -> None:
        """Take retired filters out of whatever now surrounds them, with their
        scratch nodes and files. The graph is read afresh for each pass: the
        VM manager may have put an overlay above a filter (then the overlay's
        backing is re-pointed past it) or below it (then the device goes onto
        the overlay, the filter's child now), never the node we remember."""
        state = self._state(domain.name)
        while state.retired:
            # One reading a pass: taking out a filter changes the users of the
            # filter below it on the same disk (left for the next pass), of
            # no other part.
            graph = await read_graph(domain.session)
            filters = {p.filter_node for p in self._parts(domain.name)}
            free: list[SnapshotDisk] = []  # filters nothing of ours sits on
            gone: list[SnapshotDisk] = []  # filters already out of the graph
            for part in state.retired:
                if part.filter_node not in graph.nodes:
                    gone.append(part)
                elif not any(u.node in filters for u in graph.parents(part.filter_node)):
                    free.append(part)
                # else a newer snapshot's filter still sits on it: a later pass
            if not free and not gone:
                break
            await self._take_out(domain, graph, free, gone)
            for part in free + gone:
                self._remove_scratch(part)
                state.retired.remove(part)

    async def _take_out(self, domain: Domain, graph: BlockGraph, free: list[SnapshotDisk],
                        gone: list[SnapshotDisk]) -> None:
        """Relink every user of the free filters to the filter's current child,
        then delete the filters and the scratch nodes (of the gone ones too),
        each step for every disk in one batch (they are on different disks)."""
        ops = BlockOps(domain.session)
        relinks = []
        for part in free:
            child = graph.child(part.filter_node, "file")
            if child is not None:
                own = frozenset(part.nodes()[:3])  # its view and probe, if still there
                relinks.append(relink(domain.session, graph, part.filter_node, child, keep=own))
        if any(await every(relinks)):
            await faults.check("snapshot-delete:path-restored")
        async with self._held_for_removal(domain, [p.disk for p in free]):
            await every([ops.delete_node(p.filter_node) for p in free])
        await every([ops.delete_node(p.scratch_node) for p in free + gone
                      if p.scratch_node in graph.nodes])
        await every([ops.delete_object(p.secret) for p in free + gone if p.secret is not None])
        for p in free + gone:
            p.secret = None
        await faults.check("snapshot-delete:node-removed")

    def _parts(self, domain: str) -> list[SnapshotDisk]:
        state = self._state(domain)
        return [d for s in state.snapshots.values() for d in s.disks] + state.retired

    async def _disk_removed(self, domain: Domain, disk: str) -> None:
        """The VM manager unplugged a disk's device: our views, filters,
        scratch nodes and files on it go now (its exports went just before),
        so the manager can delete its own nodes; the snapshots keep their
        other disks and say which one is gone."""
        state = self._state(domain.name)
        parts = [(s, p) for s in state.snapshots.values() for p in s.disks
                 if p.disk.name == disk]
        if not parts and not any(p.disk.name == disk for p in state.retired):
            return
        await self._drop_parts(domain, parts, "its device was unplugged")
        log.warning("domain %s: disk %s was unplugged; removed its part of snapshot(s) %s",
                    domain.name, disk, ", ".join(s.name for s, _ in parts) or "(deleted ones)")
        self._events.publish(domain.name, "disk-removed", disk=disk,
                             snapshots=[s.name for s, _ in parts],
                             reason="its device was unplugged")

    async def _job_started(self, domain: Domain, job_id: str) -> None:
        """A block stream drops the images between the top and its base. A
        filter of ours keeps internal bitmaps on the image it was put on; if
        the manager has since put an overlay under the filter, that image may
        be among those dropped, and QEMU 7.2 aborts when the manager then
        deletes it (bdrv_close: Assertion `QLIST_EMPTY(&bs->dirty_bitmaps)').
        So the snapshot gives way on those disks, at the stream's start.

        Read without the node list: a stream of a small disk may conclude
        before the next command, and the node list then kills QEMU."""
        state = self._state(domain.name)
        if not state.snapshots:
            return
        # query-jobs lists every kind (query-block-jobs omits image creation).
        jobs = await domain.session.execute("query-jobs")
        job = next((j for j in jobs if j.get("id") == job_id), None)
        if job is not None and job.get("type") != "stream":
            return
        links = await read_links(domain.session)
        parts = [(s, p) for s in state.snapshots.values() for p in s.disks
                 if p.filter_node in links.names
                 and links.child(p.filter_node, "file") != p.source]
        if not parts:
            return
        reason = (f"the VM manager started block job {job_id!r} (a stream) below an image it "
                  "had put under the snapshot; the snapshot gave way on this disk")
        await self._drop_parts(domain, parts, reason)
        for snapshot, part in parts:
            log.warning("snapshot %s/%s: disk %s dropped: %s", domain.name, snapshot.name,
                        part.disk.name, reason)
            self._events.publish(domain.name, "snapshot-broken", snapshot=snapshot.name,
                                 disk=part.disk.name, reason=reason)

    async def _migrating(self, domain: Domain, status: str) -> None:
        """QEMU cannot hand a disk over to the destination while a filter of
        ours sits in its I/O path: the migration fails at its very end
        (``bdrv_inactivate_all() failed``) and the guest stays behind. The
        manager's migration wins: every live snapshot of the domain gives way
        at once (its exports stop, its views go), and stays listed as broken
        until the client deletes it."""
        state = self._state(domain.name)
        parts = [(s, p) for s in state.snapshots.values() for p in s.disks]
        if not parts:
            return
        reason = ("migrating: the VM manager started a migration, which cannot hand the disks "
                  "over while a snapshot sits in their I/O path; the snapshot gave way")
        await self._drop_parts(domain, parts, reason)
        for snapshot, part in parts:
            snapshot.state, snapshot.broken_reason = SnapshotState.BROKEN, reason
            log.warning("snapshot %s/%s: disk %s dropped: %s (migration %s)", domain.name,
                        snapshot.name, part.disk.name, reason, status)
            self._events.publish(domain.name, "snapshot-broken", snapshot=snapshot.name,
                                 disk=part.disk.name, reason=reason)

    async def _drop_parts(self, domain: Domain, parts: list[tuple[Snapshot, SnapshotDisk]],
                          reason: str) -> None:
        """Take disks out of live snapshots at once: exports, tail bitmap, view,
        probe, filter, scratch node and file; the snapshots keep their other
        disks and list these under ``removed_disks``."""
        for snapshot, part in parts:
            for hook in self._before_part_delete:
                await hook(domain, snapshot, part.disk.name)
        await self._retire(domain, [part for _, part in parts])
        for snapshot, part in parts:
            snapshot.disks.remove(part)
            snapshot.removed[part.disk.name] = reason
        await self._unstack(domain, BlockOps(domain.session))

    async def _retire(self, domain: Domain, parts: list[SnapshotDisk]) -> None:
        """Remove the parts' tail bitmaps, probe nodes and views (the exports
        reading them went before) and hand their filters to the retired ones,
        which :meth:`_unstack` takes out."""
        state = self._state(domain.name)
        ops, bitmaps = BlockOps(domain.session), Bitmaps(domain.session)
        on_nodes = await bitmaps.on_nodes()  # every node, with its bitmaps: one query
        # Two batches sent back to back (see undo.every): the tails and the
        # probe nodes, then the views the probe windows read.
        await every([bitmaps.remove(p.disk.node, p.tail) for p in parts
                      if p.tail is not None and p.tail in on_nodes.get(p.disk.node, {})]
                     + [ops.delete_node(n) for p in parts for n in p.nodes()[:2]
                        if n in on_nodes])
        await every([ops.delete_node(p.view_node) for p in parts if p.view_node in on_nodes])
        await faults.check("snapshot-delete:view-removed")
        for part in parts:
            if part not in state.retired:
                state.retired.append(part)

    # -- leftovers ---------------------------------------------------------------

    async def clean_leftovers(self, domain: Domain) -> None:
        """Remove what a daemon that died left in this QEMU (see :mod:`.leftovers`)."""
        await leftovers.clean(domain, self._store, self.remove_leftover_scratch)

    def remove_leftover_scratch(self, domain: str, files: list[str]) -> list[str]:
        """Remove ``files`` and the recorded scratch files of the domain no live
        snapshot uses; returns every file named."""
        state = self._state(domain)
        live = {part.record for snap in state.snapshots.values() for part in snap.disks}
        live |= {part.record for part in state.retired}
        return leftovers.remove_scratch_files(self._store, domain, files, live,
                                              self._settings.scratch_dirs)

    def _remove_scratch(self, part: SnapshotDisk) -> None:
        scratch.remove(part.scratch)
        if part.record is not None:
            self._store.drop_intent(part.record)
            part.record = None

    # -- QEMU gone ----------------------------------------------------------------

    def _on_event(self, event: dict[str, Any]) -> None:
        if event["type"] == "domain-disconnected":
            self.forget(event["domain"])

    def forget(self, domain: str) -> None:
        """QEMU went away and its nodes with it: drop the snapshots, remove scratch files."""
        state = self._by_domain.pop(domain, None)
        if state is None:
            return
        self._prober.cancel(domain)
        for part in state.retired:
            self._remove_scratch(part)
        for snapshot in state.snapshots.values():
            if snapshot.lease is not None:
                snapshot.lease.cancel()
            for part in snapshot.disks:
                self._remove_scratch(part)
            log.warning("snapshot %s/%s dropped: its QEMU went away", domain, snapshot.name)


async def _refuse_throttled_io_threads(domain: Domain, graph: BlockGraph,
                                      disks: list[Disk]) -> None:
    """:raise Unsupported: before anything is made, when a listed disk has a
    ``throttle`` filter node in its I/O path (libvirt's <throttlefilters>),
    its device runs in an I/O thread, and this QEMU build aborts the VM when
    a node is added above such a filter (7.2 does, at the first blockdev-add:
    :mod:`..qemu.iothreads`)."""
    throttled = []
    for disk in disks:
        node, seen = disk.top, set()
        while node != disk.node and node in graph.nodes and node not in seen:
            seen.add(node)
            if graph.nodes[node].get("drv") == "throttle":
                throttled.append(disk)
                break
            node = graph.child(node, "file") or ""
    pinned = await iothreads.pinned(domain.session, throttled)
    if not pinned:
        return
    verdict = await iothreads.throttle_verdict(domain.session.qemu_pid)
    if verdict.safe:
        return
    names = ", ".join(f"{disk!r} (I/O thread {thread!r})" for disk, thread in pinned.items())
    raise Unsupported(f"disk(s) {names} have a throttle filter node in their I/O path, and "
                      f"this QEMU build cannot take a snapshot of such a disk without risking "
                      f"the VM: {verdict.detail}; throttle the disk on its device instead "
                      "(block_set_io_throttle, libvirt's <iotune>), or run the VM on a QEMU "
                      "that survives this (10.0 does)")
