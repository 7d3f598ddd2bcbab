"""Sharing the guest with a VM manager that keeps the agent's channel.

libvirt connects to the channel named org.qemu.guest_agent.0 when the guest
agent starts and keeps it for the domain's life, and QEMU serves one client
per channel. So blockbackupd gets a channel of its own: a second
virtio-serial port, served in the guest by a second qemu-ga. Here the test
plays the manager on the first channel (connected throughout) while the
daemon quiesces through the second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

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
