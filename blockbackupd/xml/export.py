"""The ``<domainblockexport>`` document of export.start and export.stop."""

from __future__ import annotations

from ..errors import InvalidXml
from ..model import ExportDiskSpec, ExportSpec, NbdAddress
from .document import parse

DOCUMENT = "domainblockexport"


def parse_export(text: str, snapshot: str | None = None) -> ExportSpec:
    """Parse the document; a ``<disk>`` without ``snapshot`` names ``snapshot``
    (snapshot.create's own, exported in the same request), and is refused
    when it is None.

    :raise InvalidXml: not well formed or not valid; the message gives the line.
    """
    root = parse(text, DOCUMENT)
    address = None
    el = root.find("address")
    if el is not None:
        if el.get("type") == "unix":
            address = NbdAddress("unix", socket=el.get("socket"))
        else:
            address = NbdAddress("tcp", host=el.get("host"), port=int(el.get("port", "0")),
                                 tls=el.get("tls", "no") == "yes")
    disks = []
    seen: set[tuple[str, str]] = set()
    for d in root.iterfind("disk"):
        named = d.get("snapshot", snapshot)
        if named is None:
            raise InvalidXml(f"{DOCUMENT}: line {d.sourceline}: disk {d.get('name')!r} "
                             "names no snapshot (attribute snapshot)")
        spec = ExportDiskSpec(disk=d.get("name", ""), snapshot=named,
                              checkpoint=d.get("checkpoint"), exportname=d.get("exportname"))
        if (spec.disk, spec.snapshot) in seen:
            raise InvalidXml(f"{DOCUMENT}: line {d.sourceline}: disk {spec.disk!r} of snapshot "
                             f"{spec.snapshot!r} listed twice")
        seen.add((spec.disk, spec.snapshot))
        disks.append(spec)
    return ExportSpec(address=address, disks=tuple(disks))
