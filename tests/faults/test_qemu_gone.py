"""QEMU killed (SIGKILL) with live snapshots, exports and checkpoints: the
daemon forgets what went with it, removes its files, answers no-such-snapshot,
says domain-disconnected; on the next QEMU it judges the checkpoints (a
killed QEMU never wrote its bitmaps into the images: broken, and said so)
and the next checkpoint starts a fresh chain."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest

from blockbackup_client import NoSuchSnapshot
from tests.conftest import domain_state, export_xml, snapshot_xml, wait_for
from tests.faults.checks import store_records
from tests.test_checkpoints import Guest, changes, runs
from tools.daemon import Daemon
from tools.vm import Vm


def test_qemu_killed_with_snapshots_exports_checkpoints(make_vm: Callable[..., Vm],
                                                        make_daemon: Callable[..., Daemon]
                                                        ) -> None:
    vm = make_vm()
    daemon = make_daemon()
    g = Guest(vm)
    watcher = daemon.client(timeout=30)
    try:
        with daemon.client() as c:
            c.domain_define("vm1", str(vm.daemon_qmp))
            wait_for(lambda: domain_state(daemon, "vm1") == "running")
            watcher.events_subscribe(["vm1"])
            c.snapshot_create("vm1", snapshot_xml("cp1"), checkpoint=True)
            g.write("sda", 2)
            c.snapshot_create("vm1", snapshot_xml("s2"))
            server = c.export_start("vm1", export_xml([("sda", "cp1"), ("sda", "s2")]))["server"]
            assert len(os.listdir(daemon.daemon_keys["scratch_dir"])) == 4

            vm.kill()
            event = watcher.next_event(10)
            assert (event["type"], event["domain"]) == ("domain-disconnected", "vm1")
            for name in ("cp1", "s2"):
                with pytest.raises(NoSuchSnapshot):
                    c.snapshot_lookup("vm1", name)
            assert c.snapshot_list("vm1") == [] and c.export_list("vm1") == []
            assert os.listdir(daemon.daemon_keys["scratch_dir"]) == []
            assert not os.path.exists(server["socket"])
            assert store_records(daemon) == []

            vm.start()  # the same images, after a crash
            wait_for(lambda: domain_state(daemon, "vm1") == "running")
            seen = [watcher.next_event(10) for _ in range(2)]
            assert {e["type"] for e in seen} == {"domain-connected", "checkpoint-broken"}
            broken = next(e for e in seen if e["type"] == "checkpoint-broken")
            assert broken["checkpoint"] == "cp1"
            info = c.call("checkpoint.lookup", domain="vm1", name="cp1")
            assert info["state"] == "broken" and "missing" in info["reason"]
            # The next checkpoint starts a fresh chain, exact from its instant.
            c.snapshot_create("vm1", snapshot_xml("cp2"), checkpoint=True)
            c.snapshot_delete("vm1", "cp2")
            g.write("sda", 9)
            assert changes(c, "cp2") == runs({9})
            # cp1 stays listed, broken, until someone deletes it.
            assert c.call("checkpoint.list", domain="vm1") == ["cp1", "cp2"]
            assert c.call("checkpoint.lookup", domain="vm1", name="cp1")["state"] == "broken"
    finally:
        watcher.close()
