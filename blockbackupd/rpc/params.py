"""Pydantic models of each method's params (named params only).

Types are strict: ``"force": "yes"`` is an invalid-params error, not True.
Unknown params are refused, so a misspelt optional param never goes unnoticed.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..services.leases import MAX_LEASE, MIN_LEASE


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class NoParams(Params):
    pass


class DiskImage(Params):
    name: str
    file: str
    format: str | None = None


class DomainDefine(Params):
    name: str
    qmp_socket: str
    guest_agent_socket: str | None = None
    #: Added: the images of a domain the daemon has not seen running, so that
    #: it can be backed up while stopped (the daemon records them itself at
    #: every connect).
    disks: list[DiskImage] | None = None


class DomainUndefine(Params):
    name: str
    force: bool = False


class DomainRef(Params):
    domain: str


class SnapshotCreate(Params):
    domain: str
    xml: str | None = None
    checkpoint: bool = False
    quiesce: bool = False
    #: A <domainblockexport> started with the snapshot, in the same request.
    export: str | None = None
    #: Seconds the snapshot lives without a snapshot.renew (None: until deleted).
    lease: int | None = Field(default=None, ge=MIN_LEASE, le=MAX_LEASE)


class SnapshotRef(Params):
    domain: str
    name: str


class SnapshotCopy(Params):
    domain: str
    name: str
    disk: str
    target: str
    checkpoint: str | None = None
    #: Bytes per second QEMU may copy (0: as fast as it can).
    speed: int = 0


class DomainXml(Params):
    domain: str
    xml: str


class CheckpointChanges(Params):
    domain: str
    disk: str
    name: str
    until: str | None = None


class EventsSubscribe(Params):
    domains: list[str] | None = None


class RecoveryStart(Params):
    file: str
    speed: int | None = None


class RecoveryRef(Params):
    file: str


#: Every method and the model of its params (the method table and the API
#: document are both made from it).
METHODS: dict[str, type[Params]] = {
    "daemon.info": NoParams,
    "domain.define": DomainDefine,
    "domain.undefine": DomainUndefine,
    "domain.list": NoParams,
    "domain.get_xml": DomainRef,
    "snapshot.create": SnapshotCreate,
    "snapshot.delete": SnapshotRef,
    "snapshot.renew": SnapshotRef,
    "snapshot.list": DomainRef,
    "snapshot.lookup": SnapshotRef,
    "snapshot.get_xml": SnapshotRef,
    "checkpoint.list": DomainRef,
    "checkpoint.lookup": SnapshotRef,
    "checkpoint.get_xml": SnapshotRef,
    "checkpoint.delete": SnapshotRef,
    "checkpoint.changes": CheckpointChanges,
    "checkpoint.redefine": DomainXml,
    "snapshot.copy": SnapshotCopy,
    "export.start": DomainXml,
    "export.stop": DomainXml,
    "export.server": DomainRef,
    "export.list": DomainRef,
    "events.subscribe": EventsSubscribe,
    "recovery.start": RecoveryStart,
    "recovery.lookup": RecoveryRef,
    "recovery.list": NoParams,
    "recovery.delete": RecoveryRef,
    # OpenRPC's service discovery: the API document itself.
    "rpc.discover": NoParams,
}
