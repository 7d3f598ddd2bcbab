"""The ``<domaincheckpoint>`` document: answer of checkpoint.get_xml, request of redefine."""

from __future__ import annotations

from dataclasses import dataclass

from lxml import etree

from .document import disk_elements, parse, serialize

DOCUMENT = "domaincheckpoint"


@dataclass(frozen=True)
class CheckpointDoc:
    name: str
    parent: str | None
    created: int | None
    state: str | None
    reason: str | None
    disks: tuple[tuple[str, str], ...]  # (disk, bitmap)


def parse_checkpoint(text: str) -> CheckpointDoc:
    """:raise InvalidXml: not well formed or not valid; the message gives the line."""
    root = parse(text, DOCUMENT)
    disks = [(el.get("name", ""), el.get("bitmap") or root.findtext("name") or "")
             for el in disk_elements(root, "disks/disk", DOCUMENT)
             if el.get("checkpoint", "bitmap") == "bitmap"]
    created = root.findtext("creationTime")
    return CheckpointDoc(
        name=root.findtext("name", "").strip(), parent=root.findtext("parent/name"),
        created=int(created) if created is not None else None, state=root.findtext("state"),
        reason=root.findtext("reason"), disks=tuple(disks))


def render_checkpoint(doc: CheckpointDoc) -> str:
    root = etree.Element(DOCUMENT)
    etree.SubElement(root, "name").text = doc.name
    if doc.parent is not None:
        etree.SubElement(etree.SubElement(root, "parent"), "name").text = doc.parent
    etree.SubElement(root, "creationTime").text = str(doc.created)
    etree.SubElement(root, "state").text = doc.state
    if doc.reason is not None:
        etree.SubElement(root, "reason").text = doc.reason
    disks = etree.SubElement(root, "disks")
    for disk, bitmap in doc.disks:
        etree.SubElement(disks, "disk", name=disk, checkpoint="bitmap", bitmap=bitmap)
    return serialize(root)
