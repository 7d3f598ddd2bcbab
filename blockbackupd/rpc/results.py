"""Pydantic models of what each RPC method returns (its JSON-RPC ``result``),
and of the params of the ``event`` notification.

They describe the replies exactly, for the OpenRPC/JSON Schema document and
for tests that validate every real reply: unknown fields are refused
(``extra="forbid"``). A field without a default is always present (its value
may still be null where its type says so); a field with a default (``None``)
is sometimes absent, and its description says when it appears.

:data:`RESULTS` maps every method of :func:`.methods.build_methods` to a type
usable with :class:`pydantic.TypeAdapter`; :data:`EVENT` is the model of an
``event`` notification's params.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

#: A domain's state as the contract names it.
DomainStateName = Literal["running", "paused", "disconnected"]


class Result(BaseModel):
    """Base of every result model: fields the code does not document fail validation."""

    model_config = ConfigDict(extra="forbid")


class Empty(Result):
    """``{}``: the answer of methods that return nothing (delete, stop, undefine, subscribe)."""


class Named(Result):
    """``{name}``: the name of what was defined (domain.define, checkpoint.redefine)."""

    name: str = Field(description="The name of the domain or checkpoint defined.")


# -- daemon ----------------------------------------------------------------------------


class LastError(Result):
    """The last thing that went wrong with a domain, for operators."""

    time: int = Field(description="When it happened (Unix seconds).")
    message: str = Field(description="What went wrong (the failed method and its message, "
                                     "or the break of a snapshot or checkpoint).")


class DomainInfo(Result):
    """One domain in daemon.info's ``per_domain``."""

    name: str = Field(description="The domain's name.")
    state: DomainStateName = Field(description="The domain's state.")
    snapshots: int = Field(description="How many snapshots the domain has.")
    exports: int = Field(description="How many NBD exports the domain has.")
    checkpoints: int = Field(description="How many checkpoints the domain has.")
    last_error: LastError | None = Field(
        description="The last operation-failed answer about the domain, or the last break "
                    "of one of its snapshots or checkpoints; null if none.")
    persistent_bitmaps: int | None = Field(
        default=None,
        description="Persistent bitmaps in the images of the domain's disks; present (with "
                    "bitmap_memory and checked) once the daemon has read them from QEMU.")
    bitmap_memory: int | None = Field(
        default=None,
        description="Bytes of QEMU's memory those bitmaps take; present once read from QEMU.")
    checked: int | None = Field(
        default=None,
        description="When the bitmaps were last read (Unix seconds); present once read.")
    warnings: list[str] = Field(
        description="What an operator should act on (e.g. bitmap memory past "
                    "bitmap_memory_warning); empty if nothing.")


class DaemonInfo(Result):
    """daemon.info: the daemon's version and a summary of every domain."""

    version: str = Field(description="The daemon's version.")
    domains: int = Field(description="How many domains are defined.")
    per_domain: list[DomainInfo] = Field(description="Every defined domain, by name.")


# -- domain ----------------------------------------------------------------------------


class StorageProcess(Result):
    """The daemon's storage process holding a stopped domain's images."""

    pid: int = Field(description="The storage process's pid.")
    disks: list[str] = Field(description="The disks it holds, sorted by name.")


class DomainEntry(Result):
    """One domain of domain.list."""

    name: str = Field(description="The domain's name.")
    qmp_socket: str = Field(description="The QMP socket the daemon reaches the domain's QEMU on.")
    state: DomainStateName = Field(description="The domain's state.")
    guest_agent_socket: str | None = Field(
        default=None,
        description="The host side of the guest agent's channel; present only when defined.")
    storage_process: StorageProcess | None = Field(
        default=None,
        description="Present only while a storage process of the daemon holds the images of "
                    "the stopped domain.")


# -- export ----------------------------------------------------------------------------


class UnixServer(Result):
    """A domain's NBD server listening on a UNIX socket."""

    transport: Literal["unix"] = Field(description="Always \"unix\".")
    socket: str = Field(description="The UNIX socket's path.")


class TcpServer(Result):
    """A domain's NBD server listening on TCP."""

    transport: Literal["tcp"] = Field(description="Always \"tcp\".")
    host: str = Field(description="The host (address or name) it listens on.")
    port: int = Field(description="The TCP port it listens on (the one bound, if any was "
                                  "asked for).")
    tls: bool = Field(description="Whether clients must use TLS.")


#: Where a domain's NBD server listens (NbdAddress.as_result).
NbdServer = Annotated[UnixServer | TcpServer, Field(discriminator="transport")]


class ExportEntry(Result):
    """One NBD export (export.start, export.list)."""

    disk: str = Field(description="The exported disk.")
    snapshot: str = Field(description="The snapshot whose view of the disk is exported.")
    checkpoint: str | None = Field(
        description="The checkpoint whose changes up to the snapshot the export carries; "
                    "null if none.")
    name: str = Field(description="The NBD export name.")
    bitmap: str | None = Field(
        description="The NBD meta context carrying the changes (qemu:dirty-bitmap:<checkpoint>); "
                    "null without a checkpoint.")


class ExportStarted(Result):
    """export.start (and snapshot.create's ``export``): the server and the exports started."""

    server: NbdServer = Field(description="Where the domain's NBD server listens.")
    exports: list[ExportEntry] = Field(description="The exports this request started.")


# -- snapshot --------------------------------------------------------------------------


class SnapshotCreated(Result):
    """snapshot.create: the new snapshot, and the exports started with it."""

    name: str = Field(description="The snapshot's name (generated, a UUID, if none was given).")
    xml: str = Field(description="The snapshot's <domainblocksnapshot> document.")
    export: ExportStarted | None = Field(
        default=None,
        description="Present only when the request had export: what export.start returns.")


class LeaseRenewed(Result):
    """snapshot.renew: the snapshot's lease, started again."""

    lease: int = Field(description="The lease's length (seconds).")
    expires: float = Field(description="When the snapshot is deleted unless renewed "
                                       "(Unix seconds, to the millisecond).")


class ScratchEntry(Result):
    """One disk's scratch image in snapshot.lookup."""

    disk: str = Field(description="The disk.")
    file: str = Field(description="The scratch image's path.")
    size: int = Field(description="The disk's size at the snapshot's instant (bytes).")
    allocated: int = Field(description="Host bytes the scratch image uses now (0 if gone).")
    encrypted: bool = Field(description="Whether it is a LUKS scratch (the disk is encrypted).")


class CopyEntry(Result):
    """One running snapshot.copy, in snapshot.lookup's ``copies``."""

    disk: str = Field(description="The disk being copied.")
    snapshot: str = Field(description="The snapshot it is read from.")
    checkpoint: str | None = Field(
        description="Only the changes since this checkpoint are copied; null: the whole disk.")
    target: str = Field(description="The qcow2 file written.")
    done: int = Field(description="QEMU's progress so far (bytes).")
    total: int = Field(description="QEMU's estimate of the whole job (bytes).")


class SnapshotLookup(Result):
    """snapshot.lookup: a snapshot's state, disks, scratch images and copies."""

    name: str = Field(description="The snapshot's name.")
    created: int = Field(description="When it was taken (Unix seconds).")
    disks: list[str] = Field(description="The disks it still has a view of.")
    state: Literal["active", "broken"] = Field(
        description="active, or broken: a view can no longer be read, or it gave way to a "
                    "migration.")
    held_io_window: float = Field(
        description="How long the guest's I/O was held at the instant (seconds).")
    quiesced: bool = Field(description="Whether the guest's filesystems were frozen for it.")
    scratch: list[ScratchEntry] = Field(description="The scratch image of each disk.")
    frozen_window: float | None = Field(
        default=None,
        description="Present only when quiesced: seconds from the freeze request to the "
                    "thaw's answer.")
    frozen_filesystems: int | None = Field(
        default=None,
        description="Present only when quiesced: how many filesystems the guest agent froze.")
    reason: str | None = Field(
        default=None, description="Present only when state is broken: why.")
    removed_disks: dict[str, str] | None = Field(
        default=None,
        description="Present only when disks left the snapshot: disk -> why its view went "
                    "(device unplugged, gave way to a stream or a migration).")
    lease: int | None = Field(
        default=None,
        description="Present only for a snapshot made with a lease: its length (seconds).")
    expires: float | None = Field(
        default=None,
        description="Present only with lease: when it is deleted unless renewed (Unix "
                    "seconds, to the millisecond).")
    copy_only: dict[str, str] = Field(
        description="Disks export.start refuses on this QEMU build -> why (read them with "
                    "snapshot.copy); empty if none.")
    copies: list[CopyEntry] = Field(description="The snapshot.copy requests running now.")


class CopyDone(Result):
    """snapshot.copy: the copy QEMU wrote and flushed."""

    bytes: int = Field(description="Bytes QEMU copied (its job's total progress).")
    seconds: float = Field(description="How long the copy took (seconds, to the millisecond).")


# -- checkpoint ------------------------------------------------------------------------


class CheckpointLookup(Result):
    """checkpoint.lookup: a checkpoint's place, disks and state."""

    name: str = Field(description="The checkpoint's name.")
    created: int = Field(description="When it was made (Unix seconds).")
    parent: str | None = Field(
        description="The checkpoint before it; null for the oldest.")
    disks: list[str] = Field(description="The disks whose changes it tracks.")
    state: Literal["valid", "broken"] = Field(
        description="valid, or broken: its change set cannot be trusted on some disk.")
    tracking: dict[str, Literal["image", "memory", "cluster"]] = Field(
        description="Disk -> where its changes are kept: image (qcow2 bitmap), memory (QEMU's, "
                    "lost with the process), cluster (QEMU's, rebuilt from RBD snapshots).")
    reason: str | None = Field(
        default=None,
        description="Present only when state is broken: why (its first broken disk).")
    broken_disks: dict[str, str] | None = Field(
        default=None,
        description="Present only when state is broken: each disk whose change set cannot be "
                    "trusted -> why.")


class Changes(Result):
    """checkpoint.changes: the extents changed on a disk."""

    extents: list[tuple[int, int]] = Field(
        description="The changed runs as [offset, length] (bytes), merged, in order.")
    bytes: int = Field(description="The sum of the lengths (bytes).")


# -- events ----------------------------------------------------------------------------


#: Every ``type`` an event notification may have.
EventType = Literal[
    "domain-connected", "domain-disconnected", "snapshot-broken", "checkpoint-broken",
    "disk-removed", "recovery-started", "recovery-done", "recovery-failed",
]


class Event(Result):
    """The params of an ``event`` notification (after events.subscribe)."""

    domain: str = Field(description="The domain it is about.")
    type: EventType = Field(description="What happened.")
    state: Literal["running", "paused"] | None = Field(
        default=None,
        description="domain-connected only: the domain's state once connected.")
    snapshot: str | None = Field(
        default=None, description="snapshot-broken only: the snapshot.")
    checkpoint: str | None = Field(
        default=None, description="checkpoint-broken only: the checkpoint.")
    snapshots: list[str] | None = Field(
        default=None,
        description="disk-removed only: the snapshots that lost their view of the disk.")
    disk: str | None = Field(
        default=None,
        description="snapshot-broken, disk-removed, recovery-started, recovery-done, "
                    "recovery-failed: the disk.")
    file: str | None = Field(
        default=None,
        description="recovery-started, recovery-done, recovery-failed: the image recovered "
                    "into.")
    job: str | None = Field(
        default=None,
        description="recovery-started only, and only when the VM manager's own stream job "
                    "moves the data: that job's id.")
    reason: str | None = Field(
        default=None,
        description="snapshot-broken, checkpoint-broken, disk-removed, recovery-failed: why.")


# -- recovery --------------------------------------------------------------------------


class Progress(Result):
    """How far a recovery's stream is."""

    done: int = Field(description="QEMU's progress so far (bytes; the disk's size when done).")
    total: int = Field(description="QEMU's estimate of the whole job (bytes).")


class Recovery(Result):
    """recovery.start, recovery.lookup, one entry of recovery.list: an instant recovery."""

    file: str = Field(description="The image recovered into (its real path).")
    state: Literal["waiting", "streaming", "done", "failed"] = Field(
        description="waiting, streaming, done or failed.")
    backing: list[str] = Field(description="Its backing files (the backup), nearest first.")
    created: int = Field(description="When it was registered (Unix seconds).")
    speed: int = Field(description="Bytes per second the stream may copy (0: no limit).")
    domain: str | None = Field(
        default=None, description="Present once a domain was found running on the image.")
    disk: str | None = Field(
        default=None, description="Present once a domain was found: its disk on the image.")
    progress: Progress | None = Field(
        default=None,
        description="Present while streaming (when QEMU lists the job) and when done.")
    error: str | None = Field(
        default=None,
        description="Present after a failure (state failed): QEMU's message.")
    finished: int | None = Field(
        default=None, description="Present when done: when (Unix seconds).")
    waiting_for: str | None = Field(
        default=None,
        description="Present while waiting for the VM manager to stream (libvirt's disks): "
                    "what to run.")
    manager_job: str | None = Field(
        default=None,
        description="Present while the VM manager's own stream job moves the data: its id.")


# -- the method table ------------------------------------------------------------------


#: Every method's result type, for :class:`pydantic.TypeAdapter`.
RESULTS: dict[str, Any] = {
    "daemon.info": DaemonInfo,
    "domain.define": Named,
    "domain.undefine": Empty,
    "domain.list": list[DomainEntry],
    "domain.get_xml": str,
    "snapshot.create": SnapshotCreated,
    "snapshot.delete": Empty,
    "snapshot.renew": LeaseRenewed,
    "snapshot.list": list[str],
    "snapshot.lookup": SnapshotLookup,
    "snapshot.get_xml": str,
    "checkpoint.list": list[str],
    "checkpoint.lookup": CheckpointLookup,
    "checkpoint.get_xml": str,
    "checkpoint.delete": Empty,
    "checkpoint.changes": Changes,
    "checkpoint.redefine": Named,
    "snapshot.copy": CopyDone,
    "export.start": ExportStarted,
    "export.stop": Empty,
    "export.server": NbdServer | None,
    "export.list": list[ExportEntry],
    "events.subscribe": Empty,
    "recovery.start": Recovery,
    "recovery.lookup": Recovery,
    "recovery.list": list[Recovery],
    "recovery.delete": Empty,
    # OpenRPC's discovery method: the API document itself (blockbackupd.rpc.api), an
    # object whose shape is OpenRPC's, not the daemon's.
    "rpc.discover": dict[str, Any],
}

#: The params of the ``event`` notification.
EVENT = Event
