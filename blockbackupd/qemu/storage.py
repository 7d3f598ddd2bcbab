"""A storage process of the daemon's own: a stopped domain's images, served by
``qemu-storage-daemon`` the way the domain's QEMU would serve them.

When a domain's QEMU is not running, its images still carry its checkpoints'
bitmaps, and nothing writes to them: a point-in-time view of them is the
images themselves. The daemon then opens them in a ``qemu-storage-daemon``
(the block layer of QEMU without a guest) and reaches it over QMP like any
domain, so snapshots, checkpoints and exports run the very same commands
they run against a VM's QEMU.

Only what a VM's QEMU has and a storage daemon lacks is answered here, by
:class:`StorageSession`: the run state (``shutdown``: no guest), no
migration, no I/O threads, and the disks' devices. For each disk a stand-in
device whose ``drive`` is the node at the top of its I/O path, so the
services find the disk by name (``query-block``) and move it onto a filter
(``qom-set``) as they would a VM's; nothing reads or writes through it.

The process holds the images open read-write with QEMU's image locks, so a
VM manager that starts the domain meanwhile gets QEMU's own lock error, and
is stopped with ``quit``, which writes the bitmaps back into the images (a
killed one would leave them marked in use, and every checkpoint broken).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qemu.qmp import ExecuteError, QMPClient

from ..errors import OperationFailed, Unsupported
from .graph import _PERIPHERAL
from .session import DomainSession

log = logging.getLogger("blockbackupd.storage")

#: The run state a storage process reports: no guest runs on its images.
RUN_STATE = "shutdown"
#: Seconds a storage process gets to write its bitmaps back and exit on ``quit``.
QUIT_TIMEOUT = 30.0
#: Seconds a storage process gets to open its QMP socket.
START_TIMEOUT = 10.0


@dataclass(frozen=True)
class DiskImages:
    """One disk of a stopped domain: its images, top first, as its QEMU had them."""

    disk: str
    size: int
    #: (file, format) per image, top first.
    chain: tuple[tuple[str, str], ...]
    #: The last image's backing files are those its header names (images
    #: named in a definition), not none (a chain as QEMU showed it).
    follow_backing: bool = False

    @classmethod
    def from_record(cls, disk: str, record: Mapping[str, Any]) -> DiskImages:
        return cls(disk, int(record.get("size", 0)),
                   tuple((str(i["file"]), str(i["format"])) for i in record["chain"]))

    def as_record(self) -> dict[str, Any]:
        return {"size": self.size,
                "chain": [{"file": f, "format": fmt} for f, fmt in self.chain]}


def offline_problem(chain: tuple[tuple[str, str], ...], encrypted: bool) -> str | None:
    """Why a disk with these images cannot be opened without its VM, or None."""
    if encrypted:
        return "it is encrypted, and its key is the VM manager's"
    for file, fmt in chain:
        if not file.startswith("/"):
            return f"image {file[:120]} is not a local file or block device"
        if fmt not in ("qcow2", "raw"):
            return f"image {file} is {fmt}, not qcow2 or raw"
    return None


class _StorageClient(QMPClient):
    """A QMP client to a storage process that also answers, itself, the
    questions only a VM's QEMU can (see the module's text)."""

    def __init__(self, name: str, devices: dict[str, str]) -> None:
        super().__init__(name)
        self._devices = devices

    async def execute(self, cmd: str, arguments: Mapping[str, object] | None = None,
                      oob: bool = False) -> object:
        args = dict(arguments or {})
        if cmd == "query-status":
            return {"status": RUN_STATE, "running": False}
        if cmd == "query-migrate":
            return {}
        if cmd in ("query-iothreads", "query-fdsets"):
            return []
        if cmd == "query-block":
            return [{"device": "", "qdev": disk, "type": "stand-in", "removable": False,
                     "locked": False, "inserted": {"node-name": node, "ro": False}}
                    for disk, node in self._devices.items()]
        path = str(args.get("path", ""))
        if cmd == "qom-set" and path.startswith(_PERIPHERAL) and args.get("property") == "drive":
            disk = path[len(_PERIPHERAL):]
            node = str(args.get("value", ""))
            if disk not in self._devices:
                raise OperationFailed(f"no disk {disk!r} in the storage process")
            names = {n["node-name"] for n in await super().execute(  # type: ignore[attr-defined]
                "query-named-block-nodes", {"flat": True})}
            if node not in names:
                raise OperationFailed(f"no node {node!r} in the storage process")
            self._devices[disk] = node
            return {}
        if cmd == "qom-list" and path == "/objects":
            try:
                return await super().execute(cmd, arguments, oob=oob)
            except ExecuteError:  # 7.2's storage daemon has no /objects until one is added
                return []
        return await super().execute(cmd, arguments, oob=oob)


class StorageSession(DomainSession):
    """The QMP session to a storage process (see :class:`_StorageClient`)."""

    offline = True

    def __init__(self, domain: str, qmp_socket: str, devices: dict[str, str],
                 **kwargs: Any) -> None:
        super().__init__(domain, qmp_socket, **kwargs)
        #: disk -> the node at the top of its I/O path (the stand-in device's drive).
        self.devices = devices

    def _new_client(self) -> QMPClient:
        return _StorageClient(self.domain, self.devices)


def binary_for(qemu: str | None, configured: str) -> str:
    """The storage daemon to run: the configured one, else the one of the
    domain's own QEMU build (next to its binary), else the one on PATH.

    :raise Unsupported: none is installed.
    """
    candidates = [configured] if configured else []
    if qemu:
        candidates.append(str(Path(qemu).with_name("qemu-storage-daemon")))
    candidates.append("qemu-storage-daemon")
    for candidate in candidates:
        found = shutil.which(candidate)
        if found:
            return found
    raise Unsupported("qemu-storage-daemon is not installed (Debian: qemu-utils); a stopped "
                      "domain's disks are served through it")


async def spawn(binary: str, qmp_socket: Path) -> asyncio.subprocess.Process:
    """Start a storage process with a QMP monitor on ``qmp_socket`` and wait
    until the socket answers.

    :raise OperationFailed: it did not start, or its socket did not appear.
    """
    qmp_socket.unlink(missing_ok=True)
    try:
        proc = await asyncio.create_subprocess_exec(
            binary, "--chardev", f"socket,id=bb-qmp,path={qmp_socket},server=on,wait=off",
            "--monitor", "chardev=bb-qmp",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            # Its own session: a ^C meant for a foreground daemon reaches the
            # daemon, which then quits it cleanly (bitmaps written back).
            start_new_session=True)
    except OSError as err:
        raise OperationFailed(f"cannot start {binary}: {err}") from err
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.returncode is not None or time.monotonic() > deadline:
            err_text = b""
            if proc.returncode is None:
                proc.kill()
            if proc.stderr is not None:
                with contextlib.suppress(Exception):
                    err_text = await asyncio.wait_for(proc.stderr.read(4096), 2)
            await proc.wait()
            raise OperationFailed(f"{binary} did not start: "
                                  f"{err_text.decode(errors='replace').strip() or 'no socket'}")
        if _answers(qmp_socket):
            task = asyncio.create_task(_log_stderr(proc), name=f"storage-{proc.pid}-stderr")
            _readers.add(task)
            task.add_done_callback(_readers.discard)
            return proc
        await asyncio.sleep(0.01)


_readers: set[asyncio.Task[None]] = set()


async def _log_stderr(proc: asyncio.subprocess.Process) -> None:
    """What a storage process says goes to the daemon's log (and the pipe
    never fills up)."""
    assert proc.stderr is not None
    while line := await proc.stderr.readline():
        log.warning("storage process %d: %s", proc.pid, line.decode(errors="replace").rstrip())


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def node_name(disk: str, index: int) -> str:
    """The node of image ``index`` (0: the top) of a disk. Not under the
    daemon's prefix: these nodes are the disk's, not leftovers of a snapshot."""
    return f"disk-{disk}-{index}"


async def open_disk(session: DomainSession, images: DiskImages) -> str:
    """Open a disk's images in the storage process, bottom first, each on the
    one below as its backing: the top read-write (checkpoints add and disable
    bitmaps in it), the others read-only, as the VM had them. Returns the top node.

    :raise OperationFailed: QEMU refused (its text: e.g. the image lock of a
        running VM); what was opened of this disk is closed again.
    """
    opened: list[str] = []
    try:
        below: str | None = None
        for index in reversed(range(len(images.chain))):
            file, fmt = images.chain[index]
            name = node_name(images.disk, index)
            try:
                block = stat.S_ISBLK(os.stat(file).st_mode)
            except OSError as err:
                raise OperationFailed(f"disk {images.disk}: image {file}: "
                                      f"{err.strerror}") from err
            args: dict[str, Any] = {
                "driver": fmt, "node-name": name, "read-only": index > 0,
                "file": {"driver": "host_device" if block else "file", "filename": file,
                         "node-name": f"{name}-file"}}
            if fmt == "qcow2" and not (below is None and images.follow_backing):
                args["backing"] = below
            await session.execute("blockdev-add", args)
            opened.append(name)
            below = name
    except BaseException:
        for name in reversed(opened):
            with contextlib.suppress(Exception):
                await session.execute("blockdev-del", {"node-name": name})
        raise
    assert below is not None
    return below


async def quit_process(proc: asyncio.subprocess.Process, session: DomainSession | None) -> None:
    """Stop a storage process: ``quit`` (images closed, bitmaps written
    back), then SIGTERM, then SIGKILL, each after a wait."""
    if proc.returncode is None and session is not None:
        with contextlib.suppress(Exception):
            await session.execute("quit")
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait(), QUIT_TIMEOUT if sig is None else 5.0)
            return
        except TimeoutError:
            log.warning("storage process %d did not exit; sending %s", proc.pid,
                        "SIGTERM" if sig is None else "SIGKILL")


def stop_leftover(payload: Mapping[str, Any]) -> bool:
    """Stop the storage process a killed daemon left (its store record's
    ``socket`` and ``pid``): ``quit`` over its QMP socket, then signals, but
    only to a process that is a storage daemon on that socket. Returns
    whether one was running. Blocking: run it in a thread."""
    path = str(payload.get("socket", ""))
    pid = payload.get("pid")
    alive = isinstance(pid, int) and _is_ours(pid, path)
    if path and _quit_over(path) and not isinstance(pid, int):
        alive = True
    if isinstance(pid, int) and alive:
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + (QUIT_TIMEOUT if sig is None else 5.0)
            while time.monotonic() < deadline and _is_ours(pid, path):
                time.sleep(0.02)
            if not _is_ours(pid, path):
                break
    with contextlib.suppress(OSError):
        if path and stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    return alive


def _is_ours(pid: int, socket_path: str) -> bool:
    """A live (not zombie) storage daemon serving ``socket_path``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z" and b"qemu-storage-daemon" in cmdline and \
        f"path={socket_path},".encode() in cmdline


def _quit_over(path: str) -> bool:
    """Send ``quit`` on a QMP socket; whether something answered."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5.0)
            sock.connect(path)
            stream = sock.makefile("rw")
            stream.readline()  # greeting
            for command in ("qmp_capabilities", "quit"):
                stream.write(json.dumps({"execute": command}) + "\n")
                stream.flush()
                stream.readline()
    except (OSError, ValueError):
        return False
    return True
