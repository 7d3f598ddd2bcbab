"""Reading a domain's disks from QEMU's block graph.

Disks are identified by the qdev id of their device; everything else (the
node at the top of the device's I/O path, the image file, format and size)
is read from QEMU at each call, since node names change across VM restarts
and while snapshots are active.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..model import Disk
from .session import DomainSession

_PERIPHERAL = "/machine/peripheral/"


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


def parse_disks(query_block: list[dict[str, Any]],
                nodes: Mapping[str, dict[str, Any]] | None = None,
                below: Mapping[str, str] | None = None) -> list[Disk]:
    """Disks with a medium and a qdev id, in QEMU's order.

    ``below`` maps each filter node we stacked in a device's I/O path to the
    node it sits on; such disks are described by the node under all of them
    (from ``nodes``, the flat query-named-block-nodes), so snapshots never
    change how a disk looks.
    """
    disks = []
    for dev in query_block:
        inserted = dev.get("inserted")
        name = disk_name(dev.get("qdev", ""))
        if inserted is None or name is None:
            continue
        top = inserted["node-name"]
        if below and nodes and top in below:
            node = top
            while node in below:
                node = below[node]
            inserted = nodes.get(node, inserted)
        image = inserted.get("image", {})
        disks.append(Disk(
            name=name,
            qdev=dev["qdev"],
            node=inserted["node-name"],
            file=image.get("filename", inserted.get("file", "")),
            format=inserted.get("drv", image.get("format", "")),
            size=int(image.get("virtual-size", 0)),
            read_only=bool(inserted.get("ro", False)),
            top=top,
        ))
    return disks


async def query_disks(session: DomainSession,
                      below: Mapping[str, str] | None = None) -> list[Disk]:
    """The domain's disks as QEMU shows them now (see :func:`parse_disks`).

    :raise DomainNotConnected: QEMU is not reachable.
    :raise OperationFailed: QEMU refused or did not answer in time.
    """
    devices = await session.execute("query-block")
    nodes = None
    if below:
        flat = await session.execute("query-named-block-nodes", {"flat": True})
        nodes = {n["node-name"]: n for n in flat}
    return parse_disks(devices, nodes, below)
