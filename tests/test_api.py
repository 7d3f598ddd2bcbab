"""The API as data: the OpenRPC document, checked against what the daemon does.

Every daemon of a test run records its exchanges, and the run ends by
checking all of them against the document (tests/conftest.py,
tools/api_check.py). Here: the document itself, ``rpc.discover``, the
checker's own ability to fail, and a client written in shell (socat and jq,
tests/shell/) that takes a checkpoint and reads the changes since it over NBD
knowing nothing of ours but the socket and the document.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from blockbackupd.errors import BlockbackupError
from blockbackupd.rpc import api, params
from tools.api_check import Checker, read
from tools.daemon import Daemon
from tools.vm import MiB, Vm

SHELL = Path(__file__).parent / "shell"
SHIPPED = Path(api.__file__).with_name("openrpc.json")
KiB = 1024


def test_the_shipped_document_is_the_one_the_models_make() -> None:
    assert SHIPPED.read_text() == api.text(), (
        "blockbackupd/rpc/openrpc.json is stale: python -m blockbackupd.rpc.api > "
        f"{SHIPPED}")
    doc = api.document()
    assert doc["openrpc"] == "1.2.6"
    assert [m["name"] for m in doc["methods"]] == list(params.METHODS)
    # The contract's error table, code for code.
    table = {cls.kind: cls.code for cls in BlockbackupError.__subclasses__()}
    assert {k: e["code"] for k, e in doc["components"]["errors"].items()} == table
    assert set(table.values()) == set(range(1001, 1015))
    for m in doc["methods"]:
        assert m["summary"] and m["paramStructure"] == "by-name", m["name"]
        assert all(p["description"] for p in m["params"]), m["name"]


def test_rpc_discover_answers_the_document(daemon: Daemon) -> None:
    with daemon.client() as c:
        assert c.call("rpc.discover") == api.document()


def test_the_checker_finds_what_the_document_does_not_say() -> None:
    def exchange(method: str, p: object, reply: dict[str, object]) -> dict[str, object]:
        return {"request": {"jsonrpc": "2.0", "id": 1, "method": method, "params": p},
                "reply": {"jsonrpc": "2.0", "id": 1, **reply}}

    ref = {"domain": "vm1", "name": "s1"}
    entries = [
        exchange("snapshot.renew", ref, {"result": {"lease": 2, "expires": 3.5}}),  # fine
        exchange("snapshot.renew", ref, {"result": {"lease": 2, "expires": 3.5, "x": 1}}),
        exchange("snapshot.renew", {"domain": "vm1"}, {"result": {"lease": 2, "expires": 1}}),
        exchange("snapshot.renew", ref, {"error": {"code": 1010, "message": "m",
                                                   "data": {"kind": "busy"}}}),
        exchange("snapshot.renew", ref, {"error": {"code": -32602, "message": "m"}}),
        exchange("snapshot.renew", ref, {"error": {"code": -32603, "message": "m"}}),
        exchange("snapshot.renew", {"domain": "vm1", "name": "s1", "lease": 3},
                 {"error": {"code": -32602, "message": "m"}}),  # fine: refused both ways
        {"notification": {"jsonrpc": "2.0", "method": "event",
                          "params": {"domain": "vm1", "type": "no-such-event"}}},
    ]
    findings = list(Checker().findings(entries))
    assert len(findings) == 6, findings
    for words in ("'x' was unexpected", "'name' is a required property",
                  "answered busy (1010), which the document does not list",
                  "refused params the document accepts", "internal error",
                  "'no-such-event' is not one of"):
        assert any(words in f for f in findings), (words, findings)


def _sh(*args: str) -> str:
    r = subprocess.run([str(SHELL / args[0]), *args[1:]], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_a_client_in_shell_reads_the_changes_since_a_checkpoint(
        defined: tuple[Daemon, Vm], tmp_path: Path) -> None:
    """socat and jq, no Python: a checkpoint, guest writes, then a snapshot
    exported with the changes since it, read with libnbd's command-line tools."""
    daemon, vm = defined
    sock = str(daemon.socket)
    vm.write("sda", 0, 1 * MiB, 0x11)
    # A bad request answers one line on stderr, with the contract's kind.
    r = subprocess.run([str(SHELL / "bbrpc"), sock, "snapshot.lookup",
                        '{"domain": "vm1", "name": "nope"}'], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1
    assert r.stderr == "no-such-snapshot: domain 'vm1' has no snapshot 'nope'\n"
    _sh("incremental", sock, "vm1", "sda", str(tmp_path), "begin")
    with daemon.client() as c:
        assert c.call("checkpoint.list", domain="vm1") == ["sh-cp1"]
        assert c.call("snapshot.list", domain="vm1") == []
    written = [(256 * KiB, 64 * KiB, 0x22), (8 * MiB, 128 * KiB, 0x33),
               (40 * MiB, 64 * KiB, 0x44)]
    for offset, length, pattern in written:
        vm.write("sda", offset, length, pattern)
    _sh("incremental", sock, "vm1", "sda", str(tmp_path), "read")
    expected = [[offset, length] for offset, length, _ in written]
    changes = json.loads((tmp_path / "changes.json").read_text())
    assert changes == {"extents": expected, "bytes": sum(n for _, n, _ in written)}
    dirty = [[e["offset"], e["length"]]
             for e in json.loads((tmp_path / "map.json").read_text())
             if e["type"] & 1]
    assert dirty == expected
    disk = (tmp_path / "disk.raw").read_bytes()
    assert len(disk) == 64 * MiB
    assert disk[:256 * KiB] == b"\x11" * 256 * KiB
    for offset, length, pattern in written:
        assert disk[offset:offset + length] == bytes([pattern]) * length
    assert disk[1 * MiB:8 * MiB] == bytes(7 * MiB)
    # Everything the script made is gone; the guest runs on.
    with daemon.client() as c:
        assert c.call("snapshot.list", domain="vm1") == []
        assert c.call("checkpoint.list", domain="vm1") == []
        assert c.call("export.server", domain="vm1") is None
    assert vm.status() == "running"
    # And what it said and heard is as the document says.
    checker = Checker()
    assert list(checker.findings(read([Path(daemon.daemon_keys["rpc_record"])]))) == []
    assert {"rpc.discover", "snapshot.create", "export.server", "checkpoint.changes",
            "export.stop", "checkpoint.delete"} <= checker.answered
