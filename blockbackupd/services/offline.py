"""Stopped domains: their images served by a storage process of the daemon's.

At every connect the daemon records the images each disk of the domain has
open (top first, with their formats). When the domain's QEMU is not running,
a snapshot, a checkpoint change or an export of it holds the images: the
first hold starts a ``qemu-storage-daemon`` that opens them (see
:mod:`..qemu.storage`), and the domain is served through it like a running
one, by the same services, until nothing holds it any more (no hold, no
snapshot, no export); then it is quit and the images are free for the VM
manager again.

A storage process is recorded in the store before it starts, so a daemon
killed while one runs has its successor stop it (``quit``, which writes
the bitmaps back) and remove the scratch files its snapshots made.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DomainNotConnected, OperationFailed
from ..model import DomainState
from ..qemu import storage
from ..qemu.graph import query_disks
from ..qemu.session import DomainSession
from ..store import Store
from .domains import Domain, DomainService

log = logging.getLogger("blockbackupd.offline")

#: Kind of the store records that say a storage process runs.
STORAGE_RECORD = "storage-process"


@dataclass(frozen=True)
class OfflineSettings:
    run_dir: Path
    #: The storage daemon binary ("": the domain's own QEMU build's, else PATH's).
    binary: str
    qmp_timeout: float


@dataclass
class _Running:
    process: asyncio.subprocess.Process
    session: storage.StorageSession
    record: int
    holds: int = 0
    stopping: bool = False
    watcher: asyncio.Task[None] | None = None


class OfflineService:
    def __init__(self, domains: DomainService, store: Store, settings: OfflineSettings) -> None:
        self._domains = domains
        self._store = store
        self._settings = settings
        self._running: dict[str, _Running] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        #: Says why a domain's images are held (snapshots, exports), or None.
        self._holders: list[Callable[[str], str | None]] = []
        domains.storage = self
        domains.add_connect_hook(self._record_images)

    def add_holder(self, check: Callable[[str], str | None]) -> None:
        """check(domain) says what still needs the storage process, or None."""
        self._holders.append(check)

    # -- the record of images -------------------------------------------------------

    async def _record_images(self, domain: Domain) -> None:
        """At each connect of the VM's QEMU: what each disk has open now."""
        if domain.offline:
            return
        disks = await query_disks(domain.session)
        recorded: dict[str, Any] = {}
        for disk in disks:
            if disk.read_only or not disk.chain:
                continue
            chain = tuple((image.file, image.format) for image in disk.chain)
            entry = storage.DiskImages(disk.name, disk.size, chain).as_record()
            entry["whole"] = True
            problem = storage.offline_problem(chain, any(i.encrypted for i in disk.chain))
            if problem is not None:
                entry["problem"] = problem
            recorded[disk.name] = entry
        qemu = None
        if domain.session.qemu_pid is not None:
            try:
                qemu = os.readlink(f"/proc/{domain.session.qemu_pid}/exe")
            except OSError:
                pass
        images = {"disks": recorded, "qemu": qemu}
        if self._images(domain.name) != images:
            self._store.set_images(domain.name, images)

    def _images(self, name: str) -> dict[str, Any]:
        record = next((r for r in self._store.domains() if r.name == name), None)
        return {} if record is None else record.images

    def define_images(self, name: str, disks: dict[str, tuple[str, str]]) -> None:
        """The images a domain's definition names (the daemon never saw its
        QEMU): disk -> (file, format); the backing files are the images'."""
        recorded = {}
        for disk, (file, fmt) in disks.items():
            entry = storage.DiskImages(disk, 0, ((file, fmt),)).as_record()
            entry["whole"] = False
            problem = storage.offline_problem(((file, fmt),), False)
            if problem is not None:
                entry["problem"] = problem
            recorded[disk] = entry
        self._store.set_images(name, {"disks": recorded, "qemu": None})

    def describe(self, name: str) -> dict[str, Any] | None:
        """For domain.list: the storage process holding a stopped domain's images."""
        running = self._running.get(name)
        if running is None:
            return None
        return {"pid": running.process.pid, "disks": sorted(running.session.devices)}

    # -- holds ---------------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    @asynccontextmanager
    async def hold(self, domain: Domain) -> AsyncIterator[None]:
        """Hold the domain's images in a storage process for the block.

        :raise DomainNotConnected: the daemon knows no images of the domain.
        :raise Unsupported: no storage daemon is installed.
        :raise OperationFailed: it could not open them (QEMU's text).
        """
        async with self._lock(domain.name):
            running = self._running.get(domain.name)
            if running is None or running.stopping:
                running = await self._start(domain)
            running.holds += 1
        try:
            yield
        finally:
            running.holds -= 1
            await self.settle(domain)

    async def settle(self, domain: Domain) -> None:
        """Quit the domain's storage process if nothing holds it any more."""
        async with self._lock(domain.name):
            running = self._running.get(domain.name)
            if running is None or running.holds or any(
                    check(domain.name) for check in self._holders):
                return
            async with domain.lock:
                await self._stop(domain, running)

    async def _start(self, domain: Domain) -> _Running:
        recorded = self._images(domain.name)
        images = recorded.get("disks", {})
        if not images:
            raise DomainNotConnected(domain.name, "its QEMU is not running, and the daemon "
                                     "never saw its disks (name them in domain.define)")
        usable = {d: e for d, e in images.items() if "problem" not in e}
        skipped = {d: str(e["problem"]) for d, e in images.items() if "problem" in e}
        if not usable:
            raise DomainNotConnected(domain.name, "its QEMU is not running, and none of its "
                                     "disks can be opened without it: " + "; ".join(
                                         f"{d}: {why}" for d, why in sorted(skipped.items())))
        binary = storage.binary_for(recorded.get("qemu"), self._settings.binary)
        path = self._settings.run_dir / f"{domain.name}.storage.qmp"
        record = self._store.add_intent(domain.name, STORAGE_RECORD, {"socket": str(path)})
        try:
            process = await storage.spawn(binary, path)
        except BaseException:
            self._store.drop_intent(record)
            raise
        self._store.update_intent(record, {"socket": str(path), "pid": process.pid})
        devices: dict[str, str] = {}
        ready = asyncio.get_running_loop().create_future()
        failure: list[BaseException] = []

        async def opened(session: DomainSession) -> None:
            try:
                for disk, entry in sorted(usable.items()):
                    devices[disk] = await storage.open_disk(session, _disk_images(disk, entry))
            except BaseException as err:
                failure.append(err)
                raise
            domain.storage_session = session
            await self._domains.run_connect_hooks(domain)

        def changed(session: DomainSession, old: DomainState, new: DomainState) -> None:
            if old is DomainState.DISCONNECTED and not ready.done():
                ready.set_result(None)

        session = storage.StorageSession(
            domain.name, str(path), devices, command_timeout=self._settings.qmp_timeout,
            reconnect_max_delay=1.0, on_connect=opened, on_state_change=changed)
        running = _Running(process, session, record)
        session.start()
        try:
            waiter = asyncio.ensure_future(process.wait())
            done, _ = await asyncio.wait({ready, waiter}, timeout=self._settings.qmp_timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            if failure:
                raise failure[0]
            if ready not in done:
                what = "exited" if process.returncode is not None else "did not answer"
                raise OperationFailed(f"domain {domain.name}: the storage process {what} "
                                      "before its images were open")
        except BaseException:
            domain.storage_session = None
            await session.close()
            await storage.quit_process(process, None)
            path.unlink(missing_ok=True)
            self._store.drop_intent(record)
            raise
        running.watcher = asyncio.create_task(self._watch(domain, running),
                                              name=f"storage-{domain.name}")
        self._running[domain.name] = running
        log.info("domain %s: its QEMU is not running; storage process %d (%s) holds its "
                 "images: %s%s", domain.name, process.pid, binary, ", ".join(sorted(devices)),
                 "".join(f"; disk {d} left out: {why}" for d, why in sorted(skipped.items())))
        return running

    async def _watch(self, domain: Domain, running: _Running) -> None:
        """A storage process that ends unasked takes its snapshots and exports with it."""
        await running.process.wait()
        if running.stopping:
            return
        log.error("domain %s: storage process %d exited (status %s) while serving its images",
                  domain.name, running.process.pid, running.process.returncode)
        async with self._lock(domain.name):
            await self._stop(domain, running)

    async def _stop(self, domain: Domain, running: _Running) -> None:
        """Quit the storage process; what it served is forgotten (already gone
        when nothing held it)."""
        running.stopping = True
        if self._running.get(domain.name) is running:
            del self._running[domain.name]
        try:
            await storage.quit_process(running.process, running.session)
        finally:
            if domain.storage_session is running.session:
                domain.storage_session = None
            await running.session.close()
            self._domains.storage_gone(domain.name)
            Path(running.session.qmp_socket).unlink(missing_ok=True)
            self._store.drop_intent(running.record)
        log.info("domain %s: storage process %d stopped (status %s); its images are free",
                 domain.name, running.process.pid, running.process.returncode)

    async def displaced(self, domain: Domain) -> None:
        running = self._running.get(domain.name)
        if running is None:
            return
        log.error("domain %s: its QEMU started while storage process %d held its images "
                  "(image locking off?); stopping it and dropping what it served",
                  domain.name, running.process.pid)
        async with self._lock(domain.name):
            await self._stop(domain, running)

    # -- daemon life ---------------------------------------------------------------

    async def start(self, remove_scratch: Callable[[str, list[str]], list[str]]) -> None:
        """Stop the storage processes a killed daemon left, and remove the
        scratch files their snapshots made with ``remove_scratch(domain, [])``
        (the snapshot service's; before any session starts)."""
        for record in self._store.domains():
            leftovers = [i for i in self._store.intents(record.name)
                         if i.kind == STORAGE_RECORD]
            for intent in leftovers:
                if await asyncio.to_thread(storage.stop_leftover, intent.payload):
                    log.warning("domain %s: stopped storage process %s left by an earlier "
                                "daemon", record.name, intent.payload.get("pid", "?"))
                self._store.drop_intent(intent.id)
            # The images were held by it, so its VM was not running: every
            # scratch file recorded for the domain was its snapshots'.
            if leftovers:
                remove_scratch(record.name, [])

    async def close(self) -> None:
        """Daemon stopping: quit every storage process (after the services
        removed their snapshots)."""
        for name, running in list(self._running.items()):
            try:
                await self._stop(self._domains.get(name), running)
            except Exception as err:
                log.error("domain %s: storage process left at exit: %s", name, err)


def _disk_images(disk: str, entry: dict[str, Any]) -> storage.DiskImages:
    images = storage.DiskImages.from_record(disk, entry)
    return images if entry.get("whole", True) else storage.DiskImages(
        disk, images.size, images.chain, follow_backing=True)
