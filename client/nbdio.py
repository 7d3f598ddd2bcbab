"""Where an NBD export is, and reading its meta contexts (libnbd).

An export's server is a UNIX socket on this host (a path), or TCP on another
one, with TLS and this client's certificates (the ``tls://`` directory:
ca-cert.pem, client-cert.pem, client-key.pem). The daemon reads its own
exports' contexts with the same two functions (one distribution).
Blocking: call them in a thread.
"""

from __future__ import annotations

import os
import socket

import nbd

from .remote import SILENCE, bound_silence
from .value import Value

#: Largest range asked in one NBD_CMD_BLOCK_STATUS: the protocol's limit
#: (4 GiB - 1), rounded down to whole MiB. A clean 1 TiB bitmap then takes
#: 256 requests, not 1,024 (1 GiB each: 142 -> 54 ms for an incremental's
#: two contexts there).
_CHUNK = (4 << 30) - (1 << 20)


class NbdServer(Value):
    """A TCP server with TLS (``host``, ``port``, ``certificates``), or a UNIX
    socket (``socket``); over TCP, a request fails after ``silence`` seconds
    without a word from the server."""

    __slots__ = ("socket", "host", "port", "certificates", "silence")

    def __init__(self, socket: str | None = None, host: str | None = None,
                 port: int | None = None, certificates: str | None = None,
                 silence: float = SILENCE) -> None:
        self.socket, self.host, self.port, self.certificates = socket, host, port, certificates
        self.silence = silence

    @classmethod
    def of(cls, server: dict[str, object], host: str | None = None,
           certificates: str | None = None, silence: float = SILENCE) -> NbdServer:
        """From ``export.server``'s answer; ``host``: how this client reaches
        that server's host (the connection's), over its own address when the
        server listens on every address."""
        if server.get("transport") == "unix":
            return cls(socket=str(server["socket"]))
        return cls(host=host or str(server["host"]), port=int(str(server["port"])),
                   certificates=certificates if server.get("tls") else None, silence=silence)

    def __str__(self) -> str:
        if self.socket is not None:
            return f"nbd+unix:///?socket={self.socket}"
        return f"nbd{'s' if self.certificates else ''}://{self.host}:{self.port}"


def connect(server: NbdServer | str, export: str, contexts: tuple[str, ...] = ()) -> nbd.NBD:
    """A libnbd handle on an export (``server``: a socket path, or where),
    with these meta contexts negotiated.

    :raise RuntimeError: the server does not offer one of the contexts.
    :raise nbd.Error: the connection failed.
    """
    if isinstance(server, str):
        server = NbdServer(socket=server)
    h = nbd.NBD()
    h.set_export_name(export)
    for context in contexts:
        h.add_meta_context(context)
    if server.socket is not None:
        h.connect_unix(server.socket)
    else:
        if server.certificates:
            h.set_tls(nbd.TLS_REQUIRE)
            h.set_tls_certificates(server.certificates)
        h.connect_tcp(str(server.host), str(server.port))
        # A cut network must fail a read, not hang it: the silence bound on
        # libnbd's own socket (a duplicate of it shares its options).
        with socket.socket(fileno=os.dup(h.aio_get_fd())) as sock:
            bound_silence(sock, server.silence)
    missing = [c for c in contexts if not h.can_meta_context(c)]
    if missing:
        h.shutdown()
        raise RuntimeError(f"the NBD server does not offer {', '.join(missing)} on {export}")
    return h


def context_runs(h: nbd.NBD, context: str, start: int = 0,
                 end: int | None = None) -> list[tuple[int, int, int]]:
    """(offset, length, flags) of one meta context over the export (or over
    [start, end) of it), neighbours with equal flags merged. The handle must
    have negotiated it.

    :raise RuntimeError: the server sent no status for part of the export.
    :raise nbd.Error:
    """
    size = h.get_size() if end is None else min(end, h.get_size())
    runs: list[tuple[int, int, int]] = []
    offset = start
    seen: list[tuple[int, int]] = []

    def collect(name: str, start: int, entries: list[int], err: object) -> int:
        if name == context:
            seen.extend(zip(entries[0::2], entries[1::2], strict=True))
        return 0

    while offset < size:
        seen.clear()
        h.block_status(min(size - offset, _CHUNK), offset, collect)
        if not seen:
            raise RuntimeError(f"no block status for {context} at offset {offset}")
        for length, flags in seen:
            length = min(length, size - offset)
            if runs and runs[-1][2] == flags and runs[-1][0] + runs[-1][1] == offset:
                runs[-1] = (runs[-1][0], runs[-1][1] + length, flags)
            else:
                runs.append((offset, length, flags))
            offset += length
            if offset >= size:
                break
    return runs
