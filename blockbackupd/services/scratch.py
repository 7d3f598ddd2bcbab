"""Scratch images: where they may live, and making and removing them.

A scratch image receives the old data of blocks the guest overwrites while a
snapshot exists. It is a sparse raw file of the disk's size, made by the
daemon (not by QEMU, which may lack the right to create files there): the
old data lands at its own offset, so the file needs no format of its own. A
qcow2 would add a ``qemu-img`` run to every snapshot and a metadata update to
every first write of a cluster, for nothing a temporary file needs.

The scratch of an encrypted disk is a LUKS volume instead (:func:`encrypt`),
under a random key that only the daemon and QEMU hold, for the snapshot's life.
"""

from __future__ import annotations

import logging
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ..errors import InvalidArgument, OperationFailed

log = logging.getLogger("blockbackupd.scratch")

#: Bytes allocated at once in a new scratch file: one copy cluster.
RESERVED = 64 * 1024
#: qemu-img runs a LUKS format may take. Its PBKDF timing fails at once
#: (in about 10 ms) when its thread's user CPU time shows no progress: on a
#: loaded 2-CPU host 2 runs in 40, and 3 in a row once in the fault tests,
#: which failed a snapshot of an encrypted disk.
LUKS_TRIES = 10


def default_path(scratch_dir: Path, domain: str, disk: str, snapshot: str) -> Path:
    """A readable default name: ``<domain>-<disk>-<snapshot>.raw``."""
    return scratch_dir / f"{domain}-{disk}-{snapshot}.raw"


def check_requested(path: str, allowed: Sequence[Path]) -> Path:
    """The path a client asked for, once it is known to be acceptable.

    Its directory, with every symlink resolved, must be one of the allowed
    directories or below one; the file itself must not exist (a symlink
    counts as existing, dangling or not).

    :raise InvalidArgument: naming what is wrong.
    """
    requested = Path(path)
    if not requested.is_absolute() or requested.name in ("", ".", ".."):
        raise InvalidArgument(f"scratch file {path!r} must be an absolute path to a file")
    parent = requested.parent.resolve()
    roots = [a.resolve() for a in allowed]
    if not any(parent == r or parent.is_relative_to(r) for r in roots):
        raise InvalidArgument(
            f"scratch file {path!r} is not under an allowed directory "
            f"({', '.join(str(a) for a in allowed)})")
    final = parent / requested.name
    if os.path.lexists(final):
        raise InvalidArgument(f"scratch file {str(final)!r} already exists")
    return final


def create(path: Path, size: int) -> None:
    """Create a sparse scratch file of ``size`` bytes; the path must not exist yet.

    :raise InvalidArgument: the file appeared meanwhile.
    :raise OperationFailed: the host refused (no space, no permission, a
        file system whose files cannot be that large, ...).
    """
    try:
        # O_EXCL | O_NOFOLLOW: never write through a symlink planted after the check.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise InvalidArgument(f"scratch file {str(path)!r} already exists") from None
    except OSError as err:
        raise OperationFailed(f"cannot create scratch file {path}: {err.strerror}") from err
    try:
        os.ftruncate(fd, size)
        # One cluster's room taken now: a full file system (or quota) refuses
        # the snapshot here, not at the guest's first write, when it breaks.
        os.posix_fallocate(fd, 0, min(size, RESERVED))
    except OSError as err:
        os.close(fd)
        remove(path)
        raise OperationFailed(f"cannot create scratch file {path}: {err.strerror}") from err
    os.close(fd)


def encrypt(path: Path, size: int, key: bytes, secret_id: str) -> None:
    """Make the new scratch file a LUKS volume with ``size`` bytes of payload,
    under ``key`` (for an encrypted disk: its old data must not land in the
    clear). The key goes to ``qemu-img`` through a pipe, never on its command
    line or on disk; PBKDF iterations are few, since the key is random, not a
    passphrase, and lives only as long as the snapshot.

    :raise OperationFailed: qemu-img failed (the file is then removed).
    """
    for _ in range(LUKS_TRIES):
        proc = _luks_create(path, size, key, secret_id)
        # qemu-img times its PBKDF on the CPU first; on a loaded host that
        # measure can fail ("Unable to get accurate CPU usage", at once):
        # try again.
        if proc.returncode == 0 or "accurate CPU usage" not in proc.stderr:
            break
    if proc.returncode != 0:
        remove(path)
        raise OperationFailed(f"cannot encrypt scratch file {path}: {proc.stderr.strip()}")


def _luks_create(path: Path, size: int, key: bytes,
                 secret_id: str) -> subprocess.CompletedProcess[str]:
    read, write = os.pipe()
    try:
        os.write(write, key)
        os.close(write)
        write = -1
        return subprocess.run(
            ["qemu-img", "create", "-q", "-f", "luks",
             "--object", f"secret,id={secret_id},file=/dev/fd/{read}",
             "-o", f"key-secret={secret_id},iter-time=10", str(path), str(size)],
            pass_fds=(read,), capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        remove(path)
        raise OperationFailed(f"cannot encrypt scratch file {path}: {err}") from err
    finally:
        os.close(read)
        if write >= 0:
            os.close(write)


def remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as err:
        log.error("cannot remove scratch file %s: %s", path, err)


def allocated_bytes(path: Path) -> int:
    """Host bytes the scratch image uses now (0 when it is gone)."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0
