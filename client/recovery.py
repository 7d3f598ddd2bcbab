"""``bbctl restore --instant`` and ``bbctl recovery``: a VM runs on a backup
point at once while the daemon moves the data into its new image.

The new image is a qcow2 whose backing file is the point's file (by absolute
path, so the image may live anywhere); making it writes a header only, so
it takes the same few milliseconds for any disk size. The daemon is told of
it (``recovery.start``) and streams the backup into it in the QEMU of the VM
that runs on it (see the daemon's ``services/recovery.py``).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .backup import Manifest, checked_chain
from .client import Client
from .errors import BackupError


def instant_restore(client: Client, dest: Path, disk: str, at: str | None, output: Path,
                    speed: int | None) -> dict[str, Any]:
    """Make ``output`` a qcow2 backed by the point's file and register it
    with the daemon. Returns {output, backing, seconds, recovery}.

    :raise BackupError: no such backup or disk, a file of the chain is
        missing or wrong, or ``output`` exists.
    :raise ApplicationError: the daemon refused (``output`` is removed).
    :raise subprocess.CalledProcessError: qemu-img failed.
    """
    start = time.perf_counter()
    manifest = Manifest.load(dest, None)
    record = manifest.find(at)
    files = checked_chain(dest, manifest, record["id"], disk)
    if output.exists() or output.is_symlink():
        raise BackupError(f"{output} exists: an instant restore makes a new image")
    if not output.is_absolute():
        output = Path.cwd() / output
    top = (dest / files[0]).resolve()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(top), "-F", "qcow2",
                    str(output)], check=True, capture_output=True)
    try:
        info = client.call("recovery.start", file=str(output),
                           **({"speed": speed} if speed is not None else {}))
    except BaseException:
        output.unlink(missing_ok=True)
        raise
    return {"output": str(output), "backing": str(top), "backup": record["id"],
            "seconds": round(time.perf_counter() - start, 3), "recovery": info}


def wait(client: Client, file: str, progress: Callable[[int, int], None],
         interval: float = 0.5) -> dict[str, Any]:
    """Poll the recovery until it is done; returns its last lookup.

    :raise BackupError: it failed (the daemon retries when the VM connects again).
    """
    while True:
        info: dict[str, Any] = client.call("recovery.lookup", file=file)
        done = info.get("progress", {})
        progress(int(done.get("done", 0)), int(done.get("total", 0)))
        if info["state"] == "done":
            return info
        if info["state"] == "failed":
            raise BackupError(f"recovery into {file} failed: {info.get('error')}")
        time.sleep(interval)
