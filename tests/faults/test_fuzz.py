"""Hostile input, fuzzed with hypothesis against the real daemon and QEMU:
every method with random params, malformed framing, and XML documents built
from the contract's vocabulary with hostile values, entity and DTD tricks.

Every answer must be a JSON-RPC error from the contract's table (or a
success for input that happens to be valid, which the test then undoes);
never an internal error, never a hang, never a file's content; the daemon
stays up, and afterwards the block graph, scratch directory, store records and
domains are exactly as before.

CI runs ``BB_FUZZ_EXAMPLES`` (default 150) examples per test; run a longer
one by hand with e.g. ``BB_FUZZ_EXAMPLES=5000 .venv/bin/pytest tests/faults/test_fuzz.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import RawConnection, snapshot_xml
from tests.faults.checks import store_records
from tools.daemon import Daemon, defined_domain
from tools.vm import MiB, Vm

EXAMPLES = int(os.environ.get("BB_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                derandomize=os.environ.get("BB_FUZZ_RANDOM") is None)

METHODS = ["daemon.info", "domain.define", "domain.undefine", "domain.list", "domain.get_xml",
           "snapshot.create", "snapshot.delete", "snapshot.list", "snapshot.lookup",
           "snapshot.get_xml", "checkpoint.list", "checkpoint.lookup", "checkpoint.get_xml",
           "checkpoint.delete", "checkpoint.changes", "checkpoint.redefine", "export.start",
           "export.stop", "export.server", "export.list", "events.subscribe"]
PARAMS = ["domain", "name", "xml", "qmp_socket", "force", "checkpoint", "disk", "until",
          "domains"]
ALLOWED = {-32700, -32600, -32601, -32602} | set(range(1001, 1015))
#: A secret the daemon can read and must never show (external entities, XInclude).
SECRET = "bb-fuzz-secret-4711"

hostile_text = st.one_of(
    st.sampled_from(["vm1", "s1", "sda", "", ".", "..", "../vm1", "a/b", "/etc/passwd",
                     "vm1\x00", "x" * 10_000, "é\u202e", "bb-x", "-", "\n",
                     "qemu:dirty-bitmap:s1"]),
    st.text(max_size=40),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                    st.sampled_from([10**400, -1, 0, 2**63]), st.floats(allow_nan=False),
                    hostile_text)
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.sampled_from(PARAMS) | st.text(max_size=8),
                                                 inner, max_size=4)), max_leaves=12)


@pytest.fixture(scope="module")
def target() -> Iterator[tuple[Daemon, Vm, Path]]:
    with defined_domain({"sda": 8 * MiB, "sdb": 8 * MiB}, prefix="bb-fuzz-",
                        log_level="warning") as (vm, daemon):
        (vm.workdir / "secret.txt").write_text(SECRET)
        with daemon.client() as c:
            c.snapshot_create("vm1", snapshot_xml("s0"), checkpoint=True)
            c.snapshot_create("vm1", snapshot_xml("s1"))
        yield daemon, vm, vm.workdir


def state(daemon: Daemon, vm: Vm) -> Any:
    """Everything a request could have changed."""
    with daemon.client() as c:
        domains = c.domain_list()
        snaps = c.snapshot_list("vm1")
        exports = c.export_list("vm1")
        checkpoints = c.call("checkpoint.list", domain="vm1")
    records = store_records(daemon)
    # Nodes QEMU names itself ("#block...") come and go with the daemon's
    # periodic probe job of each snapshot; ours and the disks' must not move.
    nodes = sorted(n for n in vm.node_names() if not n.startswith("#"))
    return (domains, snaps, exports, checkpoints, records, nodes,
            vm.top_nodes(), sorted(os.listdir(daemon.daemon_keys["scratch_dir"])))


def undo_success(daemon: Daemon, method: str, params: dict[str, Any], result: Any) -> None:
    """Input that happened to be valid did what it says: undo it."""
    with daemon.client() as c:
        if method == "domain.define" and params.get("name") != "vm1":
            c.domain_undefine(params["name"], force=True)
        elif method == "snapshot.create":
            name = result["name"] if isinstance(result, dict) and "name" in result else None
            for s in c.snapshot_list("vm1"):
                if s not in ("s1",) and (name is None or s == name):
                    c.snapshot_delete("vm1", s)
            for cp in c.call("checkpoint.list", domain="vm1"):
                if cp != "s0":
                    c.call("checkpoint.delete", domain="vm1", name=cp)
        elif method == "export.start":
            for e in c.export_list("vm1"):
                c.call("export.stop", domain="vm1", xml='<domainblockexport type="nbd">'
                       f'<disk name="{e["disk"]}" snapshot="{e["snapshot"]}"/>'
                       "</domainblockexport>")


def check_answer(answer: Any) -> None:
    text = json.dumps(answer)
    assert SECRET not in text
    if "error" in answer:
        assert answer["error"]["code"] in ALLOWED, answer


@FUZZ
@given(method=st.sampled_from(METHODS) | st.text(max_size=20),
       params=st.one_of(st.dictionaries(st.sampled_from(PARAMS), json_values, max_size=4),
                        json_values))
def test_random_params(target: tuple[Daemon, Vm, Path], method: str, params: Any) -> None:
    daemon, vm, _ = target
    before = state(daemon, vm)
    conn = RawConnection(daemon.socket, timeout=20)
    try:
        conn.request({"jsonrpc": "2.0", "id": 1, "method": method, "params": params})
        answer = conn.read()
    finally:
        conn.close()
    check_answer(answer)
    if "result" in answer and method not in ("events.subscribe",):
        undo_success(daemon, method, params if isinstance(params, dict) else {},
                     answer["result"])
    assert state(daemon, vm) == before


frames = st.one_of(
    st.binary(max_size=200),
    st.sampled_from([b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000, b"{" * 5000,
                     b'{"jsonrpc": "2.0", "id": 1e999999, "method": "daemon.info"}',
                     b'{"jsonrpc": "2.0", "id": ' + b"9" * 5000 + b', "method": "daemon.info"}',
                     b'{"jsonrpc": "2.0", "id": 1, "method": "daemon.info", "params": []}',
                     b"[]", b'[{"jsonrpc": "2.0"}]', b'"\\ud800"', b"null", b"\x00" * 64]),
)


@FUZZ
@given(frame=frames)
def test_malformed_frames(target: tuple[Daemon, Vm, Path], frame: bytes) -> None:
    daemon, vm, _ = target
    conn = RawConnection(daemon.socket, timeout=20)
    try:
        conn.send(frame.replace(b"\n", b" ") + b"\n")
        conn.request({"jsonrpc": "2.0", "id": "after", "method": "daemon.info"})
        answers = []
        while not answers or answers[-1].get("id") != "after":
            answer = conn.read()
            if isinstance(answer, list):  # a batch's answers
                answers.extend(answer)
                continue
            answers.append(answer)
    finally:
        conn.close()
    for answer in answers[:-1]:
        check_answer(answer)
    assert answers[-1]["result"]["domains"] == 1  # the connection is still good


def entity_attacks(secret: Path) -> list[str]:
    return [
        f'<!DOCTYPE x [<!ENTITY e SYSTEM "file://{secret}">]><domainblocksnapshot>'
        "<name>&e;</name></domainblocksnapshot>",
        '<!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
        '<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;">'
        ']><domainblocksnapshot><name>&d;</name></domainblocksnapshot>',
        f'<domainblocksnapshot xmlns:xi="http://www.w3.org/2001/XInclude"><name>'
        f'<xi:include href="file://{secret}" parse="text"/></name></domainblocksnapshot>',
        f'<!DOCTYPE x SYSTEM "file://{secret}"><domainblocksnapshot/>',
        "<domainblocksnapshot>" + "<disk>" * 10_000 + "</disk>" * 10_000
        + "</domainblocksnapshot>",
        "<domainblocksnapshot><name>" + "x" * 300_000 + "</name></domainblocksnapshot>",
        '<?xml version="1.0" encoding="UTF-16"?><domainblocksnapshot/>',
        "<domainblocksnapshot><name>s\x01</name></domainblocksnapshot>",
    ]


ELEMENTS = ["domainblocksnapshot", "domainblockexport", "domaincheckpoint", "name", "disk",
            "disks", "source", "creationTime", "parent", "address", "bogus"]
ATTRS = ["name", "snapshot", "checkpoint", "exportname", "type", "file", "transport", "socket",
         "host", "port", "tls", "bitmap", "x"]


@st.composite
def xml_documents(draw: st.DrawFn, depth: int = 0) -> str:
    tag = draw(st.sampled_from(ELEMENTS))
    attrs = draw(st.dictionaries(st.sampled_from(ATTRS), hostile_text | st.sampled_from(
        ["/tmp", "../../etc", "nbd", "unix", "tcp", "yes", "no", "0", "65536", "qcow2"]),
        max_size=3))
    text = "".join(f' {k}="{_escape(v)}"' for k, v in attrs.items())
    children = draw(st.lists(xml_documents(depth + 1), max_size=0 if depth > 2 else 3))
    body = _escape(draw(hostile_text)) if not children and draw(st.booleans()) else ""
    return f"<{tag}{text}>{body}{''.join(children)}</{tag}>"


def _escape(value: str) -> str:
    return (value.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")
            .replace("\x00", "&#0;"))


XML_METHODS = ["snapshot.create", "export.start", "export.stop", "checkpoint.redefine"]


@FUZZ
@given(method=st.sampled_from(XML_METHODS), doc=xml_documents(), attack=st.integers(-1, 7))
def test_xml_documents(target: tuple[Daemon, Vm, Path], method: str, doc: str,
                       attack: int) -> None:
    daemon, vm, workdir = target
    if attack >= 0:
        doc = entity_attacks(workdir / "secret.txt")[attack]
    before = state(daemon, vm)
    conn = RawConnection(daemon.socket, timeout=20)
    try:
        conn.request({"jsonrpc": "2.0", "id": 1, "method": method,
                      "params": {"domain": "vm1", "xml": doc}})
        answer = conn.read()
    finally:
        conn.close()
    check_answer(answer)
    if attack >= 0:
        assert answer["error"]["code"] == 1007, answer
    if "result" in answer:
        undo_success(daemon, method, {}, answer["result"])
    assert state(daemon, vm) == before
