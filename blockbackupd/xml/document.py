"""Safe parsing and schema validation shared by every XML document type.

Client XML is untrusted: the parser resolves no entities, loads no DTD and
never touches the network, so entity expansion and external entities are
refused rather than expanded. Errors become :class:`InvalidXml` naming the
line and what is wrong.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files
from typing import Any

from lxml import etree

from ..errors import InvalidXml

MAX_XML_BYTES = 256 * 1024


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False, dtd_validation=False,
        huge_tree=False, remove_comments=True, remove_pis=True,
    )


@cache
def schema(name: str) -> etree.RelaxNG:
    """The RelaxNG schema ``schemas/<name>.rng`` kept in this package."""
    path = files(__package__).joinpath("schemas", f"{name}.rng")
    return etree.RelaxNG(etree.fromstring(path.read_bytes(), _parser()))


def parse(text: str, document: str) -> etree._Element:
    """Parse text and validate it against the schema of ``document``.

    :raise InvalidXml: not well formed, carries a DTD or entities, or not valid;
        the message gives the line and the reason.
    """
    data = text.encode("utf-8")
    if len(data) > MAX_XML_BYTES:
        raise InvalidXml(f"{document}: document larger than {MAX_XML_BYTES} bytes")
    try:
        root = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as err:
        raise InvalidXml(f"{document}: line {err.lineno}: {err.msg}") from err
    docinfo: Any = root.getroottree().docinfo  # lxml-stubs lack DocInfo.doctype
    if docinfo.doctype:
        raise InvalidXml(f"{document}: line 1: a DOCTYPE is not allowed")
    rng = schema(document)
    if not rng.validate(root):
        e = _most_specific(rng.error_log)
        where = f" (at {e.path})" if getattr(e, "path", None) else ""
        raise InvalidXml(f"{document}: line {e.line}: {e.message}{where}")
    return root


def _most_specific(log: Any) -> Any:
    """libxml2 logs the inner cause first and then each enclosing element's
    generic "failed to validate content"; the first entry with a line says most."""
    entries = [e for e in log if e.line > 0]
    return entries[0] if entries else log.last_error


def disk_elements(root: etree._Element, path: str, document: str) -> list[etree._Element]:
    """The ``<disk>`` elements at path, refusing a disk named twice.

    :raise InvalidXml: naming the line of the second mention.
    """
    seen: set[str] = set()
    elements = []
    for el in root.iterfind(path):
        disk = el.get("name", "")
        if disk in seen:
            raise InvalidXml(f"{document}: line {el.sourceline}: disk {disk!r} listed twice")
        seen.add(disk)
        elements.append(el)
    return elements


def serialize(root: etree._Element) -> str:
    return str(etree.tostring(root, pretty_print=True, encoding="unicode"))
