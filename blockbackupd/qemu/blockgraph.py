"""Reading a domain's disks from QEMU's block graph.

Disks are identified by the qdev id of their device; everything else (the
node at the top of the device's I/O path, the image file, format and size)
is read from QEMU at each call, since node names change across VM restarts
and while snapshots are active.
"""

from __future__ import annotations

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


def parse_disks(query_block: list[dict[str, Any]]) -> list[Disk]:
    """Disks with a medium and a qdev id, in QEMU's order."""
    disks = []
    for dev in query_block:
        inserted = dev.get("inserted")
        name = disk_name(dev.get("qdev", ""))
        if inserted is None or name is None:
            continue
        image = inserted.get("image", {})
        disks.append(Disk(
            name=name,
            qdev=dev["qdev"],
            node=inserted["node-name"],
            file=image.get("filename", inserted.get("file", "")),
            format=image.get("format", inserted.get("drv", "")),
            size=int(image.get("virtual-size", 0)),
            read_only=bool(inserted.get("ro", False)),
        ))
    return disks


async def query_disks(session: DomainSession) -> list[Disk]:
    """The domain's disks as QEMU shows them now.

    :raise DomainNotConnected: QEMU is not reachable.
    :raise OperationFailed: QEMU refused or did not answer in time.
    """
    return parse_disks(await session.execute("query-block"))
