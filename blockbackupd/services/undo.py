"""Rollback of multi-step operations: every step pushes its inverse."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("blockbackupd.undo")

Step = Callable[[], Awaitable[None] | None]


class Undo:
    """A stack of inverse steps, run newest first on failure.

    ``rollback`` runs shielded from cancellation, so a request cancelled
    half-way (daemon stopping, client gone) still removes what it made;
    a failing inverse is logged and the others still run.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._steps: list[tuple[str, Step]] = []

    def push(self, label: str, step: Step) -> None:
        self._steps.append((label, step))

    def discard(self) -> None:
        self._steps.clear()

    async def rollback(self) -> None:
        steps, self._steps = self._steps, []
        task = asyncio.ensure_future(self._run(steps))
        cancelled = False
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                cancelled = True  # finish undoing first, then honour it
        if cancelled:
            raise asyncio.CancelledError

    async def _run(self, steps: list[tuple[str, Step]]) -> None:
        for label, step in reversed(steps):
            try:
                result = step()
                if result is not None:
                    await result
            except Exception as err:  # keep undoing the rest
                log.error("%s: rollback step %r failed: %s", self.what, label, err)
            else:
                log.debug("%s: rolled back %s", self.what, label)
