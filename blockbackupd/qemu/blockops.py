"""Typed wrappers of the QMP commands that build and tear down point-in-time
views and NBD exports. Each raises what :meth:`DomainSession.execute` raises:
DomainNotConnected when QEMU is unreachable, OperationFailed with QEMU's text
when it refuses.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from ..errors import OperationFailed
from ..model import NbdAddress
from ..names import PREFIX
from .graph import device_path, named_bitmaps, named_nodes
from .session import DomainSession

#: Bytes of the view read by each probe: QEMU fails every read of a broken
#: view, wherever it lands, so one cluster at offset 0 is enough.
PROBE_BYTES = 64 * 1024


class BlockOps:
    def __init__(self, session: DomainSession) -> None:
        self.session = session

    async def run_status(self) -> str:
        status = await self.session.execute("query-status")
        return str(status["status"])

    async def migration_status(self) -> str:
        """QEMU's migration state (``none`` when it never migrated)."""
        info = await self.session.execute("query-migrate")
        return str(info.get("status", "none"))

    async def stop(self) -> None:
        await self.session.execute("stop")

    async def cont(self) -> None:
        await self.session.execute("cont")

    async def add_scratch(self, node: str, filename: str, secret: str | None = None) -> None:
        """The scratch: raw, or LUKS under the key in QEMU secret ``secret``."""
        args: dict[str, Any] = {"driver": "raw", "node-name": node,
                                "file": {"driver": "file", "filename": filename}}
        if secret is not None:
            args.update({"driver": "luks", "key-secret": secret})
        await self.session.execute("blockdev-add", args)

    async def add_secret(self, object_id: str, key: bytes) -> None:
        await self.session.execute("object-add", {
            "qom-type": "secret", "id": object_id, "format": "base64",
            "data": base64.b64encode(key).decode(),
        })

    async def add_cbw_filter(self, node: str, source: str, scratch: str,
                             cbw_timeout: int) -> None:
        # break-snapshot: a failing or slow scratch breaks the view, never the
        # guest's write; cbw-timeout bounds how long a guest write may wait.
        await self.session.execute("blockdev-add", {
            "driver": "copy-before-write", "node-name": node, "file": source,
            "target": scratch, "on-cbw-error": "break-snapshot", "cbw-timeout": cbw_timeout,
        })

    async def add_view(self, node: str, cbw_filter: str) -> None:
        await self.session.execute("blockdev-add", {
            "driver": "snapshot-access", "node-name": node, "file": cbw_filter,
        })

    async def add_probe_window(self, window: str, view: str) -> None:
        """The probe job's source: a small read-only window on the view."""
        await self.session.execute("blockdev-add", {
            "driver": "raw", "node-name": window, "file": view, "read-only": True,
            "offset": 0, "size": PROBE_BYTES,
        })

    async def add_probe_sink(self, sink: str) -> None:
        """The probe job's target: a null node the size of the window."""
        await self.session.execute("blockdev-add", {
            "driver": "null-co", "node-name": sink, "size": PROBE_BYTES,
        })

    async def set_drive(self, qdev: str, node: str) -> None:
        await self.session.execute("qom-set", {
            "path": device_path(qdev), "property": "drive", "value": node,
        })

    async def delete_node(self, node: str) -> None:
        await self.session.execute("blockdev-del", {"node-name": node})

    async def node_names(self) -> set[str]:
        nodes = await named_nodes(self.session)
        return {n["node-name"] for n in nodes}

    async def probe(self, job_id: str, window: str, sink: str, wait: float) -> str | None:
        """Copy the probe window to the sink in a short job; None when every
        read succeeded, else QEMU's error text."""
        with self.session.listen("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED") as events:
            await self.session.execute("blockdev-backup", {
                "job-id": job_id, "device": window, "target": sink, "sync": "full",
                "auto-dismiss": True, "auto-finalize": True,
            })
            async with asyncio.timeout(wait):
                async for event in events:
                    data: Any = event.get("data", {})
                    if data.get("device") != job_id:
                        continue
                    if event["event"] == "BLOCK_JOB_CANCELLED":
                        return "probe job cancelled"
                    error = data.get("error")
                    return None if error is None else str(error)
        raise OperationFailed("probe job ended without an event")

    # -- copies: QEMU writes a view into a file the client made ------------------

    async def add_fd(self, fd: int, opaque: str) -> int:
        """Hand QEMU an open file (it may not be allowed to open the path
        itself: it often runs as another user); returns its fdset id."""
        await self.session.send_fd(fd)
        info = await self.session.execute("add-fd", {"opaque": opaque})
        return int(info["fdset-id"])

    async def remove_fdset(self, fdset: int) -> None:
        await self.session.execute("remove-fd", {"fdset-id": fdset})

    async def fdsets(self) -> dict[int, str]:
        """fdset id -> opaque string of each fdset QEMU holds."""
        out = {}
        for fdset in await self.session.execute("query-fdsets"):
            opaque = next((f.get("opaque", "") for f in fdset.get("fds", [])), "")
            out[int(fdset["fdset-id"])] = str(opaque)
        return out

    async def add_copy_target(self, node: str, fdset: int) -> None:
        """The copy's qcow2 file, opened without its backing file: the job
        never reads the target, and what it leaves unwritten must stay
        unallocated (reads fall through to the backing file once it is
        opened with one), while zeros it writes are recorded as zeros."""
        await self.session.execute("blockdev-add", {
            "driver": "qcow2", "node-name": node, "backing": None,
            "file": {"driver": "file", "filename": f"/dev/fdset/{fdset}"},
        })

    async def start_copy(self, job_id: str, source: str, target: str,
                         bitmap: str | None, speed: int = 0) -> None:
        """A backup job from a view into the target: all of it, or only the
        bitmap's blocks (left as it is: the bitmap is the daemon's own copy)."""
        args: dict[str, Any] = {"job-id": job_id, "device": source, "target": target,
                                "sync": "full", "auto-finalize": True,
                                "auto-dismiss": False, "speed": speed}
        if bitmap is not None:
            args.update({"sync": "bitmap", "bitmap": bitmap, "bitmap-mode": "never"})
        await self.session.execute("blockdev-backup", args)

    async def job(self, job_id: str) -> dict[str, Any] | None:
        """query-jobs' entry of that job (status, current/total-progress, error)."""
        for job in await self.session.execute("query-jobs"):
            if job.get("id") == job_id:
                return dict(job)
        return None

    async def cancel_job(self, job_id: str) -> None:
        await self.session.execute("job-cancel", {"id": job_id})

    async def dismiss_job(self, job_id: str) -> None:
        await self.session.execute("job-dismiss", {"id": job_id})

    # -- NBD ------------------------------------------------------------------

    async def nbd_server_start(self, address: NbdAddress, tls_creds: str | None) -> None:
        if address.transport == "unix":
            addr: dict[str, Any] = {"type": "unix", "data": {"path": address.socket}}
        else:
            addr = {"type": "inet", "data": {"host": address.host, "port": str(address.port)}}
        args: dict[str, Any] = {"addr": addr}
        if tls_creds is not None:
            args["tls-creds"] = tls_creds
        await self.session.execute("nbd-server-start", args)

    async def nbd_server_start_fd(self, fd: int, tls_creds: str | None) -> None:
        """Start the NBD server on a socket we bound and listen on (QEMU cannot
        say which port it chose itself): passed over QMP, named, then used.

        :raise OperationFailed: QEMU refused; the named descriptor is closed.
        """
        name = f"{PREFIX}nbd-listener"
        await self.session.send_fd(fd)
        await self.session.execute("getfd", {"fdname": name})
        args: dict[str, Any] = {"addr": {"type": "fd", "data": {"str": name}}}
        if tls_creds is not None:
            args["tls-creds"] = tls_creds
        try:
            await self.session.execute("nbd-server-start", args)
        except OperationFailed:
            try:  # still QEMU's while no server took it
                await self.session.execute("closefd", {"fdname": name})
            except OperationFailed:
                pass
            raise

    async def nbd_server_stop(self) -> None:
        await self.session.execute("nbd-server-stop")

    async def add_tls_creds(self, object_id: str, directory: str, verify_peer: bool) -> None:
        await self.session.execute("object-add", {
            "qom-type": "tls-creds-x509", "id": object_id, "dir": directory,
            "endpoint": "server", "verify-peer": verify_peer,
        })

    async def delete_object(self, object_id: str) -> None:
        await self.session.execute("object-del", {"id": object_id})

    async def add_null(self, node: str, size: int) -> None:
        """A node that reads as zeros: carries a bitmap for export without any data."""
        await self.session.execute("blockdev-add", {"driver": "null-co", "node-name": node,
                                                    "size": size})

    async def export_add(self, export_id: str, node: str, name: str,
                         bitmaps: list[str] | None = None, writable: bool = False) -> None:
        args: dict[str, Any] = {
            "type": "nbd", "id": export_id, "node-name": node, "name": name,
            "writable": writable, "allocation-depth": True,
        }
        if bitmaps:
            args["bitmaps"] = bitmaps
        await self.session.execute("block-export-add", args)

    async def export_del(self, export_id: str, wait: float) -> None:
        """Remove an export, disconnecting its clients, and wait until it is gone."""
        with self.session.listen("BLOCK_EXPORT_DELETED") as events:
            await self.session.execute("block-export-del", {"id": export_id, "mode": "hard"})
            async with asyncio.timeout(wait):
                async for event in events:
                    data: Any = event.get("data", {})
                    if data.get("id") == export_id:
                        return

    async def export_ids(self) -> set[str]:
        exports = await self.session.execute("query-block-exports")
        return {e["id"] for e in exports}


# -- dirty bitmaps -------------------------------------------------------------

def bitmap_ref(node: str, name: str) -> dict[str, str]:
    return {"node": node, "name": name}


def action(kind: str, **data: Any) -> dict[str, Any]:
    """One ``transaction`` action, e.g. ``action("block-dirty-bitmap-add", node=..., name=...)``."""
    return {"type": kind, "data": data}


class Bitmaps:
    """Dirty-bitmap commands on one domain."""

    def __init__(self, session: DomainSession) -> None:
        self.session = session

    async def transaction(self, actions: list[dict[str, Any]]) -> None:
        """All actions or none."""
        if actions:
            await self.session.execute("transaction", {"actions": actions})

    async def on_nodes(self) -> dict[str, dict[str, dict[str, Any]]]:
        """node name -> bitmap name -> QEMU's description of it."""
        return {n["node-name"]: named_bitmaps(n) for n in await named_nodes(self.session)}

    async def add(self, node: str, name: str, *, persistent: bool = False,
                  disabled: bool = False, granularity: int | None = None) -> None:
        args: dict[str, Any] = {"node": node, "name": name, "persistent": persistent,
                                "disabled": disabled}
        if granularity is not None:
            args["granularity"] = granularity
        await self.session.execute("block-dirty-bitmap-add", args)

    async def merge(self, node: str, target: str, sources: list[dict[str, str]]) -> None:
        if sources:
            await self.session.execute("block-dirty-bitmap-merge",
                                       {"node": node, "target": target, "bitmaps": sources})

    async def enable(self, node: str, name: str) -> None:
        await self.session.execute("block-dirty-bitmap-enable", {"node": node, "name": name})

    async def disable(self, node: str, name: str) -> None:
        await self.session.execute("block-dirty-bitmap-disable", {"node": node, "name": name})

    async def remove(self, node: str, name: str) -> None:
        await self.session.execute("block-dirty-bitmap-remove", {"node": node, "name": name})
