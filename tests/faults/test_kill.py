"""The daemon SIGKILLed at every step of every multi-step operation, then
restarted: before it answers about the domain, the domain is exactly as if
the operation had never begun or had finished (checkpoints only), with
nothing left that nothing owns, QEMU alive and its guest running.

``BLOCKBACKUPD_CRASH_AT=<step>`` makes the daemon kill itself with SIGKILL
when it reaches the step; the kill is real, the restart a new process.

Each step runs on the minimal VM, as always, and on those configurations of
:mod:`tests.faults.configs` where its code path differs (the full cross
product would add some six minutes to each QEMU build's pass; table ``ON``):

* ``snapshot:scratch-created``: encrypted, whose scratch comes with a LUKS
  key in a QEMU secret object that nothing uses yet. Before it, no node is
  made, so disks in I/O threads or raw change nothing there.
* ``snapshot:filter-added``, ``snapshot:view-added``: proxmox (virtio-scsi,
  ``-drive``) and libvirt (virtio-blk, ``-blockdev``, device throttling). On
  a build that fails the throttle check (7.2) their filters and views are
  added inside the held-I/O window: a kill at ``filter-added`` leaves the
  guest paused (asserted, with the ``held-io`` record) for the restarted
  daemon to resume; on 10.0 they take the plain path with I/O threads.
* ``snapshot:switched``: the two I/O-thread managers and raw: QEMU holds the
  new checkpoint's bitmaps, in the image or (raw) only in QEMU's memory,
  and the restart must keep both alike.
* ``checkpoint-create:intent-recorded``/``before-store``: proxmox (in the
  held path the intent is recorded before any filter exists) and raw (the
  intent settled by non-persistent bitmaps).
* ``snapshot-delete:*``: proxmox and libvirt restore their I/O paths
  differently (``-drive`` on virtio-scsi, the virtio-blk backend);
  encrypted at ``view-removed``, its key still held. The removal runs with
  the guest running here (the daemon holds it only for RBD disks in I/O
  threads); after every kill the guest is paused exactly when the store
  holds a ``held-io`` record, at ``filter-added`` in the held path only.

An encrypted disk's snapshot formats a LUKS scratch (qemu-img times its
PBKDF for about a second, on a loaded host several), so that configuration
runs only where it alone differs: two kill steps and one cut.
* export steps: proxmox and libvirt. Where the build's NBD verdict is unsafe
  for disks in I/O threads (7.2) the step is never reached: export.start
  must answer ``unsupported`` naming that verdict, make nothing, and the
  daemon live. ``copy:target-added`` (QEMU's copy, their read path there)
  is killed instead, on the same configurations.
* ``changes:exported`` (a temporary export of a null node, in the main
  loop whatever the disks) and the checkpoint deletion's steps: raw (the
  change set and the merge in QEMU's memory); proxmox at ``before-store``.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from blockbackup_client import ConnectionLost
from tests.conftest import domain_state, snapshot_xml, wait_for
from tests.faults.checks import assert_nothing_left, store_records
from tests.faults.configs import (
    ENCRYPTED,
    LIBVIRT,
    MINIMAL,
    PROXMOX,
    PROXMOX_RAW,
    Config,
    adds_held,
    exports_refused,
    format_nodes,
    params,
)
from tests.faults.operations import EXPORTING, Setup, assert_refused, prepare, run, serves
from tests.test_checkpoints import Guest, bitmap_names, changes, checkpoint, recording, runs
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
    "copy:target-added": ("snapshot.copy", ["cp1"]),
    "changes:exported": ("checkpoint.changes", ["cp1"]),
    # QEMU never got the deletion: cp2 stays, valid.
    "checkpoint-delete:intent-recorded": ("checkpoint.delete", ["cp1", "cp2"]),
    "checkpoint-delete:before-store": ("checkpoint.delete", ["cp1"]),
}

M, P, L, R, E = MINIMAL, PROXMOX, LIBVIRT, PROXMOX_RAW, ENCRYPTED
#: step -> the configurations it runs on, where its code path differs (see
#: the module's docstring); the minimal VM everywhere, as before.
ON: dict[str, tuple[Config, ...]] = {
    "snapshot:scratch-created": (M, E),
    "snapshot:filter-added": (M, P, L),
    "checkpoint-create:intent-recorded": (M, P, R),
    "snapshot:switched": (M, P, L, R),
    "snapshot:view-added": (M, P, L),
    "checkpoint-create:before-store": (M, P, R),
    "snapshot-delete:view-removed": (M, P, L, E),
    "snapshot-delete:path-restored": (M, P, L),
    "snapshot-delete:node-removed": (M, L),
    "export:server-started": (M, P),
    "export:added": (M, P, L),
    "export-stop:removed": (M, L),
    "copy:target-added": (M, P, L),
    "changes:exported": (M, R),
    "checkpoint-delete:intent-recorded": (M, R),
    "checkpoint-delete:before-store": (M, P, R),
}

CASES = [(config, step) for step in STEPS for config in ON[step]]

#: What the daemon logs when it adds a snapshot's nodes inside the held-I/O window.
HELD = "adding the snapshot's nodes with the guest's vCPUs stopped"


@pytest.mark.parametrize("config,step", params(CASES))
def test_killed_at_step_then_restarted(make_vm: Callable[..., Vm],
                                       make_daemon: Callable[..., Daemon], workdir: Path,
                                       config: Config, step: str) -> None:
    operation, listed = STEPS[step]
    vm = config.start(make_vm)
    a, b = config.disks
    s = Setup(config.disks, workdir / "copy.qcow2")
    refused = exports_refused(config, vm)
    held = adds_held(config, vm)
    daemon = make_daemon()
    g = Guest(vm)
    nodes, tops, fmt = vm.node_names(), vm.top_nodes(), format_nodes(vm)
    with daemon.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
        wait_for(lambda: domain_state(daemon, "vm1") == "running")
        checkpoint(c, "cp1")
    assert (HELD in daemon.log()) == held
    g.write(a, 1)
    g.write(b, 3)
    assert daemon.stop() == 0
    daemon.env = {"BLOCKBACKUPD_CRASH_AT": step}
    daemon.start()
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    if refused is not None and operation in EXPORTING:
        # Not reached on this build: refused before anything is made.
        with daemon.client() as c:
            c.snapshot_create("vm1", snapshot_xml("s1"))
            assert_refused(c, vm, s, refused)
            c.snapshot_delete("vm1", "s1")
        assert daemon.proc is not None and daemon.proc.poll() is None
        assert_nothing_left(daemon, vm, nodes, tops)
        return
    with daemon.client() as c:
        prepare(c, operation, s, vm)
        with pytest.raises(ConnectionLost):
            run(c, operation, s)
    assert daemon.proc is not None and daemon.proc.wait(10) == -signal.SIGKILL
    daemon.proc = None
    assert vm.running
    # A guest the daemon left stopped is one its store says it stopped (the
    # next connect resumes it): killed inside the held-I/O window, where the
    # snapshot's filters are added with the guest stopped, and only there
    # (a removal is held only for RBD disks in I/O threads: none here).
    stopped = vm.status() == "paused"
    assert ("held-io" in [kind for kind, _ in store_records(daemon)]) == stopped
    assert stopped == (held and step == "snapshot:filter-added")
    g.write(a, 5)  # the guest goes on while no daemon runs (its device's I/O does)

    daemon.env = {}
    daemon.start()
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    assert vm.running and vm.status() == "running"
    g.write(a, 7)
    with daemon.client() as c:
        assert c.snapshot_list("vm1") == [] and c.export_list("vm1") == []
        assert c.call("checkpoint.list", domain="vm1") == listed
        for name in listed:
            assert c.call("checkpoint.lookup", domain="vm1", name=name)["state"] == "valid"
        # Every change set is exact: nothing the guest wrote was missed.
        assert changes(c, "cp1", disk=a) == runs({1, 5, 7})
        assert changes(c, "cp1", disk=b) == runs({3})
        for newer in set(listed) - {"cp1"}:
            assert changes(c, newer, disk=a) == runs({5, 7})
    assert bitmap_names(vm, fmt[a]) == set(listed)
    assert bitmap_names(vm, fmt[b]) == set(listed)
    assert_nothing_left(daemon, vm, nodes, tops)
    # And the domain serves as before.
    with daemon.client() as c:
        serves(c, vm, s, refused)
    assert vm.node_names() == nodes
    assert vm.running and vm.status() == "running"


def test_killed_between_a_one_disk_move_and_its_second_bitmaps(
        make_vm: Callable[..., Vm], make_daemon: Callable[..., Daemon]) -> None:
    """``snapshot:moved``: a one-disk snapshot of a running guest holds no
    I/O, so its bitmaps change in two transactions around the move. Killed
    between them, the new checkpoint's bitmap records and so does the old
    segment: the restart finishes the checkpoint, stops the old segment, and
    every change set is exact."""
    vm = MINIMAL.start(make_vm)
    daemon = make_daemon()
    g = Guest(vm)
    nodes, tops = vm.node_names(), vm.top_nodes()
    with daemon.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
        wait_for(lambda: domain_state(daemon, "vm1") == "running")
        checkpoint(c, "cp1", {"sda": None})
    g.write("sda", 1)
    assert daemon.stop() == 0
    daemon.env = {"BLOCKBACKUPD_CRASH_AT": "snapshot:moved"}
    daemon.start()
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    with daemon.client() as c, pytest.raises(ConnectionLost):
        c.snapshot_create("vm1", snapshot_xml("s2", {"sda": None}), checkpoint=True)
    assert daemon.proc is not None and daemon.proc.wait(10) == -signal.SIGKILL
    daemon.proc = None
    assert vm.status() == "running"  # never stopped
    assert "held-io" not in [kind for kind, _ in store_records(daemon)]
    assert sorted(recording(vm, "sda-fmt")) == ["cp1", "s2"]
    g.write("sda", 5)

    daemon.env = {}
    daemon.start()
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    g.write("sda", 7)
    with daemon.client() as c:
        assert c.snapshot_list("vm1") == []
        assert c.call("checkpoint.list", domain="vm1") == ["cp1", "s2"]
        assert changes(c, "cp1") == runs({1, 5, 7})
        assert changes(c, "s2") == runs({5, 7})
    assert recording(vm, "sda-fmt") == ["s2"]
    assert_nothing_left(daemon, vm, nodes, tops)
