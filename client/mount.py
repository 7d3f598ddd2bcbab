"""File-level restore: ``bbctl mount`` and ``bbctl umount``.

``mount(DIR, DISK, AT, MOUNTPOINT)`` makes the guest filesystems of one backup
point readable under MOUNTPOINT, read-only, each in a directory of its own:

* ``<disk><N>`` for partition N of the disk (``sda1``, ``vdb2``; ``<disk>p<N>``
  when the disk's name ends in a digit, ``nvme0n1p1``);
* ``<vg>-<lv>`` for an LVM logical volume, as device-mapper names it (a ``-``
  inside a name doubled: VG ``my-vg``, LV ``root`` is ``my--vg-root``);
* ``<disk>`` for a filesystem on the whole disk (no partition table);
* ``md<N>`` and the like for whatever else libguestfs finds.

The host's kernel never reads the guest's data: a guest's disk is untrusted
input, and a host ``mount`` of it would hand the host kernel's filesystem code
whatever the guest (or whoever owned it) wrote there. libguestfs reads it
instead, inside its appliance (a small Linux VM in QEMU, no network): it opens
the point's qcow2 chain read-only, finds the partitions and LVM volumes (LVM
runs inside the appliance: the host's ``vgs`` never sees the guest's volume
groups), mounts each filesystem read-only there, and serves them to the host
over FUSE (``mount_local``). The host sees only FUSE requests answered by a
process of ours.

The drive is added ``readonly=True``: libguestfs puts a throwaway qcow2
overlay in front of the chain, so the appliance may write (an ext4 or XFS
journal of a point taken while the guest wrote is replayed at mount, as the
guest would on its next boot) but nothing reaches the backup files. A
filesystem whose replay fails is mounted with ``norecovery`` (its state
without the journal's last transactions), and the output says so.

A background process (``python -m blockbackup_client.mount``, its own session,
stdin and stdout detached, its log in the run directory) holds the appliance
and serves the mount; ``mount`` returns once that process has read every
mounted directory through the mount, so the files are readable when bbctl
prints where they are. libguestfs's temporary files (the overlay, its
sockets) go to a directory of the mount's (``$TMPDIR/bbctl-mount-*``),
removed when it ends, even if its process was killed. The process is
recorded (pid and start time, the
appliance's pid) in ``$BBCTL_RUN_DIR`` (default ``/run/bbctl`` for root, else
``$XDG_RUNTIME_DIR/bbctl``); ``umount`` unmounts (``fusermount -u``), waits for
the process and the appliance to end, and removes the record. SIGTERM to the
process unmounts too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import BackupError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

#: How long ``umount`` waits for the process and its appliance to end.
STOP_SECONDS = 60.0

_MISSING_GUESTFS = ("libguestfs's Python binding (module guestfs) is not installed: install the "
                    "Debian packages libguestfs-tools and python3-guestfs, and run bbctl from a "
                    "Python that sees them (/usr/bin/python3, or a venv made with "
                    "--system-site-packages)")


# -- the point and the mount point ---------------------------------------------------

def _point(dest: Path, disk: str, at: str | None) -> tuple[str, Path]:
    """The backup id and the newest file of disk's chain at ``at``, its chain checked.

    :raise BackupError: no such directory, backup or disk, or a file of the chain
        is missing or names another backing file than the manifest.
    """
    from .backup import Manifest, checked_chain

    if not dest.is_dir():
        raise BackupError(f"no such directory: {dest}")
    manifest = Manifest.load(dest, None)
    record = manifest.find(at)
    files = checked_chain(dest, manifest, record["id"], disk)
    return str(record["id"]), (dest / files[0]).resolve()


def _unescape(field: str) -> str:
    """A /proc/self/mountinfo path field (space, tab, newline, backslash as octal)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _mounted(path: Path) -> bool:
    """Whether something is mounted on path (a FUSE mount whose server died too,
    which os.path.ismount cannot stat)."""
    try:
        with open("/proc/self/mountinfo") as f:
            return any(_unescape(line.split()[4]) == str(path) for line in f)
    except OSError:
        return os.path.ismount(path)


def _run_dir() -> Path:
    env = os.environ.get("BBCTL_RUN_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/bbctl")
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return Path(runtime) / "bbctl" if runtime else Path(f"/tmp/bbctl-{os.getuid()}")


def _record_path(mountpoint: Path) -> Path:
    return _run_dir() / f"mount-{hashlib.sha256(str(mountpoint).encode()).hexdigest()[:16]}.json"


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] == "Z" else int(fields[19])


def _alive(pid: int | None, start: int | None) -> bool:
    """Whether the recorded process still runs (not another one with its pid)."""
    return pid is not None and start is not None and _start_time(pid) == start


def _load(mountpoint: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(_record_path(mountpoint).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("mountpoint") == str(mountpoint) else None


def _save(data: dict[str, Any]) -> None:
    path = _record_path(Path(data["mountpoint"]))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _check_mountpoint(mountpoint: Path) -> Path:
    """MOUNTPOINT as an absolute path, if it is an empty directory nothing is mounted on.

    :raise BackupError: otherwise.
    """
    path = Path(os.path.realpath(mountpoint))
    record = _load(path)
    if record is not None and _alive(record.get("pid"), record.get("pid_start")):
        raise BackupError(f"{path} is already mounted (bbctl mount, pid {record['pid']}; "
                          f"bbctl umount {path} ends it)")
    if _mounted(path):
        if record is not None:
            raise BackupError(f"{path} is already mounted (a bbctl mount whose process "
                              f"ended; bbctl umount {path} cleans it up)")
        raise BackupError(f"{path} is already mounted")
    if not path.exists():
        raise BackupError(f"no such directory: {path}")
    if not path.is_dir():
        raise BackupError(f"{path} is not a directory")
    if any(path.iterdir()):
        raise BackupError(f"{path} is not an empty directory")
    return path


def _fusermount(mountpoint: Path, lazy: bool = False) -> subprocess.CompletedProcess[str]:
    program = shutil.which("fusermount") or shutil.which("fusermount3")
    if program is None:
        raise BackupError("fusermount is missing: install the Debian package fuse3")
    return subprocess.run([program, "-u", *(["-z"] if lazy else []), str(mountpoint)],
                          capture_output=True, text=True)


# -- mount and umount (bbctl's side) -----------------------------------------------------

def mount(dest: Path, disk: str, at: str | None, mountpoint: Path,
          progress: Callable[[str, float], None] | None = None,
          timeout: float = 600.0) -> dict[str, Any]:
    """Mount the filesystems of disk at backup ``at`` (default the latest) under
    mountpoint, read-only; returns once they are readable, with what is where.

    ``progress(step, seconds)`` is called as the background process moves on and
    about twice a second while it waits (the appliance's start takes seconds).

    :raise BackupError: bad arguments (named), libguestfs missing, no
        filesystem found, or the appliance failed or did not start in ``timeout``
        seconds; nothing is left running or mounted then.
    """
    import importlib.util
    import select

    backup_id, top = _point(dest, disk, at)
    path = _check_mountpoint(mountpoint)
    if importlib.util.find_spec("guestfs") is None:
        raise BackupError(_MISSING_GUESTFS)
    if not (shutil.which("fusermount") or shutil.which("fusermount3")):
        raise BackupError("fusermount is missing: install the Debian package fuse3")
    run = _run_dir()
    run.mkdir(mode=0o700, parents=True, exist_ok=True)
    record_path = _record_path(path)
    log = record_path.with_suffix(".log")
    params = {"image": str(top), "disk": disk, "mountpoint": str(path),
              "record": str(record_path)}
    began = time.monotonic()
    # libguestfs's temporary files (the overlay, its sockets) in a directory of
    # this mount's, so that nothing stays behind even if the process is killed;
    # its appliance cache stays where it would be.
    tmp = tempfile.mkdtemp(prefix="bbctl-mount-")
    env = {**os.environ, "TMPDIR": tmp, "XDG_RUNTIME_DIR": tmp,
           "LIBGUESTFS_CACHEDIR": os.environ.get("LIBGUESTFS_CACHEDIR")
           or os.environ.get("TMPDIR") or "/var/tmp"}
    read_end, write_end = os.pipe()
    try:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", f"{__package__}.mount", json.dumps(params),
                 str(write_end)], pass_fds=(write_end,), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    except BaseException:
        os.close(read_end)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(write_end)
    record: dict[str, Any] = {
        "mountpoint": str(path), "dir": str(dest.resolve()), "disk": disk,
        "backup": backup_id, "image": str(top), "pid": proc.pid,
        "pid_start": _start_time(proc.pid), "log": str(log), "tmpdir": tmp,
        "time": int(time.time())}
    ready: dict[str, Any] | None = None
    failed = False
    try:
        _save(record)
        buffer, step = b"", "starting"
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while ready is None:
                left = began + timeout - time.monotonic()
                if left <= 0:
                    raise BackupError(
                        f"the libguestfs appliance did not get {disk} mounted in {timeout:g} s "
                        f"(last step: {step}); if KVM does not work here, try "
                        "LIBGUESTFS_BACKEND_SETTINGS=force_tcg")
                if select.select([pipe], [], [], min(left, 0.5))[0]:
                    chunk = pipe.read(65536)
                    if not chunk:
                        raise BackupError(f"the mount process ended while {step}: "
                                          f"{_last_line(log)}")
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        message = json.loads(line)
                        if "error" in message:
                            failed = True  # the process ends by itself
                            raise BackupError(message["error"])
                        if "ready" in message:
                            ready = message["ready"]
                        else:
                            step = message.get("say", step)
                if progress is not None:
                    progress(step, time.monotonic() - began)
        assert ready is not None
        record.update(ready)
        _save(record)
    except BaseException:
        _end(proc, path, 30.0 if failed else 0.0)
        record_path.unlink(missing_ok=True)
        log.unlink(missing_ok=True)  # what it said is in the error
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    record["seconds"] = round(time.monotonic() - began, 1)
    return record


def _last_line(log: Path) -> str:
    try:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else f"no output (see {log})"


def _descendants(pid: int) -> list[tuple[int, int | None]]:
    """The processes under pid (the appliance's QEMU, libguestfs's recovery
    process), with their start times."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(parents.get(pid, []))
    while todo:
        child = todo.pop()
        found.append((child, _start_time(child)))
        todo += parents.get(child, [])
    return found


def _end(proc: subprocess.Popen[bytes], mountpoint: Path, grace: float) -> None:
    """Stop a mount process that never got ready (after ``grace`` seconds: one
    that reported an error shuts its appliance down and ends by itself),
    whatever it started, and whatever it mounted.

    SIGTERM is handled once the libguestfs call under way returns: an appliance
    that hangs in its start is killed, which ends that call, and the process
    cleans up after itself (libguestfs's directories in /tmp too)."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(grace)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        for step in ("appliance", "process"):
            try:
                proc.wait(5 if step == "appliance" else 15)
                break
            except subprocess.TimeoutExpired:
                pass
            if step == "appliance":
                for pid, start in _descendants(proc.pid):
                    if _alive(pid, start):
                        os.kill(pid, signal.SIGKILL)
            else:
                under = _descendants(proc.pid)
                proc.kill()
                proc.wait()
                for pid, start in under:
                    if _alive(pid, start):
                        os.kill(pid, signal.SIGKILL)
    if _mounted(mountpoint):
        _fusermount(mountpoint, lazy=True)


def umount(mountpoint: Path, timeout: float = STOP_SECONDS) -> dict[str, Any]:
    """Unmount a ``bbctl mount`` and end its process and appliance.

    :raise BackupError: not a bbctl mount, or busy (a process uses a file in it;
        the mount then stays as it was).
    """
    path = Path(os.path.realpath(mountpoint))
    record = _load(path)
    if record is None:
        if _mounted(path):
            raise BackupError(f"{path} is not mounted by bbctl mount (no record in {_run_dir()})")
        raise BackupError(f"{path} is not mounted")
    pids = [(record.get("pid"), record.get("pid_start")),
            (record.get("appliance_pid"), record.get("appliance_start"))]
    alive = _alive(*pids[0])
    if _mounted(path):
        done = _fusermount(path)
        if done.returncode != 0:
            detail = " ".join(done.stderr.split()) or f"exit {done.returncode}"
            if alive:
                raise BackupError(f"cannot unmount {path}: {detail} (close what uses it and "
                                  "try again)")
            _fusermount(path, lazy=True)  # its process is gone: a dead FUSE mount
    deadline = time.monotonic() + timeout
    while any(_alive(pid, start) for pid, start in pids):
        if time.monotonic() > deadline:
            for pid, start in pids:
                if _alive(pid, start):
                    assert pid is not None
                    os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    _record_path(path).unlink(missing_ok=True)
    tmp = record.get("tmpdir")
    if tmp and Path(tmp).name.startswith("bbctl-mount-"):
        shutil.rmtree(tmp, ignore_errors=True)
    if record.get("log"):
        Path(record["log"]).unlink(missing_ok=True)
    return {"mountpoint": str(path), "pid": record.get("pid"),
            "appliance_pid": record.get("appliance_pid"), "was_running": alive}


# -- the background process ------------------------------------------------------------

def _name(device: str, disk: str, lvs: set[str]) -> tuple[str, str]:
    """The directory a filesystem gets under the mount point, and what it is."""
    if device == "/dev/sda":
        return disk, "whole disk"
    m = re.fullmatch(r"/dev/sda(\d+)", device)
    if m:
        return (f"{disk}p{m[1]}" if disk[-1:].isdigit() else f"{disk}{m[1]}",
                f"partition {m[1]}")
    m = re.fullmatch(r"/dev/([^/]+)/([^/]+)", device)
    if m and device in lvs:
        return (f"{m[1].replace('-', '--')}-{m[2].replace('-', '--')}",
                f"LVM {m[1]}/{m[2]}")
    return device.rsplit("/", 1)[-1], device.removeprefix("/dev/")


class _Stop(Exception):
    """A signal asked the process to stop before it served the mount."""


def _serve(params: dict[str, str], fd: int) -> int:
    """Start the appliance, mount, serve until unmounted. Messages to bbctl on fd,
    one JSON object a line: ``say`` (a step), ``ready`` (what is where), ``error``."""
    import threading

    pipe = os.fdopen(fd, "w", buffering=1)

    def send(**message: Any) -> None:
        try:
            pipe.write(json.dumps(message) + "\n")
            pipe.flush()
        except (OSError, ValueError):
            pass  # bbctl went away: the log has it

    def log(text: str) -> None:
        print(time.strftime("%H:%M:%S ") + text, flush=True)

    def stop(signum: int, frame: Any) -> None:
        raise _Stop(signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    mountpoint, disk = Path(params["mountpoint"]), params["disk"]
    g: Any = None
    try:
        try:
            import guestfs
        except ImportError:
            send(error=_MISSING_GUESTFS)
            return 1
        g = guestfs.GuestFS(python_return_dict=True)
        g.add_drive_opts(params["image"], format="qcow2", readonly=True)
        send(say="starting the libguestfs appliance")
        log(f"launching the appliance ({g.get_backend()}) on {params['image']}")
        g.launch()
        appliance = int(g.get_pid())
        send(say="looking for filesystems")
        lvs = set(g.lvs())
        found = {dev: kind for dev, kind in g.list_filesystems().items()
                 if kind not in ("swap", "unknown", "") and not dev.startswith("btrfsvol:")}
        if not found:
            send(error=f"no filesystem found on {disk} (in the image {params['image']})")
            return 1
        filesystems, taken = [], set()
        for device, kind in sorted(found.items(), key=lambda f: (f[0] in lvs, f[0])):
            name, source = _name(device, disk, lvs)
            while name in taken:
                name += "_"
            taken.add(name)
            entry: dict[str, Any] = {"name": name, "path": str(mountpoint / name),
                                     "source": source, "type": kind, "mounted": False,
                                     "note": None}
            filesystems.append(entry)
            send(say=f"mounting {name}")
            dirty = False
            if kind in ("ext2", "ext3", "ext4"):
                with _suppress():
                    features = g.tune2fs_l(device).get("Filesystem features", "")
                    dirty = "needs_recovery" in features.split()
            g.mkmountpoint(f"/{name}")
            try:
                g.mount_ro(device, f"/{name}")
                entry["mounted"] = True
                if dirty:
                    entry["note"] = "journal replayed (in the throwaway overlay)"
            except RuntimeError as err:
                first = " ".join(str(err).split())
                try:
                    g.mount_options("ro,norecovery", device, f"/{name}")
                    entry["mounted"] = True
                    entry["note"] = f"mounted without journal replay (norecovery): {first}"
                except RuntimeError:
                    entry["note"] = f"not mounted: {first}"
                    g.rmmountpoint(f"/{name}")
            log(f"{device} ({kind}) -> {name}: {entry['note'] or 'mounted'}")
        mounted = [f for f in filesystems if f["mounted"]]
        if not mounted:
            send(error=f"no filesystem of {disk} could be mounted: " + "; ".join(
                f"{f['name']}: {f['note']}" for f in filesystems))
            return 1
        send(say="serving the mount")
        g.mount_local(str(mountpoint), readonly=True)
        # From here the main thread is inside mount_local_run (C): Python signal
        # handlers would never run. A thread waits for the signals instead and
        # unmounts, which ends mount_local_run.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

        def on_signal() -> None:
            sig = signal.sigwait({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
            log(f"{signal.Signals(sig).name}: unmounting")
            if _fusermount(mountpoint).returncode != 0:
                _fusermount(mountpoint, lazy=True)

        def probe() -> None:
            """Read each mounted directory through the mount: then it is ready."""
            try:
                for f in mounted:
                    os.listdir(f["path"])
            except OSError as err:
                send(error=f"the mount at {mountpoint} does not answer: {err}")
                _fusermount(mountpoint, lazy=True)
                return
            log("ready")
            send(ready={"appliance_pid": appliance, "appliance_start": _start_time(appliance),
                        "filesystems": filesystems})
            pipe.close()

        threading.Thread(target=on_signal, daemon=True).start()
        threading.Thread(target=probe, daemon=True).start()
        g.mount_local_run()
        log("unmounted")
        return 0
    except _Stop as err:
        log(f"{err}: stopping before the mount was served")
        if _mounted(mountpoint):
            _fusermount(mountpoint, lazy=True)
        return 1
    except Exception as err:
        send(error=" ".join(f"libguestfs: {err}".split()))
        log(f"failed: {err}")
        return 1
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # stopping already
        if g is not None:
            with _suppress():
                g.shutdown()
            g.close()
        record = Path(params["record"])
        with _suppress():
            if json.loads(record.read_text()).get("pid") == os.getpid():
                record.unlink()
        with _suppress():  # bbctl's directory for libguestfs's temporary files, if empty
            if Path(os.environ["TMPDIR"]).name.startswith("bbctl-mount-"):
                os.rmdir(os.environ["TMPDIR"])


def _suppress() -> Any:
    return contextlib.suppress(Exception)


if __name__ == "__main__":
    try:
        status = _serve(json.loads(sys.argv[1]), int(sys.argv[2]))
    except _Stop:  # a signal while it handled an error: it cleaned up all the same
        status = 1
    sys.exit(status)
