"""Rollback of multi-step operations: every step pushes its inverse."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from ..errors import DomainNotConnected
from ..qemu.session import NoAnswer

log = logging.getLogger("blockbackupd.undo")

Step = Callable[[], Awaitable[None] | None]
T = TypeVar("T")


async def every(steps: Sequence[Awaitable[T]]) -> list[T]:
    """Run steps side by side, each to its end; their results, or the first
    failure (in the order given) raised.

    For QMP commands this sends them back to back: QEMU's monitor runs them
    one after the other, in order, so a batch costs about one round trip
    instead of one per command. Every step runs to its end even when another
    fails, so that what each did is known (and, in :meth:`Undo.run_all`,
    undone).
    """
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results  # type: ignore[return-value]  # none is an exception here


class _Record:
    """The inverse of a store record: see :meth:`Undo.push_record`."""

    def __init__(self, drop: Callable[[], None], keep: Callable[[], None] | None) -> None:
        self.drop, self.keep = drop, keep


class Undo:
    """A stack of inverse steps, run newest first on failure.

    ``rollback`` runs shielded from cancellation, so a request cancelled
    half-way (daemon stopping, client gone) still removes what it made;
    a failing inverse is logged and the others still run.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        self._steps: list[tuple[str, Step | _Record]] = []

    def push(self, label: str, step: Step) -> None:
        self._steps.append((label, step))

    def push_record(self, label: str, drop: Callable[[], None],
                    keep: Callable[[], None] | None = None) -> None:
        """The store's record of something this operation is about to make in
        QEMU or on the host. A rollback drops it only when every inverse step
        run before it worked; otherwise it stays (and ``keep`` runs), so the
        next connect, judging by what QEMU shows, finishes the cleanup. (A
        QMP connection lost mid-operation fails the QEMU-side inverses.)"""
        self._steps.append((label, _Record(drop, keep)))

    async def run_all(self, steps: Sequence[tuple[str, Awaitable[None], Step]]) -> None:
        """Run independent steps side by side (see :func:`every`), each
        ``(label, step, inverse)``; push the inverse of each that worked, then
        raise the first failure."""
        async def run(label: str, step: Awaitable[None], inverse: Step) -> None:
            await step
            self.push(label, inverse)

        await every([run(*s) for s in steps])

    def discard(self) -> None:
        self._steps.clear()

    def adopt(self, other: Undo) -> None:
        """Take over another stack's steps (newer than this one's), emptying it."""
        self._steps += other._steps
        other._steps = []

    async def rollback(self, cause: BaseException | None = None) -> None:
        """Run the inverse steps, newest first. ``cause``, the exception that
        stopped the operation, tells whether the last QMP command's outcome is
        unknown (connection lost, no answer, cancelled mid-command): then the
        store keeps every record, since QEMU may hold what it names."""
        steps, self._steps = self._steps, []
        uncertain = isinstance(cause, (DomainNotConnected, NoAnswer, asyncio.CancelledError))
        task = asyncio.ensure_future(self._run(steps, uncertain))
        cancelled = False
        while not task.done():
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                cancelled = True  # finish undoing first, then honour it
        if cancelled:
            raise asyncio.CancelledError

    async def _run(self, steps: list[tuple[str, Step | _Record]], uncertain: bool) -> None:
        failed = uncertain
        for label, step in reversed(steps):
            try:
                if isinstance(step, _Record):
                    if not failed:
                        step.drop()
                    else:
                        log.warning("%s: %s kept for the next connect to finish", self.what,
                                    label)
                        if step.keep is not None:
                            step.keep()
                    continue
                result = step()
                if result is not None:
                    await result
            except Exception as err:  # keep undoing the rest
                failed = True
                log.error("%s: rollback step %r failed: %s", self.what, label, err)
            else:
                log.debug("%s: rolled back %s", self.what, label)
