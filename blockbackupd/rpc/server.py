"""The RPC socket: framing, per-connection concurrency, notifications.

Each connection reads newline-delimited JSON texts. Every complete line is
dispatched in its own task, so a slow request (a domain whose QEMU hangs)
never delays the answers to later requests on the same connection or on
others; answers are written as they finish (match them by ``id``).

A line longer than :data:`MAX_LINE` is answered with -32600 and skipped up
to its newline; the connection stays usable. A client that goes away
mid-request does not cancel the request: the operation finishes (or rolls
back) as it would have, and only the answer is dropped.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jsonrpcserver import Error, Result, async_dispatch

from blockbackup_client.remote import bound_silence

from ..errors import PermissionDenied
from ..services.events import Subscription
from .access import AccessPolicy, Credentials

log = logging.getLogger("blockbackupd.rpc")

MAX_LINE = 1024 * 1024
#: Requests one connection may have in flight before we stop reading from it.
MAX_IN_FLIGHT = 64
#: Answers and notifications queued for a client that does not read them.
MAX_QUEUED = 1024
_READ_CHUNK = 64 * 1024
#: Seconds a TCP client has to finish the TLS handshake.
TLS_HANDSHAKE = 10.0


class Record:
    """``daemon.rpc_record``: every request with its answer, and every
    notification, appended to a file as one JSON line each, as the wire
    carried them (a text that is not JSON is kept as a string)."""

    def __init__(self, path: Path) -> None:
        self._file = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def exchange(self, connection: str, request: str, answer: str | None) -> None:
        self._write(lambda: {"connection": connection, "request": _parsed(request),
                             "reply": None if answer is None else _parsed(answer)})

    def notification(self, connection: str, line: str) -> None:
        self._write(lambda: {"connection": connection, "notification": _parsed(line)})

    def _write(self, entry: Callable[[], dict[str, Any]]) -> None:
        try:
            self._file.write(json.dumps(entry()) + "\n")
        except (OSError, ValueError, RecursionError) as err:
            # A debugging aid, never a reason to fail a request (a text nested
            # deeper than json can read, a full disk).
            log.warning("daemon.rpc_record: %s", err)

    def close(self) -> None:
        self._file.close()


def _parsed(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return text


def _error_line(code: int, message: str) -> bytes:
    return (json.dumps({"jsonrpc": "2.0", "error": {"code": code, "message": message},
                        "id": None}) + "\n").encode()


class Connection:
    """One client connection; also the ``Peer`` the methods see."""

    _counter = 0

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 methods: dict[str, Callable[..., Any]], policy: AccessPolicy,
                 credentials: Credentials | None = None, record: Record | None = None) -> None:
        Connection._counter += 1
        self._record = record
        self.name = f"client#{Connection._counter}"
        self._reader = reader
        self._writer = writer
        #: The peer's credentials: from the kernel, or (TLS) from its certificate.
        self.credentials = credentials or Credentials.of(writer.get_extra_info("socket"))
        self.uid = self.credentials.uid
        self.allowed = policy.allows(self.credentials)
        self._methods = methods if self.allowed else {name: _denied for name in methods}
        self._out: asyncio.Queue[bytes | None] = asyncio.Queue(MAX_QUEUED)
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._tasks: set[asyncio.Task[None]] = set()
        self._subscriptions: list[Subscription] = []
        self._on_close: list[Callable[[], None]] = []
        self._closed = False

    # -- Peer -----------------------------------------------------------------

    def add_subscription(self, subscription: Subscription) -> None:
        self._subscriptions.append(subscription)

    def on_close(self, callback: Callable[[], None]) -> None:
        self._on_close.append(callback)

    def notify(self, method: str, params: dict[str, Any]) -> None:
        line = json.dumps({"jsonrpc": "2.0", "method": method, "params": params})
        if self._record is not None:
            self._record.notification(self.name, line)
        self._send(line.encode() + b"\n")

    # -- machinery --------------------------------------------------------------

    def _send(self, data: bytes) -> None:
        if self._closed:
            return
        try:
            self._out.put_nowait(data)
        except asyncio.QueueFull:
            log.warning("%s does not read its answers; closing the connection", self.name)
            self._abort()

    def _abort(self) -> None:
        self._closed = True
        self._writer.transport.abort()

    async def serve(self) -> None:
        c = self.credentials
        if c.pid:
            who = f"pid {c.pid} uid {c.uid} gid {c.gid}"
        else:
            peer = self._writer.get_extra_info("peername")
            who = f"{c.label} from {peer[0]}:{peer[1]}" if peer else c.label
        if self.allowed:
            log.debug("%s connected (%s)", self.name,
                      f"pid={c.pid} uid={c.uid} gid={c.gid}" if c.pid else who)
        else:
            log.warning("%s: %s is not allowed to call methods "
                        "(daemon.allowed_users, daemon.allowed_groups)", self.name, who)
        writer_task = asyncio.create_task(self._write_loop())
        try:
            try:
                await self._read_loop()
            except (ConnectionError, OSError) as err:
                log.debug("%s: read failed: %s", self.name, err)
            # End of input: requests already running finish and their answers
            # are still sent, since a client may have only shut its write side.
            if self._tasks:
                await asyncio.wait(self._tasks)
            await self._out.put(None)
            await writer_task
        finally:
            # Reached early only when the daemon stops: cancel what still runs,
            # and let each request roll back what it made before we go on.
            for sub in self._subscriptions:
                sub.close()
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            writer_task.cancel()
            self._closed = True
            self._writer.close()
            for callback in self._on_close:
                try:
                    callback()
                except Exception:
                    log.exception("%s: a clean-up at disconnection failed", self.name)
            log.debug("%s disconnected", self.name)

    async def _read_loop(self) -> None:
        buf = bytearray()
        skipping = False  # inside an oversized line, dropping bytes up to its newline
        while True:
            chunk = await self._reader.read(_READ_CHUNK)
            if not chunk:
                return
            buf += chunk
            while True:
                nl = buf.find(b"\n")
                if nl < 0:
                    if not skipping and len(buf) > MAX_LINE:
                        self._send(_error_line(-32600, f"request larger than {MAX_LINE} bytes"))
                        skipping = True
                    if skipping:
                        buf.clear()
                    break
                line = bytes(buf[:nl])
                del buf[:nl + 1]
                if skipping:
                    skipping = False
                    continue
                if len(line) > MAX_LINE:
                    self._send(_error_line(-32600, f"request larger than {MAX_LINE} bytes"))
                    continue
                if line.strip():
                    await self._slots.acquire()
                    task = asyncio.create_task(self._handle(line))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)

    async def _handle(self, line: bytes) -> None:
        try:
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                self._send(_error_line(-32700, "parse error: request is not valid UTF-8"))
                return
            answer = await async_dispatch(text, methods=self._methods, context=self)
            if answer:
                self._send(answer.encode() + b"\n")
            if self._record is not None:
                self._record.exchange(self.name, text, answer or None)
        except Exception:
            log.exception("%s: dispatch failed", self.name)
            self._send(_error_line(-32603, "internal error"))
        finally:
            self._slots.release()

    async def _write_loop(self) -> None:
        while True:
            data = await self._out.get()
            if data is None:
                return
            if self._closed:
                continue
            try:
                self._writer.write(data)
                await self._writer.drain()
            except (ConnectionError, OSError):
                # The client left; keep consuming so producers never block.
                self._closed = True


async def _denied(peer: Connection, *args: Any, **kwargs: Any) -> Result:
    err = PermissionDenied(f"{peer.credentials.label} may not call methods of this daemon")
    return Error(err.code, err.message, {"kind": err.kind})


class RpcServer:
    """Listens on the UNIX socket and serves every connection concurrently."""

    def __init__(self, path: Path, methods: dict[str, Callable[..., Any]],
                 policy: AccessPolicy, record: Path | None = None) -> None:
        """``record``: where every exchange is appended (``daemon.rpc_record``).

        :raise OSError: that file cannot be opened.
        """
        self.path = path
        self._record = None if record is None else Record(record)
        self._methods = methods
        self._policy = policy
        self._server: asyncio.Server | None = None
        self._tls_server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()

    async def start(self, sock: socket.socket) -> None:
        """Serve on an already bound socket (see :mod:`blockbackupd.runtime`)."""
        self._server = await asyncio.start_unix_server(self._accept, sock=sock)

    async def listen_tls(self, host: str, port: int, context: ssl.SSLContext) -> None:
        """Also serve on TCP, TLS only, with a verified client certificate.

        :raise OSError: the address cannot be bound.
        """
        self._tls_server = await asyncio.start_server(
            self._accept_tls, host, port, ssl=context, ssl_handshake_timeout=TLS_HANDSHAKE)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      credentials: Credentials | None = None) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        try:
            await Connection(reader, writer, self._methods, self._policy, credentials,
                             self._record).serve()
        finally:
            self._connections.discard(task)

    async def _accept_tls(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        # The handshake is done and the certificate verified (CERT_REQUIRED).
        # A client whose network is cut sends no reset: its connection ends
        # after the silence bound, not when the kernel gives up.
        bound_silence(writer.get_extra_info("socket"))
        await self._accept(reader, writer,
                           Credentials.of_certificate(writer.get_extra_info("peercert")))

    async def close(self) -> None:
        """Stop listening, drop every connection, and remove the socket file."""
        servers = [server for server in (self._server, self._tls_server) if server is not None]
        for server in servers:
            server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections)
        for server in servers:
            await server.wait_closed()
        self._server = self._tls_server = None
        if self._record is not None:
            self._record.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
