"""Copies: QEMU itself writes one disk of a snapshot into a qcow2 file.

The other way to read a snapshot, for builds whose NBD server cannot serve
an export of a disk in an I/O thread without aborting the VM (see
:mod:`..qemu.iothreads`): a backup job from the snapshot's view into a file
the client created (``sync=full``, or ``sync=bitmap`` with the change set
since a checkpoint: only the changed blocks are written, the rest stays
unallocated and reads through the file's backing file).

The client makes the file (qcow2, the disk's size, its backing file named in
the header) and owns it; the daemon opens it on the client's behalf only if
the caller owns it, and hands QEMU the open file (``add-fd``), because QEMU
often runs as a user that may not open the client's directory. A copy lasts
as long as its request: the answer comes when QEMU has written and flushed
the file. Deleting the snapshot cancels it. Every QEMU object it makes is
named ``bb-copy-*`` and recorded in the store first, so that the successor of
a daemon killed mid-copy removes them on its next connect.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import stat
import struct
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from .. import faults
from ..errors import (
    DomainNotConnected,
    InvalidArgument,
    OperationFailed,
    PermissionDenied,
)
from ..model import SnapshotState
from ..names import PREFIX
from ..qemu.blockops import Bitmaps, BlockOps
from ..store.db import Store
from .checkpoints import CheckpointService
from .domains import Domain, DomainService
from .snapshot_types import Snapshot
from .snapshots import SnapshotService
from .undo import Undo

log = logging.getLogger("blockbackupd.copies")

#: Kind of the store records of a copy's QEMU objects.
COPY_RECORD = "copy"
#: Every QEMU name a copy makes starts with this (node, job, bitmap, fdset's opaque).
COPY_PREFIX = f"{PREFIX}copy-"
#: How often a running copy's job is looked at (its progress and its end).
_POLL = 0.2


@dataclass
class Copy:
    domain: str
    snapshot: str
    disk: str
    checkpoint: str | None
    target: str
    name: str  # node, job and bitmap name in QEMU
    fdset: int | None = None
    started: float = field(default_factory=time.monotonic)
    done: int = 0
    total: int = 0
    cancelled: str | None = None  # why, when the daemon cancelled it

    def as_result(self) -> dict[str, Any]:
        return {"disk": self.disk, "snapshot": self.snapshot, "checkpoint": self.checkpoint,
                "target": self.target, "done": self.done, "total": self.total}


class CopyService:
    def __init__(self, domains: DomainService, snapshots: SnapshotService,
                 checkpoints: CheckpointService, store: Store) -> None:
        self._domains = domains
        self._snapshots = snapshots
        self._checkpoints = checkpoints
        self._store = store
        self._copies: dict[str, dict[str, Copy]] = {}  # domain -> name -> copy
        #: Copies whose QEMU objects exist: name -> (store record, view node).
        self._records: dict[str, tuple[int, str]] = {}
        snapshots.add_before_delete(self._cancel_for)
        snapshots.add_before_part_delete(self._cancel_for)
        domains.add_usage_check(self._usage)
        domains.add_connect_hook(self.clean_leftovers, first=True)

    def copies(self, domain: str, snapshot: str | None = None) -> list[Copy]:
        return [c for c in self._copies.get(domain, {}).values()
                if snapshot in (None, c.snapshot)]

    def _usage(self, domain: str) -> str | None:
        n = len(self.copies(domain))
        return f"it has {n} copy(ies) running" if n else None

    async def copy(self, domain_name: str, snapshot_name: str, disk: str, target: str,
                   checkpoint: str | None, caller_uid: int, speed: int = 0
                   ) -> dict[str, Any]:
        """Write that disk of the snapshot (or its changes since the checkpoint)
        into ``target``; returns when the file is written and flushed.
        ``speed``: bytes per second QEMU may copy (0: no limit), so that a
        backup leaves the guest's storage its bandwidth.

        :raise NoSuchDomain: :raise DomainNotConnected: :raise NoSuchSnapshot:
        :raise NoSuchDisk: :raise NoSuchCheckpoint: :raise CheckpointBroken:
        :raise InvalidArgument: the target is not an existing qcow2 file of the
            disk's size, or that disk of the snapshot is being copied already.
        :raise PermissionDenied: the caller does not own the target.
        :raise OperationFailed: the snapshot is broken, QEMU refused, the copy
            failed (QEMU's error), or the snapshot was deleted meanwhile.
        """
        domain = self._domains.connected(domain_name)
        fd = -1
        async with domain.lock:
            self._domains.connected(domain_name)
            snapshot = self._snapshots.get(domain_name, snapshot_name)
            part = snapshot.disk(disk)
            if snapshot.state is not SnapshotState.ACTIVE:
                raise OperationFailed(f"snapshot {snapshot_name!r} is broken: "
                                      f"{snapshot.broken_reason}")
            if any(c.disk == disk for c in self.copies(domain_name, snapshot_name)):
                raise InvalidArgument(f"disk {disk!r} of snapshot {snapshot_name!r} is being "
                                      "copied already")
            sources: list[dict[str, str]] = []
            granularity = 0
            if checkpoint is not None:
                verified = await self._checkpoints.verify(domain)
                sources, granularity = self._checkpoints.sources_to_snapshot(
                    domain_name, snapshot, disk, checkpoint, verified)
            fd = _open_target(target, part.disk.size, caller_uid)
            copy = Copy(domain_name, snapshot_name, disk, checkpoint, target,
                        f"{COPY_PREFIX}{secrets.token_hex(4)}")
            try:
                await self._start(domain, copy, part.view_node, sources, granularity, fd, speed)
            finally:
                os.close(fd)  # QEMU has its own
            self._copies.setdefault(domain_name, {})[copy.name] = copy
        log.info("copy %s/%s started: disk %s of snapshot %s%s into %s", domain_name, copy.name,
                 disk, snapshot_name, f" (changes since {checkpoint})" if checkpoint else "",
                 target)
        try:
            error = await self._wait(domain, copy)
        finally:
            # Whatever happened to the request, the job and nodes go (under
            # the lock: nothing else may be half-way through this domain).
            async with domain.lock:
                try:
                    await asyncio.shield(self._finish(domain, copy))
                finally:
                    self._copies.get(domain_name, {}).pop(copy.name, None)
        if copy.cancelled is not None:
            raise OperationFailed(f"the copy of disk {disk!r} was cancelled: {copy.cancelled}")
        if error is not None:
            raise OperationFailed(f"QEMU could not copy disk {disk!r} of snapshot "
                                  f"{snapshot_name!r} into {target}: {error}")
        seconds = time.monotonic() - copy.started
        log.info("copy %s/%s done: %d bytes in %.3f s", domain_name, copy.name, copy.total,
                 seconds)
        return {"bytes": copy.total, "seconds": round(seconds, 3)}

    async def _start(self, domain: Domain, copy: Copy, view: str,
                     sources: list[dict[str, str]], granularity: int, fd: int,
                     speed: int) -> None:
        ops, bitmaps = BlockOps(domain.session), Bitmaps(domain.session)
        undo = Undo(f"copy {domain.name}")
        record = self._store.add_intent(domain.name, COPY_RECORD,
                                        {"name": copy.name, "view": view})
        undo.push_record("record of the copy", partial(self._store.drop_intent, record))
        try:
            copy.fdset = await ops.add_fd(fd, copy.name)
            fdset = copy.fdset
            undo.push(f"fdset {fdset}", partial(ops.remove_fdset, fdset))
            await ops.add_copy_target(copy.name, fdset)
            undo.push(f"node {copy.name}", partial(ops.delete_node, copy.name))
            bitmap = None
            if copy.checkpoint is not None:
                bitmap = copy.name
                await bitmaps.add(view, bitmap, disabled=True, granularity=granularity)
                undo.push(f"bitmap {bitmap} on {view}", partial(bitmaps.remove, view, bitmap))
                await bitmaps.merge(view, bitmap, sources)
            await faults.check("copy:target-added")
            await ops.start_copy(copy.name, view, copy.name, bitmap, speed)
        except BaseException as err:
            await undo.rollback(err)
            raise
        undo.discard()
        self._records[copy.name] = (record, view)

    async def _wait(self, domain: Domain, copy: Copy) -> str | None:
        """Follow the job until it concludes; its error, if any."""
        ops = BlockOps(domain.session)
        while True:
            try:
                job = await ops.job(copy.name)
            except DomainNotConnected:
                return "QEMU went away during the copy"
            if job is None:
                return "the job vanished"
            copy.done = int(job.get("current-progress", 0))
            copy.total = int(job.get("total-progress", 0))
            if job.get("status") == "concluded":
                return str(job["error"]) if job.get("error") else None
            await asyncio.sleep(_POLL)

    async def _finish(self, domain: Domain, copy: Copy) -> None:
        """Remove what the copy made in QEMU (caller holds the lock)."""
        if copy.name not in self._records:
            return  # already removed (the snapshot's deletion cancelled it)
        record, view = self._records.pop(copy.name)
        await self._remove(domain, copy.name, view, copy.fdset)
        self._store.drop_intent(record)

    async def _remove(self, domain: Domain, name: str, view: str | None,
                      fdset: int | None) -> None:
        ops, bitmaps = BlockOps(domain.session), Bitmaps(domain.session)
        job = await ops.job(name)
        if job is not None:
            if job.get("status") not in ("concluded", "null"):
                try:
                    await ops.cancel_job(name)
                except OperationFailed:
                    # A small copy can end between the reading and the cancel
                    # (seen on 10.0 after a reconnect): then it only needs dismissing.
                    job = await ops.job(name)
                    if job is not None and job.get("status") not in ("concluded", "null"):
                        raise
                while job is not None and job.get("status") != "concluded":
                    await asyncio.sleep(0.05)
                    job = await ops.job(name)
            if job is not None:
                await ops.dismiss_job(name)
        if view is not None and name in (await bitmaps.on_nodes()).get(view, {}):
            await bitmaps.remove(view, name)
        if name in await ops.node_names():
            await ops.delete_node(name)  # flushes the file
        if fdset is None:
            fdset = next((i for i, opaque in (await ops.fdsets()).items() if opaque == name),
                         None)
        if fdset is not None:
            await ops.remove_fdset(fdset)

    async def _cancel_for(self, domain: Domain, snapshot: Snapshot,
                          disk: str | None = None) -> None:
        """The snapshot (or one disk of it) is being deleted: its copies stop first."""
        for copy in self.copies(domain.name, snapshot.name):
            if disk in (None, copy.disk) and copy.name in self._records:
                copy.cancelled = f"snapshot {snapshot.name!r} is being deleted"
                await self._finish(domain, copy)

    async def clean_leftovers(self, domain: Domain) -> None:
        """Remove the copies a daemon that died left in this QEMU."""
        for record in [r for r in self._store.intents(domain.name) if r.kind == COPY_RECORD]:
            name = str(record.payload.get("name", ""))
            try:
                await self._remove(domain, name, record.payload.get("view"), None)
            except OperationFailed as err:
                log.warning("domain %s: cannot remove copy %s left by an earlier daemon: %s",
                            domain.name, name, err)
                continue
            self._store.drop_intent(record.id)
            log.warning("domain %s: removed copy %s left by an earlier daemon", domain.name,
                        name)


#: The start of a qcow2 header: magic, version, backing file offset and size,
#: cluster bits, virtual size.
_QCOW2 = struct.Struct(">4sIQIIQ")


def _open_target(path: str, size: int, caller_uid: int) -> int:
    """Open the client's target file for QEMU, on the client's authority.

    :raise InvalidArgument: not an absolute path of a regular qcow2 file of
        ``size`` bytes.
    :raise PermissionDenied: the caller does not own it (root may name any).
    """
    if not os.path.isabs(path):
        raise InvalidArgument(f"copy target {path!r} must be an absolute path")
    try:
        # O_NOFOLLOW: a symlink planted at the path is not followed as root.
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as err:
        raise InvalidArgument(f"cannot open copy target {path}: {err.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidArgument(f"copy target {path} is not a regular file")
        if caller_uid != 0 and st.st_uid != caller_uid:
            raise PermissionDenied(f"copy target {path} is not the caller's (owner uid "
                                   f"{st.st_uid})")
        header = os.pread(fd, _QCOW2.size, 0)
        fields = _QCOW2.unpack(header) if len(header) == _QCOW2.size else (b"",)
        if fields[0] != b"QFI\xfb":
            raise InvalidArgument(f"copy target {path} is not a qcow2 file")
        if fields[5] != size:
            raise InvalidArgument(f"copy target {path} holds {fields[5]} bytes; "
                                  f"the disk has {size}")
    except BaseException:
        os.close(fd)
        raise
    return fd
