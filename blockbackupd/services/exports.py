"""Exports: read-only NBD exports of snapshot views, one NBD server per domain.

The server starts with a domain's first export and stops with its last. By
default it listens on ``run_dir/<domain>.nbd`` (mode from ``nbd.socket_mode``);
TCP is refused unless it uses TLS (``nbd.tls_dir``) or the configuration
allows plain TCP. Read-only exports advertise multi-conn, so a client may
read with several connections at once.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import secrets
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from blockbackup_client.remote import bound_silence

from .. import faults
from ..errors import (
    AlreadyExists,
    Busy,
    DomainNotConnected,
    InvalidArgument,
    OperationFailed,
    Unsupported,
)
from ..model import Disk, ExportDiskSpec, ExportSpec, NbdAddress, SnapshotState
from ..names import PREFIX
from ..qemu import iothreads
from ..qemu.blockops import Bitmaps, BlockOps, bitmap_ref
from ..qemu.nbdread import dirty_extents, mark_extents
from ..store.db import Store
from .checkpoints import CheckpointService, Verified
from .domains import Domain, DomainService
from .events import EventBus
from .snapshot_types import Snapshot
from .snapshots import SnapshotService
from .undo import Undo

log = logging.getLogger("blockbackupd.exports")


@dataclass(frozen=True)
class ExportSettings:
    run_dir: Path
    socket_mode: int
    socket_gid: int | None
    tls_dir: str
    tls_verify_peer: bool
    allow_plain_tcp: bool
    timeout: float
    #: Seconds a TCP client may leave QEMU without a word before it is dropped.
    silence: float


@dataclass
class Export:
    disk: str
    snapshot: str
    checkpoint: str | None
    name: str
    bitmap: str | None  # the NBD meta context carrying the changes, if any
    export_id: str
    view_node: str = ""
    #: Bitmaps on the view whose union is the change set (with granularity).
    sources: list[dict[str, str]] = field(default_factory=list)
    granularity: int = 0

    def as_result(self) -> dict[str, Any]:
        return {"disk": self.disk, "snapshot": self.snapshot, "checkpoint": self.checkpoint,
                "name": self.name, "bitmap": self.bitmap}

    def spec(self) -> ExportDiskSpec:
        return ExportDiskSpec(self.disk, self.snapshot, self.checkpoint, self.name)


@dataclass
class _Server:
    address: NbdAddress
    tls_object: str | None
    #: The store's record that this server runs, so that a daemon killed at
    #: any moment stops it on the next connect.
    record: int
    exports: dict[str, Export] = field(default_factory=dict)  # by NBD export name


#: Kind of the store records that say the daemon started a domain's NBD server.
SERVER_RECORD = "nbd-server"


class ExportService:
    def __init__(self, domains: DomainService, snapshots: SnapshotService,
                 checkpoints: CheckpointService, events: EventBus, store: Store,
                 settings: ExportSettings) -> None:
        self._domains = domains
        self._store = store
        self._snapshots = snapshots
        self._checkpoints = checkpoints
        checkpoints.bitmap_reader = self.read_bitmaps
        checkpoints.cluster.writer = self.write_bitmap
        self._settings = settings
        self._servers: dict[str, _Server] = {}
        self._goodbyes: set[asyncio.Task[None]] = set()
        snapshots.add_before_delete(self._stop_for)
        snapshots.add_before_part_delete(self._stop_for)
        events.subscribe(None, self._on_event)
        domains.add_gone_hook(self.forget)
        domains.add_usage_check(self._usage)
        domains.exports_of = lambda d: [e.spec() for e in self.exports(d)]
        # Before the snapshot service's: exports go before the nodes they read.
        domains.add_connect_hook(self.clean_leftovers, first=True)

    async def close(self) -> None:
        """Daemon stopping, its sessions closed: let the probes sent to servers
        that outlive it say goodbye (cut short, QEMU logs a failed negotiation)."""
        if self._goodbyes:
            await asyncio.wait(set(self._goodbyes), timeout=3)

    # -- queries ----------------------------------------------------------------

    def exports(self, domain: str) -> list[Export]:
        """:raise NoSuchDomain:"""
        self._domains.get(domain)
        server = self._servers.get(domain)
        return list(server.exports.values()) if server else []

    def server(self, domain: str) -> NbdAddress | None:
        """:raise NoSuchDomain:"""
        self._domains.get(domain)
        server = self._servers.get(domain)
        return server.address if server else None

    def _usage(self, domain: str) -> str | None:
        n = len(self.exports(domain))
        return f"it has {n} export(s)" if n else None

    # -- start ------------------------------------------------------------------

    async def start(self, domain_name: str, spec: ExportSpec) -> tuple[NbdAddress, list[Export]]:
        """Export the listed disks of their snapshots; start the server if needed.

        :raise NoSuchDomain: :raise DomainNotConnected: :raise NoSuchSnapshot:
        :raise NoSuchDisk: the snapshot has no such disk.
        :raise NoSuchCheckpoint: the named checkpoint does not exist.
        :raise AlreadyExists: the export name, or that disk of that snapshot, is exported.
        :raise InvalidArgument: an address the server cannot take now, or refused by policy.
        :raise Unsupported: TLS asked for but no certificates configured; or a
            disk runs in an I/O thread and this QEMU build's NBD server aborts
            the VM when a client of it leaves (snapshot.copy reads it instead).
        :raise OperationFailed: the snapshot is broken, or QEMU refused.
        """
        domain = self._domains.connected(domain_name)
        async with domain.lock:
            self._domains.connected(domain_name)
            server = self._servers.get(domain_name)
            address = self._address(domain_name, spec.address, server)
            # The disks' chains as they are now decide which change sets are whole.
            verified = await self._checkpoints.verify(domain) if any(
                d.checkpoint is not None for d in spec.disks) else None
            planned = self._plan(domain_name, spec.disks, server, verified)
            refused = await self._unsafe(domain, [
                self._snapshots.get(domain_name, e.snapshot).disk(e.disk).disk for e in planned])
            if refused:
                raise Unsupported("; ".join(refused.values()))
            ops = BlockOps(domain.session)
            undo = Undo(f"export.start {domain_name}")
            try:
                if server is None:
                    server = await self._start_server(domain, ops, address, undo)
                made = []
                bitmaps = Bitmaps(domain.session)
                for export in planned:
                    bitmap = None
                    if export.checkpoint is not None:
                        # The change set as a bitmap on the view, named so that the
                        # meta context is qemu:dirty-bitmap:<checkpoint>.
                        bitmap = export.checkpoint
                        await bitmaps.add(export.view_node, bitmap, disabled=True,
                                          granularity=export.granularity)
                        undo.push(f"bitmap {bitmap} on {export.view_node}",
                                  partial(bitmaps.remove, export.view_node, bitmap))
                        await bitmaps.merge(export.view_node, bitmap, export.sources)
                    await ops.export_add(export.export_id, export.view_node, export.name,
                                         [bitmap] if bitmap else None)
                    undo.push(f"export {export.name}",
                              partial(ops.export_del, export.export_id, self._settings.timeout))
                    made.append(export)
                    await faults.check("export:added")
            except BaseException as err:
                await undo.rollback(err)
                raise
            undo.discard()
            for export in made:
                server.exports[export.name] = export
            self._servers[domain_name] = server
        for export in made:
            log.info("export %s/%s started: disk %s of snapshot %s", domain_name, export.name,
                     export.disk, export.snapshot)
        return server.address, made

    async def copy_only(self, domain_name: str, snapshot_name: str) -> dict[str, str]:
        """The disks of a snapshot that export.start refuses on this QEMU build,
        with the reason (snapshot.copy reads them instead).

        :raise NoSuchDomain: :raise NoSuchSnapshot:
        """
        snapshot = self._snapshots.get(domain_name, snapshot_name)
        try:
            return await self._unsafe(self._domains.get(domain_name),
                                      [d.disk for d in snapshot.disks])
        except DomainNotConnected:  # not connected: nothing can be exported anyway
            return {}

    async def _unsafe(self, domain: Domain, disks: list[Disk]) -> dict[str, str]:
        """disk -> why an NBD export of it would risk the VM: its device runs
        in an I/O thread, and this QEMU build aborts when a client of such
        an export disconnects (:mod:`..qemu.iothreads`)."""
        pinned = await iothreads.pinned(domain.session, disks)
        if not pinned:
            return {}
        verdict = await iothreads.nbd_verdict(domain.session.qemu_pid)
        if verdict.safe:
            return {}
        return {disk: (f"disk {disk!r} runs in I/O thread {thread!r}, and this QEMU build "
                       f"cannot serve NBD exports of such disks without risking the VM: "
                       f"{verdict.detail}; read it with snapshot.copy instead (bbctl backup "
                       "does), or run the VM on a QEMU whose NBD server survives this "
                       "(10.0 does)")
                for disk, thread in pinned.items()}

    def _address(self, domain: str, wanted: NbdAddress | None,
                 server: _Server | None) -> NbdAddress:
        s = self._settings
        if wanted is None:
            if server is not None:
                return server.address
            wanted = NbdAddress("unix", socket=str(s.run_dir / f"{domain}.nbd"))
        if wanted.transport == "unix":
            path = Path(wanted.socket or "")
            if path.parent.resolve() != s.run_dir.resolve():
                raise InvalidArgument(f"NBD socket {str(path)!r} must be directly in {s.run_dir}")
            wanted = NbdAddress("unix", socket=str(s.run_dir.resolve() / path.name))
        elif wanted.tls:
            if not s.tls_dir:
                raise Unsupported("TLS for NBD is not configured (nbd.tls_dir)")
        elif not s.allow_plain_tcp:
            raise InvalidArgument(
                "NBD over TCP without TLS is refused (set tls=\"yes\", or allow_plain_tcp "
                "in the [nbd] configuration)")
        if server is not None and wanted.transport == "tcp" and not wanted.port and \
                server.address.transport == "tcp" and server.address.host == wanted.host and \
                server.address.tls == wanted.tls:
            return server.address  # "any port": the one it already has
        if server is not None and server.address != wanted:
            raise InvalidArgument(
                f"the NBD server of domain {domain!r} already listens on "
                f"{_describe(server.address)}; stop its exports to move it")
        return wanted

    def _plan(self, domain: str, disks: tuple[ExportDiskSpec, ...],
              server: _Server | None, verified: Verified | None) -> list[Export]:
        taken = dict(server.exports) if server else {}
        exported = {(e.disk, e.snapshot) for e in taken.values()}
        planned = []
        for d in disks:
            snapshot = self._snapshots.get(domain, d.snapshot)
            snapshot.disk(d.disk)
            if snapshot.state is not SnapshotState.ACTIVE:
                raise OperationFailed(f"snapshot {d.snapshot!r} is broken: "
                                      f"{snapshot.broken_reason}")
            sources: list[dict[str, str]] = []
            granularity = 0
            if d.checkpoint is not None and verified is not None:
                sources, granularity = self._checkpoints.sources_to_snapshot(
                    domain, snapshot, d.disk, d.checkpoint, verified)
            name = d.exportname or f"{d.disk}-{d.snapshot}"
            if name in taken:
                raise AlreadyExists(f"an export named {name!r} already exists")
            if (d.disk, d.snapshot) in exported:
                raise AlreadyExists(f"disk {d.disk!r} of snapshot {d.snapshot!r} is already "
                                    "exported")
            export = Export(
                d.disk, d.snapshot, d.checkpoint, name,
                None if d.checkpoint is None else f"qemu:dirty-bitmap:{d.checkpoint}",
                f"{PREFIX}export-{secrets.token_hex(4)}", snapshot.disk(d.disk).view_node,
                sources, granularity)
            taken[name] = export
            exported.add((d.disk, d.snapshot))
            planned.append(export)
        return planned

    async def _start_server(self, domain: Domain, ops: BlockOps, address: NbdAddress,
                            undo: Undo) -> _Server:
        tls_object = None
        if address.transport == "tcp" and address.tls:
            tls_object = creds = f"{PREFIX}tls-{secrets.token_hex(4)}"
            await ops.add_tls_creds(creds, self._settings.tls_dir, self._settings.tls_verify_peer)
            undo.push(f"TLS credentials {creds}", lambda: ops.delete_object(creds))
        listener = None
        if address.transport == "tcp":
            # The daemon binds TCP listeners itself (port="0" or none: any free
            # port, which export.server then names), with the silence bound
            # that QEMU's accepted client sockets inherit. A client cut off
            # mid-reply otherwise holds its request in QEMU for the kernel's
            # retransmissions (15 minutes), and with it every drain of the
            # exported node: block jobs starting, the VM manager's snapshots,
            # the snapshot's own deletion.
            listener = _listen_tcp(address.host or "", address.port or 0)
            bound_silence(listener, self._settings.silence)
            address = NbdAddress("tcp", host=address.host, port=listener.getsockname()[1],
                                 tls=address.tls)
        try:
            record = await self._start_nbd(domain, ops, address, tls_object, undo, listener)
        finally:
            if listener is not None:
                listener.close()  # QEMU holds its own copy
        await faults.check("export:server-started")
        if address.socket is not None:
            try:
                if self._settings.socket_gid is not None:
                    os.chown(address.socket, -1, self._settings.socket_gid)
                os.chmod(address.socket, self._settings.socket_mode)
            except OSError as err:
                raise OperationFailed(f"cannot set the group or mode of {address.socket}: "
                                      f"{err}") from err
        log.info("domain %s: NBD server listening on %s", domain.name, _describe(address))
        return _Server(address, tls_object, record)

    async def _start_nbd(self, domain: Domain, ops: BlockOps, address: NbdAddress,
                         tls_object: str | None, undo: Undo,
                         listener: socket.socket | None = None) -> int:
        """Start the domain's NBD server (on ``listener`` when we bound its
        socket), recorded in the store first."""
        record = self._store.add_intent(domain.name, SERVER_RECORD, {"socket": address.socket})
        undo.push_record("record of the NBD server", partial(self._store.drop_intent, record))
        if address.socket is not None:
            _remove_socket(address.socket)  # left by a QEMU that was killed
        try:
            if listener is not None:
                await ops.nbd_server_start_fd(listener.fileno(), tls_object)
            else:
                await ops.nbd_server_start(address, tls_object)
        except OperationFailed as err:
            if "already running" not in str(err):
                raise
            # QEMU has one NBD server per process: the VM manager's own backup
            # job (libvirt's backup-begin) holds it until that job ends.
            raise Busy(f"domain {domain.name!r}: QEMU's only NBD server is already running for "
                       "someone else (e.g. the VM manager's own backup job); try again when "
                       "it has stopped") from err
        undo.push("NBD server", partial(self._stop_server, ops, address, None))
        return record

    async def _stop_server(self, ops: BlockOps, address: NbdAddress,
                           record: int | None) -> None:
        await ops.nbd_server_stop()
        if address.socket is not None:
            _remove_socket(address.socket)
        if record is not None:
            self._store.drop_intent(record)

    async def clean_leftovers(self, domain: Domain) -> None:
        """Remove the exports a daemon that died or stopped left in this QEMU,
        and the NBD server the store says it started, if this QEMU still runs
        it (unless someone else exports on it).

        A server on a UNIX socket is ours while that socket listens: after
        QEMU restarted, its socket file is stale, and a server running now
        (the VM manager's) is left alone. A TCP server's record cannot be
        told apart: it is stopped if every export on it is ours.
        """
        ops = BlockOps(domain.session)
        exports = await domain.session.execute("query-block-exports")
        ours = [e["id"] for e in exports if e["id"].startswith(PREFIX)]
        for export_id in ours:
            await ops.export_del(export_id, self._settings.timeout)
        records = [r for r in self._store.intents(domain.name) if r.kind == SERVER_RECORD]
        running = [r for r in records
                   if not r.payload.get("socket") or await _listens(r.payload["socket"])]
        if (running or ours) and len(ours) == len(exports):
            try:
                await ops.nbd_server_stop()
            except OperationFailed as err:  # it was not running
                log.debug("domain %s: nbd-server-stop: %s", domain.name, err)
        for record in records:
            if record.payload.get("socket"):
                _remove_socket(record.payload["socket"])
            self._store.drop_intent(record.id)
        if ours or records:
            log.warning("domain %s: removed %d export(s) and the NBD server left by an earlier "
                        "daemon", domain.name, len(ours))

    # -- stop -------------------------------------------------------------------

    async def stop(self, domain_name: str, disks: tuple[ExportDiskSpec, ...]) -> None:
        """Stop the exports of the listed disks; the server goes with the last.

        :raise NoSuchDomain: :raise DomainNotConnected:
        :raise InvalidArgument: a listed disk of that snapshot is not exported.
        :raise OperationFailed: QEMU refused.
        """
        domain = self._domains.connected(domain_name)
        async with domain.lock:
            self._domains.connected(domain_name)
            server = self._servers.get(domain_name)
            exports = {(e.disk, e.snapshot): e for e in (server.exports.values()
                                                           if server else [])}
            chosen = []
            for d in disks:
                export = exports.get((d.disk, d.snapshot))
                if export is None:
                    raise InvalidArgument(f"disk {d.disk!r} of snapshot {d.snapshot!r} is not "
                                          "exported")
                chosen.append(export)
            await self._remove(domain, chosen)

    async def _stop_for(self, domain: Domain, snapshot: Snapshot,
                        disk: str | None = None) -> None:
        """Stop the exports of a snapshot (of one of its disks) before its nodes go."""
        server = self._servers.get(domain.name)
        if server is not None:
            await self._remove(domain, [e for e in server.exports.values()
                                        if e.snapshot == snapshot.name
                                        and disk in (None, e.disk)])

    async def _remove(self, domain: Domain, exports: list[Export]) -> None:
        """Remove exports (caller holds the domain lock); stop an emptied server."""
        server = self._servers.get(domain.name)
        if server is None or not exports:
            return
        ops = BlockOps(domain.session)
        live = await ops.export_ids()
        # Only an export of a change set has a bitmap of its own to remove
        # (the node query costs 2-3 ms: every snapshot.delete paid it).
        on_nodes = await Bitmaps(domain.session).on_nodes() \
            if any(e.checkpoint is not None for e in exports) else {}
        for export in exports:
            if export.export_id in live:
                await ops.export_del(export.export_id, self._settings.timeout)
            if export.checkpoint is not None and \
                    export.checkpoint in on_nodes.get(export.view_node, {}):
                await Bitmaps(domain.session).remove(export.view_node, export.checkpoint)
            del server.exports[export.name]
            log.info("export %s/%s stopped", domain.name, export.name)
        await faults.check("export-stop:removed")
        if not server.exports:
            await self._stop_server(ops, server.address, server.record)
            if server.tls_object is not None:
                await ops.delete_object(server.tls_object)
            del self._servers[domain.name]
            log.info("domain %s: NBD server stopped", domain.name)

    # -- change sets without a client export ------------------------------------------

    async def read_bitmaps(self, domain: Domain, size: int, sources: list[dict[str, str]],
                           granularity: int) -> list[list[int]]:
        """The union of bitmaps as [[offset, length], ...], read through a
        temporary export of a null node (caller holds the domain lock).

        :raise Busy: the domain's NBD server listens on TCP, where the daemon
            cannot connect as a client.
        :raise OperationFailed: QEMU refused.
        """
        bitmaps = Bitmaps(domain.session)

        async def fill(node: str) -> None:
            await bitmaps.add(node, "changes", disabled=True, granularity=granularity)
            await bitmaps.merge(node, "changes", sources)

        async with self._null_export(domain, size, "changes", fill, context="changes",
                                     tcp_hint="; read the changes through an export with "
                                              "checkpoint= instead") as (sock, name, _):
            await faults.check("changes:exported")
            try:
                return await asyncio.to_thread(dirty_extents, sock, name,
                                               "qemu:dirty-bitmap:changes")
            except (RuntimeError, OSError) as err:
                raise OperationFailed(f"cannot read the change set: {err}") from err

    async def write_bitmap(self, domain: Domain, node: str, bitmap: str, size: int,
                           granularity: int, extents: list[list[int]]) -> None:
        """Mark extents in an existing bitmap of a node: written as zeros to a
        temporary writable export of a null node whose own bitmap takes them,
        then merged into ``bitmap`` (caller holds the domain lock).

        :raise Busy: the domain's NBD server listens on TCP (see read_bitmaps).
        :raise OperationFailed: QEMU refused, or the export could not be written.
        """
        bitmaps = Bitmaps(domain.session)

        async def fill(null: str) -> None:
            await bitmaps.add(null, "marks", granularity=granularity)

        async with self._null_export(domain, size, "marks", fill,
                                     writable=True) as (sock, name, null):
            try:
                await asyncio.to_thread(mark_extents, sock, name, extents)
            except (RuntimeError, OSError) as err:
                raise OperationFailed(f"cannot mark bitmap {bitmap!r}: {err}") from err
            await bitmaps.merge(node, bitmap, [bitmap_ref(null, "marks")])

    @asynccontextmanager
    async def _null_export(self, domain: Domain, size: int, kind: str,
                           fill: Callable[[str], Awaitable[None]], *, context: str | None = None,
                           writable: bool = False,
                           tcp_hint: str = "") -> AsyncIterator[tuple[str, str, str]]:
        """A null node of ``size`` bytes (it reads as zeros: no guest data),
        given its bitmap by ``fill(node)``, exported for a moment under a
        random name on the domain's UNIX-socket NBD server (started for it if
        none runs); yields (socket, export name, node), then removes it all.

        :raise Busy: the domain's NBD server listens on TCP, where the daemon
            cannot connect as a client.
        :raise OperationFailed: QEMU refused.
        """
        server = self._servers.get(domain.name)
        if server is not None and server.address.transport != "unix":
            raise Busy(f"the NBD server of domain {domain.name!r} listens on TCP{tcp_hint}")
        token = secrets.token_hex(4)
        node, export_id = f"{PREFIX}{token}-{kind}", f"{PREFIX}export-{token}"
        name = f"{PREFIX}{kind}-{token}"
        ops = BlockOps(domain.session)
        undo = Undo(f"{kind} {domain.name}")
        try:
            await ops.add_null(node, size)
            undo.push(node, partial(ops.delete_node, node))
            await fill(node)
            address = server.address if server is not None else NbdAddress(
                "unix", socket=str(self._settings.run_dir / f"{domain.name}.nbd"))
            if server is None:
                await self._start_nbd(domain, ops, address, None, undo)
            await ops.export_add(export_id, node, name, [context] if context else None,
                                 writable=writable)
            undo.push(name, partial(ops.export_del, export_id, self._settings.timeout))
            yield str(address.socket), name, node
        except BaseException as err:
            await undo.rollback(err)
            raise
        finally:
            await undo.rollback()  # the temporary export goes in any case

    # -- QEMU gone ----------------------------------------------------------------

    def _on_event(self, event: dict[str, Any]) -> None:
        if event["type"] == "domain-disconnected":
            self.forget(event["domain"])

    def forget(self, domain: str) -> None:
        """The connection to the QEMU serving the domain's exports went."""
        server = self._servers.pop(domain, None)
        if server is None:
            return
        # The connection went, not necessarily QEMU (the daemon stopping
        # while a client holds an export, a cut monitor socket): while
        # the server still listens, its record stays, and the next
        # connection to this QEMU stops it (clean_leftovers). A TCP
        # server cannot be told apart: its record goes, as with QEMU.
        if server.address.socket is not None:
            probe = _connect(server.address.socket)
            if probe is not None:  # it listens: said goodbye to, kept
                task = asyncio.get_running_loop().create_task(_goodbye(probe))
                self._goodbyes.add(task)
                task.add_done_callback(self._goodbyes.discard)
                return
            _remove_socket(server.address.socket)
        self._store.drop_intent(server.record)


#: NBD handshake constants (the NBD protocol): "IHAVEOPT", NBD_OPT_ABORT,
#: the client flag NBD_FLAG_C_FIXED_NEWSTYLE; the server's greeting is 18 bytes.
_IHAVEOPT, _OPT_ABORT, _FIXED_NEWSTYLE, _GREETING = 0x49484156454F5054, 2, 1, 18


def _connect(path: str) -> socket.socket | None:
    """A connection to the server listening on this UNIX socket now, or None
    if none listens. Never blocks: a connection to a listening socket
    completes, or waits in its backlog."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(path)
    except BlockingIOError:  # its backlog is full: it listens
        return probe
    except OSError:  # refused (nobody listens) or no such file
        probe.close()
        return None
    return probe


async def _goodbye(probe: socket.socket) -> None:
    """End a probe's connection to QEMU's NBD server as a client should (its
    greeting read, NBD_OPT_ABORT sent): cut short, QEMU reports a failed
    negotiation on its stderr, which is the VM manager's log."""
    try:
        reader, writer = await asyncio.open_unix_connection(sock=probe)
    except OSError:
        probe.close()
        return
    try:
        async with asyncio.timeout(2):
            await reader.readexactly(_GREETING)
            writer.write(struct.pack(">IQII", _FIXED_NEWSTYLE, _IHAVEOPT, _OPT_ABORT, 0))
            await writer.drain()
            await reader.read(64)  # the abort's reply, or the end
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        pass  # gone meanwhile, or not answering: it was listening, that was the question
    finally:
        writer.close()


async def _listens(path: str) -> bool:
    """Whether a server listens on this UNIX socket now (and if so, it is
    said goodbye to, see _goodbye)."""
    probe = _connect(path)
    if probe is None:
        return False
    await _goodbye(probe)
    return True


def _remove_socket(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _listen_tcp(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host`` and ``port`` (0: a free one).

    :raise InvalidArgument: the host is not an address of this machine.
    :raise OperationFailed: the port is taken.
    """
    try:
        family = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=16)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise OperationFailed(f"cannot listen for NBD on {host or '*'}:{port}: "
                                  f"{err.strerror}") from None
        raise InvalidArgument(f"cannot listen for NBD on {host!r}: "
                              f"{err.strerror or err}") from None


def _describe(address: NbdAddress) -> str:
    if address.transport == "unix":
        return f"unix:{address.socket}"
    return f"tcp:{address.host}:{address.port}{' (TLS)' if address.tls else ''}"
