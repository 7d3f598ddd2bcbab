"""Plain value types shared by every layer (no I/O, no imports of other layers)."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class DomainState(enum.StrEnum):
    """A domain's state as the contract names it."""

    RUNNING = "running"
    PAUSED = "paused"
    DISCONNECTED = "disconnected"


@dataclass(frozen=True)
class Disk:
    """One guest disk as QEMU shows it right now.

    ``name`` is the qdev id, the disk's identity. ``node`` is the node that
    currently sits at the top of the device's I/O path; it changes across VM
    restarts and is never used as identity.
    """

    name: str
    qdev: str
    node: str
    file: str
    format: str
    size: int
    read_only: bool
