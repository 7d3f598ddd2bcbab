"""Persistent change tracking for a raw volume: a qcow2 metadata image whose
data lives, byte for byte, in the raw volume itself (``data_file`` with
``data_file_raw=on``; libvirt 10.10's ``<dataStore>``).

The VM then runs on the metadata image: the guest's data stays where it was
(a file, an LVM LV, a zvol, anything ``qemu-img`` opens), readable as raw by
every other tool, and the qcow2 beside it keeps persistent bitmaps, so the
disk keeps checkpoints across QEMU restarts like any qcow2.

``qemu-img create -o data_file=VOLUME`` would create (so empty) the volume:
the metadata image is made against a throwaway data file instead, and
``qemu-img amend`` then points it at the volume, which is only ever read
(for its size and format). Offline only: the VM must be stopped, and
qemu-img's image locks refuse a volume a running QEMU holds.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path
from typing import Any

from .errors import BackupError


def _info(path: Path) -> dict[str, Any]:
    r = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise BackupError(f"cannot read {path}: {r.stderr.strip()}")
    return dict(json.loads(r.stdout))


def enable_tracking(volume: Path, output: Path) -> dict[str, Any]:
    """Make ``output``, a qcow2 metadata image whose data file is ``volume``.

    :raise BackupError: the volume is missing, not raw, or in use; the output
        exists; or qemu-img failed (nothing is left behind then, and the
        volume is unchanged).
    """
    volume, output = volume.absolute(), output.absolute()
    try:
        mode = os.stat(volume).st_mode
    except OSError as err:
        raise BackupError(f"{volume}: {err.strerror}") from None
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        raise BackupError(f"{volume} is neither a file nor a block device")
    if output.exists() or output.is_symlink():
        raise BackupError(f"{output} already exists")
    info = _info(volume)
    if info.get("format") != "raw":
        raise BackupError(f"{volume} is {info.get('format')}, not raw: a qcow2 image keeps "
                          "checkpoints itself")
    size = int(info["virtual-size"])
    # A writable open (nothing written) takes QEMU's image lock: a running VM
    # that holds the volume refuses it. amend below never opens the volume.
    held = subprocess.run(["qemu-io", "-f", "raw", "-c", "quit", str(volume)],
                          capture_output=True, text=True)
    if held.returncode != 0 or "lock" in held.stderr:
        raise BackupError(f"{volume} is in use (stop the VM first): "
                          f"{(held.stderr or held.stdout).strip()}")
    scratch = output.with_name(output.name + ".data-tmp")
    try:
        made = subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2",
             "-o", f"data_file={scratch.name},data_file_raw=on", str(output), str(size)],
            capture_output=True, text=True, cwd=output.parent)
        if made.returncode != 0:
            raise BackupError(f"qemu-img create {output}: {made.stderr.strip()}")
        # -U is not given: a QEMU that holds the volume makes this fail, as it must.
        amended = subprocess.run(
            ["qemu-img", "amend", "-f", "qcow2", "-o", f"data_file={volume}", str(output)],
            capture_output=True, text=True, cwd=output.parent)  # where the throwaway is
        if amended.returncode != 0:
            raise BackupError(f"qemu-img amend {output}: {amended.stderr.strip()}")
        check = _info(output)
        spec = check.get("format-specific", {}).get("data", {})
        if spec.get("data-file") != str(volume) or not spec.get("data-file-raw"):
            raise BackupError(f"{output} does not name {volume} as its raw data file")
    except BaseException:
        output.unlink(missing_ok=True)
        raise
    finally:
        scratch.unlink(missing_ok=True)
    block = stat.S_ISBLK(mode)
    return {"output": str(output), "data_file": str(volume), "size": size,
            "libvirt": libvirt_disk(output, volume, block),
            "qemu": qemu_args(output, volume, block)}


def libvirt_disk(meta: Path, volume: Path, block: bool) -> str:
    """A libvirt <disk> (10.10 or newer) that runs the VM on the metadata image."""
    source = f"<source dev='{volume}'/>" if block else f"<source file='{volume}'/>"
    return (f"<disk type='file' device='disk'>\n"
            f"  <driver name='qemu' type='qcow2'/>\n"
            f"  <source file='{meta}'>\n"
            f"    <dataStore type='{'block' if block else 'file'}'>\n"
            f"      <format type='raw'/>\n"
            f"      {source}\n"
            f"    </dataStore>\n"
            f"  </source>\n"
            f"  <target dev='vda' bus='virtio'/>\n"
            f"</disk>")


def qemu_args(meta: Path, volume: Path, block: bool) -> list[str]:
    """The -blockdev arguments of the same disk, for a QEMU command line."""
    driver = "host_device" if block else "file"
    return ["-blockdev", f"driver={driver},filename={volume},node-name=disk0-data",
            "-blockdev", f"driver=file,filename={meta},node-name=disk0-meta",
            "-blockdev", "driver=qcow2,file=disk0-meta,data-file=disk0-data,node-name=disk0"]
