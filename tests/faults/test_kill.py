"""The daemon SIGKILLed at every step of every multi-step operation, then
restarted: before it answers about the domain, the domain is exactly as if
the operation had never begun or had finished (checkpoints only), with
nothing left that nothing owns.

``BLOCKBACKUPD_CRASH_AT=<step>`` makes the daemon kill itself with SIGKILL
when it reaches the step; the kill is real, the restart a new process.
"""

from __future__ import annotations

import signal
from collections.abc import Callable

import pytest

from blockbackup_client import ConnectionLost
from blockbackup_client.client import Client
from tests.conftest import domain_state, export_xml, snapshot_xml, wait_for
from tests.faults.checks import assert_nothing_left
from tests.test_checkpoints import Guest, bitmap_names, changes, checkpoint, runs
from tools.daemon import Daemon
from tools.vm import Vm

#: step -> (operation cut short, checkpoints listed after the restart)
STEPS = {
    "snapshot:scratch-created": ("snapshot.create", ["cp1"]),
    "snapshot:filter-added": ("snapshot.create", ["cp1"]),
    "checkpoint-create:intent-recorded": ("snapshot.create", ["cp1"]),
    # From here on QEMU holds the new checkpoint's bitmaps: the restart keeps it.
    "snapshot:switched": ("snapshot.create", ["cp1", "s2"]),
    "snapshot:view-added": ("snapshot.create", ["cp1", "s2"]),
    "checkpoint-create:before-store": ("snapshot.create", ["cp1", "s2"]),
    "snapshot-delete:view-removed": ("snapshot.delete", ["cp1"]),
    "snapshot-delete:path-restored": ("snapshot.delete", ["cp1"]),
    "snapshot-delete:node-removed": ("snapshot.delete", ["cp1"]),
    "export:server-started": ("export.start", ["cp1"]),
    "export:added": ("export.start", ["cp1"]),
    "export-stop:removed": ("export.stop", ["cp1"]),
    "changes:exported": ("checkpoint.changes", ["cp1"]),
    # QEMU never got the deletion: cp2 stays, valid.
    "checkpoint-delete:intent-recorded": ("checkpoint.delete", ["cp1", "cp2"]),
    "checkpoint-delete:before-store": ("checkpoint.delete", ["cp1"]),
}

EXPORT = export_xml([("sda", "s1"), ("sdb", "s1")])


def prepare(c: Client, operation: str) -> None:
    """What the operation needs to exist; made by the daemon that will die."""
    if operation in ("snapshot.delete", "export.start", "export.stop"):
        c.snapshot_create("vm1", snapshot_xml("s1"))
    if operation == "export.stop":
        c.export_start("vm1", EXPORT)
    if operation == "checkpoint.delete":
        checkpoint(c, "cp2")


def run(c: Client, operation: str) -> None:
    if operation == "snapshot.create":
        c.snapshot_create("vm1", snapshot_xml("s2"), checkpoint=True)
    elif operation == "snapshot.delete":
        c.snapshot_delete("vm1", "s1")
    elif operation == "export.start":
        c.export_start("vm1", EXPORT)
    elif operation == "export.stop":
        c.call("export.stop", domain="vm1", xml=EXPORT)
    elif operation == "checkpoint.changes":
        changes(c, "cp1")
    else:
        c.call("checkpoint.delete", domain="vm1", name="cp2")


@pytest.mark.parametrize("step", list(STEPS))
def test_killed_at_step_then_restarted(make_vm: Callable[..., Vm],
                                       make_daemon: Callable[..., Daemon], step: str) -> None:
    operation, listed = STEPS[step]
    vm = make_vm()
    daemon = make_daemon()
    g = Guest(vm)
    nodes, tops = vm.node_names(), vm.top_nodes()
    with daemon.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
        wait_for(lambda: domain_state(daemon, "vm1") == "running")
        checkpoint(c, "cp1")
    g.write("sda", 1)
    g.write("sdb", 3)
    assert daemon.stop() == 0
    daemon.env = {"BLOCKBACKUPD_CRASH_AT": step}
    daemon.start()
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    with daemon.client() as c:
        prepare(c, operation)
        with pytest.raises(ConnectionLost):
            run(c, operation)
    assert daemon.proc is not None and daemon.proc.wait(10) == -signal.SIGKILL
    daemon.proc = None
    g.write("sda", 5)  # the guest goes on while no daemon runs

    daemon.env = {}
    daemon.start()
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    g.write("sda", 7)
    with daemon.client() as c:
        assert c.snapshot_list("vm1") == [] and c.export_list("vm1") == []
        assert c.call("checkpoint.list", domain="vm1") == listed
        for name in listed:
            assert c.call("checkpoint.lookup", domain="vm1", name=name)["state"] == "valid"
        # Every change set is exact: nothing the guest wrote was missed.
        assert changes(c, "cp1") == runs({1, 5, 7})
        assert changes(c, "cp1", disk="sdb") == runs({3})
        for newer in set(listed) - {"cp1"}:
            assert changes(c, newer) == runs({5, 7})
    assert bitmap_names(vm, "sda-fmt") == set(listed)
    assert bitmap_names(vm, "sdb-fmt") == set(listed)
    assert_nothing_left(daemon, vm, nodes, tops)
    # And the domain serves as before.
    with daemon.client() as c:
        c.snapshot_create("vm1", snapshot_xml("s3"))
        c.export_start("vm1", export_xml([("sda", "s3")]))
        c.snapshot_delete("vm1", "s3")
    assert vm.node_names() == nodes
