"""The API as data: an OpenRPC document of every method, made from the models.

Each method's params come from its pydantic model (:data:`params.METHODS`),
its result from :data:`results.RESULTS`, the errors it may answer from the
contract's table (:mod:`..errors`), and the ``event`` notification from
:data:`results.EVENT`. The daemon answers it to ``rpc.discover`` (OpenRPC's
discovery method); ``python -m blockbackupd.rpc.api`` prints it, and the
package ships the same text as ``blockbackupd/openrpc.json`` for programs
that read it without a daemon. The tests record every request and answer of
the suite (``daemon.rpc_record``) and validate each against this document.

The schemas are strict (``additionalProperties: false``) so that the tests
catch a field the daemon sends but the document does not name; a client
should still accept fields it does not know, as the contract lets later
versions add them.
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from pydantic import BaseModel, TypeAdapter

from .. import __version__, errors
from . import params, results

OPENRPC = "1.2.6"
REF = "#/components/schemas/{model}"

#: One line per method, what it does (docs/rpc.md says it at length).
SUMMARIES = {
    "daemon.info": "The daemon's version and, per domain, its state and counts.",
    "domain.define": "Define (persist) a domain by its QMP socket; the same definition "
                     "again is a no-op.",
    "domain.undefine": "Forget a domain; refused while it has snapshots or exports, and "
                       "while it has checkpoints unless force.",
    "domain.list": "Every defined domain and its state.",
    "domain.get_xml": "The live <domain> document: disks, checkpoints, exports.",
    "snapshot.create": "One point-in-time view across the listed disks (all writable "
                       "disks by default), optionally with a checkpoint, quiesced, with "
                       "exports, on a lease.",
    "snapshot.delete": "Stop the snapshot's exports, restore each disk's I/O path, remove "
                       "its nodes and scratch files.",
    "snapshot.renew": "Start a snapshot's lease again.",
    "snapshot.list": "The domain's snapshot names, oldest first.",
    "snapshot.lookup": "A snapshot's state, disks, scratch use, lease and copies.",
    "snapshot.get_xml": "The <domainblocksnapshot> document with every default filled in.",
    "checkpoint.list": "The domain's checkpoint names, oldest first.",
    "checkpoint.lookup": "A checkpoint's state (valid or broken, and why), parent, disks "
                         "and tracking.",
    "checkpoint.get_xml": "The <domaincheckpoint> document.",
    "checkpoint.delete": "Delete a checkpoint, keeping every other one's change set exact.",
    "checkpoint.changes": "The extents of a disk changed since a checkpoint, up to a later "
                          "checkpoint, a snapshot or now.",
    "checkpoint.redefine": "Recreate the record of a checkpoint whose bitmaps the images "
                           "hold (store lost, domain moved); checked against the images.",
    "snapshot.copy": "Have QEMU copy a snapshot's disk (or its changes since a "
                     "checkpoint) into a file on the daemon's host.",
    "export.start": "Export disks of a snapshot over NBD, with the changes since a "
                    "checkpoint as a meta context; starts the NBD server on first use.",
    "export.stop": "Stop the listed exports; the NBD server stops with its last.",
    "export.server": "Where the domain's NBD server listens, or null.",
    "export.list": "The domain's exports.",
    "events.subscribe": "Receive event notifications (of these domains, or all) on this "
                        "connection.",
    "recovery.start": "Instant recovery: a new image that reads through to a backup "
                      "while it is moved into the image.",
    "recovery.lookup": "One instant recovery and how far its move is.",
    "recovery.list": "Every instant recovery.",
    "recovery.delete": "Forget an instant recovery (a running move is cancelled).",
    "rpc.discover": "This document.",
}

_Errors = list[type[errors.BlockbackupError]]
_COMMON: _Errors = [errors.PermissionDenied]
_DOMAIN: _Errors = [errors.NoSuchDomain]
_LIVE: _Errors = [errors.NoSuchDomain, errors.DomainNotConnected, errors.OperationFailed]

#: The application errors each method may answer, besides permission-denied
#: (any method, for a caller the daemon does not allow) and -32602.
ERRORS: dict[str, _Errors] = {
    "daemon.info": [],
    "domain.define": [errors.InvalidArgument, errors.AlreadyExists],
    "domain.undefine": [errors.NoSuchDomain, errors.Busy, errors.InvalidArgument],
    "domain.list": [],
    "domain.get_xml": _LIVE,
    "snapshot.create": _LIVE + [errors.AlreadyExists, errors.InvalidXml,
                                errors.InvalidArgument, errors.NoSuchDisk,
                                errors.NoSuchCheckpoint, errors.NoSuchSnapshot, errors.Busy,
                                errors.Unsupported, errors.QuiesceFailed,
                                errors.CheckpointBroken],
    "snapshot.delete": _LIVE + [errors.NoSuchSnapshot, errors.Busy],
    "snapshot.renew": [errors.NoSuchDomain, errors.NoSuchSnapshot, errors.InvalidArgument],
    "snapshot.list": _DOMAIN,
    "snapshot.lookup": _LIVE + [errors.NoSuchSnapshot],
    "snapshot.get_xml": [errors.NoSuchDomain, errors.NoSuchSnapshot],
    "checkpoint.list": _DOMAIN,
    "checkpoint.lookup": [errors.NoSuchDomain, errors.NoSuchCheckpoint],
    "checkpoint.get_xml": [errors.NoSuchDomain, errors.NoSuchCheckpoint],
    "checkpoint.delete": _LIVE + [errors.NoSuchCheckpoint, errors.Busy, errors.Unsupported],
    "checkpoint.changes": _LIVE + [errors.NoSuchCheckpoint, errors.NoSuchSnapshot,
                                   errors.NoSuchDisk, errors.InvalidArgument,
                                   errors.CheckpointBroken, errors.Unsupported, errors.Busy],
    "checkpoint.redefine": _LIVE + [errors.InvalidXml, errors.InvalidArgument,
                                    errors.AlreadyExists, errors.NoSuchDisk,
                                    errors.Unsupported, errors.Busy],
    "snapshot.copy": _LIVE + [errors.NoSuchSnapshot, errors.NoSuchCheckpoint,
                              errors.NoSuchDisk, errors.InvalidArgument, errors.Busy,
                              errors.CheckpointBroken, errors.Unsupported],
    "export.start": _LIVE + [errors.NoSuchSnapshot, errors.NoSuchCheckpoint, errors.NoSuchDisk,
                             errors.AlreadyExists, errors.InvalidXml, errors.InvalidArgument,
                             errors.CheckpointBroken, errors.Unsupported, errors.Busy],
    "export.stop": _LIVE + [errors.InvalidXml, errors.InvalidArgument, errors.NoSuchSnapshot],
    "export.server": _DOMAIN,
    "export.list": _DOMAIN,
    "events.subscribe": _DOMAIN,
    "recovery.start": [errors.InvalidArgument, errors.AlreadyExists, errors.OperationFailed,
                       errors.Unsupported],
    "recovery.lookup": [errors.InvalidArgument],
    "recovery.list": [],
    "recovery.delete": [errors.InvalidArgument, errors.OperationFailed],
    "rpc.discover": [],
}

#: What each param means; per method where one name means two things.
_PARAMS = {
    "domain": "The domain's name.",
    "name": "The snapshot's or checkpoint's name.",
    "xml": "The method's XML document, as a string.",
    "disk": "The disk's name (its device's qdev id).",
    "until": "A later checkpoint or a snapshot (default: now).",
    "domains": "Only these domains' events (default: every domain's).",
    "file": "The recovery's image file (absolute path).",
    "speed": "Bytes per second (0 or none: as fast as it goes).",
    "target": "The file to write (absolute path on the daemon's host).",
    "checkpoint": "Only the changes since this checkpoint.",
    "force": "Also drop the domain's checkpoint records (bitmaps in images stay).",
    "qmp_socket": "The QMP socket QEMU opened for the daemon.",
    "guest_agent_socket": "The guest agent's socket, for quiesce.",
    "disks": "The images of a domain the daemon has not seen running, so it can be "
             "backed up while stopped.",
    "quiesce": "Freeze the guest's filesystems through its agent around the instant.",
    "export": "A <domainblockexport> started with the snapshot, in the same request.",
    "lease": "Seconds the snapshot lives without a snapshot.renew (absent: until deleted).",
}
_METHOD_PARAMS = {
    ("domain.define", "name"): "The domain's name.",
    ("domain.undefine", "name"): "The domain's name.",
    ("snapshot.create", "checkpoint"): "Also a checkpoint of the snapshot's name at the "
                                       "same instant.",
    ("snapshot.create", "xml"): "A <domainblocksnapshot> (absent: every writable disk, a "
                                "generated name).",
    ("checkpoint.changes", "name"): "The checkpoint the changes are counted from.",
}


def _collect(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """A schema with its ``$defs`` moved into the document's components."""
    defs.update(schema.pop("$defs", {}))
    return schema


def _param_descriptors(method: str, model: type[BaseModel],
                       defs: dict[str, Any]) -> list[dict[str, Any]]:
    schema = _collect(model.model_json_schema(ref_template=REF), defs)
    required = set(schema.get("required", []))
    out = []
    for name, prop in schema.get("properties", {}).items():
        prop.pop("title", None)
        description = prop.pop("description", None) or _METHOD_PARAMS.get(
            (method, name)) or _PARAMS.get(name, "")
        out.append({"name": name, "description": description, "required": name in required,
                    "schema": prop})
    return out


@cache
def _document() -> str:
    defs: dict[str, Any] = {}
    methods = []
    for name, model in params.METHODS.items():
        result_type = results.RESULTS.get(name)
        if name == "rpc.discover":
            result_schema: dict[str, Any] = {
                "type": "object", "description": "An OpenRPC document (this one).",
                "required": ["openrpc", "info", "methods"]}
        else:
            assert result_type is not None, f"{name} has no result model"
            result_schema = _collect(TypeAdapter(result_type).json_schema(
                ref_template=REF, mode="serialization"), defs)
        methods.append({
            "name": name,
            "summary": SUMMARIES[name],
            "paramStructure": "by-name",
            "params": _param_descriptors(name, model, defs),
            "result": {"name": "result", "schema": result_schema},
            "errors": [{"$ref": f"#/components/errors/{e.kind}"}
                       for e in _COMMON + ERRORS[name]],
        })
    event = _collect(TypeAdapter(results.EVENT).json_schema(ref_template=REF), defs)
    kinds = sorted(_error_classes(), key=lambda c: c.code)
    doc = {
        "openrpc": OPENRPC,
        "info": {
            "title": "blockbackupd",
            "version": __version__,
            "description": (
                "Point-in-time snapshots, checkpoints and NBD exports of QEMU VMs' disks. "
                "JSON-RPC 2.0 over a UNIX stream socket (or TLS, daemon.listen): one JSON "
                "text per line; params always by name; requests on one connection may be "
                "answered out of order (match by id). After events.subscribe the "
                "connection also receives notifications: method \"event\", params as "
                "x-notifications describes. Application errors carry data.kind."),
        },
        "servers": [{"name": "the daemon's socket",
                     "url": "unix:///run/blockbackupd/blockbackupd.sock"}],
        "methods": methods,
        "components": {
            "schemas": dict(sorted(defs.items())),
            "errors": {
                cls.kind: {
                    "code": cls.code, "message": cls.kind,
                    "data": {"type": "object", "required": ["kind"],
                             "properties": {"kind": {"const": cls.kind}}}}
                for cls in kinds},
        },
        "x-notifications": [{
            "name": "event",
            "summary": "Something happened to a subscribed domain (events.subscribe).",
            "params": event,
        }],
    }
    return json.dumps(doc, indent=1, sort_keys=False) + "\n"


def _error_classes() -> list[type[errors.BlockbackupError]]:
    return [cls for cls in vars(errors).values()
            if isinstance(cls, type) and issubclass(cls, errors.BlockbackupError)
            and cls is not errors.BlockbackupError]


def document() -> dict[str, Any]:
    """The OpenRPC document (a fresh copy: callers may change it)."""
    loaded: dict[str, Any] = json.loads(_document())
    return loaded


def text() -> str:
    """The document as the package ships it (``blockbackupd/openrpc.json``)."""
    return _document()


if __name__ == "__main__":
    print(text(), end="")
