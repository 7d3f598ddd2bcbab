"""Quiesce refused: no guest agent defined, or one that never answers.

The agent's channel here is real (a QEMU chardev joined to a virtio-serial
port named org.qemu.guest_agent.0), but the VM runs no operating system, so
nothing ever answers on it: exactly what a guest without a running agent,
or a channel held by another client, looks like to the daemon. Freezing a
real guest is tested in tests/guest/.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from blockbackup_client import QuiesceFailed
from tests.conftest import bbctl, domain_state, snapshot_xml, wait_for
from tools.daemon import Daemon
from tools.vm import Vm

TIMEOUT = 1.0


def agent_channel(path: Path) -> list[str]:
    """QEMU options of a guest agent channel whose host side is ``path``."""
    return ["-chardev", f"socket,id=qga0,path={path},server=on,wait=off",
            "-device", "virtio-serial-pci,id=vser0",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"]


def assert_nothing_made(daemon: Daemon, vm: Vm) -> None:
    """No snapshot, checkpoint, node, bitmap, scratch file or store record."""
    with daemon.client() as c:
        assert c.snapshot_list("vm1") == []
        assert c.call("checkpoint.list", domain="vm1") == []
    assert not any(n.startswith("bb-") for n in vm.node_names())
    for node in vm.qmp("query-named-block-nodes", flat=True):
        assert not node.get("dirty-bitmaps"), node["node-name"]
    scratch = Path(daemon.daemon_keys["scratch_dir"])
    assert list(scratch.iterdir()) == []
    db = sqlite3.connect(f"file:{daemon.daemon_keys['state_dir']}/blockbackupd.db?mode=ro",
                         uri=True)
    try:
        assert db.execute("SELECT kind, payload FROM intent").fetchall() == []
    finally:
        db.close()


def test_quiesce_without_a_guest_agent_is_refused(defined: tuple[Daemon, Vm]) -> None:
    daemon, vm = defined
    with daemon.client() as c:
        with pytest.raises(QuiesceFailed, match="has no guest agent: define it with "
                                                "guest_agent_socket"):
            c.snapshot_create("vm1", checkpoint=True, quiesce=True)
        # The same through the document's <quiesce/>.
        xml = snapshot_xml("s1").replace("</domainblocksnapshot>",
                                         "<quiesce/></domainblocksnapshot>")
        with pytest.raises(QuiesceFailed):
            c.snapshot_create("vm1", xml)
    r = bbctl(daemon, "snapshot", "create", "vm1", "--quiesce")
    assert r.returncode == 1
    assert r.stderr.endswith("[quiesce-failed]\n"), r.stderr
    assert_nothing_made(daemon, vm)
    # Without quiesce the same domain takes its snapshot, marked unquiesced.
    with daemon.client() as c:
        c.snapshot_create("vm1", snapshot_xml("s2"))
        info = c.snapshot_lookup("vm1", "s2")
        assert info["quiesced"] is False and "frozen_window" not in info
        assert "<quiesce/>" not in c.snapshot_get_xml("vm1", "s2")
        c.snapshot_delete("vm1", "s2")


def test_a_guest_agent_that_never_answers(make_daemon: Callable[..., Daemon],
                                          make_vm: Callable[..., Vm], workdir: Path) -> None:
    qga = workdir / "vm1.qga"
    vm = make_vm(extra_args=agent_channel(qga))
    # Defined in the config file this time (domain.define is tested with bbctl).
    daemon = make_daemon(quiesce_timeout=TIMEOUT, domains=[
        {"name": "vm1", "qmp_socket": str(vm.daemon_qmp), "guest_agent_socket": str(qga)}])
    wait_for(lambda: domain_state(daemon, "vm1") == "running", what="vm1 running")
    with daemon.client() as c:
        assert c.domain_list()[0]["guest_agent_socket"] == str(qga)
    with daemon.client() as c:
        start = time.monotonic()
        with pytest.raises(QuiesceFailed) as err:
            c.snapshot_create("vm1", snapshot_xml("s1"), checkpoint=True, quiesce=True)
        elapsed = time.monotonic() - start
    print(f"quiesce-failed after {elapsed:.2f} s (timeout {TIMEOUT} s)")
    assert TIMEOUT <= elapsed < TIMEOUT + 1.5
    assert "did not answer guest-sync within 1 s" in err.value.message
    assert vm.status() == "running"
    assert_nothing_made(daemon, vm)

    # bbctl backup: --quiesce fails and leaves nothing; auto (the default)
    # falls back to a crash-consistent backup and says why.
    dest = workdir / "backups"
    r = bbctl(daemon, "backup", "vm1", "--dest", str(dest), "--quiesce")
    assert r.returncode == 1 and "[quiesce-failed]" in r.stderr, r.stderr
    assert not dest.exists()
    assert_nothing_made(daemon, vm)
    r = bbctl(daemon, "--json", "backup", "vm1", "--dest", str(dest))
    assert r.returncode == 0, r.stderr
    assert "warning: cannot quiesce" in r.stderr and "crash-consistent" in r.stderr
    record = json.loads(r.stdout)
    assert record["quiesced"] is False
    assert "did not answer guest-sync" in record["quiesce_error"]
    listing = bbctl(daemon, "list", str(dest)).stdout.splitlines()
    assert listing[1].split()[4] == "no"
    r = bbctl(daemon, "--json", "backup", "vm1", "--dest", str(dest), "--quiesce", "no")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    assert "quiesce_error" not in json.loads(r.stdout)
