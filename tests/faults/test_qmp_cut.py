"""The daemon's QMP connection cut under a running command, QEMU staying up:
the request answers domain-not-connected (1006) or operation-failed (1009)
at once, never hangs, and on the reconnect the domain is brought back to a
consistent state exactly, its guest running (see qmp_cut.py for how the cut
is made; the daemon sees QEMU's own PID behind the cut socket, so it judges
the real build's I/O-thread checks).

Every cut runs on the minimal VM, as before; on the configurations of
:mod:`tests.faults.configs`, the cuts where their commands differ (table
``ON``):

* proxmox (virtio-scsi in I/O threads, ``-drive``): every cut of
  snapshot.create. On a build that fails the throttle check (7.2) the
  filters and views are added inside the held-I/O window, so the same
  counts fall elsewhere: ``blockdev-add`` 3-4 are the probe sinks, made
  before the window; ``stop`` comes before any filter; ``blockdev-add`` 5
  is the first filter and 7 the first view, both added with the guest
  stopped: a cut there leaves it stopped for the reconnect to resume. On
  10.0 they are the plain path's (4: both filters, 5: a view, 7: a sink).
  Its exports, refused on 7.2 (``unsupported``, nothing sent, asserted) and
  cut on 10.0; its snapshot deletion (the ``-drive`` device moved back);
  QEMU's copy.
* libvirt (virtio-blk in I/O threads, ``-blockdev``, device throttling):
  the moves (``qom-set`` of the virtio-blk backend), a node inside the held
  window, the instant's transaction, its removal's steps and an export.
* proxmox-raw: the instant's ``transaction`` and the checkpoint deletion's,
  on bitmaps that live in QEMU's memory only.
* encrypted: ``object-add`` of the scratch's LUKS key, whose answer is lost
  (each of its snapshots formats a LUKS scratch: one cut).
* minimal: also QEMU's copy (``add-fd`` with its descriptor, the target
  node, the job).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blockbackup_client import DomainNotConnected, OperationFailed
from tests.conftest import domain_state, snapshot_xml, wait_for
from tests.faults.checks import assert_nothing_left
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
)
from tests.faults.operations import EXPORTING, Setup, assert_refused, prepare, run
from tests.faults.qmp_cut import QmpCut
from tests.faults.test_kill import HELD
from tests.test_checkpoints import Guest, bitmap_names, changes, checkpoint, runs
from tools.daemon import Daemon
from tools.qemu_build import selected
from tools.vm import Vm

Cut = tuple[str, str, int, bool]

#: (operation, QMP command cut, which one of that command, cut after QEMU ran it)
CUTS: list[Cut] = [
    ("snapshot.create", "blockdev-add", 1, False),  # before the first node
    ("snapshot.create", "blockdev-add", 1, True),   # a scratch node added
    ("snapshot.create", "blockdev-add", 4, True),   # both filters added (held: the sinks)
    ("snapshot.create", "stop", 1, True),           # the guest stopped, nothing moved
    ("snapshot.create", "qom-set", 1, True),        # one disk moved, the guest stopped
    ("snapshot.create", "transaction", 1, True),    # the checkpoint's bitmaps made
    ("snapshot.create", "cont", 1, True),           # all moved, the guest running
    ("snapshot.create", "blockdev-add", 5, True),   # a view added (held: a filter, stopped)
    ("export.start", "nbd-server-start", 1, True),
    ("export.start", "block-export-add", 1, True),
    ("export.stop", "block-export-del", 1, True),
    ("snapshot.delete", "qom-set", 1, True),        # one I/O path restored
    ("snapshot.delete", "blockdev-del", 1, True),
    ("checkpoint.delete", "transaction", 1, True),  # cp2 merged and removed in QEMU
]
#: Cuts only some configurations meet.
HELD_VIEW: Cut = ("snapshot.create", "blockdev-add", 7, True)  # held: a view, stopped
KEY_ADDED: Cut = ("snapshot.create", "object-add", 1, True)    # encrypted: the scratch's key
COPY: list[Cut] = [
    ("snapshot.copy", "add-fd", 1, True),           # QEMU holds the target's descriptor
    ("snapshot.copy", "blockdev-add", 1, True),     # the target node added
    ("snapshot.copy", "blockdev-backup", 1, True),  # the copy's job started
]

ON: list[tuple[Config, Cut]] = (
    [(MINIMAL, cut) for cut in CUTS + COPY]
    + [(PROXMOX, cut) for cut in CUTS + [HELD_VIEW] + COPY
       if cut[0] != "checkpoint.delete"]
    + [(LIBVIRT, cut) for cut in (CUTS[4], CUTS[5], CUTS[7], HELD_VIEW, CUTS[9],
                                  CUTS[11], CUTS[12])]
    + [(PROXMOX_RAW, cut) for cut in (CUTS[5], CUTS[13])]
    + [(ENCRYPTED, KEY_ADDED)]
)


def cut_id(config: Config, cut: Cut) -> str:
    o, c, n, a = cut
    return f"{config.id}-{o}-{c}{n}-{'after' if a else 'before'}"


def counted(command: str) -> Callable[[dict[str, Any]], bool] | None:
    """Which calls of the command count: of blockdev-backup, the copy's job
    only (the snapshot prober starts jobs of its own)."""
    if command == "blockdev-backup":
        return lambda args: str(args.get("job-id", "")).startswith("bb-copy-")
    return None


@pytest.fixture
def cut_setup(request: pytest.FixtureRequest, make_vm: Callable[..., Vm],
              make_daemon: Callable[..., Daemon], workdir: Path
              ) -> Iterator[tuple[Config, Cut, Vm, Daemon, QmpCut]]:
    config, cut = request.param
    _, command, nth, after = cut
    proxy = QmpCut(workdir / "cut.qmp", command, nth, after, where=counted(command))
    try:
        vm = config.start(make_vm, qemu=proxy.build(selected()))
        proxy.attach(vm)
        yield config, cut, vm, make_daemon(), proxy
    finally:
        proxy.close()


@pytest.mark.parametrize("cut_setup", [pytest.param(c, id=cut_id(*c)) for c in ON],
                         indirect=True)
def test_qmp_cut_mid_command(cut_setup: tuple[Config, Cut, Vm, Daemon, QmpCut],
                             workdir: Path) -> None:
    config, (operation, *_), vm, daemon, proxy = cut_setup
    a, b = config.disks
    s = Setup(config.disks, workdir / "copy.qcow2")
    refused = exports_refused(config, vm)
    g = Guest(vm)
    nodes, tops, fmt = vm.node_names(), vm.top_nodes(), format_nodes(vm)
    with daemon.client() as c:
        c.domain_define("vm1", str(proxy.listen))
        wait_for(lambda: domain_state(daemon, "vm1") == "running")
        checkpoint(c, "cp1")
        # Through the cut socket the daemon judged this QEMU's build, as on its own.
        assert (HELD in daemon.log()) == adds_held(config, vm)
        g.write(a, 1)
        if refused is not None and operation in EXPORTING:
            # Refused on this build before any command is sent: nothing to cut.
            c.snapshot_create("vm1", snapshot_xml("s1"))
            proxy.armed.set()
            assert_refused(c, vm, s, refused)
            assert not proxy.cut.is_set() and proxy.seen == 0
            c.snapshot_delete("vm1", "s1")
            assert domain_state(daemon, "vm1") == "running"
            assert_nothing_left(daemon, vm, nodes, tops)
            return
        prepare(c, operation, s, vm)
        proxy.armed.set()
        start = time.monotonic()
        with pytest.raises((DomainNotConnected, OperationFailed)):
            run(c, operation, s)
        took = time.monotonic() - start
    assert proxy.cut.is_set()
    assert took < 5.0  # the daemon's qmp_timeout here: the loss is seen, not timed out
    wait_for(lambda: domain_state(daemon, "vm1") == "running", what="reconnected")
    g.write(a, 5)
    assert vm.running and vm.status() == "running"  # the guest never stays stopped
    with daemon.client() as c:
        assert c.snapshot_list("vm1") == [] and c.export_list("vm1") == []
        listed = c.call("checkpoint.list", domain="vm1")
        # Kept exactly when QEMU holds its bitmaps; each change set exact.
        assert set(listed) == bitmap_names(vm, fmt[a]) == bitmap_names(vm, fmt[b])
        assert listed[0] == "cp1"
        for name in listed:
            assert c.call("checkpoint.lookup", domain="vm1", name=name)["state"] == "valid"
            assert changes(c, name, disk=a) == runs({1, 5} if name == "cp1" else {5})
    assert_nothing_left(daemon, vm, nodes, tops)
    with daemon.client() as c:  # and the domain serves as before
        c.snapshot_create("vm1", snapshot_xml("s3"))
        c.snapshot_delete("vm1", "s3")
    assert vm.running and vm.status() == "running"
