"""Ceph RBD images that back disks: where they are, and the cluster's own
record of what changed (RBD snapshots and their diffs).

A checkpoint on a disk whose QEMU node is ``driver=rbd`` leaves an RBD
snapshot of the image just before its instant; the cluster keeps it when the
QEMU process, the host or the daemon's state is gone, and ``diff`` from it
says which extents were written since. Calls go through Ceph's own Python
bindings (librados, librbd: ceph-common's python3-rados, python3-rbd), block
and are run in a thread by the caller; each opens its own cluster connection
(about 35 ms here), so nothing is held between calls.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

#: Seconds a connection to the cluster may take before the call fails.
CONNECT_TIMEOUT = 10


class RbdError(Exception):
    """The cluster could not be reached or refused; the message says why."""


@dataclass(frozen=True)
class RbdImage:
    """An image as QEMU's ``rbd`` node names it: pool, namespace and image,
    and how to reach the cluster (``conf`` file and cephx ``user``; None:
    librados' defaults, /etc/ceph/ceph.conf and client.admin)."""

    pool: str
    image: str
    namespace: str = ""
    conf: str | None = None
    user: str | None = None

    def __str__(self) -> str:
        return "/".join(p for p in (self.pool, self.namespace, self.image) if p)


def image_of(filename: str) -> RbdImage | None:
    """The RBD image a QEMU node's filename names, or None when it is not
    one, is opened at a snapshot (read-only: nothing to track) or is a slice
    of one (a raw node with an offset: the image's offsets are not the
    disk's). QEMU shows an rbd node as ``json:{"driver": "rbd", "pool": …,
    "image": …}``, and a raw node on one as ``json:{"driver": "raw", "file":
    {…}}``."""
    if not filename.startswith("json:"):
        return None
    try:
        options = json.loads(filename[len("json:"):])
    except ValueError:
        return None
    while isinstance(options, dict) and options.get("driver") == "raw" \
            and not options.get("offset") and "size" not in options:
        options = options.get("file")
    if not isinstance(options, dict) or options.get("driver") != "rbd" \
            or options.get("snapshot"):
        return None
    pool, image = options.get("pool"), options.get("image")
    if not isinstance(pool, str) or not isinstance(image, str):
        return None
    conf, user = options.get("conf"), options.get("user")
    return RbdImage(pool, image, str(options.get("namespace") or ""),
                    conf if isinstance(conf, str) else None,
                    user if isinstance(user, str) else None)


@contextmanager
def _opened(img: RbdImage, snapshot: str | None = None) -> Iterator[Any]:
    try:
        import rados
        import rbd
    except ImportError as err:
        raise RbdError(f"Ceph's Python bindings are not installed ({err}): install "
                       "python3-rbd") from None
    try:
        cluster = rados.Rados(conffile=img.conf or "", rados_id=img.user)
        cluster.connect(timeout=CONNECT_TIMEOUT)
    except (rados.Error, OSError) as err:
        raise RbdError(f"cannot reach the Ceph cluster of {img}"
                       f"{f' (conf {img.conf})' if img.conf else ''}: {err}") from None
    try:
        with cluster.open_ioctx(img.pool) as ioctx:
            ioctx.set_namespace(img.namespace)
            with rbd.Image(ioctx, img.image, snapshot=snapshot) as handle:
                yield handle
    except (rados.Error, rbd.Error) as err:
        raise RbdError(f"RBD image {img}{f'@{snapshot}' if snapshot else ''}: {err}") from None
    finally:
        cluster.shutdown()


def snapshots(img: RbdImage) -> list[str]:
    """The image's snapshot names, oldest first.

    :raise RbdError:
    """
    with _opened(img) as handle:
        return [s["name"] for s in sorted(handle.list_snaps(), key=lambda s: s["id"])]


def create_snapshot(img: RbdImage, name: str) -> None:
    """A snapshot of the image now. With exclusive-lock (the default), the
    image's writer (QEMU's librbd) takes it, after its in-flight writes.

    :raise RbdError:
    """
    with _opened(img) as handle:
        handle.create_snap(name)


def remove_snapshots(img: RbdImage, names: list[str]) -> None:
    """Remove those of the named snapshots the image has.

    :raise RbdError:
    """
    if not names:
        return
    with _opened(img) as handle:
        present = {s["name"] for s in handle.list_snaps()}
        for name in names:
            if name in present:
                handle.remove_snap(name)


def changed(img: RbdImage, since: str, until: str | None) -> list[list[int]]:
    """[[offset, length], ...] of what was written to the image after snapshot
    ``since`` up to snapshot ``until`` (None: up to now), merged, in order.
    An object first written after ``since`` counts from its start to the end
    of its data: a little more than was written, never less.

    :raise RbdError:
    """
    out: list[list[int]] = []

    def collect(offset: int, length: int, exists: bool) -> int:
        # exists=False: the range was discarded, a change as much as a write.
        if out and out[-1][0] + out[-1][1] == offset:
            out[-1][1] += length
        else:
            out.append([offset, length])
        return 0

    with _opened(img, until) as handle:
        handle.diff_iterate(0, handle.size(), since, collect, whole_object=False)
    return out
