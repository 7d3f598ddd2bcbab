"""``bbctl prune DIR --keep N``: a backup directory keeps its N newest restore
points; the older ones are merged into a synthetic full.

Per disk, the oldest kept backup that holds the disk becomes a full: its
chain (its file and the older ones it is backed by) is flattened with
``qemu-img convert`` into a new file, which then replaces that backup's file
under the same name. So every newer incremental, whose backing file is named
in its own header, stays valid without being touched. The older backups'
records leave the manifest and their files are deleted.

Ctrl-C: the slow part (flattening, checksums) only makes temporary files
next to the manifest, removed on the way out; the swap (new files into
place, then the manifest, replaced atomically) runs with Ctrl-C held off, so
an interruption leaves the directory as it was before, or pruned.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .backup import (
    PENDING,
    Manifest,
    _pause,
    _sync_directory,
    _uninterrupted,
    chain,
    checksum,
    record_level,
)
from .dirlock import DirectoryLock
from .errors import BackupError

#: Suffix of the synthetic fulls while they are being made.
_TMP = ".prune-tmp"


def prune(dest: Path, keep: int, say: Callable[[str], None],
          recovering: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """Keep the ``keep`` newest backups of ``dest``; merge the older ones into
    a synthetic full per disk. Returns what was done.

    :raise BackupError: ``keep`` below 1; a backup into the directory is under
        way or was cut short; a disk's newest backup would be dropped; a file
        of a chain is missing or not what the manifest says.
    ``recovering``: image -> backup files it still reads, of the daemon's
    unfinished instant recoveries; prune refuses to delete any of them.

    :raise subprocess.CalledProcessError: qemu-img failed (nothing changed).
    """
    if keep < 1:
        raise BackupError("--keep must be at least 1: the newest backup always stays")
    Manifest.load(dest, None)  # a directory of backups, before a lock is made in it
    with DirectoryLock(dest, "a prune", say):
        return _prune(dest, keep, say, recovering)


def _prune(dest: Path, keep: int, say: Callable[[str], None],
           recovering: dict[str, list[str]] | None) -> dict[str, Any]:
    manifest = Manifest.load(dest, None)
    if (dest / PENDING).exists():
        raise BackupError(f"a backup into {dest} is under way, or was cut short and is cleaned "
                          "up by the next one: prune after it")
    for leftover in dest.glob(f"*{_TMP}"):  # an earlier prune killed outright
        leftover.unlink()
    backups = manifest.backups
    if len(backups) <= keep:
        return {"kept": [b["id"] for b in backups], "dropped": [], "merged": {}, "freed": 0}
    dropped, kept = backups[:-keep], backups[-keep:]
    for disk in sorted({d for b in dropped for d in b["disks"]}):
        if not any(disk in b["disks"] for b in kept):
            newest = [b["id"] for b in dropped if disk in b["disks"]][-1]
            raise BackupError(f"disk {disk}'s newest backup is {newest}, older than the {keep} "
                              "kept: back it up again first, or keep more")
    kept_files = {e["file"] for b in kept for e in b["disks"].values()}
    doomed = {str((dest / e["file"]).resolve()): b["id"] for b in dropped
              for e in b["disks"].values() if e["file"] not in kept_files}
    for image, files in sorted((recovering or {}).items()):
        read = sorted({doomed[f] for f in files if f in doomed})
        if read:
            raise BackupError(f"backup(s) {', '.join(read)} are read by the unfinished instant "
                              f"recovery into {image}: prune when it is done (bbctl recovery "
                              "wait)")
    # Per disk, the oldest kept backup holding it: a full once its chain is merged.
    plan: list[tuple[dict[str, Any], str, dict[str, Any]]] = []
    for disk in sorted({d for b in kept for d in b["disks"]}):
        record = next(b for b in kept if disk in b["disks"])
        entry = record["disks"][disk]
        if entry.get("backing"):
            plan.append((record, disk, entry))
    made: list[tuple[dict[str, Any], str, Path, str, list[str]]] = []
    try:
        for record, disk, entry in plan:
            files = chain(manifest, record["id"], disk)
            for name in files:
                if not (dest / name).exists():
                    raise BackupError(f"{name} is missing: {disk} at {record['id']} needs it")
            tmp = dest / (entry["file"] + _TMP)
            subprocess.run(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "qcow2",
                            str(dest / entry["file"]), str(tmp)], check=True,
                           capture_output=True)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            made.append((entry, disk, tmp, checksum(tmp), files[1:]))
            say(f"{disk}: {entry['file']} is now a full ({len(files) - 1} older file(s) merged)")
            _pause("prune-merged")
        with _uninterrupted():
            referenced = set()
            for entry, disk, tmp, digest, _ in made:
                os.replace(tmp, dest / entry["file"])  # same name: newer backing links hold
                entry.update(level="full", backing=None, base=None, checksum=digest,
                             reason=f"synthetic full: {_ids(dropped, disk)} merged by prune",
                             bytes_written=(dest / entry["file"]).stat().st_blocks * 512)
            _sync_directory(dest)
            for record in kept:
                record["level"] = record_level(record)
                referenced |= {e["file"] for e in record["disks"].values()}
            manifest.data["backups"] = kept
            manifest.save()
            freed = 0
            for record in dropped:
                for entry in record["disks"].values():
                    path = dest / entry["file"]
                    if entry["file"] not in referenced and path.exists():
                        freed += path.stat().st_blocks * 512
                        path.unlink()
            _sync_directory(dest)
    finally:
        for _, _, tmp, _, _ in made:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    return {"kept": [b["id"] for b in kept], "dropped": [b["id"] for b in dropped],
            "merged": {disk: entry["file"] for entry, disk, _, _, _ in made}, "freed": freed}


def _ids(records: list[dict[str, Any]], disk: str) -> str:
    return ", ".join(b["id"] for b in records if disk in b["disks"])
