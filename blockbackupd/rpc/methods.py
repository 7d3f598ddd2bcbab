"""The method table: validate params, call a service, shape the result.

This is the one place where daemon errors become JSON-RPC error objects
(``code``, ``message``, ``data.kind``) and pydantic failures become -32602
with a message naming the field.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

from jsonrpcserver import Error, Result, Success
from pydantic import ValidationError

from .. import __version__
from ..errors import BlockbackupError, InvalidArgument, NoSuchDomain, OperationFailed
from ..services.checkpoints import BitmapUsage, CheckpointService
from ..services.copies import CopyService
from ..services.domains import DomainService
from ..services.events import EventBus, Subscription
from ..services.exports import ExportService
from ..services.offline import OfflineService
from ..services.recovery import RecoveryService
from ..services.snapshot_types import lookup_result
from ..services.snapshots import SnapshotService
from ..xml.checkpoint import CheckpointDoc, parse_checkpoint, render_checkpoint
from ..xml.export import parse_export
from ..xml.snapshot import parse_snapshot, render_snapshot
from . import api
from . import params as p

log = logging.getLogger("blockbackupd.rpc")

P = TypeVar("P", bound=p.Params)

# jsonrpcserver's InvalidParams keeps a fixed message; the contract wants the
# field named in the message itself.
INVALID_PARAMS = -32602


class Peer(Protocol):
    """What a method may ask of the connection that called it."""

    name: str
    #: The caller's uid, from the kernel (SO_PEERCRED).
    uid: int

    def add_subscription(self, subscription: Subscription) -> None: ...

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call back (no I/O) when the connection has closed."""

    def notify(self, method: str, params: dict[str, Any]) -> None: ...


def disk_images(disks: list[p.DiskImage]) -> dict[str, tuple[str, str]]:
    """disk -> (file, format) from domain.define's ``disks``, checked.

    :raise InvalidArgument: a name twice, a path not absolute or not there, a
        format other than qcow2 or raw.
    """
    out: dict[str, tuple[str, str]] = {}
    for disk in disks:
        if not disk.name or "/" in disk.name or disk.name in out:
            raise InvalidArgument(f"disks: disk name {disk.name[:100]!r} is empty, has a '/' "
                                  "or is given twice")
        path = Path(disk.file)
        if "\0" in disk.file or not path.is_absolute():
            raise InvalidArgument(f"disks: {disk.name}: file {disk.file[:200]!r} must be an "
                                  "absolute path")
        try:
            with path.open("rb") as f:
                magic = f.read(4)
        except OSError as err:
            raise InvalidArgument(f"disks: {disk.name}: {disk.file}: {err.strerror}") from None
        fmt = disk.format or ("qcow2" if magic == b"QFI\xfb" else "raw")
        if fmt not in ("qcow2", "raw"):
            raise InvalidArgument(f"disks: {disk.name}: format {fmt!r} is not qcow2 or raw")
        out[disk.name] = (str(path), fmt)
    return out


def describe_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        field = ".".join(str(x) for x in e["loc"]) or "params"
        msg = "unknown parameter" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{field}: {msg}")
    return "invalid params: " + "; ".join(parts)


def _wrap(name: str, model: type[P], handler: Callable[[Peer, P], Awaitable[Any]],
          failed: Callable[[str, str], None]) -> Callable[..., Awaitable[Result]]:
    # No functools.wraps: jsonrpcserver binds params against this signature.
    async def method(peer: Peer, *positional: Any, **raw: Any) -> Result:
        if positional:
            return Error(INVALID_PARAMS, "invalid params: params must be an object (named params)")
        try:
            params = model.model_validate(raw)
        except ValidationError as err:
            return Error(INVALID_PARAMS, describe_validation_error(err))
        try:
            return Success(await handler(peer, params))
        except BlockbackupError as err:
            log.info("%s from %s failed: %s (%s)", name, peer.name, err.message, err.kind)
            domain = getattr(params, "domain", None)
            if isinstance(err, OperationFailed) and isinstance(domain, str):
                failed(domain, f"{name}: {err.message}")
            return Error(err.code, err.message, {"kind": err.kind})
        except asyncio.CancelledError:
            raise
        except Exception as err:
            log.exception("%s from %s: internal error", name, peer.name)
            return Error(-32603, f"internal error: {err}")
    return method


def _usage(usage: BitmapUsage | None) -> dict[str, Any]:
    """daemon.info's figures of a domain's persistent bitmaps (none before the
    daemon first read them from QEMU)."""
    return {} if usage is None else usage.as_result()


def build_methods(domains: DomainService, snapshots: SnapshotService,
                  checkpoints: CheckpointService, exports: ExportService,
                  copies: CopyService, events: EventBus,
                  offline: OfflineService, recovery: RecoveryService
                  ) -> dict[str, Callable[..., Any]]:
    """The jsonrpcserver method table for the daemon's services."""

    async def daemon_info(peer: Peer, _: p.NoParams) -> dict[str, Any]:
        return {"version": __version__, "domains": len(domains), "per_domain": [
            {"name": d.name, "state": d.state.value,
             "snapshots": len(snapshots.names(d.name)),
             "exports": len(exports.exports(d.name)),
             "checkpoints": len(checkpoints.names(d.name)),
             "last_error": d.last_error,
             **_usage(checkpoints.usage(d.name)),
             "warnings": checkpoints.warnings(d.name)}
            for d in domains.all()]}

    def failed(domain: str, message: str) -> None:
        try:
            domains.get(domain).note_error(message)
        except NoSuchDomain:
            pass

    async def domain_define(peer: Peer, a: p.DomainDefine) -> dict[str, Any]:
        images = None if a.disks is None else disk_images(a.disks)
        domain = await domains.define(a.name, a.qmp_socket, a.guest_agent_socket)
        if images is not None:
            offline.define_images(domain.name, images)
        return {"name": domain.name}

    async def domain_undefine(peer: Peer, a: p.DomainUndefine) -> dict[str, Any]:
        await domains.undefine(a.name, a.force)
        return {}

    async def domain_list(peer: Peer, _: p.NoParams) -> list[dict[str, Any]]:
        return [{"name": d.name, "qmp_socket": d.qmp_socket, "state": d.state.value,
                 **({"guest_agent_socket": d.guest_agent_socket}
                    if d.guest_agent_socket is not None else {}),
                 **({"storage_process": held}
                    if (held := offline.describe(d.name)) is not None else {})}
                for d in domains.all()]

    async def domain_get_xml(peer: Peer, a: p.DomainRef) -> str:
        return await domains.get_xml(a.domain)

    async def snapshot_create(peer: Peer, a: p.SnapshotCreate) -> dict[str, Any]:
        domains.get(a.domain)
        spec = parse_snapshot(a.xml) if a.xml is not None else None
        disks = None
        if spec is not None and spec.disks is not None:
            disks = [(d.name, d.scratch) for d in spec.disks]
        # The export document is checked before anything is made. Its disks
        # name this snapshot (or none: the name may be generated).
        export = None
        if a.export is not None:
            export = parse_export(a.export, snapshot="")
            for d in export.disks:
                if d.snapshot not in ("", spec.name if spec else None):
                    raise InvalidArgument(
                        f"export: disk {d.disk!r} names snapshot {d.snapshot!r}; in "
                        "snapshot.create it may only name the snapshot being created")
        snapshot = await snapshots.create(a.domain, spec.name if spec else None, disks,
                                          a.checkpoint,
                                          a.quiesce or (spec is not None and spec.quiesce),
                                          a.lease)
        if snapshot.offline:
            # A stopped domain's images stay held only as long as the backup
            # application that asked: its VM manager may want to start it.
            peer.on_close(partial(snapshots.delete_soon, a.domain, snapshot.name))
        result: dict[str, Any] = {"name": snapshot.name, "xml": render_snapshot(snapshot.view())}
        if export is not None:
            export = replace(export, disks=tuple(replace(d, snapshot=snapshot.name)
                                                 for d in export.disks))
            try:
                address, made = await exports.start(a.domain, export)
            except BaseException as err:
                await asyncio.shield(_unmake(a.domain, snapshot.name, a.checkpoint, err))
                raise
            result["export"] = {"server": address.as_result(),
                                "exports": [e.as_result() for e in made]}
        return result

    async def _unmake(domain: str, name: str, checkpoint: bool, cause: BaseException) -> None:
        """Roll back a snapshot (and its checkpoint) whose exports failed to start."""
        try:
            await snapshots.delete(domain, name)
            if checkpoint:
                await checkpoints.delete(domain, name)
        except Exception as err:  # the request's own error is the one to report
            log.error("snapshot %s/%s: exports failed (%s) and the rollback failed: %s",
                      domain, name, cause, err)

    async def snapshot_delete(peer: Peer, a: p.SnapshotRef) -> dict[str, Any]:
        await snapshots.delete(a.domain, a.name)
        return {}

    async def snapshot_renew(peer: Peer, a: p.SnapshotRef) -> dict[str, Any]:
        lease = snapshots.renew(a.domain, a.name)
        return {"lease": lease.seconds, "expires": round(lease.expires, 3)}

    async def snapshot_list(peer: Peer, a: p.DomainRef) -> list[str]:
        return snapshots.names(a.domain)

    async def snapshot_lookup(peer: Peer, a: p.SnapshotRef) -> dict[str, Any]:
        result = lookup_result(snapshots.get(a.domain, a.name))
        # Disks export.start refuses on this QEMU build (snapshot.copy reads them).
        result["copy_only"] = await exports.copy_only(a.domain, a.name)
        result["copies"] = [c.as_result() for c in copies.copies(a.domain, a.name)]
        return result

    async def snapshot_get_xml(peer: Peer, a: p.SnapshotRef) -> str:
        return render_snapshot(snapshots.get(a.domain, a.name).view())

    async def checkpoint_list(peer: Peer, a: p.DomainRef) -> list[str]:
        return checkpoints.names(a.domain)

    async def checkpoint_lookup(peer: Peer, a: p.SnapshotRef) -> dict[str, Any]:
        return checkpoints.lookup(a.domain, a.name)

    async def checkpoint_get_xml(peer: Peer, a: p.SnapshotRef) -> str:
        cp, parent = checkpoints.with_parent(a.domain, a.name)
        return render_checkpoint(CheckpointDoc(
            cp.name, parent, int(cp.created), cp.state, cp.broken,
            tuple((d.disk, d.bitmap) for d in cp.disks)))

    async def checkpoint_delete(peer: Peer, a: p.SnapshotRef) -> dict[str, Any]:
        await checkpoints.delete(a.domain, a.name)
        return {}

    async def checkpoint_changes(peer: Peer, a: p.CheckpointChanges) -> dict[str, Any]:
        return await checkpoints.changes(a.domain, a.disk, a.name, a.until)

    async def checkpoint_redefine(peer: Peer, a: p.DomainXml) -> dict[str, Any]:
        domains.get(a.domain)
        doc = parse_checkpoint(a.xml)
        await checkpoints.redefine(a.domain, doc.name, doc.created, list(doc.disks))
        return {"name": doc.name}

    async def export_start(peer: Peer, a: p.DomainXml) -> dict[str, Any]:
        domains.get(a.domain)
        address, made = await exports.start(a.domain, parse_export(a.xml))
        return {"server": address.as_result(), "exports": [e.as_result() for e in made]}

    async def snapshot_copy(peer: Peer, a: p.SnapshotCopy) -> dict[str, Any]:
        if a.speed < 0:
            raise InvalidArgument("speed must be 0 (no limit) or more bytes per second")
        return await copies.copy(a.domain, a.name, a.disk, a.target, a.checkpoint, peer.uid,
                                 a.speed)

    async def export_stop(peer: Peer, a: p.DomainXml) -> dict[str, Any]:
        domains.get(a.domain)
        await exports.stop(a.domain, parse_export(a.xml).disks)
        return {}

    async def export_server(peer: Peer, a: p.DomainRef) -> dict[str, Any] | None:
        address = exports.server(a.domain)
        return None if address is None else address.as_result()

    async def export_list(peer: Peer, a: p.DomainRef) -> list[dict[str, Any]]:
        return [e.as_result() for e in exports.exports(a.domain)]

    async def events_subscribe(peer: Peer, a: p.EventsSubscribe) -> dict[str, Any]:
        if a.domains is not None:
            for name in a.domains:
                domains.get(name)
        peer.add_subscription(
            events.subscribe(a.domains, lambda event: peer.notify("event", event))
        )
        return {}

    async def recovery_start(peer: Peer, a: p.RecoveryStart) -> dict[str, Any]:
        return await recovery.start(a.file, a.speed)

    async def recovery_lookup(peer: Peer, a: p.RecoveryRef) -> dict[str, Any]:
        return await recovery.lookup(a.file)

    async def recovery_list(peer: Peer, _: p.NoParams) -> list[dict[str, Any]]:
        return await recovery.all()

    async def recovery_delete(peer: Peer, a: p.RecoveryRef) -> dict[str, Any]:
        await recovery.delete(a.file)
        return {}

    async def rpc_discover(peer: Peer, _: p.NoParams) -> dict[str, Any]:
        return api.document()

    table: dict[str, Callable[[Peer, Any], Awaitable[Any]]] = {
        "daemon.info": daemon_info,
        "domain.define": domain_define,
        "domain.undefine": domain_undefine,
        "domain.list": domain_list,
        "domain.get_xml": domain_get_xml,
        "snapshot.create": snapshot_create,
        "snapshot.delete": snapshot_delete,
        "snapshot.renew": snapshot_renew,
        "snapshot.list": snapshot_list,
        "snapshot.lookup": snapshot_lookup,
        "snapshot.get_xml": snapshot_get_xml,
        "checkpoint.list": checkpoint_list,
        "checkpoint.lookup": checkpoint_lookup,
        "checkpoint.get_xml": checkpoint_get_xml,
        "checkpoint.delete": checkpoint_delete,
        "checkpoint.changes": checkpoint_changes,
        "checkpoint.redefine": checkpoint_redefine,
        "snapshot.copy": snapshot_copy,
        "export.start": export_start,
        "export.stop": export_stop,
        "export.server": export_server,
        "export.list": export_list,
        "events.subscribe": events_subscribe,
        "recovery.start": recovery_start,
        "recovery.lookup": recovery_lookup,
        "recovery.list": recovery_list,
        "recovery.delete": recovery_delete,
        "rpc.discover": rpc_discover,
    }
    assert table.keys() == p.METHODS.keys(), "every method has its params model"
    return {name: _wrap(name, p.METHODS[name], handler, failed)
            for name, handler in table.items()}
