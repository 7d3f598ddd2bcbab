"""Thin client of blockbackupd's JSON-RPC socket.

``Client`` is synchronous, ``AsyncClient`` is for asyncio programs; both raise
the typed errors of :mod:`blockbackup_client.errors`, which carry the
contract's ``code`` and ``kind``.
"""

from .client import DEFAULT_SOCKET, AsyncClient, Client
from .errors import (
    AlreadyExists,
    ApplicationError,
    BlockbackupError,
    Busy,
    CheckpointBroken,
    ConnectionLost,
    DomainNotConnected,
    InvalidArgument,
    InvalidXml,
    NoSuchCheckpoint,
    NoSuchDisk,
    NoSuchDomain,
    NoSuchSnapshot,
    OperationFailed,
    PermissionDenied,
    ProtocolError,
    QuiesceFailed,
    Unsupported,
)

__all__ = [
    "DEFAULT_SOCKET", "AsyncClient", "Client",
    "AlreadyExists", "ApplicationError", "BlockbackupError", "Busy", "CheckpointBroken",
    "ConnectionLost", "DomainNotConnected", "InvalidArgument", "InvalidXml",
    "NoSuchCheckpoint", "NoSuchDisk", "NoSuchDomain", "NoSuchSnapshot", "OperationFailed",
    "PermissionDenied", "ProtocolError", "QuiesceFailed", "Unsupported",
]
