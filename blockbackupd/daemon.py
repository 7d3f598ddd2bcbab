"""Wiring: start the daemon's parts in order, stop them in reverse."""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import AsyncExitStack
from pathlib import Path

from . import __version__
from .config import Config
from .rpc.access import AccessPolicy
from .rpc.methods import build_methods
from .rpc.server import RpcServer
from .runtime import Lock, StartupError, bind_unix_socket, make_dirs, sd_notify, server_tls_context
from .services.checkpoints import CheckpointService
from .services.copies import CopyService
from .services.domains import DomainService, DomainSettings
from .services.events import EventBus
from .services.exports import ExportService, ExportSettings
from .services.offline import OfflineService, OfflineSettings
from .services.quiesce import QuiesceService, QuiesceSettings
from .services.recovery import RecoveryService
from .services.snapshot_types import SnapshotSettings
from .services.snapshots import SnapshotService
from .store import Store

log = logging.getLogger("blockbackupd")


async def run(config: Config) -> None:
    """Run until SIGTERM or SIGINT.

    :raise StartupError: a directory, lock or socket cannot be had.
    :raise StoreError: the store cannot be opened.
    """
    d = config.daemon
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async with AsyncExitStack() as stack:
        make_dirs(d.state_dir, d.scratch_dir, d.run_dir, d.socket.parent)
        stack.callback(Lock(d.state_dir / "blockbackupd.lock", f"state_dir {d.state_dir}").release)
        stack.callback(Lock(d.socket.with_name(d.socket.name + ".lock"),
                            f"socket {d.socket}").release)
        store = Store.open(d.state_dir)
        stack.callback(store.close)

        events = EventBus()
        # Closed after the sessions (the stack unwinds in reverse): the NBD
        # probes sent on their disconnection finish their goodbye first.
        late: list[ExportService] = []
        stack.push_async_callback(_close_all, late)
        domains = DomainService(store, events, DomainSettings(
            qmp_timeout=d.qmp_timeout, reconnect_max_delay=d.reconnect_max_delay))
        stack.push_async_callback(domains.close)
        offline = OfflineService(domains, store, OfflineSettings(
            run_dir=d.run_dir, binary=d.storage_daemon, qmp_timeout=d.qmp_timeout))
        # Quit after the snapshot service removed what the storage processes served.
        stack.push_async_callback(offline.close)
        quiesce = QuiesceService(domains, store, QuiesceSettings(timeout=d.quiesce_timeout))
        stack.push_async_callback(quiesce.close)
        snapshots = SnapshotService(domains, events, store, SnapshotSettings(
            scratch_dirs=d.scratch_dirs, cbw_timeout=d.cbw_timeout,
            probe_interval=d.snapshot_probe_interval, probe_timeout=d.qmp_timeout), quiesce)
        stack.push_async_callback(snapshots.close)
        offline.add_holder(snapshots.usage)
        await offline.start(snapshots.remove_leftover_scratch)
        checkpoints = CheckpointService(
            domains, snapshots, events, store,
            bitmap_memory_warning=d.bitmap_memory_warning * 2**20 or None)
        exports = ExportService(domains, snapshots, checkpoints, events, store, ExportSettings(
            run_dir=d.run_dir, socket_mode=config.nbd.socket_mode_bits, socket_gid=d.socket_gid,
            tls_dir=config.nbd.tls_dir, tls_verify_peer=config.nbd.tls_verify_peer,
            allow_plain_tcp=config.nbd.allow_plain_tcp, timeout=d.qmp_timeout,
            silence=config.nbd.silence))
        late.append(exports)
        copies = CopyService(domains, snapshots, checkpoints, store)
        recovery = RecoveryService(domains, events, store)
        stack.push_async_callback(recovery.close)
        # Sessions start once every service has hooked in, so the first
        # connect is reconciled like every later one.
        domains.start((c.name, str(c.qmp_socket),
                       None if c.guest_agent_socket is None else str(c.guest_agent_socket))
                      for c in config.domain)
        quiesce.start()

        try:
            server = RpcServer(d.socket,
                               build_methods(domains, snapshots, checkpoints, exports, copies,
                                             events, offline, recovery),
                               AccessPolicy(d.allowed_uids, d.allowed_gids),
                               Path(d.rpc_record) if d.rpc_record else None)
        except OSError as err:
            raise StartupError(f"daemon.rpc_record: cannot open {d.rpc_record}: "
                               f"{err.strerror}") from None
        await server.start(bind_unix_socket(d.socket, d.socket_mode_bits, d.socket_gid))
        stack.push_async_callback(server.close)
        where = str(d.socket)
        if d.listen_host_port is not None:
            host, port = d.listen_host_port
            try:
                await server.listen_tls(host, port, server_tls_context(Path(config.tls_dir)))
            except OSError as err:
                raise StartupError(f"daemon.listen: cannot listen on {d.listen}: "
                                   f"{err.strerror or err}") from None
            where += f" and {d.listen} (TLS)"

        log.info("blockbackupd %s listening on %s", __version__, where)
        sd_notify("READY=1")
        await stop.wait()
        log.info("stopping")
        sd_notify("STOPPING=1")


async def _close_all(services: list[ExportService]) -> None:
    for service in services:
        await service.close()
