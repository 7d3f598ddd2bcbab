"""The reference backup application: full and incremental backups of a
domain's disks as qcow2 chains, pulled over NBD, and their restore and check.

A backup directory holds one domain's backups: per backup and disk one qcow2
file (an incremental one has the previous backup of that disk as its backing
file, by relative name, so ``qemu-img`` works on any of them without bbctl),
and ``manifest.json`` recording every backup: id, level, time, checkpoint,
and per disk the file, its size, bytes read and written, and a BLAKE3 checksum.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3

from . import pull, qcow2
from .client import Client
from .errors import ApplicationError

MANIFEST = "manifest.json"


class BackupError(Exception):
    """The backup, restore or check cannot be done; the message says why."""


@dataclass
class Manifest:
    path: Path
    data: dict[str, Any]

    @classmethod
    def load(cls, directory: Path, domain: str | None) -> Manifest:
        path = directory / MANIFEST
        if path.exists():
            data = json.loads(path.read_text())
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
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            f.write(json.dumps(self.data, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def find(self, backup_id: str | None) -> dict[str, Any]:
        if not self.backups:
            raise BackupError("no backups in this directory")
        if backup_id is None:
            return self.backups[-1]
        for b in self.backups:
            if b["id"] == backup_id:
                return b
        raise BackupError(f"no backup {backup_id!r} in this directory")


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
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return bool(h.hexdigest() == entry["sha256"])


def _pause(step: str) -> None:
    """Stop here if ``BBCTL_PAUSE_AT`` names this step: the tests interrupt a
    backup at a known point with a real SIGINT."""
    if os.environ.get("BBCTL_PAUSE_AT") == step:
        print(f"bbctl: paused at {step}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)


def _pull(socket_path: str, export: str, changes: str | None, target: Path, size: int,
          backing: str | None, progress: Callable[[int], None]) -> tuple[int, int, str]:
    """Copy an export's data (or only its changes) into a new qcow2 file, flushed;
    returns the bytes read, the bytes recorded as zeros, and the file's checksum.

    :raise pull.PullError: the export could not be read.
    :raise OSError: the file could not be written.
    """
    runs = pull.plan(socket_path, export, changes)
    clusters = qcow2.cluster_runs([(r.offset, r.length, r.zero) for r in runs], size)
    # The image holds whole clusters: read whole clusters (the disk's end aside).
    reads = [pull.Run(c.first * qcow2.CLUSTER,
                      min(c.count * qcow2.CLUSTER, size - c.first * qcow2.CLUSTER))
             for c in clusters if not c.zero]
    writer = qcow2.Qcow2Writer(target, size, clusters, backing)

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
        read = pull.copy(socket_path, export, reads, writer, progress=report, ordered=seen)
        pad = writer.file_size - writer.data_offset - read
        hasher.update(bytes(pad))
        writer.complete()
        writer.sync()
        digest = "blake3:" + hasher.hexdigest()
    except BaseException:
        writer.abort()
        raise
    return read, sum(c.count for c in clusters if c.zero) * qcow2.CLUSTER, digest


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


def backup(client: Client, domain: str, dest: Path, level: str, disks: list[str],
           say: Callable[[str], None], progress: Callable[[int], None]) -> dict[str, Any]:
    """Take one backup; whatever happens, its snapshot and exports go.

    :raise BackupError: the directory belongs to another domain, or a step failed.
    :raise ApplicationError: the daemon refused.
    """
    dest.mkdir(parents=True, exist_ok=True)
    manifest = Manifest.load(dest, domain)
    previous = manifest.backups[-1] if manifest.backups else None
    if level in ("inc", "auto"):
        reason = _incremental_blocker(client, domain, previous, disks)
        if reason is not None:
            if level == "inc":
                raise BackupError(f"cannot take an incremental backup: {reason}")
            say(f"taking a full backup: {reason}")
            level = "full"
        else:
            level = "inc"
    backup_id = "bk-" + time.strftime("%Y%m%dT%H%M%S") + f"-{int(time.time() * 1000) % 1000:03d}"
    xml = "<domainblocksnapshot><name>" + backup_id + "</name>" + "".join(
        f'<disk name="{d}"/>' for d in disks) + "</domainblocksnapshot>"
    made: list[Path] = []
    created = False
    try:
        client.snapshot_create(domain, xml, checkpoint=True)
        created = True
        _pause("snapshot")
        info = client.snapshot_lookup(domain, backup_id)
        checkpoint = previous["checkpoint"] if level == "inc" and previous else None
        export_xml = '<domainblockexport type="nbd">' + "".join(
            f'<disk name="{d}" snapshot="{backup_id}"'
            + (f' checkpoint="{checkpoint}"' if checkpoint else "") + "/>"
            for d in info["disks"]) + "</domainblockexport>"
        started = client.export_start(domain, export_xml)
        _pause("export")
        socket_path = started["server"]["socket"]
        record: dict[str, Any] = {"id": backup_id, "level": level, "time": int(time.time()),
                                  "checkpoint": backup_id, "disks": {}}
        for export, scratch in zip(started["exports"], info["scratch"], strict=True):
            disk = export["disk"]
            target = dest / f"{backup_id}-{disk}.qcow2"
            backing = previous["disks"][disk]["file"] if level == "inc" and previous else None
            made.append(target)
            began = time.monotonic()
            read, zeroed, digest = _pull(socket_path, export["name"],
                                         export.get("bitmap") if backing else None, target,
                                         scratch["size"], backing, progress)
            record["disks"][disk] = {
                "file": target.name, "backing": backing, "size": scratch["size"],
                "bytes_read": read, "bytes_zeroed": zeroed,
                "bytes_written": target.stat().st_blocks * 512,
                "seconds": round(time.monotonic() - began, 3),
                "checksum": digest}
        _pause("manifest")
        manifest.data["backups"].append(record)
        manifest.save()
        return record
    except BaseException:
        with _uninterrupted():
            for path in made:
                path.unlink(missing_ok=True)
            if created:
                # The snapshot first: its checkpoint then has nothing to fold into.
                created = False
                for method in ("snapshot.delete", "checkpoint.delete"):
                    try:
                        client.call(method, domain=domain, name=backup_id)
                    except ApplicationError:
                        pass
        raise
    finally:
        if created:
            with _uninterrupted():
                try:
                    client.snapshot_delete(domain, backup_id)
                except ApplicationError:
                    pass


def _incremental_blocker(client: Client, domain: str, previous: dict[str, Any] | None,
                         disks: list[str]) -> str | None:
    """Why an incremental backup is not possible now, or None."""
    if previous is None:
        return "no earlier backup in this directory"
    try:
        info = client.call("checkpoint.lookup", domain=domain, name=previous["checkpoint"])
    except ApplicationError as err:
        return f"checkpoint {previous['checkpoint']!r} of the last backup: {err.message}"
    if info["state"] != "valid":
        return f"checkpoint {previous['checkpoint']!r} is broken: {info.get('reason')}"
    missing = [d for d in (disks or info["disks"]) if d not in previous["disks"]]
    if missing:
        return f"the last backup has no disk {', '.join(missing)}"
    return None


def restore(dest: Path, disk: str, at: str | None, output: Path, fmt: str) -> None:
    """Rebuild a disk as it was at a backup into a standalone image.

    :raise BackupError:
    """
    record = Manifest.load(dest, None).find(at)
    if disk not in record["disks"]:
        raise BackupError(f"backup {record['id']} has no disk {disk!r}")
    source = dest / record["disks"][disk]["file"]
    subprocess.run(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", fmt, str(source),
                    str(output)], check=True, capture_output=True)


def verify(dest: Path, at: str | None) -> list[str]:
    """Files whose content does not match the manifest (empty: all good).

    :raise BackupError: no manifest, or no such backup.
    """
    manifest = Manifest.load(dest, None)
    upto = manifest.find(at)["id"]
    bad = []
    for record in manifest.backups:
        for entry in record["disks"].values():
            path = dest / entry["file"]
            if not path.exists() or not _matches(path, entry):
                bad.append(entry["file"])
        if record["id"] == upto:
            break
    return bad
