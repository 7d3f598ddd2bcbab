"""The daemon's error tree: one class per row of the contract's error table.

::

    BlockbackupError            code, kind, message
     +-- NoSuchDomain           1001 no-such-domain
     +-- NoSuchSnapshot         1002 no-such-snapshot
     +-- NoSuchCheckpoint       1003 no-such-checkpoint
     +-- NoSuchDisk             1004 no-such-disk
     +-- AlreadyExists          1005 already-exists
     +-- DomainNotConnected     1006 domain-not-connected
     +-- InvalidXml             1007 invalid-xml
     +-- InvalidArgument        1008 invalid-argument
     +-- OperationFailed        1009 operation-failed
     +-- Busy                   1010 busy
     +-- CheckpointBroken       1011 checkpoint-broken
     +-- PermissionDenied       1012 permission-denied
     +-- Unsupported            1013 unsupported
     +-- QuiesceFailed          1014 quiesce-failed

Every layer raises these; only the rpc layer turns them into JSON-RPC error
objects, so the contract's codes and kinds live here and nowhere else in the
daemon.
"""

from __future__ import annotations

from typing import ClassVar


class BlockbackupError(Exception):
    """Root of every error a client may see as an application error."""

    code: ClassVar[int] = 1009
    kind: ClassVar[str] = "operation-failed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NoSuchDomain(BlockbackupError):
    code, kind = 1001, "no-such-domain"

    def __init__(self, domain: str) -> None:
        super().__init__(f"no domain named {domain!r}")
        self.domain = domain


class NoSuchSnapshot(BlockbackupError):
    code, kind = 1002, "no-such-snapshot"


class NoSuchCheckpoint(BlockbackupError):
    code, kind = 1003, "no-such-checkpoint"


class NoSuchDisk(BlockbackupError):
    code, kind = 1004, "no-such-disk"


class AlreadyExists(BlockbackupError):
    code, kind = 1005, "already-exists"


class DomainNotConnected(BlockbackupError):
    code, kind = 1006, "domain-not-connected"

    def __init__(self, domain: str, detail: str = "its QEMU is not reachable") -> None:
        super().__init__(f"domain {domain!r} is not connected: {detail}")
        self.domain = domain


class InvalidXml(BlockbackupError):
    code, kind = 1007, "invalid-xml"


class InvalidArgument(BlockbackupError):
    code, kind = 1008, "invalid-argument"


class OperationFailed(BlockbackupError):
    code, kind = 1009, "operation-failed"


class Busy(BlockbackupError):
    code, kind = 1010, "busy"


class CheckpointBroken(BlockbackupError):
    code, kind = 1011, "checkpoint-broken"


class PermissionDenied(BlockbackupError):
    code, kind = 1012, "permission-denied"


class Unsupported(BlockbackupError):
    code, kind = 1013, "unsupported"


class QuiesceFailed(BlockbackupError):
    code, kind = 1014, "quiesce-failed"


ALL_ERRORS: tuple[type[BlockbackupError], ...] = (
    NoSuchDomain, NoSuchSnapshot, NoSuchCheckpoint, NoSuchDisk, AlreadyExists,
    DomainNotConnected, InvalidXml, InvalidArgument, OperationFailed, Busy,
    CheckpointBroken, PermissionDenied, Unsupported, QuiesceFailed,
)
