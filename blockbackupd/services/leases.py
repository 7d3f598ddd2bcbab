"""Leases: a snapshot that lives only while its creator keeps saying so.

A backup application on another host can vanish without a word: its network
cut, its machine gone. Its TCP connection then stays open on this side for as
long as the kernel believes in it, and the snapshot, whose scratch grows with
every guest write, with it. A snapshot made with a lease of N seconds is
deleted when N seconds pass without a renewal (``snapshot.renew``); a backup
application renews it every N/4 seconds from a connection of its own, so one
lost renewal costs nothing.

The timers are the event loop's; a lease lives in memory only, as the
snapshot does (a daemon that stops deletes every snapshot).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

#: Bounds of a lease, in seconds: under one second no network renews in
#: time; over a day it bounds nothing a backup needs.
MIN_LEASE = 1
MAX_LEASE = 86_400


class Lease:
    """One snapshot's lease: ``expire`` is called once, ``seconds`` after the
    last renewal, unless it is cancelled first."""

    def __init__(self, seconds: float, expire: Callable[[], None]) -> None:
        self.seconds = seconds
        self._expire = expire
        self._timer: asyncio.TimerHandle | None = None
        self.expires = 0.0
        self.renew()

    def renew(self) -> float:
        """Start the lease's time again; returns when it now expires (Unix seconds)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.seconds, self._fire)
        self.expires = time.time() + self.seconds
        return self.expires

    def cancel(self) -> None:
        """The snapshot went another way: the lease will not fire."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fire(self) -> None:
        self._timer = None
        self._expire()
