"""The reference backup application: full and incremental backups of a
domain's disks as qcow2 chains, pulled over NBD, and their restore and check.

A backup directory holds one domain's backups: per backup and disk one qcow2
file (an incremental one has the previous backup of that disk as its backing
file, by relative name, so ``qemu-img`` works on any of them without bbctl),
and ``manifest.json`` recording every backup: id, level, time, checkpoint,
and per disk its level (and why a full), the file, its backing file, size,
bytes read and written, and a BLAKE3 checksum.

The level is decided per disk: a disk is incremental from the newest earlier
backup that holds it when that backup's checkpoint is valid on that disk,
else full, so a hot-added disk or one whose change tracking broke does not
force a full of the others. A backup's level is ``full``, ``inc`` or
``mixed``. Each backup also records whether its instant was quiesced (the
guest's filesystems frozen through its agent) or only crash-consistent.

After a successful backup, the checkpoints of the directory's earlier
backups that no next backup needs are deleted (per disk, the newest backup
holding it keeps its checkpoint), so the images do not gather one persistent
bitmap per backup.

The snapshot lives on a lease (``--lease``, 60 s by default) that a thread
renews every quarter of it from a connection of its own: a backup cut off
from the VM's host (its network gone, bbctl killed) leaves no snapshot
behind there once the lease ends, and every connection of the backup (the
daemon's, the renewals', NBD over TCP) counts as cut after that long
without a word from the far end, so the backup fails in one line instead of
hanging.

A backup holds the directory's ``lock.json`` while it runs, so that two
backups of one domain into one directory, from one host or two, never
interleave (see :mod:`.dirlock`).

``pending.json`` names the backup under way from before its snapshot is
created until its manifest is saved or its snapshot and checkpoint are
deleted; a backup that could not clean up after itself (the daemon or QEMU
gone) is cleaned up by the next one into the same directory.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import blake3
import nbd

from . import pull, qcow2
from .client import Client, writable_disks
from .dirlock import DirectoryLock
from .errors import (
    ApplicationError,
    BlockbackupError,
    NoSuchCheckpoint,
    NoSuchSnapshot,
    QuiesceFailed,
)
from .errors import BackupError as BackupError  # re-exported: it was defined here
from .nbdio import NbdServer

# For the type checker only: typing, dataclasses (with inspect), hashlib and
# subprocess cost every backup's start ~15 ms; restore and verify import
# the last two when they run.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from typing import Any

MANIFEST = "manifest.json"
#: The backup under way (its id and domain), until it is saved or cleaned up.
PENDING = "pending.json"


def _sync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: Any) -> None:
    """Replace a JSON file atomically and durably: a crash leaves the old one
    or the new one, never a mix; a failure leaves the old one and no temporary."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _sync_directory(path.parent)


def _remove_durably(path: Path) -> None:
    path.unlink(missing_ok=True)
    _sync_directory(path.parent)


class Manifest:
    """A backup directory's manifest: its file and its data."""

    def __init__(self, path: Path, data: dict[str, Any]) -> None:
        self.path, self.data = path, data

    @classmethod
    def load(cls, directory: Path, domain: str | None) -> Manifest:
        path = directory / MANIFEST
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except ValueError as err:
                raise BackupError(f"{path} is not readable JSON: {err}") from None
            if not isinstance(data, dict) or not isinstance(data.get("backups"), list):
                raise BackupError(f"{path} is not a backup manifest")
            if domain is not None and data.get("domain") != domain:
                raise BackupError(f"{directory} holds backups of domain {data.get('domain')!r}, "
                                  f"not {domain!r}")
            return cls(path, data)
        if domain is None:
            raise BackupError(f"{directory} holds no backups ({MANIFEST} missing)")
        return cls(path, {"domain": domain, "backups": []})

    @property
    def backups(self) -> list[dict[str, Any]]:
        return list(self.data["backups"])

    def save(self) -> None:
        """Replace the manifest atomically and durably: a crash leaves the old
        one or the new one, never a mix, and never one naming unwritten files."""
        _write_durably(self.path, self.data)

    def find(self, backup_id: str | None) -> dict[str, Any]:
        if not self.backups:
            raise BackupError("no backups in this directory")
        if backup_id is None:
            return self.backups[-1]
        for b in self.backups:
            if b["id"] == backup_id:
                return b
        raise BackupError(f"no backup {backup_id!r} in this directory")


def disk_level(entry: dict[str, Any]) -> str:
    """``full`` or ``inc``; manifests before per-disk levels say it by the backing file."""
    level = entry.get("level")
    if level in ("full", "inc"):
        return str(level)
    return "full" if entry.get("backing") is None else "inc"


def record_level(record: dict[str, Any]) -> str:
    """``full``, ``inc`` or ``mixed``: what a backup's disks are."""
    levels = {disk_level(e) for e in record["disks"].values()}
    if len(levels) == 1:
        return levels.pop()
    return "mixed" if levels else str(record.get("level", "full"))


def checksum(path: Path) -> str:
    """``blake3:<hex>`` of the file's bytes (multi-threaded)."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            h.update(chunk)
    return "blake3:" + h.hexdigest()


def _matches(path: Path, entry: dict[str, Any]) -> bool:
    """The file against its manifest entry (``sha256`` in manifests before blake3)."""
    if "checksum" in entry:
        return bool(checksum(path) == entry["checksum"])
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return bool(h.hexdigest() == entry["sha256"])


def _pause(step: str) -> None:
    """Stop here if ``BBCTL_PAUSE_AT`` names this step: the tests interrupt a
    backup at a known point with a real SIGINT. With ``BBCTL_PAUSE_WHILE``
    naming a file, wait only while that file exists (once, the first time the
    step is reached): the tests break something, then let the backup go on."""
    if os.environ.get("BBCTL_PAUSE_AT") != step:
        return
    hold = os.environ.get("BBCTL_PAUSE_WHILE")
    if hold and not os.path.exists(hold):
        return
    print(f"bbctl: paused at {step}", file=sys.stderr, flush=True)
    while not hold or os.path.exists(hold):
        # Short sleeps: a Ctrl-C that lands after Python last looked for
        # signals but before the sleep's system call began interrupts nothing
        # (its handler already ran); Python raises KeyboardInterrupt only when
        # the sleep returns. A one-hour sleep made the Ctrl-C tests wait for
        # it, about once in ten suite runs.
        time.sleep(0.05)


# -- the level of each disk --------------------------------------------------------

class DiskPlan:
    """How one disk is backed up: full (and why), or incremental from ``base``."""

    def __init__(self, disk: str, level: str, reason: str | None = None,
                 base: dict[str, Any] | None = None) -> None:
        self.disk = disk
        self.level = level    # "full" or "inc"
        self.reason = reason  # why a full; None for an incremental
        self.base = base      # the backup record an incremental builds on

    @property
    def checkpoint(self) -> str | None:
        return str(self.base["checkpoint"]) if self.base is not None else None

    @property
    def backing(self) -> str | None:
        return str(self.base["disks"][self.disk]["file"]) if self.base is not None else None

    def describe(self) -> str:
        if self.base is not None:
            return f"{self.disk}: incremental from {self.base['id']}"
        return f"{self.disk}: full ({self.reason})"


class _Planner:
    """Decides each disk's level from the manifest and the daemon's checkpoints
    (each checkpoint looked up once)."""

    def __init__(self, client: Client, domain: str, dest: Path,
                 backups: list[dict[str, Any]], level: str) -> None:
        self._client, self._domain, self._dest = client, domain, dest
        self._backups, self._level = backups, level
        self._lookups: dict[str, dict[str, Any] | ApplicationError] = {}

    def _lookup(self, name: str) -> dict[str, Any] | ApplicationError:
        if name not in self._lookups:
            try:
                self._lookups[name] = dict(self._client.call(
                    "checkpoint.lookup", domain=self._domain, name=name))
            except ApplicationError as err:
                self._lookups[name] = err
        return self._lookups[name]

    def plan(self, disk: str, size: int | None) -> DiskPlan:
        if self._level == "full":
            return DiskPlan(disk, "full", "--level full")
        base = next((b for b in reversed(self._backups) if disk in b["disks"]), None)
        if base is None:
            return DiskPlan(disk, "full", "new disk: no earlier backup of it" if self._backups
                            else "no earlier backup in this directory")
        reason = self._blocker(disk, size, base)
        if reason is not None:
            return DiskPlan(disk, "full", reason)
        return DiskPlan(disk, "inc", None, base)

    def _blocker(self, disk: str, size: int | None, base: dict[str, Any]) -> str | None:
        """Why disk cannot be incremental from backup ``base``, or None."""
        entry = base["disks"][disk]
        if size is not None and entry.get("size") not in (None, size):
            return f"its size changed since {base['id']} ({entry['size']} -> {size} bytes)"
        if not (self._dest / entry["file"]).exists():
            return f"{entry['file']} of {base['id']} is missing"
        name = base.get("checkpoint")
        if not name:
            return f"backup {base['id']} has no checkpoint"
        info = self._lookup(name)
        if isinstance(info, ApplicationError):
            return f"checkpoint {name}: {info.message}"
        if disk not in info.get("disks", []):
            return f"checkpoint {name} does not track this disk"
        if info.get("state") != "valid":
            broken = info.get("broken_disks")
            if not isinstance(broken, dict):  # a daemon before per-disk states
                return f"checkpoint {name} is broken: {info.get('reason')}"
            if disk in broken:
                return f"checkpoint {name} is broken on this disk: {broken[disk]}"
        return None


def _refuse_incremental(plans: list[DiskPlan]) -> None:
    """:raise BackupError: naming every disk that cannot be incremental, and why."""
    full = [p for p in plans if p.level != "inc"]
    if full:
        raise BackupError("cannot take an incremental backup: "
                          + "; ".join(f"{p.disk}: {p.reason}" for p in full))


# -- the pull ----------------------------------------------------------------------

class _FileSink:
    """The qcow2 writer, remembering the first write that failed (a full disk
    is then named as such, not as a failed copy)."""

    def __init__(self, writer: qcow2.Qcow2Writer) -> None:
        self.writer = writer
        self.error: OSError | None = None

    @property
    def request_size(self) -> int:
        """The piece size the writer takes best (see pull.request_size)."""
        return self.writer.request_size

    def write(self, offset: int, data: memoryview) -> None:
        with self._noted():
            self.writer.write(offset, data)

    def write_many(self, runs: list[tuple[int, int]], data: memoryview) -> None:
        with self._noted():
            self.writer.write_many(runs, data)

    @contextlib.contextmanager
    def _noted(self) -> Iterator[None]:
        try:
            yield
        except OSError as err:
            if self.error is None:
                self.error = err
            raise


class _ReadFailed(BackupError):
    """The export could not be read (the source's side failed)."""


def _os_message(err: OSError) -> str:
    return err.strerror or str(err)


def _pull(server: NbdServer, disk: str, export: str, changes: str | None, target: Path,
          size: int, backing: str | None, progress: Callable[[int], None]
          ) -> tuple[int, int, str]:
    """Copy an export's data (or only its changes) into a new qcow2 file, flushed;
    returns the bytes read, the bytes recorded as zeros, and the file's checksum.

    :raise BackupError: the export could not be read, or the file written
        (the file is then removed).
    """
    try:
        runs = pull.plan(server, export, changes)
    except pull.PullError as err:
        raise _ReadFailed(f"reading disk {disk} over NBD: {err}") from None
    clusters = qcow2.cluster_runs([(r.offset, r.length, r.zero) for r in runs], size)
    # The image holds whole clusters: read whole clusters (the disk's end aside).
    reads = [pull.Run(c.first * qcow2.CLUSTER,
                      min(c.count * qcow2.CLUSTER, size - c.first * qcow2.CLUSTER))
             for c in clusters if not c.zero]
    try:
        writer = qcow2.Qcow2Writer(target, size, clusters, backing)
    except OSError as err:
        target.unlink(missing_ok=True)
        raise BackupError(f"writing {target}: {_os_message(err)}") from None
    sink = _FileSink(writer)

    def report(n: int) -> None:
        progress(n)
        _pause("pull")

    # The file's checksum as it is made, never read back: the metadata (known
    # from the plan), then the data in file order as it arrives, then the
    # zeros that round the disk's last cluster up (the file's last bytes).
    hasher = blake3.blake3()
    hasher.update(writer.metadata())

    def seen(data: memoryview) -> None:
        hasher.update(data)

    try:
        read = pull.copy(server, export, reads, sink, progress=report, ordered=seen)
        pad = writer.file_size - writer.data_offset - read
        hasher.update(bytes(pad))
        writer.complete()
        writer.sync()
        digest = "blake3:" + hasher.hexdigest()
    except BaseException as err:
        writer.abort()
        if sink.error is not None:
            raise BackupError(f"writing {target}: {_os_message(sink.error)}") from None
        if isinstance(err, OSError):
            raise BackupError(f"writing {target}: {_os_message(err)}") from None
        if isinstance(err, (pull.PullError, nbd.Error)):
            raise _ReadFailed(f"reading disk {disk} over NBD: {err}") from None
        raise
    return read, sum(c.count for c in clusters if c.zero) * qcow2.CLUSTER, digest


def _copy(client: Client, domain: str, snapshot: str, disk: str, target: Path, size: int,
          backing: str | None, checkpoint: str | None, progress: Callable[[int], None]
          ) -> tuple[int, int, str]:
    """Have QEMU write the snapshot's disk (or its changes since the
    checkpoint) into a new qcow2 file (snapshot.copy): the daemon's answer for
    a disk it cannot export safely on this QEMU build. Returns the bytes
    QEMU copied, 0 (zeros are QEMU's to record) and the file's checksum.

    :raise BackupError: the file could not be made, or the copy failed (the
        file is then removed).
    :raise ApplicationError: the daemon refused.
    """
    import subprocess

    cmd = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        cmd += ["-b", backing, "-F", "qcow2"]
    made = subprocess.run([*cmd, str(target), str(size)], capture_output=True, text=True)
    if made.returncode != 0:
        target.unlink(missing_ok=True)
        raise BackupError(f"writing {target}: {made.stderr.strip()}")
    outcome: dict[str, Any] = {}

    def run() -> None:
        # A connection of its own without a timeout: the answer comes when
        # the whole disk is written, however long that takes.
        try:
            with Client(client.socket_path, timeout=None) as own:
                outcome["result"] = own.call(
                    "snapshot.copy", domain=domain, name=snapshot, disk=disk,
                    target=str(target.resolve()),
                    **({"checkpoint": checkpoint} if checkpoint is not None else {}))
        except BaseException as err:  # noqa: BLE001 - handed to the waiting thread
            outcome["error"] = err

    worker = threading.Thread(target=run, name=f"copy-{disk}", daemon=True)
    worker.start()
    done = 0
    try:
        while worker.is_alive():
            worker.join(0.5)
            with contextlib.suppress(BlockbackupError, OSError):
                for c in client.snapshot_lookup(domain, snapshot).get("copies", []):
                    if c["disk"] == disk and c["done"] > done:
                        progress(c["done"] - done)
                        done = c["done"]
            _pause("pull")
        if "error" in outcome:
            raise outcome["error"]
        copied = int(outcome["result"]["bytes"])
        if copied > done:
            progress(copied - done)
        with open(target, "rb+") as f:  # QEMU wrote it; make it durable before the manifest
            os.fsync(f.fileno())
        return copied, 0, checksum(target)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _uninterrupted() -> Iterator[None]:
    """Hold Ctrl-C off while undoing a backup, so the undo itself is never cut."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


# -- cleaning up ---------------------------------------------------------------------

def _delete(client: Client, domain: str, what: str, name: str) -> tuple[bool, str | None]:
    """Delete a snapshot or checkpoint: (whether it existed, why it could not
    be deleted or None)."""
    gone = NoSuchSnapshot if what == "snapshot" else NoSuchCheckpoint
    try:
        client.call(f"{what}.delete", domain=domain, name=name)
    except gone:
        return False, None
    except ApplicationError as err:
        return True, f"{err.message} [{err.kind}]"
    except (BlockbackupError, OSError) as err:
        return True, str(err)
    return True, None


def _clear_pending(client: Client, dest: Path, backups: list[dict[str, Any]],
                   say: Callable[[str], None]) -> None:
    """Finish the cleanup of a backup into this directory that failed and
    could not clean up after itself: delete its snapshot and (unless its
    manifest entry was saved) its checkpoint and files, then forget it.
    Nothing else is touched: only the name the record gives, in its domain.

    :raise BackupError: they cannot be deleted now (the record stays).
    """
    path = dest / PENDING
    if not path.exists():
        return
    try:
        pending = json.loads(path.read_text())
        backup_id, domain = str(pending["id"]), str(pending["domain"])
    except (ValueError, KeyError, TypeError) as err:
        raise BackupError(f"{path} is unreadable ({err}): remove it once the checkpoint it "
                          "names is deleted") from None
    saved = any(b["id"] == backup_id for b in backups)
    # The snapshot first: its checkpoint then has nothing to fold into. A
    # saved backup's checkpoint is the base of the next incremental: kept.
    for what in ("snapshot",) if saved else ("snapshot", "checkpoint"):
        existed, problem = _delete(client, domain, what, backup_id)
        if problem is not None:
            raise BackupError(f"cannot delete {what} {backup_id} of an earlier failed backup "
                              f"(recorded in {path}): {problem}")
        if existed and what == "checkpoint":
            say(f"deleted checkpoint {backup_id} of an earlier failed backup")
    if not saved:
        for leftover in dest.glob(f"{backup_id}-*.qcow2"):
            leftover.unlink()
    _remove_durably(path)


def _undo(client: Client, domain: str, dest: Path, backup_id: str, made: list[Path],
          names: tuple[str, ...]) -> list[str]:
    """Undo a failed backup: its files, then the named daemon objects
    (snapshot, checkpoint); the pending record goes once none of them is
    left. Returns what is left, for the message."""
    left = []
    for path in made:
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            left.append(f"{path} could not be removed: {_os_message(err)}")
    for i, what in enumerate(names):
        _, problem = _delete(client, domain, what, backup_id)
        if problem is not None:
            them = " and ".join(names[i:])
            left.append(f"{them} {backup_id} could not be deleted now ({problem}); the next "
                        f"backup into {dest} deletes {'them' if i + 1 < len(names) else 'it'}")
            return left
    try:
        _remove_durably(dest / PENDING)
    except OSError as err:
        left.append(f"{dest / PENDING} could not be removed: {_os_message(err)}")
    return left


class _Renewer:
    """Renews a snapshot's lease every quarter of it, from a connection of its
    own (the backup's is busy with long calls; one lost renewal costs
    nothing). ``lost`` says why the snapshot is gone, once it is."""

    def __init__(self, where: str, domain: str, name: str, lease: float) -> None:
        self._where, self._domain, self._name, self._lease = where, domain, name, lease
        self._stopped = threading.Event()
        self.lost: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"renew-{name}", daemon=True)

    def __enter__(self) -> _Renewer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        self._thread.join(1.0)  # a renewal stuck on a cut network ends with the process

    def _run(self) -> None:
        client: Client | None = None
        try:
            while not self._stopped.wait(self._lease / 4):
                try:
                    if client is None:
                        client = Client(self._where, timeout=self._lease, silence=self._lease)
                    client.snapshot_renew(self._domain, self._name)
                except NoSuchSnapshot:
                    self.lost = (f"snapshot {self._name} is gone: its lease of "
                                 f"{self._lease:g} s ended before a renewal reached the daemon")
                    return
                except (BlockbackupError, OSError):
                    if client is not None:
                        client.close()
                    client = None  # tried again on a new connection, while the lease lasts
        finally:
            if client is not None:
                client.close()


def _saved(dest: Path, backup_id: str) -> bool:
    """Whether the manifest on disk names this backup (its save got that far)."""
    try:
        data = json.loads((dest / MANIFEST).read_text())
        return any(b.get("id") == backup_id for b in data.get("backups", []))
    except (OSError, ValueError, AttributeError):
        return False


def _domain_note(client: Client, domain: str) -> str:
    """What the daemon says about the domain after a failed read, for the message."""
    try:
        for d in client.domain_list():
            if d.get("name") == domain and d.get("state") == "disconnected":
                return f" (domain {domain} is disconnected: QEMU went away)"
    except (BlockbackupError, OSError):
        return " (the daemon does not answer)"
    return ""


# -- the backup ----------------------------------------------------------------------

def _definition(client: Client, domain: str) -> dict[str, Any]:
    """The domain's entry of domain.list (empty when not defined: the daemon
    answers no-such-domain at the snapshot)."""
    return next((d for d in client.domain_list() if d["name"] == domain), {})


def backup(client: Client, domain: str, dest: Path, level: str, disks: list[str],
           say: Callable[[str], None], progress: Callable[[int], None],
           quiesce: str = "auto", lease: int = 60) -> dict[str, Any]:
    """Take one backup; whatever happens, its snapshot and exports go, and if
    it fails, its files and checkpoint too (now, or by the next backup).
    ``lease``: seconds the snapshot outlives the last renewal of it.

    ``quiesce``: ``yes`` freezes the guest's filesystems around the instant
    (the backup fails if that cannot be done), ``no`` does not, and ``auto``
    does when the domain has a guest agent, falling back to a crash-consistent
    backup, with a warning and the reason in the manifest, when it cannot.

    :raise BackupError: the directory belongs to another domain, a disk cannot
        be incremental with ``level="inc"``, or a step failed.
    :raise ApplicationError: the daemon refused (QuiesceFailed with ``yes``).
    :raise BlockbackupError: the daemon cannot be reached.
    """
    if client.remote:
        # From another host the data comes over NBD with TLS: this client's
        # certificates must be there before anything is made.
        from .remote import missing_certificates

        missing = missing_certificates(client.pki_dir)
        if missing:
            raise BackupError(f"a backup from another host reads the disks over NBD with TLS, "
                              f"and {client.pki_dir} has no {', '.join(missing)} (the "
                              "connection's ?pki=DIR, or $BLOCKBACKUPD_PKI)")
    new_directory = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    try:
        # One writer of the directory at a time, whichever host it runs on.
        with DirectoryLock(dest, f"a backup of {domain}", say):
            return _backup(client, domain, dest, level, disks, say, progress, quiesce, lease)
    finally:
        if new_directory:
            with contextlib.suppress(OSError):
                dest.rmdir()  # only if nothing is left in it


def _backup(client: Client, domain: str, dest: Path, level: str, disks: list[str],
            say: Callable[[str], None], progress: Callable[[int], None], quiesce: str,
            lease: int) -> dict[str, Any]:
    manifest = Manifest.load(dest, domain)
    _clear_pending(client, dest, manifest.backups, say)
    planner = _Planner(client, domain, dest, manifest.backups, level)
    if level == "inc":  # refused before anything is created
        wanted = dict.fromkeys(disks) if disks else \
            writable_disks(client.domain_get_xml(domain), domain)
        _refuse_incremental([planner.plan(d, size) for d, size in wanted.items()])
    backup_id = "bk-" + time.strftime("%Y%m%dT%H%M%S") + f"-{int(time.time() * 1000) % 1000:03d}"
    # Without --disk, the snapshot takes every writable disk there is at its instant.
    xml = "<domainblocksnapshot><name>" + backup_id + "</name>" + "".join(
        f'<disk name="{d}"/>' for d in dict.fromkeys(disks)) + "</domainblocksnapshot>"
    definition = _definition(client, domain)
    stopped = definition.get("state") == "disconnected"
    if stopped:
        say(f"{domain} is not running: its disks are read from its images as the guest left "
            "them (the daemon holds them until this backup ends)")
    freeze = quiesce == "yes" or (quiesce == "auto" and not stopped
                                  and bool(definition.get("guest_agent_socket")))
    quiesce_error: str | None = None
    made: list[Path] = []
    undo: tuple[str, ...] = ()  # what of the daemon's to delete if this fails
    renewals = contextlib.ExitStack()
    renewer: _Renewer | None = None
    try:
        _write_durably(dest / PENDING, {"id": backup_id, "domain": domain,
                                        "time": int(time.time())})
        undo = ("snapshot", "checkpoint")
        try:
            try:
                client.snapshot_create(domain, xml, checkpoint=True, quiesce=freeze or None,
                                       lease=lease)
            except QuiesceFailed as err:
                if quiesce != "auto":
                    raise
                quiesce_error = err.message  # nothing was created: take it unfrozen
                say(f"warning: cannot quiesce ({err.message}); this backup is "
                    "crash-consistent")
                client.snapshot_create(domain, xml, checkpoint=True, lease=lease)
        except ApplicationError:
            # A refusal creates nothing; and after already-exists, the name is
            # someone else's snapshot or checkpoint: not ours to delete.
            undo = ()
            raise
        renewer = renewals.enter_context(_Renewer(client.socket_path, domain, backup_id, lease))
        _pause("snapshot")
        info = client.snapshot_lookup(domain, backup_id)
        sizes = {s["disk"]: int(s["size"]) for s in info["scratch"]}
        plans = {d: planner.plan(d, sizes[d]) for d in info["disks"]}
        if level == "inc":
            _refuse_incremental(list(plans.values()))
        for p in plans.values():
            say(p.describe())
        encrypted = {s["disk"] for s in info["scratch"] if s.get("encrypted")}
        for disk in sorted(encrypted):
            say(f"warning: {disk} is encrypted in the VM, but its backup files hold its data in "
                "the clear (bbctl does not encrypt them): keep the directory as safe as the key")
        # Disks this QEMU build cannot export safely (an I/O thread's disk on
        # 7.2): QEMU itself writes them into their files.
        copy_only: dict[str, str] = info.get("copy_only", {})
        for disk in plans:
            if disk in copy_only:
                say(f"{disk}: copied by QEMU, not read over NBD: it runs in an I/O thread, "
                    "and this QEMU build aborts the VM when an NBD client of such a disk "
                    "leaves")
        if copy_only and client.remote:
            raise BackupError(
                f"{', '.join(sorted(copy_only))}: only QEMU can copy "
                f"{'this disk' if len(copy_only) == 1 else 'these disks'} on this QEMU build, "
                "into a file on the VM's own host: run bbctl backup there")
        exported = {d: p for d, p in plans.items() if d not in copy_only}
        server, exports = NbdServer(), {}
        if exported:
            # From another host: NBD over TCP with TLS on the address this
            # client reached the host by, on a port the daemon picks.
            address = f'<address type="ip" host="{client.host}" tls="yes"/>' \
                if client.remote else ""
            export_xml = f'<domainblockexport type="nbd">{address}' + "".join(
                f'<disk name="{d}" snapshot="{backup_id}"'
                + (f' checkpoint="{p.checkpoint}"' if p.checkpoint else "") + "/>"
                for d, p in exported.items()) + "</domainblockexport>"
            started = client.export_start(domain, export_xml)
            server = NbdServer.of(started["server"], client.host, client.pki_dir, lease)
            exports = {e["disk"]: e for e in started["exports"]}
        _pause("export")
        entries: dict[str, dict[str, Any]] = {}
        for disk, p in plans.items():
            target = dest / f"{backup_id}-{disk}.qcow2"
            made.append(target)
            began = time.monotonic()
            if disk in copy_only:
                read, zeroed, digest = _copy(client, domain, backup_id, disk, target,
                                             sizes[disk], p.backing,
                                             p.checkpoint if p.backing else None, progress)
            else:
                export = exports[disk]
                if p.level == "inc" and not export.get("bitmap"):
                    raise BackupError(f"the export of {disk} carries no changes since "
                                      f"{p.checkpoint}")
                try:
                    read, zeroed, digest = _pull(server, disk, export["name"],
                                                 export.get("bitmap") if p.backing else None,
                                                 target, sizes[disk], p.backing, progress)
                except _ReadFailed as err:
                    if renewer.lost is not None:
                        raise BackupError(f"{err}: {renewer.lost}") from None
                    raise BackupError(f"{err}{_domain_note(client, domain)}") from None
            entries[disk] = {
                "level": p.level, "reason": p.reason,
                "base": p.base["id"] if p.base is not None else None,
                "file": target.name, "backing": p.backing, "size": sizes[disk],
                "bytes_read": read, "bytes_zeroed": zeroed,
                "bytes_written": target.stat().st_blocks * 512,
                "seconds": round(time.monotonic() - began, 3),
                "checksum": digest, "read_by": "copy" if disk in copy_only else "nbd",
                "source_encrypted": disk in encrypted}
        record: dict[str, Any] = {"id": backup_id, "level": record_level({"disks": entries}),
                                  "time": int(time.time()), "checkpoint": backup_id,
                                  "quiesced": bool(info.get("quiesced")),
                                  "disks": entries}
        if info.get("frozen_window") is not None:
            record["frozen_window"] = info["frozen_window"]
        if quiesce_error is not None:
            record["quiesce_error"] = quiesce_error
        _pause("manifest")
        manifest.data["backups"].append(record)
        # The earlier checkpoints no next backup needs are marked in the same
        # write (the manifest is written once), and deleted once it is saved.
        keep = needed_checkpoints(manifest.backups)
        for b in manifest.data["backups"]:
            if b.get("checkpoint") not in keep:
                b["checkpoint_deleted"] = True
        manifest.save()
    except BaseException as err:
        renewals.close()
        with _uninterrupted():
            if _saved(dest, backup_id):  # saved; only the directory's fsync failed
                made, undo = [], ("snapshot",)
            left = _undo(client, domain, dest, backup_id, made, undo)
        if left and not isinstance(err, KeyboardInterrupt):
            err.add_note("; ".join(left))
        raise
    renewals.close()
    with _uninterrupted():
        _, problem = _delete(client, domain, "snapshot", backup_id)
        if problem is None:
            with contextlib.suppress(OSError):
                _remove_durably(dest / PENDING)
        else:
            say(f"warning: snapshot {backup_id} could not be deleted ({problem}); the next "
                f"backup into {dest} deletes it")
        _drop_unneeded_checkpoints(client, domain, manifest, say)
    return record


def needed_checkpoints(backups: list[dict[str, Any]]) -> set[str]:
    """The checkpoints a directory's next backup may start from: per disk, the
    one of the newest backup that holds the disk."""
    newest: dict[str, str] = {}
    for b in backups:
        for disk in b["disks"]:
            newest[disk] = b["checkpoint"]
    return set(newest.values())


def _drop_unneeded_checkpoints(client: Client, domain: str, manifest: Manifest,
                               say: Callable[[str], None]) -> None:
    """Delete this directory's checkpoints that no next backup needs, so the
    images do not gather a bitmap per backup forever (QEMU holds every one in
    memory). Only names this manifest records are touched: another
    directory's chain, or anyone else's checkpoint, stays as it is. The
    manifest already marks them ``checkpoint_deleted``; the daemon's list says
    which are still there, so one that cannot be deleted now (or that a
    crash kept) goes after the next backup."""
    keep = needed_checkpoints(manifest.backups)
    ours = {b["checkpoint"] for b in manifest.backups if b.get("checkpoint")} - keep
    try:
        there = set(client.call("checkpoint.list", domain=domain))
    except (BlockbackupError, OSError) as err:
        say(f"warning: the checkpoints could not be listed ({err}); the next backup "
            "deletes those no next backup needs")
        return
    for name in sorted(ours & there):
        _, problem = _delete(client, domain, "checkpoint", name)
        if problem is not None:
            say(f"warning: checkpoint {name}, which no next backup needs, could not be "
                f"deleted ({problem}); the next backup tries again")


# -- restore and verify -------------------------------------------------------------

def _backing_name(path: Path) -> str | None:
    """The backing file name in a qcow2 file's header (None: none).

    :raise BackupError: the file is not qcow2.
    """
    try:
        return qcow2.backing_file(path)
    except ValueError as err:
        raise BackupError(str(err)) from None


def chain(manifest: Manifest, backup_id: str, disk: str) -> list[str]:
    """The files that make up disk at a backup, newest first, following each
    file's backing file through the earlier backups of that disk.

    :raise BackupError: the backup has no such disk, or a link is missing.
    """
    records = manifest.backups
    index = next(i for i, b in enumerate(records) if b["id"] == backup_id)
    if disk not in records[index]["disks"]:
        raise BackupError(f"backup {backup_id} has no disk {disk!r}")
    entry = records[index]["disks"][disk]
    files = [str(entry["file"])]
    while entry.get("backing"):
        backing = entry["backing"]
        found = next(((i, b["disks"][disk]) for i, b in enumerate(records[:index])
                      if disk in b["disks"] and b["disks"][disk]["file"] == backing), None)
        if found is None:
            raise BackupError(f"{entry['file']} has backing file {backing}, which is not an "
                              f"earlier backup of {disk} in the manifest")
        index, entry = found
        files.append(str(entry["file"]))
    return files


def restore(dest: Path, disk: str, at: str | None, output: Path, fmt: str) -> None:
    """Rebuild a disk as it was at a backup into a standalone image.

    :raise BackupError: no such backup or disk, or a file of its chain is
        missing or names another backing file than the manifest.
    :raise subprocess.CalledProcessError: qemu-img failed (the output is removed
        if it did not exist before).
    """
    manifest = Manifest.load(dest, None)
    record = manifest.find(at)
    files = checked_chain(dest, manifest, record["id"], disk)
    import stat
    import subprocess

    target = str(output)
    # A block device (an LV, a zvol) is written in place; an rbd: target is
    # an RBD image qemu-img creates; both hold the disk raw.
    device = target.startswith("/dev/") or (
        output.exists() and stat.S_ISBLK(output.stat().st_mode))
    remote = target.startswith("rbd:")
    if (device or remote) and fmt != "raw":
        raise BackupError(f"{target} holds the disk raw: restore it with --format raw")
    existed = device or remote or output.exists()
    args = ["qemu-img", "convert", "-q", "-f", "qcow2", "-O", fmt]
    if fmt == "raw":
        # Clusters written in any order, by several coroutines: a raw target
        # then takes them at the copy speed of the disks (qcow2 would be laid
        # out scattered).
        args.append("-W")
    if device:
        args.append("-n")  # it exists: written, not created
    try:
        subprocess.run([*args, str(dest / files[0]), target], check=True, capture_output=True)
    except BaseException:
        if not existed:
            output.unlink(missing_ok=True)
        raise


def checked_chain(dest: Path, manifest: Manifest, backup_id: str, disk: str) -> list[str]:
    """:func:`chain`, each file present and naming the next one as its backing file.

    :raise BackupError: no such disk, or a file is missing or names another
        backing file than the manifest.
    """
    files = chain(manifest, backup_id, disk)
    for i, name in enumerate(files):
        path = dest / name
        if not path.exists():
            raise BackupError(f"{name} is missing: {disk} at {backup_id} needs it")
        expected = files[i + 1] if i + 1 < len(files) else None
        actual = _backing_name(path)
        if actual != expected:
            raise BackupError(f"{name} has backing file {actual}, the manifest says {expected}")
    return files


def verify(dest: Path, at: str | None) -> list[str]:
    """Files whose content does not match the manifest, or whose backing file
    is not the earlier backup of its disk the manifest names (empty: all good).

    :raise BackupError: no manifest, or no such backup.
    """
    manifest = Manifest.load(dest, None)
    upto = manifest.find(at)["id"]
    bad = []
    for record in manifest.backups:
        for disk, entry in record["disks"].items():
            path = dest / entry["file"]
            if not path.exists() or not _matches(path, entry):
                bad.append(entry["file"])
                continue
            try:
                files = chain(manifest, record["id"], disk)
                actual = _backing_name(path)
            except BackupError as err:
                bad.append(f"{entry['file']} ({err})")
                continue
            if actual != (files[1] if len(files) > 1 else None):
                bad.append(f"{entry['file']} (backing file {actual}, the manifest says "
                           f"{entry.get('backing')})")
        if record["id"] == upto:
            break
    return bad


def restorable(dest: Path, manifest: Any, record: dict[str, Any]) -> list[str]:
    """How a backup point can be restored: ``["restore", "instant", "mount"]``
    when every file of every disk's chain is in the directory (``bbctl
    restore`` rebuilds a disk, ``--instant`` runs a VM on it at once, ``bbctl
    mount`` shows its files), else ``[]``."""
    try:
        for disk in record["disks"]:
            if not all((dest / name).exists() for name in chain(manifest, record["id"], disk)):
                return []
    except BackupError:
        return []
    return ["restore", "instant", "mount"]
