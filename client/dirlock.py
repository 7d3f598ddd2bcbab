"""One writer of a backup directory at a time, across processes and hosts.

Two backups of one domain into one directory at once would interleave: the
second would take the first's pending record for a cut-short backup and
delete its snapshot, and the two manifests written last-wins would lose one
backup. So a backup (and a prune) holds the directory's ``lock.json`` while
it runs.

The lock is made with link(2) of a file of the holder's own: it fails with
EEXIST when the lock is there, atomically, on a local filesystem, on NFS
(the way NFS documents to replace O_EXCL) and on CephFS. The file names its
holder (host, boot id, pid, what it does, since when), and a thread of the
holder touches it every few seconds. A lock is stale, and taken over with a
warning, when its holder ran on this host (the same boot) and its process
is gone, or when it was not touched for :data:`STALE` seconds (a holder on
another host that died, or lost the filesystem). The taker first renames the
stale file to a name of its own, so of two takers only one wins.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from .errors import BackupError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

LOCK = "lock.json"
#: Seconds without a touch after which another host's lock is stale. The
#: holder touches it every sixth of that; the margin covers clock skew
#: between hosts (NFS sets the time the server's clock says).
STALE = 120.0


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: alive
    return True


class DirectoryLock:
    """``with DirectoryLock(directory, "backup of vm1"):`` holds the lock.

    :raise BackupError: (on entering) another holder has it: the message names it.
    """

    def __init__(self, directory: Path, what: str, say: Callable[[str], None],
                 stale: float = STALE) -> None:
        self.path = directory / LOCK
        self._what, self._say, self._stale = what, say, stale
        self._token = uuid.uuid4().hex
        self._stopped = threading.Event()
        self._toucher: threading.Thread | None = None

    def __enter__(self) -> DirectoryLock:
        self._acquire()
        self._toucher = threading.Thread(target=self._touch, name="lock-touch", daemon=True)
        self._toucher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        if self._toucher is not None:
            self._toucher.join(5)
        holder = self._holder(self.path)
        if holder is not None and holder.get("token") == self._token:
            self.path.unlink(missing_ok=True)

    def _acquire(self) -> None:
        mine = {"what": self._what, "host": socket.gethostname(), "boot_id": _boot_id(),
                "pid": os.getpid(), "since": int(time.time()), "token": self._token}
        tmp = self.path.with_name(f".{LOCK}.{self._token}")
        tmp.write_text(json.dumps(mine) + "\n")
        try:
            for _ in range(5):
                try:
                    os.link(tmp, self.path)
                    return
                except FileExistsError:
                    pass
                holder, touched = self._holder(self.path), self._touched()
                if holder is None or touched is None:
                    continue  # released meanwhile: try again
                why = self._why_stale(holder, touched)
                if why is None:
                    raise BackupError(
                        f"{self.path.parent} is in use: {_describe(holder)} holds {self.path} "
                        f"(touched {max(0, int(time.time() - touched))} s ago); two writers "
                        "of one backup directory at once would interleave: try again when "
                        "it is done")
                self._take_over(holder, why)
            raise BackupError(f"cannot take {self.path}: other writers keep taking it")
        finally:
            tmp.unlink(missing_ok=True)

    def _take_over(self, holder: dict[str, Any], why: str) -> None:
        grave = self.path.with_name(f".{LOCK}.stale.{self._token}")
        try:
            os.rename(self.path, grave)
        except FileNotFoundError:
            return  # another taker was first
        if self._holder(grave) != holder:
            # A live holder's lock, taken between our look and the rename: give it back.
            try:
                os.link(grave, self.path)
            except FileExistsError:
                pass
            grave.unlink(missing_ok=True)
            return
        grave.unlink(missing_ok=True)
        self._say(f"took over {self.path}: {_describe(holder)} {why}")

    def _why_stale(self, holder: dict[str, Any], touched: float) -> str | None:
        if holder.get("host") == socket.gethostname() and holder.get("boot_id") == _boot_id():
            pid = holder.get("pid")
            if isinstance(pid, int) and not _alive(pid):
                return "is gone (its process ended)"
            return None
        idle = time.time() - touched
        if idle > self._stale:
            return f"did not touch it for {int(idle)} s"
        return None

    def _touched(self) -> float | None:
        try:
            return self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    @staticmethod
    def _holder(path: Path) -> dict[str, Any] | None:
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"what": f"a writer that left {path} unreadable"}
        return data if isinstance(data, dict) else {"what": f"a writer of an odd {path}"}

    def _touch(self) -> None:
        while not self._stopped.wait(self._stale / 6):
            try:
                os.utime(self.path)
            except OSError:
                pass  # the next touch may reach it; the backup's own I/O says more


def _describe(holder: dict[str, Any]) -> str:
    what = str(holder.get("what", "another writer"))
    where = f" (pid {holder.get('pid')} on {holder.get('host')}" if "pid" in holder else ""
    since = holder.get("since")
    if where and isinstance(since, int):
        where += f", since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))}"
    return what + (where + ")" if where else "")
