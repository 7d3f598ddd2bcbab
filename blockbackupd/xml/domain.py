"""The ``<domain>`` document of ``domain.get_xml``: the live view of a domain."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from lxml import etree

from ..model import Disk, DomainState, ExportDiskSpec
from .document import serialize


def render_domain(name: str, state: DomainState, disks: Sequence[Disk],
                  exports: Iterable[ExportDiskSpec] = (),
                  checkpoints: Mapping[str, list[str]] | None = None) -> str:
    """Write the domain document; disks in QEMU's order, each with its
    checkpoints (oldest first) and exports."""
    by_disk: dict[str, list[ExportDiskSpec]] = {}
    for export in exports:
        by_disk.setdefault(export.disk, []).append(export)
    root = etree.Element("domain", name=name, state=state.value)
    for disk in disks:
        attrs = {"name": disk.name, "file": disk.file, "format": disk.format,
                 "size": str(disk.size)}
        if disk.read_only:
            attrs["readonly"] = "yes"
        el = etree.SubElement(root, "disk", attrs)
        for checkpoint in (checkpoints or {}).get(disk.name, []):
            etree.SubElement(el, "checkpoint", name=checkpoint)
        for export in by_disk.get(disk.name, []):
            e = etree.SubElement(el, "export", name=export.exportname or "",
                                 snapshot=export.snapshot)
            if export.checkpoint is not None:
                e.set("checkpoint", export.checkpoint)
    return serialize(root)
