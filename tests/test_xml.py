"""XML handling: hostile documents are refused with the line and the reason."""

from __future__ import annotations

import pytest

from blockbackupd.errors import InvalidXml
from blockbackupd.model import (
    Disk,
    DomainState,
    SnapshotDiskView,
    SnapshotState,
    SnapshotView,
)
from blockbackupd.xml.document import MAX_XML_BYTES, parse
from blockbackupd.xml.domain import render_domain
from blockbackupd.xml.snapshot import parse_snapshot, render_snapshot

LAUGHS = """<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>
<domain name="&lol2;" state="running"/>"""

EXTERNAL = """<?xml version="1.0"?>
<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]>
<domain name="&x;" state="running"/>"""


@pytest.mark.parametrize("text, message", [
    (LAUGHS, "domain: line 1: a DOCTYPE is not allowed"),
    (EXTERNAL, "domain: line 3: Attribute references external entity 'x'"),
    ("<domain", "domain: line 1: Couldn't find end of Start Tag domain"),
    ('<domain name="a" state="running">\n\n<bogus/>\n</domain>',
     "domain: line 3: Did not expect element bogus there"),
    ('<domain name="a" state="asleep"/>', "domain: line 1: Element domain failed to validate"),
    ("<a>" * 300 + "</a>" * 300, "domain: line 1: "),
    ("<domain>" + " " * MAX_XML_BYTES + "</domain>", "larger than"),
])
def test_bad_documents_are_refused(text: str, message: str) -> None:
    with pytest.raises(InvalidXml) as err:
        parse(text, "domain")
    assert message in err.value.message
    assert (err.value.code, err.value.kind) == (1007, "invalid-xml")


def test_rendered_domain_parses_back() -> None:
    disks = [Disk("sda", "sda", "n1", '/img/a "quoted" & <odd>.qcow2', "qcow2", 1 << 30, False,
                  "n1")]
    text = render_domain("vm1", DomainState.PAUSED, disks)
    root = parse(text, "domain")
    assert root.get("state") == "paused"
    assert root[0].get("file") == '/img/a "quoted" & <odd>.qcow2'


def test_snapshot_document_with_quiesce_reads_back() -> None:
    spec = parse_snapshot("<domainblocksnapshot><name>s1</name><quiesce/>"
                          "<disk name='vda'/></domainblocksnapshot>")
    assert (spec.name, spec.quiesce, [d.name for d in spec.disks or ()]) == ("s1", True, ["vda"])
    assert parse_snapshot("<domainblocksnapshot/>").quiesce is False
    with pytest.raises(InvalidXml, match="line 1"):
        parse_snapshot("<domainblocksnapshot><quiesce>yes</quiesce></domainblocksnapshot>")
    view = SnapshotView("s1", 1764060000, SnapshotState.ACTIVE, 0.004,
                        (SnapshotDiskView("vda", "/s/vm1-vda-s1.qcow2"),), frozen_window=0.2125)
    text = render_snapshot(view)
    assert "<quiesce/>" in text and "<frozenWindow>0.212500</frozenWindow>" in text
    # What get_xml writes is a valid request: it asks for a quiesced snapshot again.
    again = parse_snapshot(text)
    assert again.quiesce is True and again.name == "s1"
    unquiesced = render_snapshot(SnapshotView("s2", 1, SnapshotState.ACTIVE, 0.0, ()))
    assert "quiesce" not in unquiesced and "frozenWindow" not in unquiesced
