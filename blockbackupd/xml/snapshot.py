"""The ``<domainblocksnapshot>`` document: request of snapshot.create, answer of get_xml."""

from __future__ import annotations

from lxml import etree

from ..model import SnapshotDiskSpec, SnapshotSpec, SnapshotView
from .document import disk_elements, parse, serialize

DOCUMENT = "domainblocksnapshot"


def parse_snapshot(text: str) -> SnapshotSpec:
    """Read a snapshot.create document.

    Elements only ``get_xml`` writes (creationTime, state, heldIoWindow,
    frozenWindow) are accepted and ignored, so a document read back can be
    sent again. ``<quiesce/>`` asks for the guest's filesystems to be frozen.

    :raise InvalidXml: not well formed or not valid; the message gives the line.
    """
    root = parse(text, DOCUMENT)
    name = root.findtext("name")
    disks = []
    for el in disk_elements(root, "disk", DOCUMENT):
        source = el.find("source")
        disks.append(SnapshotDiskSpec(el.get("name", ""),
                                      None if source is None else source.get("file")))
    return SnapshotSpec(name=name.strip() if name is not None else None,
                        disks=tuple(disks) if disks else None,
                        quiesce=root.find("quiesce") is not None)


def render_snapshot(view: SnapshotView) -> str:
    root = etree.Element(DOCUMENT)
    etree.SubElement(root, "name").text = view.name
    etree.SubElement(root, "creationTime").text = str(view.created)
    etree.SubElement(root, "state").text = view.state.value
    etree.SubElement(root, "heldIoWindow").text = f"{view.held_io_window:.6f}"
    if view.frozen_window is not None:
        etree.SubElement(root, "quiesce")
        etree.SubElement(root, "frozenWindow").text = f"{view.frozen_window:.6f}"
    for disk in view.disks:
        el = etree.SubElement(root, "disk", name=disk.name, type="file")
        etree.SubElement(el, "source", file=disk.scratch)
    return serialize(root)
