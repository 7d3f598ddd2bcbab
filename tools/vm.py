"""Throwaway QEMU VMs for tests and the demo: qcow2 disks, no guest OS.

Each VM has two QMP monitors: ``daemon_qmp`` for blockbackupd, ``test_qmp``
for the VM manager's role (the test). Guest writes are made with qemu-io on
the test monitor, as the guest would make them through the device. The QEMU
build is the one ``BB_QEMU`` selects (tools/qemu_build.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from tools.qemu_build import QemuBuild, selected

MiB = 1024 * 1024


class Monitor:
    """A minimal blocking QMP client for the test's own monitor.

    Deliberately independent of asyncio so that tests of any style can drive
    the VM while the daemon under test owns the other monitor.
    """

    RESEND_AFTER = 2.0

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        # Our own line buffer, not makefile(): a file object refuses every read
        # after one timed out, and cmd() uses a short timeout on purpose.
        self.buffer = bytearray()
        self.events: list[dict[str, Any]] = []
        self.read()  # greeting
        self.cmd("qmp_capabilities")

    def read(self) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("QEMU closed the monitor")
            self.buffer += chunk
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        return dict(json.loads(line))

    def cmd(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            try:
                reply = self.read()
            except TimeoutError:
                if self.sock.gettimeout() != self.RESEND_AFTER:
                    raise
                self.sock.settimeout(self.timeout)  # the reset dropped it: send again
                self.sock.sendall(json.dumps(msg).encode() + b"\n")
                continue
            if "QMP" in reply:
                # Seen here when connecting while QEMU is still starting: the
                # monitor resets and greets again. What we sent may be answered
                # in the new session, or may have been dropped.
                self.sock.settimeout(self.RESEND_AFTER)
                continue
            self.sock.settimeout(self.timeout)
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise RuntimeError(f"{command}: {reply['error']['desc']}")
            if "return" not in reply:
                raise RuntimeError(f"{command}: unexpected message from QEMU: {reply}")
            return reply["return"]

    def close(self) -> None:
        self.sock.close()


def _disk(qdev: str) -> str:
    """The disk's name (its device's id) from query-block's ``qdev``, which is
    the id for SCSI and IDE disks and a QOM path for virtio-blk's backend."""
    prefix = "/machine/peripheral/"
    return qdev[len(prefix):].split("/", 1)[0] if qdev.startswith(prefix) else qdev


class Vm:
    """One QEMU process with qcow2 disks attached as scsi-hd devices.

    With ``writer=True`` it is instead a ``pc`` machine booting the guest of
    tools/guest/writer.S from an IDE disk, with exactly two qcow2 disks on
    the IDE primary slave and secondary master, which that guest keeps writing.
    """

    def __init__(self, workdir: Path, name: str = "vm1",
                 disks: dict[str, int] | None = None, paused: bool = False,
                 extra_args: list[str] | None = None, writer: bool = False,
                 qemu: QemuBuild | None = None) -> None:
        self.workdir = workdir
        self.qemu = qemu or selected()
        self.name = name
        self.disks = disks if disks is not None else {"sda": 64 * MiB, "sdb": 64 * MiB}
        self.paused = paused
        self.extra_args = extra_args or []
        self.writer = writer
        if writer and len(self.disks) != 2:
            raise ValueError("the writer guest needs exactly two disks")
        self.daemon_qmp = workdir / f"{name}.qmp"
        self.test_qmp = workdir / f"{name}-test.qmp"
        self.stdout_path = workdir / f"{name}.out"
        self.proc: subprocess.Popen[bytes] | None = None
        self.monitor: Monitor | None = None

    def image(self, disk: str) -> Path:
        return self.workdir / f"{self.name}-{disk}.qcow2"

    def create_images(self) -> None:
        for disk, size in self.disks.items():
            if not self.image(disk).exists():
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                                str(self.image(disk)), str(size)], check=True)

    def common_args(self) -> list[str]:
        """The machine and the two monitors, before any disk."""
        args = [*self.qemu.command(), "-machine", "pc" if self.writer else "q35", "-nodefaults",
                "-display", "none", "-name", self.name,
                "-qmp", f"unix:{self.daemon_qmp},server=on,wait=off",
                "-qmp", f"unix:{self.test_qmp},server=on,wait=off"]
        if self.paused:
            args.append("-S")
        return args

    def command_line(self) -> list[str]:
        args = self.common_args()
        if self.writer:
            from tools.guest import build_boot_image
            boot = build_boot_image(self.workdir)
            args += ["-blockdev", f"driver=file,filename={boot},node-name=boot-file",
                     "-blockdev", "driver=raw,file=boot-file,node-name=boot",
                     "-device", "ide-hd,drive=boot,bus=ide.0,unit=0,id=boot"]
            placements = ["bus=ide.0,unit=1", "bus=ide.1,unit=0"]
        else:
            args += ["-device", "virtio-scsi-pci,id=scsi0"]
        for i, disk in enumerate(self.disks):
            args += ["-blockdev", f"driver=file,filename={self.image(disk)},node-name={disk}-file",
                     "-blockdev", f"driver=qcow2,file={disk}-file,node-name={disk}-fmt"]
            if self.writer:
                args += ["-device", f"ide-hd,drive={disk}-fmt,{placements[i]},id={disk}"]
            else:
                args += self.disk_device(disk)
        return args + self.extra_args

    def disk_device(self, disk: str) -> list[str]:
        """The -device arguments of a disk's device (subclasses choose the bus)."""
        return ["-device", f"scsi-hd,drive={disk}-fmt,id={disk}"]

    def start(self, timeout: float = 30.0) -> Vm:
        self.create_images()
        for path in (self.daemon_qmp, self.test_qmp):
            path.unlink(missing_ok=True)
        with open(self.stdout_path, "ab") as out:
            self.proc = subprocess.Popen(self.command_line(), stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.qemu.environ())
        deadline = time.monotonic() + timeout
        while not (self.daemon_qmp.exists() and self.test_qmp.exists()):
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with {self.proc.returncode}: "
                                   f"{self.stdout_path.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError("QEMU did not create its monitors")
            time.sleep(0.02)
        while True:  # the socket file appears at bind(), a moment before listen()
            try:
                self.monitor = Monitor(self.test_qmp)
                return self
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise
                time.sleep(0.02)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def qmp(self, command: str, **arguments: Any) -> Any:
        assert self.monitor is not None
        return self.monitor.cmd(command, **arguments)

    def qemu_io(self, disk: str, command: str) -> str:
        """Run a qemu-io command on a disk as a guest write/read; returns what it printed."""
        before = self.stdout_path.stat().st_size
        self.qmp("human-monitor-command", **{"command-line": f'qemu-io -d {disk} "{command}"'})
        # QEMU 7.2 prints qemu-io's output on its own stdout, not in the reply.
        with open(self.stdout_path, "rb") as f:
            f.seek(before)
            return f.read().decode(errors="replace")

    def write(self, disk: str, offset: int, length: int, pattern: int) -> None:
        out = self.qemu_io(disk, f"write -P {pattern:#x} {offset} {length}")
        if "wrote" not in out:
            raise RuntimeError(f"guest write failed on {disk}: {out}")

    def zero(self, disk: str, offset: int, length: int) -> None:
        """A guest write of zeros (WRITE ZEROES, as a discarding guest sends)."""
        out = self.qemu_io(disk, f"write -z {offset} {length}")
        if "wrote" not in out:
            raise RuntimeError(f"guest write of zeros failed on {disk}: {out}")

    def node_names(self) -> set[str]:
        return {n["node-name"] for n in self.qmp("query-named-block-nodes", flat=True)}

    def top_nodes(self) -> dict[str, str]:
        """qdev -> node at the top of each device's I/O path."""
        return {_disk(b["qdev"]): b["inserted"]["node-name"]
                for b in self.qmp("query-block") if "inserted" in b}

    def status(self) -> str:
        return str(self.qmp("query-status")["status"])

    def stop(self, timeout: float = 10.0) -> None:
        """Quit QEMU cleanly (images closed properly), killing it if it will not go."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                if self.monitor is not None:
                    self.monitor.cmd("quit")
            except (OSError, EOFError, RuntimeError, ValueError):
                pass  # QEMU may close the monitor before it answers
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._forget()

    def kill(self) -> None:
        """SIGKILL QEMU (an unclean stop: images are not closed)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # in case a test stopped it
            self.proc.kill()
            self.proc.wait()
        self._forget()

    def _forget(self) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        self.proc = None
