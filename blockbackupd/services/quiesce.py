"""Quiesce: the guest's filesystems frozen through its agent around an instant.

A frozen guest is the one state the daemon must never leave behind: every
write of the guest's applications waits until the thaw. So the store records
the freeze before it is asked for (``guest-frozen``), and the record goes only
once a thaw was answered. A thaw that fails is retried in the background
until it is answered or the agent's channel is gone (QEMU quit); a daemon
stopped half-way thaws before it exits; one killed outright leaves the record,
and the next daemon thaws the guest as soon as it starts.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket as socket_module
import time
from dataclasses import dataclass, field

from ..errors import QuiesceFailed
from ..qemu.agent import AgentError, GuestAgent
from ..store.db import Store
from .domains import Domain, DomainService

log = logging.getLogger("blockbackupd.quiesce")

#: Kind of the store records that say the daemon asked the guest to freeze.
FROZEN_RECORD = "guest-frozen"
#: Pause between attempts to thaw a guest whose agent did not answer.
RETRY_DELAY = 1.0


@dataclass(frozen=True)
class QuiesceSettings:
    #: Longest wait for each agent command (freeze, thaw) to be answered.
    timeout: float


@dataclass
class Frozen:
    """A freeze that was answered: what to thaw, and since when."""

    domain: str
    socket: str
    record: int
    filesystems: int
    #: perf_counter() when the freeze was asked for: from then on guest writes
    #: to the filesystems being frozen wait.
    since: float
    thawed: bool = False
    #: Whether a thaw must be sent (False when the freeze froze nothing).
    owed: bool = True
    #: How long the guest's filesystems stayed frozen (set by the thaw).
    window: float | None = field(default=None)


class QuiesceService:
    def __init__(self, domains: DomainService, store: Store, settings: QuiesceSettings) -> None:
        self._domains = domains
        self._store = store
        self._settings = settings
        self._retries: dict[int, asyncio.Task[None]] = {}
        domains.add_connect_hook(self._thaw_leftovers, first=True)

    def start(self) -> None:
        """Thaw every guest an earlier daemon froze and did not thaw (it was
        killed): at once, without waiting for the domain's QMP connection,
        since the agent's channel is enough."""
        for domain in self._domains.all():
            self._retry_leftovers(domain.name)

    async def close(self) -> None:
        """Daemon stopping: pending thaw retries stop; their records stay, and
        the next daemon thaws as soon as it starts."""
        tasks, self._retries = list(self._retries.values()), {}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def freeze(self, domain: Domain, snapshot: str) -> Frozen:
        """Freeze the guest's filesystems through its agent.

        :raise QuiesceFailed: no agent socket is defined, the agent cannot be
            reached, refuses, or does not answer within the timeout. The guest
            is then thawed (or a thaw keeps being retried) and nothing is left.
        """
        socket = agent_socket(domain)
        record = self._store.add_intent(domain.name, FROZEN_RECORD,
                                        {"snapshot": snapshot, "socket": socket})
        since = time.perf_counter()
        try:
            count = await self._agent(socket).command("guest-fsfreeze-freeze")
        except AgentError as err:
            # Refused: qemu-ga thawed what it froze. Not answered: it may yet
            # freeze. Either way a thaw makes sure. Never delivered (agent not
            # there, or not answering even the synchronisation): nothing to thaw.
            if err.delivered and not _unreachable(socket):
                self._retry(domain.name, socket, record)
            else:
                self._store.drop_intent(record)
            raise QuiesceFailed(f"domain {domain.name!r}: cannot freeze the guest's "
                                f"filesystems: {err}") from None
        except BaseException:
            # Cancelled mid-freeze (daemon stopping, client gone): thaw first.
            frozen = Frozen(domain.name, socket, record, 0, since)
            await asyncio.shield(self.thaw(frozen))
            raise
        if not isinstance(count, int):
            count = 0
        log.info("domain %s: froze %d filesystem(s) in %.1f ms for snapshot %s", domain.name,
                 count, (time.perf_counter() - since) * 1e3, snapshot)
        frozen = Frozen(domain.name, socket, record, count, since)
        if count == 0:
            # Nothing of ours to thaw: the guest has no filesystem its agent can
            # freeze, or another agent (the manager's) froze them already, and
            # qemu-ga's thaw would thaw them all, theirs included.
            self._store.drop_intent(record)
            frozen.owed = False
        return frozen

    async def thaw(self, frozen: Frozen) -> None:
        """Thaw what ``freeze`` froze; a no-op the second time. Never raises: a
        thaw that is not answered keeps being retried in the background."""
        if frozen.thawed:
            return
        frozen.thawed = True
        if not frozen.owed:
            frozen.window = time.perf_counter() - frozen.since
            return
        try:
            await self._agent(frozen.socket).command("guest-fsfreeze-thaw")
        except AgentError as err:
            frozen.window = time.perf_counter() - frozen.since  # at least this long
            log.error("domain %s: the guest's filesystems may still be frozen: %s; "
                      "retrying the thaw", frozen.domain, err)
            self._retry(frozen.domain, frozen.socket, frozen.record)
            return
        frozen.window = time.perf_counter() - frozen.since
        self._store.drop_intent(frozen.record)

    def _agent(self, socket: str) -> GuestAgent:
        return GuestAgent(socket, self._settings.timeout)

    # -- thaws still owed ---------------------------------------------------

    async def _thaw_leftovers(self, domain: Domain) -> None:
        self._retry_leftovers(domain.name)

    def _retry_leftovers(self, domain: str) -> None:
        for record in self._store.intents(domain):
            if record.kind == FROZEN_RECORD and record.id not in self._retries:
                log.warning("domain %s: an earlier daemon froze the guest for snapshot %s "
                            "and did not thaw it; thawing", domain,
                            record.payload.get("snapshot"))
                self._retry(domain, str(record.payload["socket"]), record.id)

    def _retry(self, domain: str, socket: str, record: int) -> None:
        if record in self._retries:
            return
        task = asyncio.create_task(self._thaw_until_answered(domain, socket, record),
                                   name=f"{domain}: thaw the guest")
        self._retries[record] = task
        task.add_done_callback(lambda _: self._retries.pop(record, None))

    async def _thaw_until_answered(self, domain: str, socket: str, record: int) -> None:
        started = time.monotonic()
        while True:
            try:
                await self._agent(socket).command("guest-fsfreeze-thaw")
            except AgentError as err:
                if _unreachable(socket):
                    log.warning("domain %s: the guest agent's channel %s is gone (QEMU quit); "
                                "nothing left to thaw", domain, socket)
                    break
                log.debug("domain %s: thaw not answered yet: %s", domain, err)
                await asyncio.sleep(RETRY_DELAY)
                continue
            log.warning("domain %s: thawed the guest's filesystems %.1f s after the thaw "
                        "was owed", domain, time.monotonic() - started)
            break
        self._store.drop_intent(record)


def agent_socket(domain: Domain) -> str:
    """The domain's guest agent socket.

    :raise QuiesceFailed: the domain was defined without one.
    """
    if domain.guest_agent_socket is None:
        raise QuiesceFailed(f"domain {domain.name!r} has no guest agent: define it with "
                            "guest_agent_socket to quiesce")
    return domain.guest_agent_socket


def _unreachable(path: str) -> bool:
    """Whether nothing listens on the agent's channel (no QEMU behind it)."""
    probe = socket_module.socket(socket_module.AF_UNIX, socket_module.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as err:
        return err.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK)
    finally:
        probe.close()
    return False
