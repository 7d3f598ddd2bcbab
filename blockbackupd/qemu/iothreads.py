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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import nbd

from ..model import Disk
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


#: (domain, QEMU PID, qdev) -> the I/O thread found. Only a found thread is
#: kept: an answer "none" kept could let a disk plugged again under the same
#: id, now in an I/O thread, be exported or stacked on where QEMU would
#: abort; a kept thread at worst refuses one.
_pinned: dict[tuple[str, int | None, str], str] = {}


async def pinned(session: DomainSession, disks: Sequence[Disk]) -> dict[str, str]:
    """disk name -> the I/O thread its device runs in, for the listed disks
    that run in one (bbctl's copies poll snapshot.lookup, which asks this:
    QOM is asked once per QEMU process and device).

    :raise DomainNotConnected: :raise OperationFailed:
    """
    if not disks or not await has_iothreads(session):
        return {}
    out = {}
    for disk in disks:
        key = (session.domain, session.qemu_pid, disk.qdev)
        thread = _pinned.get(key) or await device_iothread(session, disk.qdev)
        if thread is not None:
            if key not in _pinned and len(_pinned) > 4096:  # a host's VMs, restarted often
                _pinned.clear()
            _pinned[key] = out[disk.name] = thread
    return out


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
    """Whether a QEMU build survives one of the sequences below."""

    safe: bool
    #: What was found, for messages and logs: the binary and what happened.
    detail: str


#: The checks a build is put through, each in a throwaway process of its own.
NBD_CLIENTS = "NBD clients of an export in an I/O thread"
THROTTLE_GRAPH = "a node added above a throttle filter in an I/O thread"

_Key = tuple[str, int, int, int, int]
_verdicts: dict[_Key, Verdict] = {}
_probing: dict[_Key, asyncio.Future[Verdict]] = {}


async def nbd_verdict(pid: int | None) -> Verdict:
    """Whether the build QEMU process ``pid`` runs serves NBD exports of
    I/O-thread nodes safely; never raises (an unknown build is unsafe)."""
    return await verdict(pid, NBD_CLIENTS)


async def throttle_verdict(pid: int | None) -> Verdict:
    """Whether that build survives a node added above a ``throttle`` filter
    node in an I/O thread (7.2 aborts: ``qemu_mutex_unlock_impl: Operation
    not permitted``, at the first blockdev-add); never raises."""
    return await verdict(pid, THROTTLE_GRAPH)


async def adds_need_held_io(session: DomainSession, disks: Sequence[Disk]) -> dict[str, str]:
    """The listed disks (-> their I/O thread) above whose nodes this QEMU
    build may add nodes only while the guest's vCPUs are stopped: those whose
    device runs in an I/O thread, on a build that fails the throttle check.

    Measured on 7.2 with a Linux guest writing to a virtio-blk disk in an I/O
    thread: a snapshot's blockdev-adds (filter above the disk, view above the
    filter) made while the guest ran aborted QEMU at the 12th snapshot, the
    same ``qemu_mutex_unlock_impl: Operation not permitted`` (an AioContext
    lock released by a thread that does not hold it, racing the I/O thread's
    requests); made between ``stop`` and ``cont`` (drained, the I/O thread
    idle), 700 snapshots survived, and so did removing the nodes while the
    guest ran (300). The throttle check is the deterministic form of that
    fault: it needs no guest I/O to fire.
    """
    found = await pinned(session, disks)
    if not found:
        return {}
    result = await throttle_verdict(session.qemu_pid)
    return {} if result.safe else found


async def verdict(pid: int | None, check: str) -> Verdict:
    """The build's verdict for one check, probed once per binary."""
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
    key = (check, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _verdicts:
        return _verdicts[key]
    pending = _probing.get(key)
    if pending is not None:
        return await asyncio.shield(pending)
    pending = _probing[key] = asyncio.get_running_loop().create_future()
    try:
        probe = _probe_nbd if check == NBD_CLIENTS else _probe_throttle
        found = await probe(exe, name)
    except Exception as err:  # noqa: BLE001 - a probe that cannot run proves nothing
        found = Verdict(False, f"{name}: the probe ({check}) could not run ({err})")
    _verdicts[key] = found
    del _probing[key]
    pending.set_result(found)
    log.info("QEMU build %s: %s: %s (%s)", name, check, "safe" if found.safe else "unsafe",
             found.detail)
    return found


async def _start(exe: str, *args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        exe, "-machine", "none", "-nodefaults", "-display", "none", "-S",
        "-object", "iothread,id=io0", "-qmp", "stdio", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, preexec_fn=_no_core)


async def _end(proc: asyncio.subprocess.Process) -> str:
    """Stop the probe's process (if it still runs); its stderr."""
    if proc.returncode is None:
        proc.kill()
        await proc.wait()
    return (await proc.stderr.read()).decode(errors="replace") if proc.stderr else ""


def _why(stderr: str, fallback: str) -> str:
    """The line of QEMU's abort, without the source file's path."""
    for line in stderr.splitlines():
        if "Assertion" in line and "nbd_" in line:
            return line[line.index("nbd_"):].strip()
        if "Assertion" in line or "not permitted" in line or "Aborted" in line:
            return line.strip().removeprefix("qemu: ")
    return fallback


@dataclass
class _Outcome:
    """How a probe's throwaway process ended."""

    status: int | None
    stderr: str
    #: Why the sequence could not be tried (the build lacks a command): unsafe.
    untestable: str | None = None
    #: What the sequence itself saw go wrong (e.g. a client's failure).
    failure: str | None = None


_Steps = Callable[["_StdioQmp"], Awaitable[tuple[str | None, str | None]]]


async def _run(exe: str, args: tuple[str, ...], steps: _Steps) -> _Outcome:
    """Start a throwaway process, run ``steps`` (-> untestable, failure),
    quit it; an abort on the way ends the steps, and the exit status and
    stderr say what happened."""
    proc = await _start(exe, *args)
    untestable = failure = None
    try:
        async with asyncio.timeout(PROBE_TIMEOUT):
            qmp = _StdioQmp(proc)
            await qmp.greeting()
            await qmp.cmd("qmp_capabilities")
            untestable, failure = await steps(qmp)
            if untestable is None:
                await qmp.cmd("quit")
                await proc.wait()
    except (EOFError, ConnectionError):
        pass  # it aborted
    except TimeoutError:
        untestable = f"the probe did not finish in {PROBE_TIMEOUT:g} s"
    finally:
        stderr = await _end(proc)
    return _Outcome(proc.returncode, stderr, untestable, failure)


async def _probe_throttle(exe: str, name: str) -> Verdict:
    """A null node under a throttle filter, moved into the I/O thread (as a
    device with an I/O thread moves its disk's nodes), then a node added
    above it and removed, as a snapshot does."""

    async def steps(qmp: _StdioQmp) -> tuple[str | None, str | None]:
        moved = await qmp.cmd("x-blockdev-set-iothread",
                              {"node-name": "probe-throttle", "iothread": "io0"})
        if "error" in moved:
            return f"cannot move a node into an I/O thread ({moved['error'].get('desc')})", None
        for _ in range(2):
            await qmp.cmd("blockdev-add", {"driver": "raw", "node-name": "probe-above",
                                           "file": "probe-throttle", "read-only": True})
            await qmp.cmd("blockdev-del", {"node-name": "probe-above"})
        return None, None

    out = await _run(exe, (
        "-object", '{"qom-type":"throttle-group","id":"probe-group",'
                   '"limits":{"bps-total":1073741824}}',
        "-blockdev", "driver=null-co,node-name=probe,size=1048576",
        "-blockdev", "driver=throttle,node-name=probe-throttle,throttle-group=probe-group,"
                     "file=probe"), steps)
    return _verdict(name, out, "survived nodes added above a throttle filter in an I/O thread",
                    "aborts when a node is added above a throttle filter in an I/O thread")


async def _probe_nbd(exe: str, name: str) -> Verdict:
    """Run the fatal sequence against a throwaway process of the binary: an
    export of a null node in an I/O thread, one client that negotiates, reads
    and leaves, then a second one. The server takes one connection at a time
    (``max-connections``), so the second client's handshake completing
    proves the first client's close ran; a build with the bug aborts then."""
    work = tempfile.mkdtemp(prefix="bb-nbdprobe-")
    sock = os.path.join(work, "nbd")

    async def steps(qmp: _StdioQmp) -> tuple[str | None, str | None]:
        await qmp.cmd("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}},
                                           "max-connections": 1})
        reply = await qmp.cmd("block-export-add", {
            "type": "nbd", "id": "probe", "node-name": "probe", "iothread": "io0"})
        if "error" in reply:
            return f"cannot put an export in an I/O thread ({reply['error'].get('desc')})", None
        first = await asyncio.to_thread(_client, sock)
        return None, await asyncio.to_thread(_client, sock) if first is None else first

    try:
        out = await _run(exe, ("-blockdev",
                               "driver=null-co,node-name=probe,size=1048576,read-zeroes=on"),
                         steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _verdict(name, out, "its NBD server survived clients of an I/O-thread export",
                    "aborts when an NBD client of an export in an I/O thread disconnects")


def _verdict(name: str, out: _Outcome, survived: str, aborts: str) -> Verdict:
    if out.untestable is not None:
        return Verdict(False, f"{name}: {out.untestable}")
    if out.status == 0 and out.failure is None:
        return Verdict(True, f"{name}: {survived}")
    why = _why(out.stderr, out.failure or f"exit status {out.status}")
    return Verdict(False, f"{name} {aborts} ({why})")


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

