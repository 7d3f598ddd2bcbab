"""The synchronous client of the daemon's socket, and what the asyncio one shares.

Both speak newline-delimited JSON-RPC 2.0 with named params, raise
:mod:`blockbackup_client.errors`, and offer one method per RPC method
(``domain_list()`` for ``domain.list``) on top of the generic ``call()``.
``AsyncClient`` lives in :mod:`blockbackup_client.aio`, so that a program
using ``Client`` (bbctl's every start) does not import asyncio; it is still
reachable here as ``blockbackup_client.client.AsyncClient``, imported on
first use.
"""

from __future__ import annotations

import collections
import itertools
import json
import os

from .errors import ConnectionLost, ProtocolError, error_from_response

# typing is for the type checker only: importing it costs bbctl's every start ~2 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .aio import AsyncClient as AsyncClient

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


def writable_disks(document: str, domain: str) -> dict[str, int | None]:
    """The writable disks in a domain's document (``domain.get_xml``) and their
    sizes (None: not given): what a snapshot without a disk list takes.

    :raise ProtocolError: the document is not readable XML.
    """
    from xml.etree import ElementTree  # only the commands that need it pay for it

    try:
        root = ElementTree.fromstring(document)
    except ElementTree.ParseError as err:
        raise ProtocolError(-32700, f"the daemon's document of domain {domain} is "
                            f"unreadable: {err}") from None
    out: dict[str, int | None] = {}
    for el in root.iter("disk"):
        if el.get("readonly") != "yes" and el.get("name"):
            size = el.get("size")
            out[str(el.get("name"))] = int(size) if size and size.isdigit() else None
    return out


class _Methods:
    """One method per RPC method; subclasses supply ``call``.

    On :class:`AsyncClient` each of these returns an awaitable.
    """

    def call(self, method: str, **params: Any) -> Any:
        raise NotImplementedError

    def daemon_info(self) -> Any:
        return self.call("daemon.info")

    def domain_define(self, name: str, qmp_socket: str,
                      guest_agent_socket: str | None = None,
                      disks: list[dict[str, str]] | None = None) -> Any:
        return self.call("domain.define", **_params(name=name, qmp_socket=qmp_socket,
                                                    guest_agent_socket=guest_agent_socket,
                                                    disks=disks))

    def domain_undefine(self, name: str, force: bool | None = None) -> Any:
        return self.call("domain.undefine", **_params(name=name, force=force))

    def domain_list(self) -> Any:
        return self.call("domain.list")

    def domain_get_xml(self, domain: str) -> Any:
        return self.call("domain.get_xml", domain=domain)

    def snapshot_create(self, domain: str, xml: str | None = None,
                        checkpoint: bool | None = None, quiesce: bool | None = None,
                        export: str | None = None, lease: int | None = None) -> Any:
        """``export``: a <domainblockexport> started in the same request;
        ``lease``: seconds it lives without a :meth:`snapshot_renew`."""
        return self.call("snapshot.create", **_params(domain=domain, xml=xml,
                                                      checkpoint=checkpoint, quiesce=quiesce,
                                                      export=export, lease=lease))

    def snapshot_renew(self, domain: str, name: str) -> Any:
        return self.call("snapshot.renew", domain=domain, name=name)

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
    """Blocking client; one request at a time. Use as a context manager.

    ``where`` is the daemon's socket path or a connection string
    (``ssh://host``, ``tls://host:port``; see :mod:`blockbackup_client.remote`).
    """

    def __init__(self, where: str = DEFAULT_SOCKET, timeout: float | None = 300.0,
                 silence: float | None = None) -> None:
        """``silence``: seconds without a word from another host after which
        the connection counts as cut (default :data:`remote.SILENCE`)."""
        from .remote import Channel, parse

        #: As given: a later connection to the same daemon opens with it.
        self.socket_path = where
        try:
            self._target = parse(where)
            if silence is not None:
                self._target.silence = silence
            self._channel = Channel.open(self._target, timeout)
        except (OSError, ValueError) as err:
            raise ConnectionLost(f"cannot connect to {where.split('?', 1)[0]}: {err}") from err
        self._sock = self._channel.sock
        self._file = self._sock.makefile("rb")
        self._ids = itertools.count(1)
        self._events: collections.deque[dict[str, Any]] = collections.deque()
        self._answered = False

    @property
    def remote(self) -> bool:
        """Whether the daemon is on another host (ssh:// or tls://)."""
        return self._target.remote

    @property
    def host(self) -> str | None:
        """The other host's name or address as the connection string gives it."""
        return self._target.host or None

    @property
    def pki_dir(self) -> str:
        """This client's TLS certificates (for ``tls://`` and a remote backup's NBD)."""
        from .remote import default_pki_dir

        return self._target.options.get("pki") or default_pki_dir()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()
        self._channel.close()

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
            raise self._lost(err) from err
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

    def _lost(self, err: OSError | None) -> ConnectionLost:
        # Over SSH the first answer is the first sign that the far end is there;
        # over TLS 1.3 the daemon checks our certificate after we think we are in.
        if self._answered:
            return ConnectionLost(f"{self._target.display}: {self._channel.why_closed(err)}")
        why = self._channel.why_closed(err)
        if self._target.scheme == "tls" and err is None:
            why = "the daemon ended the connection at once: it does not accept this " \
                  "client's certificate (not from its CA?)"
        return ConnectionLost(f"cannot connect to {self._target.display}: {why}")

    def _read(self) -> dict[str, Any]:
        try:
            line = self._file.readline(_LINE_LIMIT)
        except TimeoutError:
            raise
        except OSError as err:
            raise self._lost(err) from err
        if not line:
            raise self._lost(None)
        self._answered = True
        try:
            reply = json.loads(line)
        except ValueError as err:
            raise ProtocolError(-32700, f"unreadable answer from daemon: {err}") from err
        if not isinstance(reply, dict):
            raise ProtocolError(-32600, "unexpected answer from daemon")
        return reply


def __getattr__(name: str) -> Any:
    """``AsyncClient``, imported from :mod:`.aio` (and asyncio) only when asked for."""
    if name == "AsyncClient":
        from .aio import AsyncClient

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
