"""The images are the record: a daemon with no record of a domain's
checkpoints (its state_dir lost, or another host after a cold move) adopts
them from the bitmaps' names, with no client action, and every change set
and the next incremental are exact."""

from __future__ import annotations

import shutil
from pathlib import Path

from tests.conftest import domain_state, snapshot_xml, wait_for
from tests.test_checkpoints import Guest, changes, runs
from tests.vm_manager.manager import assert_restore_equals_live, backup
from tools.daemon import Daemon
from tools.vm import Vm


def checkpoint(daemon: Daemon, name: str) -> None:
    with daemon.client() as c:
        c.snapshot_create("vm1", snapshot_xml(name), checkpoint=True)
        c.snapshot_delete("vm1", name)


def listing(daemon: Daemon) -> list[tuple[str, int, str]]:
    with daemon.client() as c:
        return [(n, info["created"], info["state"]) for n in c.call("checkpoint.list",
                                                                    domain="vm1")
                for info in [c.call("checkpoint.lookup", domain="vm1", name=n)]]


def test_a_lost_state_dir(defined: tuple[Daemon, Vm], workdir: Path) -> None:
    daemon, vm = defined
    g = Guest(vm)
    dest = workdir / "b"
    g.write("sda", 1)
    backup(daemon, dest)
    g.write("sda", 2)
    g.write("sdb", 4)
    checkpoint(daemon, "mid")
    g.write("sda", 3)
    before = listing(daemon)
    assert [n for n, _, _ in before][1:] == ["mid"]
    daemon.stop()
    shutil.rmtree(daemon.daemon_keys["state_dir"])
    daemon.start()
    with daemon.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    assert listing(daemon) == before
    with daemon.client() as c:
        assert changes(c, before[0][0]) == runs({2, 3})
        assert changes(c, before[0][0], disk="sdb") == runs({4})
        assert changes(c, "mid") == runs({3})
    record = backup(daemon, dest)
    assert record["level"] == "inc"
    for disk in ("sda", "sdb"):
        assert_restore_equals_live(daemon, vm, dest, disk)


def test_a_cold_move_to_another_host(defined: tuple[Daemon, Vm], workdir: Path) -> None:
    """QEMU quits on one host and starts on another on the same images: the
    other host's daemon, which never saw the domain, takes an incremental."""
    daemon, vm = defined
    g = Guest(vm)
    dest = workdir / "b"
    g.write("sda", 1)
    first = backup(daemon, dest)
    g.write("sda", 5)
    vm.stop()  # a clean quit stores the bitmaps
    # The first host's daemon must not see the QEMU that starts on the
    # second: QEMU's QMP socket serves one client, and the first daemon,
    # still retrying it, would otherwise win the race for it.
    with daemon.client() as c:
        c.domain_undefine("vm1", force=True)  # the bitmaps stay
    host2 = workdir / "host2"
    host2.mkdir()
    other = Daemon(host2).start()  # its own socket, state_dir and scratch
    try:
        vm.start()
        with other.client() as c:
            c.domain_define("vm1", str(vm.daemon_qmp))
        wait_for(lambda: domain_state(other, "vm1") == "running")
        assert [n for n, _, state in listing(other)] == [first["id"]]
        assert listing(other)[0][2] == "valid"
        g.write("sdb", 6)
        with other.client() as c:
            assert changes(c, first["id"]) == runs({5})
            assert changes(c, first["id"], disk="sdb") == runs({6})
        record = backup(other, dest)
        assert record["level"] == "inc"
        for disk in ("sda", "sdb"):
            assert_restore_equals_live(other, vm, dest, disk)
    finally:
        other.stop()
