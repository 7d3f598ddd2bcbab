"""The ``<domain>`` document of ``domain.get_xml``: the live view of a domain."""

from __future__ import annotations

from collections.abc import Sequence

from lxml import etree

from ..model import Disk, DomainState
from .document import serialize


def render_domain(name: str, state: DomainState, disks: Sequence[Disk]) -> str:
    """Write the domain document; disks in QEMU's order."""
    root = etree.Element("domain", name=name, state=state.value)
    for disk in disks:
        attrs = {"name": disk.name, "file": disk.file, "format": disk.format,
                 "size": str(disk.size)}
        if disk.read_only:
            attrs["readonly"] = "yes"
        etree.SubElement(root, "disk", attrs)
    return serialize(root)
