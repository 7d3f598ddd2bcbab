"""Synchronous and asyncio clients of the daemon's socket.

Both speak newline-delimited JSON-RPC 2.0 with named params, raise
:mod:`blockbackup_client.errors`, and offer one method per RPC method
(``domain_list()`` for ``domain.list``) on top of the generic ``call()``.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

from .errors import ConnectionLost, ProtocolError, error_from_response

DEFAULT_SOCKET = os.environ.get("BLOCKBACKUPD_SOCKET", "/run/blockbackupd/blockbackupd.sock")
_LINE_LIMIT = 64 * 1024 * 1024


def _request(request_id: int, method: str, params: dict[str, Any]) -> bytes:
    msg = {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
    return json.dumps(msg).encode() + b"\n"


def _result(reply: dict[str, Any]) -> Any:
    if "error" in reply:
        raise error_from_response(reply["error"])
    return reply.get("result")


def _params(**kwargs: Any) -> dict[str, Any]:
    """Named params, leaving out the optional ones not given."""
    return {k: v for k, v in kwargs.items() if v is not None}


class _Methods:
    """One method per RPC method; subclasses supply ``call``.

    On :class:`AsyncClient` each of these returns an awaitable.
    """

    def call(self, method: str, **params: Any) -> Any:
        raise NotImplementedError

    def daemon_info(self) -> Any:
        return self.call("daemon.info")

    def domain_define(self, name: str, qmp_socket: str,
                      guest_agent_socket: str | None = None) -> Any:
        return self.call("domain.define", **_params(name=name, qmp_socket=qmp_socket,
                                                    guest_agent_socket=guest_agent_socket))

    def domain_undefine(self, name: str, force: bool | None = None) -> Any:
        return self.call("domain.undefine", **_params(name=name, force=force))

    def domain_list(self) -> Any:
        return self.call("domain.list")

    def domain_get_xml(self, domain: str) -> Any:
        return self.call("domain.get_xml", domain=domain)

    def snapshot_create(self, domain: str, xml: str | None = None,
                        checkpoint: bool | None = None, quiesce: bool | None = None) -> Any:
        return self.call("snapshot.create", **_params(domain=domain, xml=xml,
                                                      checkpoint=checkpoint, quiesce=quiesce))

    def snapshot_delete(self, domain: str, name: str) -> Any:
        return self.call("snapshot.delete", domain=domain, name=name)

    def snapshot_list(self, domain: str) -> Any:
        return self.call("snapshot.list", domain=domain)

    def snapshot_lookup(self, domain: str, name: str) -> Any:
        return self.call("snapshot.lookup", domain=domain, name=name)

    def snapshot_get_xml(self, domain: str, name: str) -> Any:
        return self.call("snapshot.get_xml", domain=domain, name=name)

    def export_start(self, domain: str, xml: str) -> Any:
        return self.call("export.start", domain=domain, xml=xml)

    def export_stop(self, domain: str, xml: str) -> Any:
        return self.call("export.stop", domain=domain, xml=xml)

    def export_server(self, domain: str) -> Any:
        return self.call("export.server", domain=domain)

    def export_list(self, domain: str) -> Any:
        return self.call("export.list", domain=domain)

    def events_subscribe(self, domains: list[str] | None = None) -> Any:
        return self.call("events.subscribe", **_params(domains=domains))


class Client(_Methods):
    """Blocking client; one request at a time. Use as a context manager."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float | None = 300.0) -> None:
        self.socket_path = socket_path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(socket_path)
        except OSError as err:
            self._sock.close()
            raise ConnectionLost(f"cannot connect to {socket_path}: {err}") from err
        self._file = self._sock.makefile("rb")
        self._ids = itertools.count(1)
        self._events: collections.deque[dict[str, Any]] = collections.deque()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def call(self, method: str, **params: Any) -> Any:
        """Call one method and return its result.

        :raise ApplicationError: the daemon refused (a subclass per contract kind).
        :raise ProtocolError: a JSON-RPC protocol error.
        :raise ConnectionLost: the socket closed before the answer.
        """
        request_id = next(self._ids)
        try:
            self._sock.sendall(_request(request_id, method, params))
        except OSError as err:
            raise ConnectionLost(f"{self.socket_path}: {err}") from err
        while True:
            reply = self._read()
            if reply.get("id") == request_id:
                return _result(reply)
            if "method" in reply:
                self._events.append(reply.get("params", {}))

    def next_event(self, timeout: float | None = None) -> dict[str, Any]:
        """The next event notification (after ``events_subscribe``).

        :raise TimeoutError: none arrived within timeout.
        :raise ConnectionLost: the socket closed.
        """
        if self._events:
            return self._events.popleft()
        old = self._sock.gettimeout()
        self._sock.settimeout(timeout)
        try:
            while True:
                reply = self._read()
                if "method" in reply:
                    return dict(reply.get("params", {}))
        except TimeoutError as err:
            raise TimeoutError("no event arrived in time") from err
        finally:
            self._sock.settimeout(old)

    def _read(self) -> dict[str, Any]:
        try:
            line = self._file.readline(_LINE_LIMIT)
        except TimeoutError:
            raise
        except OSError as err:
            raise ConnectionLost(f"{self.socket_path}: {err}") from err
        if not line:
            raise ConnectionLost(f"{self.socket_path}: the daemon closed the connection")
        try:
            reply = json.loads(line)
        except ValueError as err:
            raise ProtocolError(-32700, f"unreadable answer from daemon: {err}") from err
        if not isinstance(reply, dict):
            raise ProtocolError(-32600, "unexpected answer from daemon")
        return reply


async def _connect_unix(path: str) -> socket.socket:
    """A connected non-blocking UNIX socket.

    A UNIX socket's non-blocking connect fails with EAGAIN when the server's
    accept queue is full, and then nothing is in progress: asyncio's
    sock_connect waits for writability, finds no error and calls the socket
    connected, and the first write fails with ENOTCONN (seen with 200
    clients connecting at once). So EAGAIN is retried here, for a while.

    :raise OSError: the connect failed, or the queue stayed full for 10 s.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    delay = 0.001
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
            return sock
        except BlockingIOError:
            sock.close()
            if loop.time() > deadline:
                raise
        except BaseException:
            sock.close()
            raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.05)


class AsyncClient(_Methods):
    """asyncio client; many requests may be in flight at once.

    ``async with AsyncClient(path) as c: await c.domain_list()``
    """

    def __init__(self, socket_path: str = DEFAULT_SOCKET) -> None:
        self.socket_path = socket_path
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._reader_task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> AsyncClient:
        """:raise ConnectionLost: the socket cannot be reached."""
        try:
            sock = await _connect_unix(self.socket_path)
            reader, self._writer = await asyncio.open_unix_connection(
                sock=sock, limit=_LINE_LIMIT)
        except OSError as err:
            raise ConnectionLost(f"cannot connect to {self.socket_path}: {err}") from err
        self._reader_task = asyncio.create_task(self._read_loop(reader))
        return self

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except asyncio.CancelledError:
                pass
            self._reader_task = None

    async def call(self, method: str, **params: Any) -> Any:
        """Call one method and return its result.

        :raise ApplicationError: the daemon refused (a subclass per contract kind).
        :raise ProtocolError: a JSON-RPC protocol error.
        :raise ConnectionLost: the socket closed before the answer.
        """
        if self._writer is None:
            raise ConnectionLost("not connected")
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            self._writer.write(_request(request_id, method, params))
            await self._writer.drain()
            reply = await future
        except OSError as err:
            raise ConnectionLost(f"{self.socket_path}: {err}") from err
        finally:
            self._pending.pop(request_id, None)
        return _result(reply)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Event notifications (after ``events_subscribe``) until the connection closes."""
        while True:
            event = await self._events.get()
            if event is None:
                return
            yield event

    async def _read_loop(self, reader: asyncio.StreamReader) -> None:
        error: Exception = ConnectionLost(f"{self.socket_path}: the daemon closed the connection")
        try:
            while line := await reader.readline():
                try:
                    reply = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(reply, dict):
                    continue
                if "method" in reply:
                    self._events.put_nowait(reply.get("params", {}))
                    continue
                future = self._pending.get(reply.get("id"))  # type: ignore[arg-type]
                if future is not None and not future.done():
                    future.set_result(reply)
        except (OSError, ValueError) as err:
            error = ConnectionLost(f"{self.socket_path}: {err}")
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._events.put_nowait(None)
