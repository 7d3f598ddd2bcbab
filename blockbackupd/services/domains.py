"""Domains: definitions (persisted), their QMP sessions and their live view."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..errors import AlreadyExists, Busy, DomainNotConnected, InvalidArgument, NoSuchDomain
from ..model import DomainState, ExportDiskSpec
from ..names import PREFIX, check_name
from ..qemu.graph import query_disks
from ..qemu.session import DomainSession
from ..store import Store
from ..xml.domain import render_domain
from .events import EventBus

log = logging.getLogger("blockbackupd.domains")

#: QEMU's migration states in which the VM's disks are about to be handed over.
MIGRATION_STARTING = frozenset({"setup", "active", "pre-switchover", "device"})
#: QEMU run states in which its images are not its own (being handed over, or
#: already the destination's): what QEMU shows of them says nothing of the
#: checkpoints (the persistent bitmaps are gone with the disks).
MIGRATED_RUN_STATES = frozenset({"inmigrate", "postmigrate", "finish-migrate"})

ORIGIN_CONFIG = "config"
ORIGIN_RPC = "rpc"


@dataclass
class Domain:
    name: str
    qmp_socket: str
    origin: str
    #: The session to the domain's own QEMU (the VM).
    vm_session: DomainSession
    #: The host side of the guest agent's channel, for quiesce (None: no agent).
    guest_agent_socket: str | None = None
    #: Held by every operation that changes the domain's block graph
    #: (snapshots, exports, probes), so they never interleave.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    #: The last thing that went wrong with the domain, for operators
    #: (daemon.info): {"time": unix seconds, "message": ...}, or None.
    last_error: dict[str, Any] | None = None
    #: While the VM's QEMU is not running and a snapshot, checkpoint or
    #: export needs its images: the session to the daemon's storage process
    #: that holds them (see :mod:`blockbackupd.qemu.storage`).
    storage_session: DomainSession | None = None

    @property
    def session(self) -> DomainSession:
        """The QEMU that holds the domain's images now: the VM's, or, while
        the domain is served offline, the daemon's storage process."""
        return self.storage_session or self.vm_session

    @property
    def offline(self) -> bool:
        return self.storage_session is not None

    @property
    def state(self) -> DomainState:
        """The VM's state (``disconnected`` while it is served offline)."""
        return self.vm_session.state

    def note_error(self, message: str) -> None:
        self.last_error = {"time": int(time.time()), "message": message}


@dataclass(frozen=True)
class DomainSettings:
    qmp_timeout: float
    reconnect_max_delay: float


class Storage(Protocol):
    """Serves a stopped domain's images (the offline service)."""

    def hold(self, domain: Domain) -> AbstractAsyncContextManager[None]:
        """Hold the domain's images in a storage process for the block.

        :raise DomainNotConnected: the daemon knows no images of the domain.
        :raise Unsupported: no storage daemon is installed.
        :raise OperationFailed: it could not open them (QEMU's text).
        """
        ...

    async def settle(self, domain: Domain) -> None:
        """Stop serving the domain's images if nothing holds them any more."""
        ...

    async def displaced(self, domain: Domain) -> None:
        """The VM's QEMU connected while a storage process holds its images."""
        ...


class DomainService:
    """Owns every defined domain and its QMP session."""

    def __init__(self, store: Store, events: EventBus, settings: DomainSettings) -> None:
        self._store = store
        self._events = events
        events.subscribe(None, self._on_event)
        self._settings = settings
        self._domains: dict[str, Domain] = {}
        self._usage_checks: list[Callable[[str], str | None]] = []
        self._connect_hooks: list[Callable[[Domain], Awaitable[None]]] = []
        self._removal_hooks: list[Callable[[Domain, str], Awaitable[None]]] = []
        self._job_hooks: list[Callable[[str, str, str, str | None], None]] = []
        self._job_start_hooks: list[Callable[[Domain, str], Awaitable[None]]] = []
        self._migration_hooks: list[Callable[[Domain, str], Awaitable[None]]] = []
        self._resume_hooks: list[Callable[[Domain, str], Awaitable[None]]] = []
        self._background: set[asyncio.Task[None]] = set()
        #: Set by the checkpoint service: the domain's checkpoints, oldest first.
        self.checkpoints_of: Callable[[str], list[str]] = lambda domain: []
        #: Set by the checkpoint service: checkpoint names per disk, oldest first.
        self.disk_checkpoints: Callable[[str], Mapping[str, list[str]]] = lambda domain: {}
        #: Set by the export service: the domain's exports.
        self.exports_of: Callable[[str], Iterable[ExportDiskSpec]] = lambda domain: ()
        #: Set by the offline service: serves stopped domains' images.
        self.storage: Storage | None = None
        self._gone_hooks: list[Callable[[str], None]] = []

    def _on_event(self, event: dict[str, Any]) -> None:
        """Breaks are what an operator must hear about: keep the last one."""
        domain = self._domains.get(event["domain"])
        if domain is None:
            return
        if event["type"] == "snapshot-broken":
            domain.note_error(f"snapshot {event['snapshot']} broke on disk {event['disk']}: "
                              f"{event['reason']}")
        elif event["type"] == "checkpoint-broken":
            domain.note_error(f"checkpoint {event.get('checkpoint')} broke: "
                              f"{event.get('reason')}")

    def add_connect_hook(self, hook: Callable[[Domain], Awaitable[None]],
                         first: bool = False) -> None:
        """hook(domain) runs on every (re)connect, before the domain counts as
        connected; in the order added, or before all others with ``first``."""
        if first:
            self._connect_hooks.insert(0, hook)
        else:
            self._connect_hooks.append(hook)

    async def _connected_hooks(self, session: DomainSession) -> None:
        domain = self._domains.get(session.domain)
        if domain is None or domain.vm_session is not session:
            return
        if domain.offline and self.storage is not None:
            # Its images were not to be opened by anyone else; QEMU did (image
            # locking off?): the storage process and what it served go first.
            await self.storage.displaced(domain)
        await self.run_connect_hooks(domain)

    async def run_connect_hooks(self, domain: Domain) -> None:
        """Reconcile the services with the QEMU now holding the domain's images."""
        async with domain.lock:
            start = time.perf_counter()
            for hook in self._connect_hooks:
                await hook(domain)
            log.info("domain %s: reconciled with %s in %.1f ms", domain.name,
                     "the storage process" if domain.offline else "QEMU",
                     (time.perf_counter() - start) * 1e3)

    def add_gone_hook(self, hook: Callable[[str], None]) -> None:
        """hook(domain) runs when the storage process serving a stopped domain
        has gone: its nodes, snapshots and exports went with it."""
        self._gone_hooks.append(hook)

    def storage_gone(self, name: str) -> None:
        for hook in self._gone_hooks:
            hook(name)

    def add_removal_hook(self, hook: Callable[[Domain, str], Awaitable[None]]) -> None:
        """hook(domain, disk) runs under the domain's lock when QEMU reports that
        the device of a disk was unplugged."""
        self._removal_hooks.append(hook)

    def add_job_hook(self, hook: Callable[[str, str, str, str | None], None]) -> None:
        """hook(domain, job type, job id, error) runs at once (no I/O allowed)
        when QEMU reports that a block job ended, before later replies arrive.
        error is QEMU's message for a failed job, "cancelled" for a cancelled
        one, else None."""
        self._job_hooks.append(hook)

    def add_job_start_hook(self, hook: Callable[[Domain, str], Awaitable[None]]) -> None:
        """hook(domain, job id) runs soon, under the domain's lock, when QEMU
        reports a new block job that is not ours."""
        self._job_start_hooks.append(hook)

    def add_migration_hook(self, hook: Callable[[Domain, str], Awaitable[None]]) -> None:
        """hook(domain, status) runs soon, under the domain's lock, when QEMU
        reports that a migration is being set up or has begun."""
        self._migration_hooks.append(hook)

    def _migration(self, session: DomainSession, status: str) -> None:
        if status in MIGRATION_STARTING:
            self._react(session, self._migration_hooks, status,
                        f"giving way to a migration ({status})")

    def _job_event(self, session: DomainSession, kind: str, job_type: str,
                   job_id: str, error: str | None) -> None:
        if job_id.startswith(PREFIX):
            return  # our own probes
        if kind == "completed":
            for hook in self._job_hooks:
                hook(session.domain, job_type, job_id, error)
            return
        self._react(session, self._job_start_hooks, job_id, f"reacting to block job {job_id}")

    def _device_deleted(self, session: DomainSession, device: str) -> None:
        self._react(session, self._removal_hooks, device,
                    f"cleaning up after disk {device} was unplugged")

    def _react(self, session: DomainSession,
               hooks: list[Callable[[Domain, str], Awaitable[None]]], subject: str,
               what: str) -> None:
        """Run hooks(domain, subject) in a task, under the domain's lock: QEMU
        told of something the services must follow (called from the QMP
        reader, which must not wait)."""
        domain = self._domains.get(session.domain)
        if domain is None or domain.vm_session is not session or not hooks:
            return

        async def run() -> None:
            async with domain.lock:
                for hook in hooks:
                    try:
                        await hook(domain, subject)
                    except Exception as err:  # the next hook still does its part
                        log.error("domain %s: %s failed: %s", domain.name, what, err)
                        domain.note_error(f"{what} failed: {err}")

        task = asyncio.create_task(run(), name=f"{domain.name}: {what}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def add_usage_check(self, check: Callable[[str], str | None]) -> None:
        """check(domain) says why the domain cannot be undefined now, or None."""
        self._usage_checks.append(check)

    # -- lifecycle ----------------------------------------------------------

    def start(self, configured: Iterable[tuple[str, str, str | None]]) -> None:
        """Load definitions from the store, apply the config file's, start sessions.

        ``configured``: (name, QMP socket, guest agent socket or None) per
        domain of the config file. A domain in the config file wins over a
        stored definition with the same name or QMP socket: the file is the
        administrator's statement.
        """
        for name, qmp_socket, agent in configured:
            stored = {r.name: r for r in self._store.domains()}
            known = stored.get(name)
            if (known is None or known.qmp_socket != qmp_socket
                    or known.origin != ORIGIN_CONFIG or known.guest_agent_socket != agent):
                if known is not None and known.qmp_socket != qmp_socket:
                    log.warning("domain %s: config file moves it from %s to %s",
                                name, known.qmp_socket, qmp_socket)
                self._store.put_domain(name, qmp_socket, ORIGIN_CONFIG, agent)
        for record in self._store.domains():
            self._add(record.name, record.qmp_socket, record.origin, record.guest_agent_socket)
        log.info("%d domain(s) defined", len(self._domains))

    async def close(self) -> None:
        """Close every QMP session (the definitions stay in the store)."""
        domains, self._domains = list(self._domains.values()), {}
        await asyncio.gather(*(d.vm_session.close() for d in domains))

    def _add(self, name: str, qmp_socket: str, origin: str,
             guest_agent_socket: str | None) -> Domain:
        session = DomainSession(
            name, qmp_socket,
            command_timeout=self._settings.qmp_timeout,
            reconnect_max_delay=self._settings.reconnect_max_delay,
            on_state_change=self._state_changed,
            on_connect=self._connected_hooks,
            on_device_deleted=self._device_deleted,
            on_job=self._job_event,
            on_migration=self._migration,
        )
        domain = Domain(name, qmp_socket, origin, session, guest_agent_socket)
        self._domains[name] = domain
        session.start()
        return domain

    def _state_changed(self, session: DomainSession, old: DomainState, new: DomainState) -> None:
        if old is DomainState.DISCONNECTED:
            self._events.publish(session.domain, "domain-connected", state=new.value)
        elif new is DomainState.DISCONNECTED:
            self._events.publish(session.domain, "domain-disconnected")
        elif old is DomainState.PAUSED and new is DomainState.RUNNING:
            self._react(session, self._resume_hooks, "", "following the guest's resume")

    def add_resume_hook(self, hook: Callable[[Domain, str], Awaitable[None]]) -> None:
        """hook(domain, "") runs soon, under the domain's lock, when a connected
        domain's guest goes from paused to running (e.g. an incoming migration
        has completed)."""
        self._resume_hooks.append(hook)

    # -- queries ------------------------------------------------------------

    def get(self, name: str) -> Domain:
        """:raise NoSuchDomain: no domain with that name."""
        try:
            return self._domains[name]
        except KeyError:
            raise NoSuchDomain(name) from None

    def connected(self, name: str) -> Domain:
        """The domain, when its QEMU is reachable.

        :raise NoSuchDomain: no domain with that name.
        :raise DomainNotConnected: its QEMU is not reachable.
        """
        domain = self.get(name)
        if domain.state is DomainState.DISCONNECTED and not domain.offline:
            raise DomainNotConnected(name)
        return domain

    async def release(self, domain: Domain) -> None:
        """Something that held a stopped domain's images (a snapshot) has gone."""
        if self.storage is not None and domain.offline:
            await self.storage.settle(domain)

    @asynccontextmanager
    async def reachable(self, name: str) -> AsyncIterator[Domain]:
        """The domain, served by its QEMU, or while that is not running by a
        storage process of the daemon's (kept for the block at least).

        :raise NoSuchDomain: no domain with that name.
        :raise DomainNotConnected: its QEMU is not reachable and the daemon
            knows none of its images.
        :raise Unsupported: :raise OperationFailed: the storage process
            could not serve them.
        """
        domain = self.get(name)
        if domain.state is not DomainState.DISCONNECTED or self.storage is None:
            yield self.connected(name)
            return
        async with self.storage.hold(domain):
            yield domain

    def __len__(self) -> int:
        return len(self._domains)

    def all(self) -> list[Domain]:
        return sorted(self._domains.values(), key=lambda d: d.name)

    async def get_xml(self, name: str) -> str:
        """The live ``<domain>`` document.

        :raise NoSuchDomain: unknown name.
        :raise DomainNotConnected: QEMU is not reachable.
        :raise OperationFailed: QEMU refused or did not answer in time.
        """
        domain = self.connected(name)
        disks = await query_disks(domain.session)
        return render_domain(domain.name, domain.state, disks, self.exports_of(name),
                             self.disk_checkpoints(name))

    # -- definitions --------------------------------------------------------

    async def define(self, name: str, qmp_socket: str,
                     guest_agent_socket: str | None = None) -> Domain:
        """Define a domain (persisted); the same definition again is a no-op.
        The same name and QMP socket with another guest agent socket (or none)
        changes only that.

        :raise InvalidArgument: bad name or a socket path that is not absolute.
        :raise AlreadyExists: the name, or the QMP socket, belongs to another definition.
        """
        try:
            check_name(name, "domain name")
        except ValueError as err:
            raise InvalidArgument(str(err)) from None
        qmp_socket = _socket_path("qmp_socket", qmp_socket)
        if guest_agent_socket is not None:
            guest_agent_socket = _socket_path("guest_agent_socket", guest_agent_socket)
            if guest_agent_socket == qmp_socket:
                raise InvalidArgument("guest_agent_socket must not be the qmp_socket")
        existing = self._domains.get(name)
        if existing is not None:
            if Path(existing.qmp_socket) == Path(qmp_socket):
                if existing.guest_agent_socket != guest_agent_socket:
                    self._store.put_domain(name, qmp_socket, existing.origin,
                                           guest_agent_socket)
                    existing.guest_agent_socket = guest_agent_socket
                    log.info("domain %s: guest agent socket now %s", name,
                             guest_agent_socket or "(none)")
                return existing
            raise AlreadyExists(
                f"domain {name!r} is already defined with qmp_socket {existing.qmp_socket!r}"
            )
        for other in self._domains.values():
            if other.qmp_socket == qmp_socket:
                raise AlreadyExists(
                    f"qmp_socket {qmp_socket!r} already belongs to domain {other.name!r}"
                )
        self._store.put_domain(name, qmp_socket, ORIGIN_RPC, guest_agent_socket)
        log.info("domain %s: defined on %s%s", name, qmp_socket,
                 f", guest agent on {guest_agent_socket}" if guest_agent_socket else "")
        return self._add(name, qmp_socket, ORIGIN_RPC, guest_agent_socket)

    async def undefine(self, name: str, force: bool = False) -> None:
        """Forget a domain and close its session.

        :raise NoSuchDomain: unknown name.
        :raise Busy: it has snapshots or exports.
        :raise InvalidArgument: it has checkpoints and force is not set.
        """
        domain = self.get(name)
        for check in self._usage_checks:
            reason = check(name)
            if reason is not None:
                raise Busy(f"domain {name!r} cannot be undefined: {reason}")
        checkpoints = self.checkpoints_of(name)
        if checkpoints and not force:
            raise InvalidArgument(
                f"domain {name!r} has {len(checkpoints)} checkpoint(s); undefine with force "
                "to drop their metadata (the bitmaps in the images stay)")
        self._store.delete_domain(name)
        del self._domains[name]
        log.info("domain %s: undefined", name)
        await domain.vm_session.close()


def _socket_path(key: str, path: str) -> str:
    """A UNIX socket path as given in a definition, normalised.

    :raise InvalidArgument: not absolute, or too long for a UNIX socket.
    """
    if "\0" in path or not os.path.isabs(path):
        raise InvalidArgument(f"{key} {path[:200]!r} must be an absolute path")
    path = os.path.normpath(path)
    if len(os.fsencode(path)) >= 108:
        raise InvalidArgument(f"{key} {path[:200]!r} is too long for a UNIX socket")
    return path
