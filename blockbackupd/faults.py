"""Fault injection for tests: fail a multi-step operation at a named step.

``BLOCKBACKUPD_FAIL_AT=<step>`` in the daemon's environment makes
:func:`check` raise OperationFailed when that step is reached, so tests can
prove that a failure at every step rolls back what the operation made.
QEMU cannot be made to fail on demand at each of these points. Unset in
production, it costs one dictionary lookup per step.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from .errors import OperationFailed

ENV = "BLOCKBACKUPD_FAIL_AT"
CRASH_ENV = "BLOCKBACKUPD_CRASH_AT"
PAUSE_ENV = "BLOCKBACKUPD_PAUSE_AT"

log = logging.getLogger("blockbackupd.faults")


async def check(step: str) -> None:
    """Fail (``BLOCKBACKUPD_FAIL_AT=<step>``), linger for a minute
    (``BLOCKBACKUPD_PAUSE_AT=<step>``, so a test can cancel the operation there)
    or die (``BLOCKBACKUPD_CRASH_AT=<step>``, see :func:`crash_point`).

    :raise OperationFailed: when the environment asks to fail at this step.
    """
    crash_point(step)
    if os.environ.get(ENV) == step:
        raise OperationFailed(f"injected failure at {step}")
    if os.environ.get(PAUSE_ENV) == step:
        log.warning("pausing at %s", step)
        await asyncio.sleep(60)


def crash_point(step: str) -> None:
    """``BLOCKBACKUPD_CRASH_AT=<step>``: the daemon SIGKILLs itself here, as a
    power cut or an OOM kill would, to test recovery on the next start."""
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)
