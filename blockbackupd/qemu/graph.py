"""A domain's block graph, read in one go, and the questions asked of it.

The VM manager changes the graph whenever it likes: an external snapshot puts
a new image on top of a disk (QEMU sends no event for it), a commit or a
stream takes images out, a mirror pivots the device onto another image, a
hot-plug adds or removes a device. So nothing about a disk's images is kept
between requests: every operation reads the graph again and asks it

- which disks there are, and for each its *chain*: the images from the top
  of the device's I/O path down its backing files, stepping through filters
  (ours, and the manager's, e.g. throttle);
- which bitmaps each image holds;
- who uses a node now (its parents), and how to point them at another node
  (:func:`relink`): the device's ``drive`` property, or an overlay's
  ``backing`` through ``blockdev-reopen``.

Three queries make one reading: ``query-block`` (devices and their root
node), ``query-named-block-nodes`` (every node, its image and bitmaps) and
``x-debug-query-block-graph`` (the edges; the only query that names a node's
children in QEMU 7.2).

The first and the last alone make a lighter reading, :class:`Links`: who
holds which node, no images or bitmaps. It is what the reactions to a VM
manager's new block job read: of the three queries, only
``query-named-block-nodes`` kills QEMU when a stream job concludes just
before it (see :func:`named_nodes`), and a stream of a small disk concludes
within milliseconds of its start.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import Busy, OperationFailed
from ..model import Disk, Image
from .session import DomainSession

_PERIPHERAL = "/machine/peripheral/"

#: Drivers that pass I/O through to their ``file`` child: a disk's images are
#: found below them. copy-before-write is ours (a snapshot's filter);
#: copy-on-read is a stream job's, between the top image and its backing.
FILTER_DRIVERS = frozenset({"copy-before-write", "throttle", "compress", "preallocate",
                            "blkdebug", "blklogwrites", "copy-on-read"})


def disk_name(qdev: str) -> str | None:
    """The qdev id from query-block's ``qdev`` field, None for devices without an id.

    QEMU reports the id itself for most devices (``sda``) and a QOM path for
    others (``/machine/peripheral/vda/virtio-backend`` for virtio-blk).
    """
    if not qdev.startswith("/"):
        return qdev or None
    if qdev.startswith(_PERIPHERAL):
        return qdev[len(_PERIPHERAL):].split("/", 1)[0] or None
    return None  # /machine/peripheral-anon/...: a device the VM manager gave no id


def device_path(qdev: str) -> str:
    """The QOM path whose ``drive`` property moves a disk's I/O path.

    For virtio-blk QEMU reports the backend's path; its proxy device (the one
    with the id) forwards the property.
    """
    if qdev.startswith(_PERIPHERAL):
        return _PERIPHERAL + qdev.split("/")[3]
    return f"{_PERIPHERAL}{qdev}"


@dataclass(frozen=True)
class Parent:
    """A user of a node: a device (``qdev`` set, role ``root``) or another
    node that holds it as its ``role`` child (``file``, ``backing``, ...)."""

    role: str
    node: str | None = None
    qdev: str | None = None


class Links:
    """Who holds which node (devices, nodes, block jobs), by name: one reading
    of ``query-block`` and ``x-debug-query-block-graph``; no I/O."""

    def __init__(self, devices: list[dict[str, Any]], debug_graph: Mapping[str, Any]) -> None:
        self.devices = devices
        ids = {n["id"]: n for n in debug_graph.get("nodes", [])}
        #: Every named block-driver node.
        self.names = {n["name"] for n in ids.values()
                      if n["type"] == "block-driver" and n.get("name")}
        #: (parent node, role, child node) between named block-driver nodes.
        self.edges: list[tuple[str, str, str]] = []
        #: Block jobs (by id) and the nodes each uses.
        self.jobs: dict[str, set[str]] = {}
        for e in debug_graph.get("edges", []):
            parent, child = ids.get(e["parent"]), ids.get(e["child"])
            if parent is None or child is None:
                continue
            if parent["type"] == "block-job":
                self.jobs.setdefault(parent["name"], set()).add(child["name"])
            elif parent["type"] == "block-driver":
                self.edges.append((parent["name"], e["name"], child["name"]))

    def child(self, node: str, role: str) -> str | None:
        return next((c for p, r, c in self.edges if p == node and r == role), None)

    def parents(self, node: str) -> list[Parent]:
        """Who uses ``node`` now: devices whose root it is, and parent nodes."""
        out = [Parent("root", qdev=d["qdev"]) for d in self.devices
               if d.get("inserted", {}).get("node-name") == node]
        out += [Parent(r, node=p) for p, r, c in self.edges if c == node]
        return out

    def below_device(self, disk: str) -> set[str]:
        """Every node under the device of disk ``disk`` (its qdev id): its
        root and whatever that holds, down to the bottom of its chain."""
        root = next((d["inserted"]["node-name"] for d in self.devices
                     if "inserted" in d and disk_name(d.get("qdev", "")) == disk), None)
        out: set[str] = set()
        todo = [root] if root is not None else []
        while todo:
            node = todo.pop()
            if node not in out:
                out.add(node)
                todo += [c for p, _, c in self.edges if p == node]
        return out


class BlockGraph(Links):
    """One reading of the graph; cheap questions, no I/O."""

    def __init__(self, devices: list[dict[str, Any]], nodes: list[dict[str, Any]],
                 debug_graph: Mapping[str, Any]) -> None:
        super().__init__(devices, debug_graph)
        self.nodes: dict[str, dict[str, Any]] = {n["node-name"]: n for n in nodes}

    # -- nodes ---------------------------------------------------------------

    def bitmaps(self, node: str) -> dict[str, dict[str, Any]]:
        return named_bitmaps(self.nodes.get(node, {}))

    def below_filters(self, node: str) -> str:
        """The first node at or below ``node`` that is not a filter."""
        seen = set()
        while node in self.nodes and self.nodes[node]["drv"] in FILTER_DRIVERS \
                and node not in seen:
            seen.add(node)
            below = self.child(node, "file")
            if below is None:
                break
            node = below
        return node

    def image(self, node: str) -> Image:
        info = self.nodes[node]
        image = info.get("image", {})
        return Image(node=node, file=str(image.get("filename", info.get("file", ""))),
                     format=str(info.get("drv", "")),
                     size=int(image.get("virtual-size", 0)),
                     read_only=bool(info.get("ro", False)),
                     bitmaps=self.bitmaps(node),
                     encrypted=bool(info.get("encrypted")) or info.get("drv") == "luks")

    def chain(self, node: str) -> tuple[Image, ...]:
        """The images from ``node`` down its backing files, filters stepped through."""
        out: list[Image] = []
        current: str | None = self.below_filters(node)
        while current is not None and current in self.nodes and \
                all(i.node != current for i in out):
            out.append(self.image(current))
            backing = self.child(current, "backing")
            current = None if backing is None else self.below_filters(backing)
        return tuple(out)

    # -- disks -----------------------------------------------------------------

    def disks(self) -> list[Disk]:
        """Disks with a medium and a qdev id, in QEMU's order, each described by
        its top image (below any filter), so snapshots never change how a
        disk looks."""
        out = []
        for dev in self.devices:
            inserted = dev.get("inserted")
            name = disk_name(dev.get("qdev", ""))
            if inserted is None or name is None:
                continue
            root = inserted["node-name"]
            chain = self.chain(root) if root in self.nodes else ()
            if chain:
                top = chain[0]
                node, file, fmt, size = top.node, top.file, top.format, top.size
            else:  # a node QEMU lists only through the device (no name): describe it as is
                image = inserted.get("image", {})
                node, file = root, str(image.get("filename", inserted.get("file", "")))
                fmt, size = str(inserted.get("drv", "")), int(image.get("virtual-size", 0))
            out.append(Disk(name=name, qdev=dev["qdev"], node=node, file=file, format=fmt,
                            size=size, read_only=bool(inserted.get("ro", False)), top=root,
                            chain=chain))
        return out

    def jobs_on(self, disk: Disk, ours: str) -> list[str]:
        """Block jobs not named with ``ours`` that use a node of the disk's I/O
        path: the nodes from the device's root down to its top image (a job's
        own filters sit there) and the images of its chain."""
        path = {disk.top, *(image.node for image in disk.chain)}
        node: str | None = disk.top
        while node is not None and node in self.nodes and node != disk.node:
            path.add(node)
            node = self.child(node, "file")
        return sorted(job for job, nodes in self.jobs.items()
                      if not job.startswith(ours) and nodes & path)


def named_bitmaps(node: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The named bitmaps of one node of ``query-named-block-nodes``, by name
    (filters keep anonymous bitmaps of their own: only named ones matter)."""
    return {b["name"]: b for b in node.get("dirty-bitmaps", []) if "name" in b}


#: How long a graph read waits for the VM manager's image creation to end,
#: or for a concluded stream job to be dismissed.
CREATE_WAIT = 10.0


def _unsafe_jobs(jobs: list[dict[str, Any]]) -> list[str]:
    """The jobs during which ``query-named-block-nodes`` would kill QEMU."""
    out = []
    for j in jobs:
        if j.get("type") == "create" and j.get("status") not in ("concluded", "null"):
            out.append(f"{j['id']} (creating an image)")
        elif j.get("type") == "stream" and j.get("status") == "concluded":
            out.append(f"{j['id']} (a concluded stream, not yet dismissed)")
    return out


async def named_nodes(session: DomainSession) -> list[dict[str, Any]]:
    """``query-named-block-nodes``, never while it would kill QEMU.

    QEMU 7.2 aborts (qcow2.c:5222 qcow2_get_specific_info: Assertion 'false')
    when the query meets a qcow2 image that a ``blockdev-create`` job is still
    writing, as libvirt's external snapshots, copies and backups do. And
    QEMU 7.2 and 10.0 crash (SIGSEGV in bdrv_refresh_filename) when it meets
    the copy-on-read node a ``block-stream`` job keeps, without a child, from
    the job's conclusion until it is dismissed (libvirt's block pulls are
    dismissed by libvirt when it sees them end). Wait for such jobs to end
    or go first (milliseconds, as the VM manager runs them). A job that
    starts or concludes between the two commands is a window this cannot
    close: what reacts to a new job reads :func:`read_links` instead, so
    only a request that comes in the very milliseconds a stream concludes
    meets it.

    :raise Busy: such a job is still there after :data:`CREATE_WAIT` s.
    :raise DomainNotConnected: :raise OperationFailed:
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + CREATE_WAIT
    while True:
        unsafe = _unsafe_jobs(await session.execute("query-jobs"))
        if not unsafe:
            break
        if loop.time() > deadline:
            raise Busy(f"QEMU's node list cannot be read safely while job {', '.join(unsafe)} "
                       "is there; try again when it is gone")
        await asyncio.sleep(0.02)
    nodes: list[dict[str, Any]] = await session.execute("query-named-block-nodes",
                                                        {"flat": True})
    return nodes


async def read_graph(session: DomainSession) -> BlockGraph:
    """Read the graph now.

    :raise DomainNotConnected: QEMU is not reachable.
    :raise OperationFailed: QEMU refused or did not answer in time.
    :raise Busy: QEMU is creating an image (see :func:`named_nodes`).
    """
    nodes = await named_nodes(session)
    devices, debug = await asyncio.gather(session.execute("query-block"),
                                          session.execute("x-debug-query-block-graph"))
    return BlockGraph(devices, nodes, debug)


async def read_links(session: DomainSession) -> Links:
    """Who holds which node now, without ``query-named-block-nodes``: safe
    whatever state a block job is in.

    :raise DomainNotConnected: :raise OperationFailed:
    """
    devices, debug = await asyncio.gather(session.execute("query-block"),
                                          session.execute("x-debug-query-block-graph"))
    return Links(devices, debug)


async def query_disks(session: DomainSession) -> list[Disk]:
    """The domain's disks as QEMU shows them now (see :meth:`BlockGraph.disks`).

    :raise DomainNotConnected: :raise OperationFailed:
    """
    return (await read_graph(session)).disks()


async def relink(session: DomainSession, graph: BlockGraph, node: str, new: str,
                 keep: frozenset[str] = frozenset()) -> list[Parent]:
    """Point every user of ``node`` (but the nodes in ``keep``) at ``new``
    instead: a device through its ``drive`` property, an overlay that has it
    as backing through ``blockdev-reopen``. Returns the parents moved.

    :raise OperationFailed: a parent cannot be moved (QEMU refused, or a
        parent of a kind that cannot be reopened onto another child).
    :raise DomainNotConnected:
    """
    if new == node:
        # Not a no-op: qom-set of a device's drive to the node it already
        # uses aborts QEMU (7.2 and 10.0: bdrv_replace_child_noperm
        # "old_bs != new_bs").
        return []
    moved = []
    for parent in graph.parents(node):
        if parent.node is not None and parent.node in keep:
            continue
        if parent.qdev is not None:
            await session.execute("qom-set", {"path": device_path(parent.qdev),
                                              "property": "drive", "value": new})
        elif parent.role == "backing" and parent.node is not None:
            await session.execute("blockdev-reopen",
                                  {"options": [_reopen_options(graph, parent.node, new)]})
        else:
            raise OperationFailed(f"node {parent.node} uses {node} as its {parent.role!r} "
                                  "child and cannot be pointed elsewhere")
        moved.append(parent)
    return moved


def _reopen_options(graph: BlockGraph, node: str, backing: str) -> dict[str, Any]:
    """The options of an overlay as it is, with another backing node.

    blockdev-reopen resets every option not given to its default, so the ones
    QEMU reports are carried over.
    """
    info = graph.nodes[node]
    options: dict[str, Any] = {"node-name": node, "driver": info["drv"],
                               "read-only": bool(info.get("ro", False)), "backing": backing}
    file = graph.child(node, "file")
    if file is not None:
        options["file"] = file
    cache = info.get("cache")
    if isinstance(cache, dict):
        options["cache"] = {"direct": bool(cache.get("direct")),
                            "no-flush": bool(cache.get("no-flush"))}
    if info.get("detect_zeroes") not in (None, "off"):
        options["detect-zeroes"] = info["detect_zeroes"]
    return options
