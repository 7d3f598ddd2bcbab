"""The daemon's QMP connection cut under a running command, QEMU staying up:
the request answers domain-not-connected (1006) or operation-failed (1009)
at once, never hangs, and on the reconnect the domain is brought back to a
consistent state exactly (see qmp_cut.py for how the cut is made)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blockbackup_client import DomainNotConnected, OperationFailed
from tests.conftest import domain_state, snapshot_xml, wait_for
from tests.faults.checks import assert_nothing_left
from tests.faults.qmp_cut import QmpCut
from tests.faults.test_kill import prepare, run
from tests.test_checkpoints import Guest, bitmap_names, changes, checkpoint, runs
from tools.daemon import Daemon
from tools.vm import Vm

#: (operation, QMP command cut, which one of that command, cut after QEMU ran it)
CUTS = [
    ("snapshot.create", "blockdev-add", 1, False),  # before the first node
    ("snapshot.create", "blockdev-add", 1, True),   # a scratch node added
    ("snapshot.create", "blockdev-add", 4, True),   # both filters added
    ("snapshot.create", "stop", 1, True),           # the guest stopped, nothing moved
    ("snapshot.create", "qom-set", 1, True),        # one disk moved, the guest stopped
    ("snapshot.create", "transaction", 1, True),    # the checkpoint's bitmaps made
    ("snapshot.create", "cont", 1, True),           # all moved, the guest running
    ("snapshot.create", "blockdev-add", 5, True),   # a view added
    ("export.start", "nbd-server-start", 1, True),
    ("export.start", "block-export-add", 1, True),
    ("export.stop", "block-export-del", 1, True),
    ("snapshot.delete", "qom-set", 1, True),        # one I/O path restored
    ("snapshot.delete", "blockdev-del", 1, True),
    ("checkpoint.delete", "transaction", 1, True),  # cp2 merged and removed in QEMU
]


@pytest.fixture
def cut_setup(request: pytest.FixtureRequest, make_vm: Callable[..., Vm],
              make_daemon: Callable[..., Daemon], workdir: Path
              ) -> Iterator[tuple[Vm, Daemon, QmpCut]]:
    operation, command, nth, after = request.param
    vm = make_vm()
    proxy = QmpCut(workdir / "cut.qmp", vm.daemon_qmp, command, nth, after)
    try:
        yield vm, make_daemon(), proxy
    finally:
        proxy.close()


@pytest.mark.parametrize("cut_setup", CUTS, indirect=True,
                         ids=[f"{o}-{c}{n}-{'after' if a else 'before'}" for o, c, n, a in CUTS])
def test_qmp_cut_mid_command(cut_setup: tuple[Vm, Daemon, QmpCut],
                             request: pytest.FixtureRequest) -> None:
    vm, daemon, proxy = cut_setup
    operation = request.node.callspec.params["cut_setup"][0]
    g = Guest(vm)
    nodes, tops = vm.node_names(), vm.top_nodes()
    with daemon.client() as c:
        c.domain_define("vm1", str(proxy.listen))
        wait_for(lambda: domain_state(daemon, "vm1") == "running")
        checkpoint(c, "cp1")
        g.write("sda", 1)
        prepare(c, operation)
        proxy.armed.set()
        start = time.monotonic()
        with pytest.raises((DomainNotConnected, OperationFailed)):
            run(c, operation)
        took = time.monotonic() - start
    assert proxy.cut.is_set()
    assert took < 5.0  # the daemon's qmp_timeout here: the loss is seen, not timed out
    wait_for(lambda: domain_state(daemon, "vm1") == "running", what="reconnected")
    g.write("sda", 5)
    assert vm.qmp("query-status")["status"] == "running"  # the guest never stays stopped
    with daemon.client() as c:
        assert c.snapshot_list("vm1") == [] and c.export_list("vm1") == []
        listed = c.call("checkpoint.list", domain="vm1")
        # Kept exactly when QEMU holds its bitmaps; each change set exact.
        assert set(listed) == bitmap_names(vm, "sda-fmt") == bitmap_names(vm, "sdb-fmt")
        assert listed[0] == "cp1"
        for name in listed:
            assert c.call("checkpoint.lookup", domain="vm1", name=name)["state"] == "valid"
            assert changes(c, name) == runs({1, 5} if name == "cp1" else {5})
    assert_nothing_left(daemon, vm, nodes, tops)
    with daemon.client() as c:  # and the domain serves as before
        c.snapshot_create("vm1", snapshot_xml("s3"))
        c.snapshot_delete("vm1", "s3")
