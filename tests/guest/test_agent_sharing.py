"""Sharing the guest with a VM manager that keeps the agent's channel.

libvirt connects to the channel named org.qemu.guest_agent.0 when the guest
agent starts and keeps it for the domain's life, and QEMU serves one client
per channel. So blockbackupd gets a channel of its own: a second
virtio-serial port, served in the guest by a second qemu-ga. Here the test
plays the manager on the first channel (connected throughout) while the
daemon quiesces through the second.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from blockbackup_client import QuiesceFailed
from tests.conftest import domain_state, snapshot_xml, wait_for
from tools.daemon import Daemon
from tools.linux_guest.vm import GuestAgent, LinuxVm

MiB = 1024 * 1024
PORT = "org.blockbackupd.guest_agent.0"

#: Run by the guest's /init after BB-READY: a second agent on our port, then
#: the crash workload's writes.
SCRIPT = f"""
port=
for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = {PORT} ] && port=/dev/${{p##*/}}
done
mkdir -p /run/qga-bb
qemu-ga -m virtio-serial -p "$port" -t /run/qga-bb -f /run/qga-bb.pid &
say "BB-AGENT2 port=$port pid=$!"
wl_crash
"""


def test_quiesce_through_a_channel_of_its_own_while_the_manager_holds_its_own(
        make_guest: Callable[..., LinuxVm], make_daemon: Callable[..., Daemon],
        guest_workdir: Path) -> None:
    ours = guest_workdir / "vm1-bb.qga"
    vm = make_guest("vm1", disks={"vda": 64 * MiB, "sdb": 64 * MiB}, script=SCRIPT,
                    params={"kmin": 16, "kmax": 64, "delay": 0.05},
                    extra_args=["-chardev", f"socket,path={ours},server=on,wait=off,id=qga1",
                                "-device", "virtio-serial-pci,id=vserial1",
                                "-device", f"virtserialport,bus=vserial1.0,chardev=qga1,"
                                           f"name={PORT}"])
    vm.wait_ready()
    vm.wait_console(r"^BB-AGENT2 port=/dev/vport\d+p\d+ pid=\d+", timeout=30)
    wait_for(lambda: vm.steps() >= 2, timeout=60, what="the guest's first steps")
    manager = GuestAgent(vm.agent_socket)  # the manager's, held throughout
    try:
        manager.sync()
        daemon = make_daemon(quiesce_timeout=10.0)
        with daemon.client() as c:
            c.domain_define("vm1", str(vm.daemon_qmp), guest_agent_socket=str(ours))
        wait_for(lambda: domain_state(daemon, "vm1") == "running", what="domain running")
        for i in range(3):
            before = vm.steps()
            with daemon.client() as c:
                c.snapshot_create("vm1", snapshot_xml(f"s{i}"), quiesce=True)
                info = c.snapshot_lookup("vm1", f"s{i}")
                assert info["quiesced"] is True and 0 < info["frozen_window"] < 5
                assert info["frozen_filesystems"] == 2
                c.snapshot_delete("vm1", f"s{i}")
            # The manager's agent still answers, and the guest writes on.
            assert manager.cmd("guest-ping") == {}
            wait_for(lambda before=before: vm.steps() >= before + 2, timeout=30,
                     what="the guest writing after the snapshot")
        assert manager.cmd("guest-fsfreeze-status") == "thawed"

        # The manager freezes the guest itself: our agent then freezes nothing
        # (the filesystems are frozen already), and the daemon must not thaw
        # what the manager froze (qemu-ga's thaw would thaw every filesystem).
        assert manager.cmd("guest-fsfreeze-freeze") == 2
        with daemon.client() as c:
            c.snapshot_create("vm1", snapshot_xml("s9"), quiesce=True)
            info = c.snapshot_lookup("vm1", "s9")
            assert info["quiesced"] is True and info["frozen_filesystems"] == 0
            c.snapshot_delete("vm1", "s9")
        before = vm.steps()
        time.sleep(1.5)
        assert vm.steps() <= before + 1, "the manager's freeze was thawed"
        assert manager.cmd("guest-fsfreeze-status") == "frozen"
        assert manager.cmd("guest-fsfreeze-thaw") == 2
        wait_for(lambda: vm.steps() >= before + 2, timeout=30, what="writes after the thaw")
        assert vm.errors() == []
    finally:
        manager.close()


def test_a_request_left_queued_on_a_held_channel_reaches_the_next_client_as_plain_json(
        make_guest: Callable[..., LinuxVm], make_daemon: Callable[..., Daemon]) -> None:
    """While another client holds the channel, the daemon's connection waits
    in the socket's accept queue with its synchronisation unread; when the
    holder goes, QEMU serves the dead connection first, and the agent's
    answer reaches the next client, or no one when QEMU writes it to the dead
    connection before it has seen its end (a race inside QEMU and the guest:
    alone every time the next client, in full-suite runs no one in about one
    round of three). What arrives must be plain JSON lines, which libvirt
    ignores as stray replies: an answer to guest-sync-delimited starts with
    0xFF, which libvirt cannot parse (its agent then stays unusable until it
    reconnects). Rounds go on until two answers have arrived."""
    vm = make_guest("vm1", disks={"vda": 64 * MiB}, workload="idle")
    vm.wait_ready()
    daemon = make_daemon(quiesce_timeout=1.0)
    with daemon.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp), guest_agent_socket=str(vm.agent_socket))
    wait_for(lambda: domain_state(daemon, "vm1") == "running", what="domain running")
    answered = 0
    for round in range(10):
        holder = GuestAgent(vm.agent_socket)
        holder.sync()
        with daemon.client() as c, pytest.raises(QuiesceFailed, match="another client"):
            c.snapshot_create("vm1", snapshot_xml(f"s{round}"), quiesce=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as next_client:
            # Queued behind the daemon's dead connection before the holder goes.
            next_client.connect(str(vm.agent_socket))
            holder.close()
            next_client.settimeout(5.0)  # then a moment for more after the first line
            received = b""
            with contextlib.suppress(TimeoutError):
                while chunk := next_client.recv(65536):
                    received += chunk
                    if b"\n" in received:
                        next_client.settimeout(1.0)
        assert b"\xff" not in received, received
        replies = [json.loads(line) for line in received.splitlines() if line.strip()]
        # The daemon's synchronisation was answered to the next client (once), or lost.
        syncs = sum(isinstance(r.get("return"), int) for r in replies)
        assert syncs <= 1, replies
        answered += syncs
        if answered == 2:
            break
    assert answered == 2, f"only {answered} answer(s) reached a client in {round + 1} rounds"
    with daemon.client() as c:
        assert c.snapshot_list("vm1") == []
        c.snapshot_create("vm1", snapshot_xml("ok"), quiesce=True)
        assert c.snapshot_lookup("vm1", "ok")["frozen_filesystems"] == 1
        c.snapshot_delete("vm1", "ok")
