"""A frozen guest is never left behind: every way a quiesced snapshot can end
early, on a real Linux guest whose agent really freezes its filesystems.

The guest writes all along (the ``crash`` workload); a frozen filesystem
stops its step counter, a thawed one lets it go on. The guest's state is
read through its own agent (``guest-fsfreeze-status``) between the daemon's
uses of the channel, which serves one client at a time.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from blockbackup_client import ConnectionLost, OperationFailed, QuiesceFailed
from tests.conftest import domain_state, snapshot_xml, wait_for
from tests.faults.checks import store_records
from tools.daemon import Daemon
from tools.linux_guest.vm import GuestAgent, LinuxVm

MiB = 1024 * 1024


@pytest.fixture
def guest(make_guest: Callable[..., LinuxVm]) -> LinuxVm:
    vm = make_guest("vm1", disks={"vda": 64 * MiB, "sdb": 64 * MiB}, workload="crash",
                    params={"kmin": 16, "kmax": 64, "delay": 0.05})
    vm.wait_ready()
    wait_for(lambda: vm.steps() >= 2, timeout=60, what="the guest's first steps")
    return vm


def define(daemon: Daemon, vm: LinuxVm) -> None:
    with daemon.client() as c:
        c.domain_define(vm.name, str(vm.daemon_qmp), guest_agent_socket=str(vm.agent_socket))
    wait_for(lambda: domain_state(daemon, vm.name) == "running", what="domain running")


def freeze_status(vm: LinuxVm) -> str:
    """The agent's word on the guest's filesystems; the channel is let go at once."""
    try:
        return str(vm.agent("guest-fsfreeze-status", timeout=10))
    finally:
        vm.close_agent()


def assert_writing(vm: LinuxVm) -> None:
    """The guest's writes go on (and none failed)."""
    before = vm.steps()
    wait_for(lambda: vm.steps() >= before + 2, timeout=30, what="the guest writing")
    assert vm.errors() == []


def assert_not_writing(vm: LinuxVm, seconds: float = 1.5) -> None:
    """Frozen: the step counter stands still."""
    before = vm.steps()
    time.sleep(seconds)
    assert vm.steps() <= before + 1  # a step may have been reported just as it froze


def assert_nothing_made(daemon: Daemon, vm: LinuxVm) -> None:
    with daemon.client() as c:
        assert c.snapshot_list("vm1") == []
        assert c.call("checkpoint.list", domain="vm1") == []
    assert not any(n.startswith("bb-") for n in vm.node_names())
    assert list(Path(daemon.daemon_keys["scratch_dir"]).iterdir()) == []
    assert store_records(daemon) == []


def test_a_failure_after_the_freeze_thaws_the_guest(guest: LinuxVm,
                                                    make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon()
    daemon.env = {"BLOCKBACKUPD_FAIL_AT": "snapshot:frozen"}
    daemon.stop()
    daemon.start()
    define(daemon, guest)
    with daemon.client() as c:
        with pytest.raises(OperationFailed, match="injected failure at snapshot:frozen"):
            c.snapshot_create("vm1", snapshot_xml("s1"), checkpoint=True, quiesce=True)
    assert freeze_status(guest) == "thawed"
    assert_nothing_made(daemon, guest)
    assert_writing(guest)
    assert "froze 2 filesystem(s)" in daemon.log()


def test_sigterm_while_frozen_thaws_before_the_daemon_exits(
        guest: LinuxVm, make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon()
    daemon.env = {"BLOCKBACKUPD_PAUSE_AT": "snapshot:frozen"}
    daemon.stop()
    daemon.start()
    define(daemon, guest)
    failure: list[BaseException] = []

    def create() -> None:
        try:
            with daemon.client() as c:
                c.snapshot_create("vm1", snapshot_xml("s1"), quiesce=True)
        except BaseException as err:  # the daemon goes away under the request
            failure.append(err)

    request = threading.Thread(target=create)
    request.start()
    try:
        wait_for(lambda: "pausing at snapshot:frozen" in daemon.log(), timeout=30,
                 what="the daemon to hold the guest frozen")
        assert freeze_status(guest) == "frozen"
        assert_not_writing(guest)
        start = time.monotonic()
        assert daemon.stop(signal.SIGTERM) == 0
        stopped = time.monotonic() - start
    finally:
        request.join(30)
    assert failure and isinstance(failure[0], ConnectionLost), failure
    assert freeze_status(guest) == "thawed"
    assert_writing(guest)
    print(f"SIGTERM while frozen: daemon gone and guest thawed in {stopped:.2f} s")
    assert not any(n.startswith("bb-") for n in guest.node_names())
    # A request cancelled mid-command keeps the store's records of what it
    # made (QEMU may still hold it); the next daemon's connect finishes. The
    # thaw was answered, so no record says the guest is frozen.
    assert "guest-frozen" not in [kind for kind, _ in store_records(daemon)]
    daemon.env = {}
    daemon.start()
    wait_for(lambda: domain_state(daemon, "vm1") == "running", what="domain running")
    wait_for(lambda: store_records(daemon) == [], what="the store's records dropped")
    assert_nothing_made(daemon, guest)


def test_the_next_daemon_thaws_a_guest_left_frozen_by_a_killed_one(
        guest: LinuxVm, make_daemon: Callable[..., Daemon]) -> None:
    daemon = make_daemon()
    daemon.env = {"BLOCKBACKUPD_CRASH_AT": "snapshot:frozen"}
    daemon.stop()
    daemon.start()
    define(daemon, guest)
    with daemon.client() as c:
        with pytest.raises(ConnectionLost):
            c.snapshot_create("vm1", snapshot_xml("s1"), checkpoint=True, quiesce=True)
    assert daemon.proc is not None and daemon.proc.wait(10) == -signal.SIGKILL
    daemon.proc = None
    # SIGKILLed between the freeze and the instant: the guest stays frozen.
    assert freeze_status(guest) == "frozen"
    assert_not_writing(guest)
    assert [kind for kind, _ in store_records(daemon)].count("guest-frozen") == 1

    daemon.env = {}
    start = time.monotonic()
    daemon.start()
    wait_for(lambda: freeze_status(guest) == "thawed", timeout=30, interval=0.1,
             what="the next daemon to thaw the guest")
    thawed = time.monotonic() - start
    print(f"the next daemon thawed the guest {thawed:.2f} s after it was started")
    assert thawed < 10
    assert_writing(guest)
    wait_for(lambda: domain_state(daemon, "vm1") == "running", what="domain running")
    wait_for(lambda: store_records(daemon) == [], what="the store's records dropped")
    assert_nothing_made(daemon, guest)
    assert "an earlier daemon froze the guest for snapshot s1" in daemon.log()
    # And the domain quiesces normally again.
    with daemon.client() as c:
        c.snapshot_create("vm1", snapshot_xml("s2"), quiesce=True)
        assert c.snapshot_lookup("vm1", "s2")["quiesced"] is True
        c.snapshot_delete("vm1", "s2")
    assert freeze_status(guest) == "thawed"


def test_an_agent_channel_held_by_another_client(
        guest: LinuxVm, make_daemon: Callable[..., Daemon]) -> None:
    """As under libvirt, which keeps the agent's channel for the domain's life:
    quiesce-failed within the timeout, the guest untouched; once the other
    client lets go, quiesce works."""
    daemon = make_daemon(quiesce_timeout=2.0)
    define(daemon, guest)
    holder = GuestAgent(guest.agent_socket)
    try:
        holder.sync()
        start = time.monotonic()
        with daemon.client() as c:
            with pytest.raises(QuiesceFailed, match="another client using its channel"):
                c.snapshot_create("vm1", snapshot_xml("s1"), quiesce=True)
        elapsed = time.monotonic() - start
        assert 2.0 <= elapsed < 3.5, elapsed
        assert holder.cmd("guest-fsfreeze-status") == "thawed"
        assert_writing(guest)
        assert_nothing_made(daemon, guest)
    finally:
        holder.close()
    with daemon.client() as c:
        c.snapshot_create("vm1", snapshot_xml("s2"), quiesce=True)
        info = c.snapshot_lookup("vm1", "s2")
        assert info["quiesced"] is True and 0 < info["frozen_window"] < 2.0
        c.snapshot_delete("vm1", "s2")
    assert freeze_status(guest) == "thawed"
    assert_writing(guest)
