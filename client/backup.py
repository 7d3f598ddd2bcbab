"""The reference backup application: full and incremental backups of a
domain's disks as qcow2 chains, pulled over NBD, and their restore and check.

A backup directory holds one domain's backups: per backup and disk one qcow2
file (an incremental one has the previous backup of that disk as its backing
file, by relative name, so ``qemu-img`` works on any of them without bbctl),
and ``manifest.json`` recording every backup: id, level, time, checkpoint,
and per disk the file, its size, bytes read and written, and a SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .client import Client
from .errors import ApplicationError

MANIFEST = "manifest.json"
#: Largest NBD request QEMU's server accepts.
MAX_REQUEST = 32 * 1024 * 1024


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
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        os.replace(tmp, self.path)  # never a half-written manifest

    def find(self, backup_id: str | None) -> dict[str, Any]:
        if not self.backups:
            raise BackupError("no backups in this directory")
        if backup_id is None:
            return self.backups[-1]
        for b in self.backups:
            if b["id"] == backup_id:
                return b
        raise BackupError(f"no backup {backup_id!r} in this directory")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _pull_changes(socket_path: str, export: str, context: str, target: Path,
                  progress: Callable[[int], None]) -> int:
    """Copy the extents a dirty-bitmap context flags from the export into a
    qcow2 file (served by a qemu-nbd we start and stop); returns bytes read."""
    import nbd

    # The daemon's own reader of dirty-bitmap contexts (same distribution).
    from blockbackupd.qemu.nbdread import dirty_extents

    extents = dirty_extents(socket_path, export, context)
    src = nbd.NBD()
    src.set_export_name(export)
    src.connect_unix(socket_path)
    with tempfile.TemporaryDirectory(prefix="bbctl-") as tmp:
        sock = os.path.join(tmp, "target.sock")
        server = subprocess.Popen(["qemu-nbd", "-k", sock, "-f", "qcow2", "--cache=unsafe",
                                   "--discard=unmap", str(target)])
        try:
            deadline = time.monotonic() + 10
            while not os.path.exists(sock):
                if server.poll() is not None or time.monotonic() > deadline:
                    raise BackupError(f"qemu-nbd could not serve {target}")
                time.sleep(0.02)
            dst = nbd.NBD()
            dst.connect_unix(sock)
            copied = 0
            for offset, length in extents:
                end = offset + length
                while offset < end:
                    n = min(MAX_REQUEST, end - offset)
                    dst.pwrite(src.pread(n, offset), offset)
                    offset += n
                    copied += n
                    progress(n)
            dst.flush()
            dst.shutdown()
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(10)
    src.shutdown()
    return copied


def _pull_full(socket_path: str, export: str, target: Path) -> int:
    """Copy the allocated, non-zero data of the export into a new qcow2 file
    (qemu-img convert reads block status and writes holes as holes)."""
    uri = f"nbd+unix:///{export}?socket={socket_path}"
    subprocess.run(["qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", uri, str(target)],
                   check=True, capture_output=True)
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "raw", uri],
                         check=True, capture_output=True, text=True).stdout
    return sum(int(e["length"]) for e in json.loads(out) if e.get("data") and not e.get("zero"))


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
        snap = client.snapshot_create(domain, xml, checkpoint=True)
        created = True
        info = client.snapshot_lookup(domain, snap["name"])
        checkpoint = previous["checkpoint"] if level == "inc" and previous else None
        export_xml = '<domainblockexport type="nbd">' + "".join(
            f'<disk name="{d}" snapshot="{backup_id}"'
            + (f' checkpoint="{checkpoint}"' if checkpoint else "") + "/>"
            for d in info["disks"]) + "</domainblockexport>"
        started = client.export_start(domain, export_xml)
        socket_path = started["server"]["socket"]
        record: dict[str, Any] = {"id": backup_id, "level": level, "time": int(time.time()),
                                  "checkpoint": backup_id, "disks": {}}
        for export, scratch in zip(started["exports"], info["scratch"], strict=True):
            disk = export["disk"]
            target = dest / f"{backup_id}-{disk}.qcow2"
            made.append(target)
            if level == "full":
                read = _pull_full(socket_path, export["name"], target)
                progress(read)
                backing = None
            else:
                assert previous is not None
                backing = previous["disks"][disk]["file"]
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing,
                                "-F", "qcow2", str(target), str(scratch["size"])],
                               check=True, capture_output=True, cwd=dest)
                read = _pull_changes(socket_path, export["name"], export["bitmap"], target,
                                     progress)
            record["disks"][disk] = {
                "file": target.name, "backing": backing, "size": scratch["size"],
                "bytes_read": read, "bytes_written": target.stat().st_blocks * 512,
                "sha256": sha256(target)}
        manifest.data["backups"].append(record)
        manifest.save()
        return record
    except BaseException:
        for path in made:
            path.unlink(missing_ok=True)
        if created:
            try:
                client.call("checkpoint.delete", domain=domain, name=backup_id)
            except ApplicationError:
                pass
        raise
    finally:
        if created:
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
            if not path.exists() or sha256(path) != entry["sha256"]:
                bad.append(entry["file"])
        if record["id"] == upto:
            break
    return bad
