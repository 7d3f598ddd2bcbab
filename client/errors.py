"""Errors the client raises.

::

    BlockbackupError
     +-- ConnectionLost         the socket closed or could not be reached
     +-- ProtocolError          a JSON-RPC protocol error (-32700 .. -32603)
     +-- ApplicationError       an error from the contract's table (code, kind)
          +-- NoSuchDomain (1001) ... QuiesceFailed (1014)

    BackupError                 the backup application (bbctl backup, restore,
                                verify, prune) cannot do it; defined here so
                                that bbctl's other commands need not import it
"""

from __future__ import annotations

# typing is for the type checker only: importing it costs bbctl's every start ~2 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any


class BlockbackupError(Exception):
    """Root of the client's errors."""


class BackupError(Exception):
    """The backup, restore or check cannot be done; the message says why."""


class ConnectionLost(BlockbackupError, ConnectionError):
    """The daemon's socket could not be reached or closed before answering."""


class ProtocolError(BlockbackupError):
    """The daemon answered with a JSON-RPC protocol error."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message
        self.data = data


class ApplicationError(BlockbackupError):
    """An error of the contract's table; ``code`` and ``kind`` say which."""

    code: int = 0
    kind: str = ""

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data


class NoSuchDomain(ApplicationError):
    code, kind = 1001, "no-such-domain"


class NoSuchSnapshot(ApplicationError):
    code, kind = 1002, "no-such-snapshot"


class NoSuchCheckpoint(ApplicationError):
    code, kind = 1003, "no-such-checkpoint"


class NoSuchDisk(ApplicationError):
    code, kind = 1004, "no-such-disk"


class AlreadyExists(ApplicationError):
    code, kind = 1005, "already-exists"


class DomainNotConnected(ApplicationError):
    code, kind = 1006, "domain-not-connected"


class InvalidXml(ApplicationError):
    code, kind = 1007, "invalid-xml"


class InvalidArgument(ApplicationError):
    code, kind = 1008, "invalid-argument"


class OperationFailed(ApplicationError):
    code, kind = 1009, "operation-failed"


class Busy(ApplicationError):
    code, kind = 1010, "busy"


class CheckpointBroken(ApplicationError):
    code, kind = 1011, "checkpoint-broken"


class PermissionDenied(ApplicationError):
    code, kind = 1012, "permission-denied"


class Unsupported(ApplicationError):
    code, kind = 1013, "unsupported"


class QuiesceFailed(ApplicationError):
    code, kind = 1014, "quiesce-failed"


BY_CODE: dict[int, type[ApplicationError]] = {
    cls.code: cls for cls in (
        NoSuchDomain, NoSuchSnapshot, NoSuchCheckpoint, NoSuchDisk, AlreadyExists,
        DomainNotConnected, InvalidXml, InvalidArgument, OperationFailed, Busy,
        CheckpointBroken, PermissionDenied, Unsupported, QuiesceFailed,
    )
}


def error_from_response(error: dict[str, Any]) -> BlockbackupError:
    """The exception for a JSON-RPC ``error`` object."""
    code = int(error.get("code", 0))
    message = str(error.get("message", ""))
    data = error.get("data")
    cls = BY_CODE.get(code)
    if cls is not None:
        return cls(message, data)
    if -32768 <= code <= -32000:
        return ProtocolError(code, message, data)
    # A code newer than this client: still an application error, kind from data.
    err = ApplicationError(message, data)
    err.code = code
    err.kind = str(data.get("kind", "")) if isinstance(data, dict) else ""
    return err
