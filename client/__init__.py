"""Thin client of blockbackupd's JSON-RPC socket.

``Client`` is synchronous, ``AsyncClient`` is for asyncio programs; both raise
the typed errors of :mod:`blockbackup_client.errors`, which carry the
contract's ``code`` and ``kind``. ``AsyncClient`` (and asyncio with it) is
imported on first use, so a program that only uses ``Client`` starts without
asyncio.
"""

from __future__ import annotations

from .client import DEFAULT_SOCKET, Client
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

# typing is for the type checker only: importing it costs bbctl's every start ~2 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from .aio import AsyncClient

__all__ = [
    "DEFAULT_SOCKET", "AsyncClient", "Client",
    "AlreadyExists", "ApplicationError", "BlockbackupError", "Busy", "CheckpointBroken",
    "ConnectionLost", "DomainNotConnected", "InvalidArgument", "InvalidXml",
    "NoSuchCheckpoint", "NoSuchDisk", "NoSuchDomain", "NoSuchSnapshot", "OperationFailed",
    "PermissionDenied", "ProtocolError", "QuiesceFailed", "Unsupported",
]


def __getattr__(name: str) -> Any:
    """``AsyncClient``, imported from :mod:`.aio` only when asked for."""
    if name == "AsyncClient":
        from .aio import AsyncClient

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
