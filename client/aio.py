"""The asyncio client of the daemon's socket: many requests in flight at once.

Kept apart from :mod:`blockbackup_client.client` so that the synchronous
client, and bbctl with it, starts without importing asyncio.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

from .client import _LINE_LIMIT, DEFAULT_SOCKET, _Methods, _request, _result
from .errors import ConnectionLost


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


async def _reap(process: asyncio.subprocess.Process) -> None:
    """Wait for ssh to end (the helper ends when the daemon closes, ssh with
    it); one that has not in 5 s is killed."""
    try:
        await asyncio.wait_for(process.wait(), 5)
    except TimeoutError:
        process.kill()
        await process.wait()


class AsyncClient(_Methods):
    """asyncio client; many requests may be in flight at once.

    ``async with AsyncClient(path) as c: await c.domain_list()``
    """

    def __init__(self, socket_path: str = DEFAULT_SOCKET) -> None:
        """``socket_path``: the daemon's socket, or a connection string
        (``ssh://host``, ``tls://host:port``; see :mod:`blockbackup_client.remote`)."""
        self.socket_path = socket_path
        self._process: asyncio.subprocess.Process | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._reader_task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def connect(self) -> AsyncClient:
        """:raise ConnectionLost: the socket or host cannot be reached."""
        from .remote import bound_silence, parse

        try:
            target = parse(self.socket_path)
            if target.scheme == "unix":
                sock = await _connect_unix(target.path)
                reader, self._writer = await asyncio.open_unix_connection(
                    sock=sock, limit=_LINE_LIMIT)
            elif target.scheme == "tls":
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    target.host, target.port, ssl=target.ssl_context(),
                    server_hostname=target.host, limit=_LINE_LIMIT), 30.0)
                bound_silence(writer.get_extra_info("socket"), target.silence)
                self._writer = writer
            else:
                reader, self._writer = await self._open_ssh(target.ssh_argv())
        except (TimeoutError, OSError, ValueError) as err:
            raise ConnectionLost(f"cannot connect to {self._display}: "
                                 f"{err or 'no answer in 30 s'}") from err
        self._reader_task = asyncio.create_task(self._read_loop(reader))
        return self

    async def _open_ssh(self, argv: list[str]) -> tuple[asyncio.StreamReader,
                                                         asyncio.StreamWriter]:
        """The OpenSSH client on one end of a socket pair, and streams on the other."""
        ours, theirs = socket.socketpair()
        try:
            self._process = await asyncio.create_subprocess_exec(
                *argv, stdin=theirs.fileno(), stdout=theirs.fileno(),
                stderr=asyncio.subprocess.PIPE)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return await asyncio.open_unix_connection(sock=ours, limit=_LINE_LIMIT)

    @property
    def _display(self) -> str:
        return self.socket_path.split("?", 1)[0]

    async def _why_closed(self, err: OSError | None = None) -> str:
        from .remote import _last_words

        process = self._process
        if process is None:
            return str(err) if err else "the daemon closed the connection"
        await _reap(process)
        assert process.stderr is not None
        return _last_words(await process.stderr.read(), process.returncode, err)

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
        if self._process is not None:
            await _reap(self._process)
            self._process = None

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
            raise ConnectionLost(f"{self._display}: {await self._why_closed(err)}") from err
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
        error: Exception = ConnectionLost(f"{self.socket_path}: the connection was closed")
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
            # The far end closed: over SSH, ssh or the helper may say why.
            error = ConnectionLost(f"{self._display}: {await self._why_closed()}")
        except OSError as err:
            error = ConnectionLost(f"{self._display}: {await self._why_closed(err)}")
        except ValueError as err:
            error = ConnectionLost(f"{self._display}: {err}")
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)
            self._events.put_nowait(None)
