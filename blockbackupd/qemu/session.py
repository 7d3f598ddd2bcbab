"""One QMP session per domain: connect, reconnect with backoff, run state, events.

A :class:`DomainSession` owns a supervisor task that keeps a ``qemu.qmp``
client connected to the domain's QMP socket. While QEMU is away the session
is ``disconnected`` and retries with exponential backoff (capped); when a
QEMU answers on the socket again it reconnects by itself. The run state
follows QEMU's ``STOP``/``RESUME`` events after one ``query-status`` at
connect time, so no polling is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any

from qemu.qmp import (
    ConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    Message,
    QMPClient,
)
from qemu.qmp.protocol import Runstate

from ..errors import DomainNotConnected, OperationFailed
from ..model import DomainState

log = logging.getLogger("blockbackupd.qemu")

StateCallback = Callable[["DomainSession", DomainState, DomainState], None]
ConnectHook = Callable[["DomainSession"], Awaitable[None]]
DeviceHook = Callable[["DomainSession", str], None]
JobHook = Callable[["DomainSession", str, str, str, "str | None"], None]

# QEMU run states in which guest vCPUs execute; every other status (prelaunch,
# paused, inmigrate, suspended, ...) is reported as "paused" by the contract.
_RUNNING_STATUSES = frozenset({"running"})
_FIRST_RETRY_DELAY = 0.1


def _accept_none(event: Message) -> bool:
    return False


class _Listener(EventListener):
    """An EventListener without the history log: a session may live for months."""

    async def put(self, event: Message) -> None:
        if self.accept(event):
            await self._queue.put(event)


class _GraphWatch(EventListener):
    """Calls back at once, inside qemu.qmp's reader, for the events that tell
    of a changed block graph (a block job created or ended, a device
    unplugged): before any reply that QEMU sent after the event is delivered,
    so a request that reads the graph afterwards already knows."""

    def __init__(self, session: DomainSession) -> None:
        super().__init__(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED", "JOB_STATUS_CHANGE",
                          "DEVICE_DELETED", "MIGRATION"))
        self._session = session

    async def put(self, event: Message) -> None:
        if not self.accept(event):
            return
        session = self._session
        data: Any = event.get("data", {})
        job, unplugged = session._on_job, session._on_device_deleted
        if event["event"] == "MIGRATION":
            # Sent only when the VM manager turned on the migration "events"
            # capability (libvirt does).
            if session._on_migration is not None and data.get("status"):
                session._on_migration(session, str(data["status"]))
        elif event["event"] == "DEVICE_DELETED":
            # QEMU also reports backends (virtio-backend), without an id.
            if unplugged is not None and data.get("device"):
                unplugged(session, str(data["device"]))
        elif job is None:
            return
        elif event["event"] == "BLOCK_JOB_COMPLETED":
            # For a block job, "device" is the job's id.
            job(session, "completed", str(data.get("type", "")), str(data.get("device", "")),
                str(data["error"]) if data.get("error") else None)
        elif event["event"] == "BLOCK_JOB_CANCELLED":
            job(session, "completed", str(data.get("type", "")), str(data.get("device", "")),
                "cancelled")
        elif data.get("status") == "created":
            job(session, "created", "", str(data.get("id", "")), None)


class NoAnswer(OperationFailed):
    """QEMU did not answer in time: unlike a refusal, the command may still run."""


class DomainSession:
    """A self-reconnecting QMP session to one domain's QEMU."""

    #: A storage process of the daemon's own, holding a stopped domain's
    #: images (see :mod:`.storage`), rather than the domain's QEMU.
    offline = False

    def __init__(
        self,
        domain: str,
        qmp_socket: str,
        *,
        command_timeout: float,
        reconnect_max_delay: float,
        on_state_change: StateCallback | None = None,
        on_connect: ConnectHook | None = None,
        on_device_deleted: DeviceHook | None = None,
        on_job: JobHook | None = None,
        on_migration: DeviceHook | None = None,
    ) -> None:
        self.domain = domain
        self.qmp_socket = qmp_socket
        self.command_timeout = command_timeout
        self.reconnect_max_delay = reconnect_max_delay
        self._on_state_change = on_state_change
        # Runs on every new connection before the domain counts as connected,
        # so requests never see a block graph that has not been reconciled.
        self._on_connect = on_connect
        # The VM manager unplugged a device (its qdev id): our nodes on that
        # disk must go at once, or the manager's blockdev-del of its own fails.
        self._on_device_deleted = on_device_deleted
        # A block job (the VM manager's stream, commit, mirror; our probes)
        # was created or ended: hook(session, "created"/"completed", job type
        # (known when completed), job id).
        self._on_job = on_job
        # A migration changed state (QEMU's MIGRATION event): hook(session, status).
        self._on_migration = on_migration
        self._state = DomainState.DISCONNECTED
        #: Why the last connection attempt failed, None once connected.
        self.last_error: str | None = None
        self._qmp: QMPClient | None = None
        #: The QEMU process on the other end (SO_PEERCRED), None when unknown:
        #: the I/O-thread probe runs a throwaway process of its binary.
        self.qemu_pid: int | None = None
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        # Checked by the supervisor loop as well as delivered by cancel():
        # Python 3.11's wait_for can lose a cancellation that races with the
        # inner call failing, and a session that keeps reconnecting after
        # close() would hold its QMP socket forever.
        self._closing = asyncio.Event()
        self.log = log.getChild(domain)

    @property
    def state(self) -> DomainState:
        return self._state

    def start(self) -> None:
        """Start the supervisor task (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._supervise(), name=f"qmp-{self.domain}")

    async def close(self) -> None:
        """Stop reconnecting and close the QMP connection."""
        self._closing.set()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        self._set_state(DomainState.DISCONNECTED)

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        """Run one QMP command and return its ``return`` value.

        :raise DomainNotConnected: QEMU is not reachable, or went away before answering.
        :raise OperationFailed: QEMU refused the command (its error text is in
            the message) or did not answer within ``command_timeout``.
        """
        qmp = self._qmp
        if qmp is None:
            raise DomainNotConnected(self.domain)
        self.log.debug("domain %s: QMP %s %s", self.domain, command, arguments or "")
        try:
            async with asyncio.timeout(self.command_timeout):
                return await qmp.execute(command, arguments)
        except ExecuteError as err:
            if "qmp_capabilities" in str(err):
                # A QEMU still starting can reset its monitor and greet again
                # after we negotiated; the session is unusable: start a new one.
                self.log.warning("domain %s: QEMU reset the monitor; reconnecting", self.domain)
                task = asyncio.create_task(self._close_client(qmp))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
                raise DomainNotConnected(self.domain, "QEMU reset its monitor") from err
            raise OperationFailed(f"QEMU refused {command}: {err}") from err
        except TimeoutError as err:
            raise NoAnswer(
                f"QEMU did not answer {command} within {self.command_timeout:g} s"
            ) from err
        except (ExecInterruptedError, ConnectionError, EOFError) as err:
            raise DomainNotConnected(self.domain, f"connection lost during {command}") from err
        except Exception as err:
            # qemu.qmp raises StateError when the session dropped between our
            # check and the call; treat any other library failure the same way.
            if qmp.runstate is not Runstate.RUNNING:
                raise DomainNotConnected(self.domain, f"connection lost during {command}") from err
            raise

    async def send_fd(self, fd: int) -> None:
        """Pass a file descriptor to QEMU (SCM_RIGHTS); the next ``add-fd`` or
        ``getfd`` takes it. The caller keeps (and closes) its own copy.

        :raise DomainNotConnected: QEMU is not reachable.
        """
        qmp = self._qmp
        if qmp is None:
            raise DomainNotConnected(self.domain)
        try:
            qmp.send_fd_scm(fd)
        except OSError as err:
            raise DomainNotConnected(self.domain, f"cannot pass a file to QEMU: {err}") from err

    @contextlib.contextmanager
    def listen(self, *names: str) -> Iterator[EventListener]:
        """A scoped listener for QEMU events on the current connection.

        :raise DomainNotConnected: QEMU is not reachable.
        """
        qmp = self._qmp
        if qmp is None:
            raise DomainNotConnected(self.domain)
        listener = _Listener(names)
        with qmp.listen(listener):
            yield listener

    # -- supervisor ---------------------------------------------------------

    def _set_state(self, state: DomainState) -> None:
        old, self._state = self._state, state
        if old is state:
            return
        self.log.info("domain %s: %s -> %s", self.domain, old.value, state.value)
        if self._on_state_change is not None:
            self._on_state_change(self, old, state)

    def _set_status(self, status: str) -> None:
        running = status in _RUNNING_STATUSES
        self._set_state(DomainState.RUNNING if running else DomainState.PAUSED)

    async def _supervise(self) -> None:
        delay = _FIRST_RETRY_DELAY
        while not self._closing.is_set():
            qmp = self._new_client()
            # The default catch-all listener would queue every event forever.
            qmp.events.event_filter = _accept_none
            listener = _Listener(("STOP", "RESUME"))
            qmp.register_listener(listener)
            qmp.register_listener(_GraphWatch(self))
            sock: socket.socket | None = None
            try:
                try:
                    # A socket that accepts but never greets must not hold us.
                    async with asyncio.timeout(self.command_timeout):
                        sock = await _open_unix(self.qmp_socket)
                        self.qemu_pid = _peer_pid(sock)
                        await qmp.connect(sock)
                        status = await qmp.execute("query-status")
                except (ConnectError, OSError, TimeoutError, ExecuteError,
                        ExecInterruptedError, EOFError) as err:
                    reason = (f"no answer within {self.command_timeout:g} s"
                              if isinstance(err, TimeoutError) else str(err))
                    # Say it once per new reason, not at every retry.
                    level = logging.DEBUG if reason == self.last_error else logging.WARNING
                    self.log.log(level, "domain %s: cannot reach QEMU on %s: %s; retrying",
                                 self.domain, self.qmp_socket, reason)
                    self.last_error = reason
                    await self._close_client(qmp)
                    if sock is not None:
                        sock.close()  # not taken over by qemu.qmp, or already closed
                    try:
                        await asyncio.wait_for(self._closing.wait(), delay)
                    except TimeoutError:
                        pass
                    delay = min(delay * 2, self.reconnect_max_delay)
                    continue
                delay = _FIRST_RETRY_DELAY
                self.last_error = None
                self._qmp = qmp
                try:
                    await self._serve(qmp, listener, str(status["status"]))  # type: ignore[index]
                except Exception as err:  # whatever ends a session, the next one follows
                    self.log.warning("domain %s: session on %s ended: %s", self.domain,
                                     self.qmp_socket, err)
                    await asyncio.sleep(_FIRST_RETRY_DELAY)
            finally:
                self._qmp = None
                self._set_state(DomainState.DISCONNECTED)
                await asyncio.shield(self._close_client(qmp))

    def _new_client(self) -> QMPClient:
        return QMPClient(self.domain)

    async def _serve(self, qmp: QMPClient, listener: EventListener, status: str) -> None:
        """One connected session: reconcile, then follow run-state events until it drops."""
        self.log.info("domain %s: connected to %s", self.domain, self.qmp_socket)
        if self._on_connect is not None:
            try:
                await self._on_connect(self)
            except Exception:  # reconciling failed: still serve the domain
                self.log.exception("domain %s: reconciling after connect failed", self.domain)
            status = str((await qmp.execute("query-status"))["status"])  # type: ignore[index]
        self._set_status(status)
        await self._follow(qmp, listener)
        self.log.warning("domain %s: QMP connection to %s lost", self.domain, self.qmp_socket)

    async def _follow(self, qmp: QMPClient, listener: EventListener) -> None:
        """Apply run-state events until the connection drops."""
        events = asyncio.create_task(self._apply_events(listener))
        try:
            while qmp.runstate is Runstate.RUNNING:
                await qmp.runstate_changed()
        finally:
            events.cancel()
            try:
                await events
            except asyncio.CancelledError:
                pass

    async def _apply_events(self, listener: EventListener) -> None:
        async for event in listener:
            name = event["event"]
            if name == "RESUME":
                self._set_status("running")
            elif name == "STOP":
                self._set_status("paused")


    @staticmethod
    async def _close_client(qmp: QMPClient) -> None:
        if qmp.runstate is Runstate.IDLE:
            return
        try:
            await qmp.disconnect()
        except Exception:  # noqa: BLE001 - the bottom half's cause is already logged
            pass



async def _open_unix(path: str) -> socket.socket:
    """A connected, non-blocking UNIX socket (qemu.qmp takes it over), opened
    here so that the peer's credentials can be read first."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, path)
    except BaseException:
        sock.close()
        raise
    return sock


def _peer_pid(sock: socket.socket) -> int | None:
    """The PID of the process listening on the other end (QEMU, when QEMU
    made its QMP socket; a VM manager that passed QEMU a socket it made
    itself shows up instead, and the probe then finds no QEMU there)."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return struct.unpack("3i", raw)[0] or None
