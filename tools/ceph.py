"""A real, tiny Ceph cluster for tests: one monitor, one RAM-backed OSD, a pool ``rbd``.

The tests of RBD disks need what Proxmox and libvirt VMs really use: QEMU's
rbd driver talking to librbd talking to a cluster. A :class:`Cluster` owns all
of it under one folder: its ceph.conf (passed with ``-c`` to every command
and as ``conf=`` to QEMU, so the system's /etc/ceph is never read), the mon
and OSD data, run dir, admin sockets, pid files and logs. It starts in a few
seconds and leaves nothing behind: :meth:`Cluster.stop` stops the daemons by
the PIDs they wrote (never by name: another cluster, or a real one, may run on
the same machine) and removes the folder.

The shape, from /work/shared/design/qemu-recipes.md: auth off (``keyring =
/dev/null``), no manager (pools, ``rbd`` and librbd I/O work without one; the
mgr-backed commands such as ``ceph osd pool stats`` hang), a ``memstore`` OSD
(memstore asserts in mkfs if its data folder is missing, so we make it), and
a pool of size 1 whose PGs may sit on one host (``osd crush chooseleaf type = 0``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

MiB = 1024 * 1024
GiB = 1024 * MiB
POOL = "rbd"

# Order of stopping: the OSD first, while the monitor can still hear its
# goodbye; the other way round the OSD waits for a monitor that is gone.
DAEMONS = ("osd.0", "mon.a")


# Ceph 16's monitor client can send its first command before it has the
# monitor's map, with a zero fsid; the monitor refuses it ("wrong fsid",
# EPERM; the ceph CLI says "problem getting command descriptions"). It happens
# to one command in a few dozen. With auth off nothing else is refused with
# EPERM here, and a refused command did nothing: run it again.
FSID_RACE_RETRIES = 5


class CephError(RuntimeError):
    pass


def _fsid_race(output: str) -> bool:
    return any(s in output for s in ("wrong fsid", "problem getting command descriptions",
                                     "Operation not permitted", "EPERM"))


def _free_port() -> int:
    """A TCP port nobody listens on right now (the monitor may still lose a race
    for it: start() retries on another one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _alive(pid: int) -> bool:
    """Whether pid runs (a zombie does not: the daemons are not our children,
    and whoever reaps orphans here may be slow to, or never, reap them)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class Cluster:
    """One monitor (``mon.a`` on 127.0.0.1, a free port) and one memstore OSD
    (``osd.0``) under a folder of their own, created in ``parent`` (default:
    the system's temporary directory) by :meth:`start` and removed by :meth:`stop`.
    """

    def __init__(self, parent: Path | None = None, osd_bytes: int = GiB,
                 timeout: float = 60.0) -> None:
        self.parent = parent
        self.osd_bytes = osd_bytes
        self.timeout = timeout          # for each command and each daemon's stop
        self.dir: Path | None = None
        self.port: int | None = None
        self.fsid = str(uuid.uuid4())
        #: daemon name ("mon.a", "osd.0") -> PID, as it wrote it to its pid file.
        self.pids: dict[str, int] = {}
        #: Seconds the last start() took, from nothing to a usable pool; and stop().
        self.start_seconds: float | None = None
        self.stop_seconds: float | None = None

    # ---------------------------------------------------------------- paths

    def _folder(self) -> Path:
        if self.dir is None:
            raise CephError("the cluster is not started")
        return self.dir

    @property
    def conf(self) -> Path:
        """The cluster's ceph.conf: give it to anything that talks to the cluster."""
        return self._folder() / "ceph.conf"

    def pid_file(self, daemon: str) -> Path:
        return self._folder() / "run" / f"{daemon}.pid"

    def log_file(self, daemon: str) -> Path:
        return self._folder() / "log" / f"{daemon}.log"

    # ---------------------------------------------------------------- start, stop

    def start(self, attempts: int = 5) -> Cluster:
        """Create the folder and the cluster, return once pool ``rbd`` takes images."""
        if self.dir is not None:
            raise CephError(f"already started in {self.dir}")
        began = time.monotonic()
        try:
            for attempt in range(attempts):
                self.dir = Path(tempfile.mkdtemp(prefix="bb-ceph-", dir=self.parent))
                self.port = _free_port()
                self._write_conf()
                if self._start_monitor():
                    break
                # Someone took the port between _free_port() and the bind: again.
                shutil.rmtree(self.dir)
                self.dir = None
                if attempt == attempts - 1:
                    raise CephError(f"the monitor found no free port in {attempts} tries")
            self._start_osd()
            self.run("ceph", "osd", "pool", "create", POOL, "8")
            self.run("rbd", "pool", "init", POOL)
            self._wait_usable()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - began
        return self

    def _write_conf(self) -> None:
        d = self._folder()
        for sub in ("run", "log", "mon", "osd"):
            (d / sub).mkdir()
        # $name expands to mon.a, osd.0, client.admin. Admin sockets for the
        # daemons only: clients (the CLI, every QEMU) would fight over one path.
        self.conf.write_text(f"""\
[global]
fsid = {self.fsid}
mon host = v1:127.0.0.1:{self.port}
auth cluster required = none
auth service required = none
auth client required = none
keyring = /dev/null
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
osd crush chooseleaf type = 0
osd objectstore = memstore
# The OSD's first mon commands at boot (set its device class, place it in the
# CRUSH map) can race its monitor client's first monmap and go out with a
# zero fsid: the monitor answers "wrong fsid" and the OSD exits, one start in
# four here. We place it in the map ourselves (_start_osd) instead.
osd class update on start = false
osd crush update on start = false
# The monitor batches map changes for a second by default: each OSD boot,
# pool and PG creation would wait for it. A test cluster has nothing to batch.
paxos propose interval = 0.05
memstore device bytes = {self.osd_bytes}
run dir = {d}/run
pid file = {d}/run/$name.pid
log file = {d}/log/$name.log
mon data = {d}/mon/$name
osd data = {d}/osd/$name

[mon]
admin socket = {d}/run/$name.asok

[osd]
admin socket = {d}/run/$name.asok
# Loopback only, like the monitor (by default the OSD listens on every address).
public addr = 127.0.0.1
cluster addr = 127.0.0.1
""")

    def _start_monitor(self) -> bool:
        """Make and start mon.a; False if its port was taken meanwhile."""
        d = self._folder()
        monmap = d / "monmap"
        self._command(["monmaptool", "--create", "--fsid", self.fsid,
                       "--addv", "a", f"[v1:127.0.0.1:{self.port}]", str(monmap)])
        self._command(["ceph-mon", "-c", str(self.conf), "--mkfs", "-i", "a",
                       "--monmap", str(monmap)])
        proc = self._command(["ceph-mon", "-c", str(self.conf), "-i", "a"], check=False)
        if proc.returncode != 0:
            if "Address already in use" in proc.stderr + proc.stdout:
                return False
            raise CephError(f"ceph-mon failed ({proc.returncode}): {proc.stderr}")
        self._record_pid("mon.a")
        return True

    def _start_osd(self) -> None:
        osd_id = self.run("ceph", "osd", "create").strip()
        if osd_id != "0":
            raise CephError(f"ceph osd create gave id {osd_id!r}, expected 0")
        self.run("ceph", "osd", "crush", "add", "osd.0", "1.0", "root=default")
        (self._folder() / "osd" / "osd.0").mkdir()
        self._command(["ceph-osd", "-c", str(self.conf), "-i", "0", "--mkfs"])
        self._command(["ceph-osd", "-c", str(self.conf), "-i", "0"])
        self._record_pid("osd.0")

    def _record_pid(self, daemon: str) -> None:
        # The daemon's parent returns once the child is ready; the pid file is
        # written by then, but a moment's grace costs nothing.
        path = self.pid_file(daemon)
        deadline = time.monotonic() + 5
        while True:
            try:
                text = path.read_text().strip()
                if text:
                    self.pids[daemon] = int(text)
                    return
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise CephError(f"{daemon} wrote no pid file {path}")
            time.sleep(0.01)

    def _wait_usable(self) -> None:
        """Until a probe image can be created and removed: the PGs are active."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                self.run("rbd", "create", "--size", "1M", f"{POOL}/bb-probe")
                self.run("rbd", "rm", "--no-progress", f"{POOL}/bb-probe")
                return
            except CephError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        """Stop the daemons (SIGTERM, then SIGKILL after the timeout) and remove the
        folder. Idempotent, and safe after a failed or partial start()."""
        began = time.monotonic()
        if self.dir is not None:
            # PIDs we recorded, and any pid file a daemon wrote before start()
            # failed: all of them are ours (they are in our folder).
            for daemon in DAEMONS:
                pid = self.pids.get(daemon)
                if pid is None:
                    try:
                        pid = int(self.pid_file(daemon).read_text().strip())
                    except (OSError, ValueError):
                        continue
                    self.pids[daemon] = pid
                self._stop_pid(pid)
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
            self.stop_seconds = time.monotonic() - began

    def _stop_pid(self, pid: int) -> None:
        if not self._ours(pid):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + self.timeout
        while _alive(pid):
            if time.monotonic() > deadline:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    return
                deadline = time.monotonic() + self.timeout
            time.sleep(0.01)

    def _ours(self, pid: int) -> bool:
        """pid still runs with our ceph.conf on its command line (not a reused PID)."""
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return _alive(pid) and str(self.conf).encode() in argv

    def running(self) -> dict[str, int]:
        """The daemons whose PIDs still run (for tests of stop())."""
        return {d: p for d, p in self.pids.items() if _alive(p)}

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # ---------------------------------------------------------------- commands

    def _command(self, args: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        # CEPH_ARGS would add options to every command; this cluster has only its conf.
        env = {k: v for k, v in os.environ.items() if k not in ("CEPH_ARGS", "CEPH_CONF")}
        for attempt in range(FSID_RACE_RETRIES + 1):
            try:
                proc = subprocess.run(args, capture_output=True, text=True, env=env,
                                      stdin=subprocess.DEVNULL, timeout=self.timeout)
            except subprocess.TimeoutExpired:
                raise CephError(f"{' '.join(args)}: no answer in {self.timeout} s") from None
            if proc.returncode == 0 or not _fsid_race(proc.stdout + proc.stderr):
                break
            time.sleep(0.05 * (attempt + 1))
        if check and proc.returncode != 0:
            raise CephError(f"{' '.join(args)} failed ({proc.returncode}):\n"
                            f"{proc.stdout}{proc.stderr}")
        return proc

    def run(self, *args: str) -> str:
        """Run a ceph/rbd command (``run("rbd", "ls")``) on this cluster; its stdout."""
        if not args:
            raise ValueError("run() needs a command")
        return str(self._command([args[0], "-c", str(self.conf), *args[1:]]).stdout)

    def create_image(self, name: str, size: int) -> None:
        """A new image of size bytes in pool rbd."""
        self.run("rbd", "create", "--size", f"{size}B", f"{POOL}/{name}")

    def images(self) -> list[str]:
        """The images of pool rbd."""
        return list(json.loads(self.run("rbd", "ls", "--format", "json", POOL)))

    def remove_image(self, name: str) -> None:
        """Remove the image and its snapshots."""
        self.run("rbd", "snap", "purge", "--no-progress", f"{POOL}/{name}")
        self.run("rbd", "rm", "--no-progress", f"{POOL}/{name}")

    def snapshots(self, image: str) -> list[dict[str, Any]]:
        """``rbd snap ls --format json``: [{"id", "name", "size", "protected", "timestamp"}]."""
        return list(json.loads(self.run("rbd", "snap", "ls", "--format", "json",
                                        f"{POOL}/{image}")))

    def qemu_uri(self, image: str) -> str:
        """The image as qemu-img and -drive file= take it: ``rbd:rbd/IMAGE:conf=CONF``."""
        conf = str(self.conf)
        if ":" in conf or "," in conf:
            raise CephError(f"{conf}: ':' and ',' cannot appear in an rbd: URI")
        return f"rbd:{POOL}/{image}:conf={conf}"

    def blockdev(self, image: str, node_name: str) -> dict[str, Any]:
        """The -blockdev/blockdev-add arguments of the image's rbd node (libvirt's shape)."""
        return {"driver": "rbd", "pool": POOL, "image": image, "conf": str(self.conf),
                "node-name": node_name}
