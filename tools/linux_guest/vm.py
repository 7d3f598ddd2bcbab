"""LinuxVm: tools/vm.py's Vm booting the Linux guest, and a guest agent client.

The disks are attached as in Vm (``<disk>-file`` and ``<disk>-fmt`` nodes, a
device with ``id=<disk>``), as virtio-blk-pci or scsi-hd, each with
``serial=<disk>`` so that the guest names its mount point after the QEMU id.
The serial console goes to ``console_path`` (QEMU writes it unbuffered, so it
can be read while the guest runs); the guest agent's channel is a UNIX socket
at ``agent_socket``, which accepts one client at a time (close_agent() before
another program, e.g. the daemon, connects to it).
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from tools.linux_guest.accel import Accelerator, accelerator
from tools.linux_guest.build import GuestImage, build
from tools.vm import MiB, Vm

BUSES = ("virtio", "scsi")
DISK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,19}\Z")  # virtio-blk serials: 20 bytes
PARAM_KEY = re.compile(r"[a-z0-9_]+\Z")
#: Console lines that say a guest write (or anything else) failed.
ERROR_LINE = re.compile(r"^BB-ERROR.*$|^.*I/O error.*$|^.*EXT4-fs error.*$", re.M)


def read_console(path: Path, start: int = 0) -> str:
    """A serial console file's text from offset ``start`` (the tty's CR LF as LF)."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            return f.read().decode(errors="replace").replace("\r\n", "\n")
    except FileNotFoundError:
        return ""


def last_step(console: str) -> int:
    """The crash workload's last reported step in console text (0 before the first)."""
    found = re.findall(r"^BB-STEP (\d+)$", console, re.M)
    return int(found[-1]) if found else 0


#: A "script" workload that writes and syncs 4 MiB to the first disk over
#: and over, counting its rounds on the console (see :func:`write_rounds`).
WRITE_ROUNDS = """
n=0
while ! stopping; do
    dd if=/dev/urandom of=/mnt/vda/f bs=64k count=64 conv=fsync 2>/dev/null || err "write"
    n=$((n + 1))
    say "BB-ROUND $n"
done
"""


def write_rounds(console: str) -> int:
    """The WRITE_ROUNDS workload's last finished round in console text (0 before the first)."""
    found = re.findall(r"^BB-ROUND (\d+)$", console, re.M)
    return int(found[-1]) if found else 0


def console_errors(console: str) -> list[str]:
    """BB-ERROR lines and the kernel's I/O error lines of console text."""
    return ERROR_LINE.findall(console)


class GuestAgentError(RuntimeError):
    """The guest agent answered with an error."""


class GuestAgent:
    """A minimal blocking client of qemu-ga on its virtio-serial channel.

    Every command is preceded by guest-sync-delimited: a 0xFF byte resets the
    agent's JSON parser, and the agent puts 0xFF before its answer, so stale
    answers (to a client that went away, or sent before the agent ran) are
    skipped up to the answer carrying our id.
    """

    _ids = itertools.count(int(time.time() * 1000) % 1_000_000_000)

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.buffer = bytearray()

    def _recv(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"guest agent at {self.path}: no answer")
        self.sock.settimeout(remaining)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("QEMU closed the guest agent channel")
        self.buffer += chunk

    def _line(self, deadline: float) -> dict[str, Any]:
        while b"\n" not in self.buffer:
            self._recv(deadline)
        line, _, rest = bytes(self.buffer).partition(b"\n")
        self.buffer = bytearray(rest)
        return dict(json.loads(line))

    def sync(self, timeout: float | None = None, attempt: float = 3.0) -> None:
        """Wait until the agent answers (it may still be starting)."""
        deadline = time.monotonic() + (timeout if timeout is not None else self.timeout)
        while True:
            sync_id = next(self._ids)
            msg = {"execute": "guest-sync-delimited", "arguments": {"id": sync_id}}
            self.sock.sendall(b"\xff" + json.dumps(msg).encode() + b"\n")
            attempt_end = min(deadline, time.monotonic() + attempt)
            try:
                while True:
                    while 0xFF not in self.buffer:
                        self._recv(attempt_end)
                    del self.buffer[:self.buffer.index(0xFF) + 1]
                    reply = self._line(attempt_end)
                    if reply.get("return") == sync_id:
                        return
            except (TimeoutError, ValueError):
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"guest agent at {self.path} did not answer") from None

    def send(self, command: str, **arguments: Any) -> None:
        """Send a command that has no answer (guest-shutdown)."""
        self.sync()
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def cmd(self, command: str, timeout: float | None = None, **arguments: Any) -> Any:
        self.send(command, **arguments)
        reply = self._line(time.monotonic() + (timeout or self.timeout))
        if "error" in reply:
            raise GuestAgentError(f"{command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def close(self) -> None:
        self.sock.close()


class LinuxVm(Vm):
    """A QEMU booting the Linux guest (tools/linux_guest) on its qcow2 disks.

    ``disks``: id -> size, as in Vm (default vda 64 MiB on virtio-blk and sdb
    64 MiB on SCSI); ``buses``: id -> "virtio" or "scsi" (default: virtio for
    ids starting with "vd", else scsi). ``workload`` and ``params`` become
    ``bb.workload=`` and ``bb.<key>=<value>`` on the kernel command line;
    ``script`` (shell text) is handed to the guest through fw_cfg and run by
    the "script" workload (the default when a script is given).
    """

    def __init__(self, workdir: Path, name: str = "vm1",
                 disks: dict[str, int] | None = None,
                 buses: dict[str, str] | None = None,
                 workload: str | None = None,
                 params: dict[str, str | int | float] | None = None,
                 agent: bool = True, memory: int = 256, script: str | None = None,
                 paused: bool = False, extra_args: list[str] | None = None,
                 accel: Accelerator | None = None, image: GuestImage | None = None,
                 loglevel: int = 5, iothread: bool = False) -> None:
        super().__init__(workdir, name,
                         disks if disks is not None else {"vda": 64 * MiB, "sdb": 64 * MiB},
                         paused=paused, extra_args=extra_args)
        buses = buses or {}
        self.buses = {d: buses.get(d) or ("virtio" if d.startswith("vd") else "scsi")
                      for d in self.disks}
        for disk, bus in self.buses.items():
            if not DISK_ID.match(disk):
                raise ValueError(f"disk id {disk!r}: letters, digits, - and _, 20 at most")
            if bus not in BUSES:
                raise ValueError(f"disk {disk}: bus {bus!r} is not one of {BUSES}")
        self.workload = workload or ("script" if script is not None else "idle")
        self.params = dict(params or {})
        for key, value in self.params.items():
            if not PARAM_KEY.match(key) or not re.fullmatch(r"[^\s\"']+", str(value)):
                raise ValueError(f"guest parameter {key}={value!r}: no spaces or quotes")
        self.agent_enabled = agent
        self.memory = memory
        self.script = script
        self.accel = accel
        self.guest_image = image
        self.loglevel = loglevel
        #: virtio-blk disks in an I/O thread of their own (libvirt's
        #: ``<driver iothread='N'/>``): their requests run there, not in the main loop.
        self.iothread = iothread
        self.console_path = workdir / f"{name}.console"
        self.agent_socket = workdir / f"{name}.qga"
        self.script_path = workdir / f"{name}.script.sh"
        self.console_start = 0      # offset of this boot's output in console_path
        self.started_at: float | None = None
        self._agent: GuestAgent | None = None

    # ------------------------------------------------------------ QEMU side

    def disk_device(self, disk: str) -> list[str]:
        if self.buses[disk] == "scsi":
            return ["-device", f"scsi-hd,drive={disk}-fmt,id={disk},serial={disk}"]
        device = f"virtio-blk-pci,drive={disk}-fmt,id={disk},serial={disk}"
        if not self.iothread:
            return ["-device", device]
        return ["-object", f"iothread,id=io-{disk}", "-device", f"{device},iothread=io-{disk}"]

    def kernel_command_line(self) -> str:
        params: dict[str, str | int | float] = {"workload": self.workload,
                                                "disks": ",".join(self.disks)}
        if self.agent_enabled:
            params["agent"] = 1
        params.update(self.params)
        return " ".join([f"console=ttyS0 loglevel={self.loglevel} panic=-1",
                         *(f"bb.{k}={v}" for k, v in params.items())])

    def command_line(self) -> list[str]:
        image = self.guest_image = self.guest_image or build()
        accel = self.accel = self.accel or accelerator(image)
        args = super().command_line() + list(accel.args) + [
            "-m", str(self.memory), "-no-reboot",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd),
            "-append", self.kernel_command_line(),
            "-chardev", f"file,id=console0,path={self.console_path},append=on",
            "-serial", "chardev:console0"]
        if self.agent_enabled:
            args += ["-device", "virtio-serial-pci,id=vserial0",
                     "-chardev", f"socket,path={self.agent_socket},server=on,wait=off,id=qga0",
                     "-device", "virtserialport,bus=vserial0.0,chardev=qga0,"
                                "name=org.qemu.guest_agent.0"]
        if self.script is not None:
            self.script_path.write_text(self.script)
            args += ["-fw_cfg", f"name=opt/bb/script,file={self.script_path}"]
        return args

    def start(self, timeout: float = 30.0) -> LinuxVm:
        self.console_start = self.console_path.stat().st_size if self.console_path.exists() else 0
        self.agent_socket.unlink(missing_ok=True)
        self.guest_image = self.guest_image or build()  # not timed as boot
        self.accel = self.accel or accelerator(self.guest_image)
        self.started_at = time.monotonic()
        super().start(timeout)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Quit QEMU at once (the guest's filesystems are not unmounted)."""
        self.close_agent()
        super().stop(timeout)

    def kill(self) -> None:
        self.close_agent()
        super().kill()

    def wait_exit(self, timeout: float) -> int:
        """Wait for QEMU to exit by itself; its exit status."""
        if self.proc is None:
            raise RuntimeError("QEMU is not running")
        return self.proc.wait(timeout)

    def shutdown(self, timeout: float = 60.0, via: str = "acpi") -> None:
        """Clean guest shutdown (workload stopped, filesystems thawed, synced and
        unmounted, then poweroff), then QEMU's exit.

        ``via="acpi"``: QMP system_powerdown (the guest watches its power button);
        ``via="agent"``: the guest agent's guest-shutdown (after a thaw if the
        agent has the filesystems frozen). Raises if the guest
        did not get to BB-POWEROFF in time (QEMU is killed then) or reported an
        unmount failure.
        """
        if not self.running:
            self._forget()
            return
        if via == "agent":
            # A frozen agent refuses guest-shutdown (the answer would be its
            # only one): thaw first, as the guest's own shutdown would.
            if self.agent("guest-fsfreeze-status") == "frozen":
                self.agent("guest-fsfreeze-thaw")
            self.agent_client().send("guest-shutdown")
        elif via == "acpi":
            self.qmp("system_powerdown")
        else:
            raise ValueError(f"shutdown via {via!r}: 'acpi' or 'agent'")
        try:
            self.wait_exit(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise TimeoutError(f"the guest did not power off in {timeout} s:\n"
                               f"{self.console()[-3000:]}") from None
        self.stop()
        text = self.console()
        if "BB-POWEROFF" not in text or re.search(r"^BB-ERROR umount", text, re.M):
            raise RuntimeError(f"the guest did not shut down cleanly:\n{text[-3000:]}")

    # -------------------------------------------------------------- console

    def console(self) -> str:
        """The serial console's text since this boot's start."""
        return read_console(self.console_path, self.console_start)

    def wait_console(self, pattern: str | re.Pattern[str], timeout: float = 60.0,
                     start: int = 0) -> re.Match[str]:
        """The first match of pattern (a regular expression, multiline: ``^``
        is a line start) in this boot's console text from offset ``start``."""
        regex = re.compile(pattern, re.M) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            text = self.console()
            m = regex.search(text, start)
            if m:
                return m
            if not self.running:
                raise RuntimeError(f"QEMU exited before {regex.pattern!r} appeared on the "
                                   f"console:\n{text[-3000:]}\n{self.qemu_output()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{regex.pattern!r} not on the console after {timeout} s:"
                                   f"\n{text[-3000:]}")
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Wait for BB-READY (disks mounted, agent serving); seconds since start().

        Raises if the guest reported an error (BB-ERROR) or panicked first.
        """
        m = self.wait_console(r"^BB-READY|^BB-ERROR.*|Kernel panic.*", timeout)
        if not m.group(0).startswith("BB-READY"):
            raise RuntimeError(f"guest failed: {m.group(0)}\n{self.console()[-3000:]}")
        assert self.started_at is not None
        return time.monotonic() - self.started_at

    def qemu_output(self) -> str:
        """What QEMU printed (its errors) during this boot, tail."""
        try:
            return self.stdout_path.read_text(errors="replace")[-2000:]
        except FileNotFoundError:
            return ""

    def markers(self, name: str) -> list[str]:
        """The text after ``BB-<name> `` of each such console line."""
        return re.findall(rf"^BB-{name}(?: (.*))?$", self.console(), re.M)

    def steps(self) -> int:
        """The crash workload's last reported step (0 before the first)."""
        return last_step(self.console())

    def errors(self) -> list[str]:
        """BB-ERROR lines and the kernel's I/O error lines."""
        return console_errors(self.console())

    def results(self) -> list[dict[str, str]]:
        """The BB-RESULT lines, as {"kind": "write", key: value...}."""
        out = []
        for line in self.markers("RESULT"):
            kind, *pairs = line.split()
            out.append({"kind": kind, **dict(p.split("=", 1) for p in pairs if "=" in p)})
        return out

    def guest_disks(self) -> dict[str, dict[str, str]]:
        """id -> {"dev": "/dev/vda", "mnt": "/mnt/vda", "formatted": "1"} from BB-DISK."""
        out = {}
        for line in self.markers("DISK"):
            fields = dict(p.split("=", 1) for p in line.split() if "=" in p)
            if "raw" in line.split():
                fields["raw"] = "1"
            out[fields.pop("id")] = fields
        return out

    # ---------------------------------------------------------------- agent

    def agent_client(self) -> GuestAgent:
        if not self.agent_enabled:
            raise RuntimeError(f"{self.name} has no guest agent (agent=False)")
        if self._agent is None:
            self._agent = GuestAgent(self.agent_socket)
        return self._agent

    def agent(self, command: str, timeout: float | None = None, **arguments: Any) -> Any:
        """Run a guest agent command (guest-sync-delimited first); its return value."""
        try:
            return self.agent_client().cmd(command, timeout=timeout, **arguments)
        except (OSError, EOFError, TimeoutError):
            self.close_agent()  # a half-read answer must not confuse the next command
            raise

    def close_agent(self) -> None:
        if self._agent is not None:
            self._agent.close()
            self._agent = None

    def guest_exec(self, script: str, timeout: float = 60.0
                   ) -> subprocess.CompletedProcess[bytes]:
        """Run a shell script in the guest through the agent (guest-exec)."""
        pid = self.agent("guest-exec", path="/bin/sh", arg=["-c", script],
                         **{"capture-output": True})["pid"]
        deadline = time.monotonic() + timeout
        while True:
            status = self.agent("guest-exec-status", pid=pid)
            if status["exited"]:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"guest-exec of {script!r} still running after {timeout} s")
            time.sleep(0.05)
        return subprocess.CompletedProcess(
            ["/bin/sh", "-c", script], status.get("exitcode", -status.get("signal", 0)),
            base64.b64decode(status.get("out-data", "")),
            base64.b64decode(status.get("err-data", "")))
