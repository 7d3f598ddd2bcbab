"""I/O threads: which disks run in one, and whether this QEMU build can serve
NBD exports of such disks without aborting.

QEMU 7.2 (Debian 12's build) aborts the whole VM when an NBD client that
negotiated an export of a node in an I/O thread's AioContext disconnects:
``blockdev-nbd.c:62: nbd_blockdev_client_closed: Assertion
'qemu_in_main_thread() && nbd_server' failed`` (the server's close callback
runs in the I/O thread). Measured here: the first such client's disconnect
kills it; clients of exports in the main loop (the daemon's null-node change
sets), clients that never negotiate (``nbdinfo --list``, the daemon's
``NBD_OPT_ABORT`` probes) and everything on QEMU 10.0 survive.

Which builds have the bug is decided by running it: a throwaway process of
the very binary the VM runs (``/proc/PID/exe``, so an upgraded package on
disk does not mislead) with no machine, one I/O thread and a null node,
gets the fatal client sequence. A version table would be wrong for every
distribution backport; the throwaway process risks nothing. The answer is
kept per binary (device, inode, size, mtime) for the daemon's life.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any

import nbd

from .session import DomainSession

log = logging.getLogger("blockbackupd.qemu")

#: The QOM properties by which a device (or its virtio backend) names an I/O
#: thread: ``iothread`` everywhere, ``iothread-vq-mapping`` on newer virtio
#: devices (a list; any entry counts).
_IOTHREAD_PROPERTIES = ("iothread", "iothread-vq-mapping")
#: Steps up the QOM tree from a disk's device to its controllers.
_MAX_DEPTH = 6
#: Seconds the whole probe may take (it takes about 0.2 s here).
PROBE_TIMEOUT = 20.0


async def has_iothreads(session: DomainSession) -> bool:
    """Whether the domain's QEMU has any I/O thread object at all (the cheap
    question that spares the walk for most VMs).

    :raise DomainNotConnected: :raise OperationFailed:
    """
    return bool(await session.execute("query-iothreads"))


async def device_iothread(session: DomainSession, qdev: str) -> str | None:
    """The I/O thread that a disk's device (qdev path or id) runs in, through
    itself or its controller (virtio-scsi's ``iothread`` carries every
    ``scsi-hd`` on its bus); None: the main loop.

    :raise DomainNotConnected: QEMU went away.
    """
    path = qdev if qdev.startswith("/") else f"/machine/peripheral/{qdev}"
    for _ in range(_MAX_DEPTH):
        for prop in _IOTHREAD_PROPERTIES:
            value = await _qom_get(session, path, prop)
            if isinstance(value, str) and value:
                return value.rsplit("/", 1)[-1]
            if isinstance(value, list) and value:
                return str(value[0].get("iothread", "?")) if isinstance(value[0], dict) \
                    else "?"
        if path.endswith("/virtio-backend"):  # the backend of a virtio proxy device
            path = path.rsplit("/", 1)[0]
            continue
        bus = await _qom_get(session, path, "parent_bus")
        if not isinstance(bus, str) or bus.count("/") < 3:
            return None  # the machine's own buses: nothing above carries an I/O thread
        path = bus.rsplit("/", 1)[0]  # the bus's controller
    return None


async def _qom_get(session: DomainSession, path: str, prop: str) -> Any:
    from ..errors import OperationFailed

    try:
        return await session.execute("qom-get", {"path": path, "property": prop})
    except OperationFailed:  # no such property on this object
        return None


# -- the build probe -------------------------------------------------------------

@dataclass(frozen=True)
class Verdict:
    """Whether a QEMU build's NBD server survives clients of exports in an I/O thread."""

    safe: bool
    #: What was found, for messages and logs: the binary and what happened.
    detail: str


_verdicts: dict[tuple[int, int, int, int], Verdict] = {}
_probing: dict[tuple[int, int, int, int], asyncio.Future[Verdict]] = {}


async def nbd_verdict(pid: int | None) -> Verdict:
    """Whether the build QEMU process ``pid`` runs serves NBD exports of
    I/O-thread nodes safely; never raises (an unknown build is unsafe).
    """
    if pid is None:
        return Verdict(False, "the QEMU process behind the QMP socket is unknown "
                              "(SO_PEERCRED), so its build could not be checked")
    exe = f"/proc/{pid}/exe"
    try:
        st = os.stat(exe)
        name = os.readlink(exe)
    except OSError as err:
        return Verdict(False, f"the binary of QEMU process {pid} cannot be read ({err.strerror})")
    if not os.path.basename(name).startswith("qemu"):
        # The socket's listener is not QEMU (a VM manager made it and passed
        # it on): never run an unknown program.
        return Verdict(False, f"the QMP socket's listener (PID {pid}, {name}) is not QEMU, "
                              "so the build could not be checked")
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _verdicts:
        return _verdicts[key]
    pending = _probing.get(key)
    if pending is None:
        pending = _probing[key] = asyncio.get_running_loop().create_future()
        try:
            verdict = await _probe(exe, name)
        except Exception as err:  # noqa: BLE001 - a probe that cannot run proves nothing
            verdict = Verdict(False, f"{name}: the probe of its NBD server could not run ({err})")
        _verdicts[key] = verdict
        del _probing[key]
        pending.set_result(verdict)
        log.info("QEMU build %s: NBD exports of I/O-thread disks are %s (%s)", name,
                 "safe" if verdict.safe else "unsafe", verdict.detail)
        return verdict
    return await asyncio.shield(pending)


async def _probe(exe: str, name: str) -> Verdict:
    """Run the fatal sequence against a throwaway process of the binary: an
    export of a null node in an I/O thread, one client that negotiates, reads
    and leaves, then a second one. The server takes one connection at a time
    (``max-connections``), so the second client's handshake completing
    proves the first client's close ran; a build with the bug aborts then."""
    work = tempfile.mkdtemp(prefix="bb-nbdprobe-")
    sock = os.path.join(work, "nbd")
    proc = await asyncio.create_subprocess_exec(
        exe, "-machine", "none", "-nodefaults", "-display", "none", "-S",
        "-object", "iothread,id=io0", "-qmp", "stdio",
        "-blockdev", "driver=null-co,node-name=probe,size=1048576,read-zeroes=on",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, preexec_fn=_no_core)
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            qmp = _StdioQmp(proc)
            await qmp.greeting()
            await qmp.cmd("qmp_capabilities")
            await qmp.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}},
                                               "max-connections": 1})
            reply = await qmp.cmd("block-export-add", {
                "type": "nbd", "id": "probe", "node-name": "probe", "iothread": "io0"})
            if "error" in reply:
                return Verdict(False, f"{name}: cannot put an export in an I/O thread "
                                      f"({reply['error'].get('desc')})")
            first = await asyncio.to_thread(_client, sock)
            second = await asyncio.to_thread(_client, sock) if first is None else first
            try:
                await qmp.cmd("quit")
            except (EOFError, ConnectionError):
                pass  # it aborted: the exit status and stderr say so
            await proc.wait()
    except TimeoutError:
        return Verdict(False, f"{name}: the probe did not finish in {PROBE_TIMEOUT:g} s")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        stderr = (await proc.stderr.read()).decode(errors="replace") if proc.stderr else ""
        shutil.rmtree(work, ignore_errors=True)
    if proc.returncode == 0 and second is None:
        return Verdict(True, f"{name}: its NBD server survived clients of an I/O-thread export")
    why = next((line[line.index("nbd_"):].strip() if "nbd_" in line else line.strip()
                for line in stderr.splitlines() if "Assertion" in line),
               second or f"exit status {proc.returncode}")
    return Verdict(False, f"{name} aborts when an NBD client of an export in an I/O thread "
                          f"disconnects ({why})")


def _no_core() -> None:
    # The abort is expected: no core dump of the throwaway process.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _client(sock: str) -> str | None:
    """One client that negotiates, reads and leaves; None, or what failed."""
    h = nbd.NBD()
    try:
        h.connect_uri(f"nbd+unix:///probe?socket={sock}")
        h.pread(4096, 0)
        h.shutdown()
    except nbd.Error as err:
        return f"NBD client: {err}"
    finally:
        del h
    return None


class _StdioQmp:
    """Just enough QMP over the probe's stdin/stdout (one command at a time)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self._in, self._out = proc.stdin, proc.stdout

    async def _message(self) -> dict[str, Any]:
        line = await self._out.readline()
        if not line:
            raise EOFError("the probe's QEMU exited")
        return dict(json.loads(line))

    async def greeting(self) -> None:
        await self._message()

    async def cmd(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self._in.write(json.dumps(msg).encode() + b"\n")
        await self._in.drain()
        while True:
            reply = await self._message()
            if "return" in reply or "error" in reply:
                return reply

