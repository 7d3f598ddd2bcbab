"""XML handling: hostile documents are refused with the line and the reason."""

from __future__ import annotations

import pytest

from blockbackupd.errors import InvalidXml
from blockbackupd.model import Disk, DomainState
from blockbackupd.xml.document import MAX_XML_BYTES, parse
from blockbackupd.xml.domain import render_domain

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
