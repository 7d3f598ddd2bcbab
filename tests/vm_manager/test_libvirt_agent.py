"""Quiesce under libvirt 9.0: the Linux test guest (tools/linux_guest) booted
by a private libvirtd, which keeps the guest agent channel
org.qemu.guest_agent.0 for itself, while blockbackupd quiesces through a
channel of its own (org.blockbackupd.guest_agent.0, a second virtio-serial
port served in the guest by a second qemu-ga), as the README recommends.

The domain: q35 under TCG (``<cpu mode='maximum'/>``, i.e. ``-cpu max``), the
guest's kernel and initramfs in ``<os>``, a virtio-blk disk vda and a scsi-hd
disk sdb (qcow2, serials vda and sdb), the serial console in a file, the
guest's script handed over by ``<sysinfo type='fwcfg'>`` (``-fw_cfg``), and
the extra QMP monitor for blockbackupd as in the other libvirt tests. Who is
connected to which channel is read from the kernel's socket table (``ss -x``):
libvirtd's connection to its agent must be the same one throughout.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from blockbackup_client import QuiesceFailed
from tests.conftest import domain_state, snapshot_xml, wait_for
from tests.guest.test_agent_sharing import PORT, SCRIPT
from tools.daemon import Daemon
from tools.libvirt import Libvirt, devices_end, libvirt_errors
from tools.linux_guest.build import GuestImage, build
from tools.linux_guest.vm import console_errors, last_step, read_console

#: libvirt's emulator is the system's QEMU (/usr/bin/qemu-system-x86_64) whatever
#: BB_QEMU selects: `make test`'s pass on another build deselects these.
pytestmark = pytest.mark.libvirt

MiB = 1024 * 1024
LIBVIRT_PORT = "org.qemu.guest_agent.0"
DISKS = {"vda": "virtio", "sdb": "scsi"}
QDEVS = ["ua-vda", "ua-sdb"]            # libvirt's user aliases = blockbackupd's disk names
QUIESCE_TIMEOUT = 2.0
#: virsh domfsinfo: mount point, guest device, type, libvirt's disk target.
FSINFO = [["/mnt/vda", "vda", "ext4", "vda"], ["/mnt/sdb", "sda", "ext4", "sdb"]]
NOT_CONNECTED = "Guest agent is not responding: QEMU guest agent is not connected"
#: libvirtd reconnects, each after the daemon left a request in the channel's queue.
ROUNDS = 2


CMDLINE = ("console=ttyS0 loglevel=5 panic=-1 bb.workload=script bb.disks=vda,sdb "
           "bb.agent=1 bb.kmin=16 bb.kmax=64 bb.delay=0.05")


def guest_domain_xml(name: str, image: GuestImage, disks: dict[str, Path], script: Path,
                     console: Path, ours: Path, qmp: Path) -> str:
    """The Linux guest under libvirt. libvirt picks the path of its own agent
    channel (``<source mode='bind'/>`` without a path); ours is given."""
    devices = []
    for target, path in disks.items():
        devices.append(f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='{path}'/>
      <target dev='{target}' bus='{DISKS[target]}'/>
      <serial>{target}</serial>
      <alias name='ua-{target}'/>
    </disk>""")
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <sysinfo type='fwcfg'>
    <entry name='opt/bb/script' file='{script}'/>
  </sysinfo>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{image.kernel}</kernel>
    <initrd>{image.initrd}</initrd>
    <cmdline>{CMDLINE}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode='maximum'/>
  <on_reboot>destroy</on_reboot>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='scsi' index='0' model='virtio-scsi'/>
    <controller type='usb' model='none'/>{''.join(devices)}
    <serial type='file'>
      <source path='{console}' append='on'/>
      <target port='0'/>
    </serial>
    <console type='file'>
      <source path='{console}' append='on'/>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='{LIBVIRT_PORT}'/>
    </channel>
    <channel type='unix'>
      <source mode='bind' path='{ours}'/>
      <target type='virtio' name='{PORT}'/>
    </channel>
{devices_end(qmp)}"""


# ------------------------------------------------------------ socket table

@dataclass(frozen=True)
class UnixSocket:
    state: str
    recv_q: int        # for a listener: connections waiting to be accepted
    path: str          # "*" when unnamed
    inode: int
    peer: int
    users: str         # ss's users:((...)) text


SS_LINE = re.compile(r"^u_str\s+(\S+)\s+(\d+)\s+\d+\s+(\S+) (\d+)\s+\S+ (\d+)\s*(.*)$")


def unix_sockets() -> list[UnixSocket]:
    out = subprocess.run(["ss", "-xapH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        m = SS_LINE.match(line)
        if m:
            found.append(UnixSocket(m[1], int(m[2]), m[3], int(m[4]), int(m[5]), m[6]))
    return found


@dataclass(frozen=True)
class Channel:
    listening: bool
    queued: int                       # connections QEMU has not accepted
    clients: list[tuple[int, str]]    # (inode, users) of each connected client


def channel(path_in_qemu: str) -> Channel:
    """The host side of a chardev socket: ``path_in_qemu`` as QEMU bound it
    (in libvirt's mount namespace for libvirt's own channel)."""
    socks = unix_sockets()
    by_inode = {s.inode: s for s in socks}
    listeners = [s for s in socks if s.path == path_in_qemu and s.state == "LISTEN"]
    clients = []
    for s in socks:
        if s.path == path_in_qemu and s.state == "ESTAB" and s.peer in by_inode:
            peer = by_inode[s.peer]
            clients.append((peer.inode, peer.users))
    return Channel(bool(listeners), sum(s.recv_q for s in listeners), clients)


# ------------------------------------------------------------------ guest

class LibvirtGuest:
    """The Linux guest as libvirt domain ``name``, files in ``workdir``."""

    def __init__(self, lv: Libvirt, workdir: Path, name: str = "vm1") -> None:
        self.lv = lv
        self.workdir = workdir
        self.name = name
        self.console_path = workdir / f"{name}.console"
        self.script = workdir / f"{name}.script.sh"
        self.ours = workdir / f"{name}-bb.qga"
        self.qmp = workdir / f"{name}.qmp"
        self.image = build()

    def disk(self, target: str) -> Path:
        return self.workdir / f"{self.name}-{target}.qcow2"

    def start(self) -> float:
        """Define and start the domain; seconds ``virsh start`` took."""
        for target in DISKS:
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.disk(target)),
                            str(64 * MiB)], check=True)
        self.script.write_text(SCRIPT)
        xml = self.workdir / f"{self.name}.xml"
        xml.write_text(guest_domain_xml(self.name, self.image,
                                        {t: self.disk(t) for t in DISKS}, self.script,
                                        self.console_path, self.ours, self.qmp))
        self.virsh("define", str(xml))
        began = time.monotonic()
        self.virsh("start", self.name)
        return time.monotonic() - began

    def remove(self) -> None:
        if self.virsh("domstate", self.name, check=False).stdout.strip() not in ("shut off", ""):
            self.virsh("destroy", self.name, check=False)
        self.virsh("undefine", self.name, check=False)

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.lv.virsh(*args, check=check, timeout=60)

    # console

    def console(self) -> str:
        return read_console(self.console_path)

    def wait_console(self, pattern: str, timeout: float) -> re.Match[str]:
        regex = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.console())
            if m:
                return m
            state = self.virsh("domstate", self.name, check=False).stdout.strip()
            if state != "running" or time.monotonic() > deadline:
                pytest.fail(f"{pattern!r} not on the console (domain {state}):\n"
                            f"{self.console()[-3000:]}")
            time.sleep(0.1)

    def steps(self) -> int:
        return last_step(self.console())

    def errors(self) -> list[str]:
        return console_errors(self.console())

    def writes_on(self, timeout: float = 30) -> None:
        before = self.steps()
        wait_for(lambda: self.steps() >= before + 2, timeout=timeout,
                 what="the guest writing on")

    # libvirt's view

    def dumpxml(self) -> ET.Element:
        return ET.fromstring(self.virsh("dumpxml", self.name).stdout)

    def channels(self) -> dict[str, tuple[str, str]]:
        """Port name -> (socket path as libvirt reports it, state of the guest side)."""
        out = {}
        for ch in self.dumpxml().iter("channel"):
            source, target = ch.find("source"), ch.find("target")
            assert source is not None and target is not None
            out[target.attrib["name"]] = (source.attrib["path"], target.attrib.get("state", ""))
        return out

    def virsh_says(self, *args: str) -> str:
        """What virsh prints without -q (e.g. domfsfreeze's count), which must succeed."""
        r = subprocess.run(["virsh", "-c", self.lv.uri, *args], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, f"virsh {' '.join(args)}: {r.stderr.strip()}"
        return r.stdout.strip()

    def agent(self, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command through libvirt's agent (``virsh qemu-agent-command``)."""
        return self.virsh("qemu-agent-command", self.name, json.dumps({"execute": command}),
                          check=check)

    def agent_return(self, command: str) -> Any:
        return json.loads(self.agent(command).stdout)["return"]

    def fsinfo(self) -> list[list[str]]:
        return [line.split() for line in
                self.virsh("domfsinfo", self.name).stdout.splitlines() if line.strip()]

    def libvirt_agent_works(self) -> None:
        assert self.agent_return("guest-ping") == {}
        assert self.fsinfo() == FSINFO


@dataclass
class Started:
    guest: LibvirtGuest
    libvirt_channel: str      # libvirt's agent socket, as QEMU bound it
    libvirt_client: int       # inode of libvirtd's connection to it


@pytest.fixture
def started(lv: Libvirt, workdir: Path) -> Iterator[Started]:
    """vm1 booted under libvirt, both agents serving, libvirtd connected to
    its own channel only; what libvirt did on the way is printed (and checked)."""
    if not lv.alive:
        print("libvirtd had died: started again")
        lv.restart()
    guest = LibvirtGuest(lv, workdir)
    try:
        log_mark = lv.libvirtd_log.stat().st_size
        domain_log = lv.domain_log("vm1")
        domain_log_mark = domain_log.stat().st_size if domain_log.exists() else 0
        began = time.monotonic()
        took = guest.start()
        channels = guest.channels()
        assert set(channels) == {LIBVIRT_PORT, PORT}
        theirs = channels[LIBVIRT_PORT][0]
        assert channels[PORT] == (str(guest.ours), "disconnected")
        assert re.fullmatch(rf"/var/lib/libvirt/qemu/channel/target/domain-\d+-vm1/"
                            rf"{re.escape(LIBVIRT_PORT)}", theirs), theirs
        # Before the guest's agent runs, nobody is connected to either channel
        # and libvirt says so.
        assert channel(theirs) == Channel(True, 0, [])
        assert channel(str(guest.ours)) == Channel(True, 0, [])
        refused = guest.agent("guest-ping", check=False)
        assert refused.returncode == 1 and NOT_CONNECTED in refused.stderr, refused.stderr
        # Boot, sampled: the socket table first, then the console, so that a
        # connection seen implies every line printed before it is seen too.
        markers = ("BB-DISK id=sdb ", "BB-READY ", "BB-AGENT ", "BB-AGENT2 ")
        marks: dict[str, float] = {}
        deadline = time.monotonic() + 90
        while len(marks) < len(markers) + 1:
            now = time.monotonic() - began
            connected = bool(channel(theirs).clients)
            text = guest.console()
            if connected and "libvirtd connected" not in marks:
                marks["libvirtd connected"] = now
            for marker in markers:
                if marker not in marks and f"\n{marker}" in text:
                    marks[marker] = now
            if re.search(r"^BB-ERROR|Kernel panic", text, re.M) or time.monotonic() > deadline:
                pytest.fail(f"boot: {marks}\n{text[-3000:]}")
            time.sleep(0.05)
        guest.libvirt_agent_works()
        pinged = time.monotonic() - began
        # What libvirt logged: the refusal above, nothing about either channel.
        errors = libvirt_errors(lv, log_mark)
        with open(domain_log, "rb") as f:
            f.seek(domain_log_mark)
            taints = re.findall(r"is tainted: (\S+)$", f.read().decode(errors="replace"), re.M)
        print(f"libvirtd's errors while starting vm1: {errors}; vm1 tainted: {taints}")
        assert len(errors) == 1 and re.search(rf": error : qemuDomainAgentAvailable:\d+ : "
                                              rf"{NOT_CONNECTED}$", errors[0]), errors
        assert taints == ["high-privileges", "custom-argv", "custom-ga-command"]
        print(f"virsh start took {took:.2f} s; since its start: "
              + ", ".join(f"{k.strip()} {v:.2f} s" for k, v in marks.items())
              + f", libvirt's agent answering {pinged:.2f} s")
        # libvirt connects once the guest's agent opened its port
        # (VSERPORT_CHANGE), after the disks were mounted: not at start.
        assert marks["libvirtd connected"] >= marks["BB-DISK id=sdb "]
        guest.wait_console(r"^BB-AGENT2 port=/dev/vport\d+p2 pid=\d+$", 10)
        # libvirt learns of the port's opening from QEMU's VSERPORT_CHANGE
        # event, a moment after the guest says so (missed once under load).
        wait_for(lambda: {k: v[1] for k, v in guest.channels().items()} ==
                 {LIBVIRT_PORT: "connected", PORT: "connected"},
                 what="libvirt to see both agent ports open")
        theirs_now = channel(theirs)
        assert theirs_now.queued == 0 and len(theirs_now.clients) == 1
        inode, users = theirs_now.clients[0]
        assert users.startswith('users:(("libvirtd",') and \
            f"pid={lv.libvirtd.pid if lv.libvirtd else -1}," in users, users
        assert channel(str(guest.ours)) == Channel(True, 0, [])   # libvirt leaves ours alone
        guest.writes_on()
        yield Started(guest, theirs, inode)
    finally:
        print(f"--- console of vm1 ---\n{guest.console()[-4000:]}")
        if lv.domain_log("vm1").exists():
            print(f"--- libvirt's log of vm1 ---\n"
                  f"{lv.domain_log('vm1').read_text(errors='replace')[-2000:]}")
        guest.remove()


def define(daemon: Daemon, guest: LibvirtGuest, agent_socket: Path) -> None:
    with daemon.client() as c:
        c.domain_define("vm1", str(guest.qmp), guest_agent_socket=str(agent_socket))
    wait_for(lambda: domain_state(daemon, "vm1") == "running", what="vm1 running")


def quiesced_snapshot(daemon: Daemon, name: str) -> dict[str, Any]:
    with daemon.client() as c:
        c.snapshot_create("vm1", snapshot_xml(name), quiesce=True)
        info: dict[str, Any] = c.snapshot_lookup("vm1", name)
        c.snapshot_delete("vm1", name)
        assert c.snapshot_list("vm1") == []
    assert info["disks"] == QDEVS and info["quiesced"] is True
    return info


def test_quiesce_through_our_channel_while_libvirt_keeps_its_own(
        started: Started, make_daemon: Callable[..., Daemon]) -> None:
    guest, lv = started.guest, started.guest.lv
    daemon = make_daemon(quiesce_timeout=QUIESCE_TIMEOUT)
    define(daemon, guest, guest.ours)
    windows = []
    for i in range(3):
        info = quiesced_snapshot(daemon, f"s{i}")
        assert info["frozen_filesystems"] == 2 and 0 < info["frozen_window"] < QUIESCE_TIMEOUT
        windows.append(info["frozen_window"])
        # libvirt's agent answers between them, the guest thawed; it writes on.
        guest.libvirt_agent_works()
        assert guest.agent_return("guest-fsfreeze-status") == "thawed"
        guest.writes_on()
    print(f"quiesced through our channel: frozen windows {windows} s")

    # libvirt freezes the guest through its agent: a freeze through ours then
    # freezes nothing, owes no thaw, and libvirt's freeze holds until domfsthaw.
    assert guest.virsh_says("domfsfreeze", "vm1") == "Froze 2 filesystem(s)"
    info = quiesced_snapshot(daemon, "s9")
    assert info["frozen_filesystems"] == 0
    before = guest.steps()
    time.sleep(1.5)
    assert guest.steps() <= before + 1, "libvirt's freeze was thawed"
    assert guest.agent_return("guest-fsfreeze-status") == "frozen"
    assert guest.virsh_says("domfsthaw", "vm1") == "Thawed 2 filesystem(s)"
    guest.writes_on()
    assert guest.agent_return("guest-fsfreeze-status") == "thawed"

    # libvirt kept its one connection to its agent throughout and never
    # touched ours; the guest saw no error.
    now = channel(started.libvirt_channel)
    assert now.queued == 0 and [inode for inode, _ in now.clients] == [started.libvirt_client]
    assert channel(str(guest.ours)) == Channel(True, 0, [])
    assert guest.errors() == []
    assert lv.alive


def test_pointed_at_libvirts_channel(started: Started, make_daemon: Callable[..., Daemon]
                                     ) -> None:
    """The daemon given libvirt's channel: quiesce-failed after quiesce_timeout,
    the guest untouched, libvirt's agent answering on its same connection.

    QEMU never accepts the daemon's connection: it waits in the channel's
    accept queue, its synchronisation request unread. When libvirtd connects
    again (here: libvirtd restarted, as an upgrade would), QEMU serves that
    dead connection first, and the request may reach the guest's agent, whose
    answer then goes to libvirt. It must be one libvirt ignores: with
    guest-sync-delimited (0xFF before the JSON) libvirt failed to parse it and
    marked its agent unusable, in 7 of 17 such reconnects; with plain
    guest-sync, as the daemon sends now, it answers on every round.
    """
    guest, lv = started.guest, started.guest.lv
    theirs = lv.host_path(started.libvirt_channel)   # outside libvirt's mount namespace
    assert theirs.is_socket()
    daemon = make_daemon(quiesce_timeout=QUIESCE_TIMEOUT)
    define(daemon, guest, theirs)
    before = guest.steps()
    with daemon.client() as c:
        began = time.monotonic()
        with pytest.raises(QuiesceFailed) as err:
            c.snapshot_create("vm1", snapshot_xml("s1"), quiesce=True)
        took = time.monotonic() - began
        assert c.snapshot_list("vm1") == []
    print(f"pointed at libvirt's channel: quiesce-failed after {took:.2f} s: {err.value.message}")
    assert err.value.message == (
        f"domain 'vm1': cannot freeze the guest's filesystems: the guest agent did not "
        f"answer guest-sync within {QUIESCE_TIMEOUT:g} s (is the guest agent "
        f"running, or is another client using its channel?)")
    assert QUIESCE_TIMEOUT <= took < QUIESCE_TIMEOUT + 2
    # libvirt's agent answers, on the same connection; the guest was never frozen.
    guest.libvirt_agent_works()
    assert guest.agent_return("guest-fsfreeze-status") == "thawed"
    assert guest.steps() > before
    now = channel(started.libvirt_channel)
    assert [inode for inode, _ in now.clients] == [started.libvirt_client]
    # ... and the daemon's connection waits in QEMU's accept queue.
    assert now.queued == 1

    # Back on our own channel the daemon quiesces as before.
    define(daemon, guest, guest.ours)
    assert quiesced_snapshot(daemon, "s2")["frozen_filesystems"] == 2
    guest.writes_on()

    # libvirtd restarts (as an upgrade would), each time after the daemon left
    # a request in the queue; the domain runs on, and each new libvirtd finds
    # its agent working.
    define(daemon, guest, theirs)
    for round in range(ROUNDS):
        if round:  # the first round's request is queued already
            with daemon.client() as c, pytest.raises(QuiesceFailed):
                c.snapshot_create("vm1", snapshot_xml(f"q{round}"), quiesce=True)
        assert channel(started.libvirt_channel).queued == 1
        log_mark = lv.libvirtd_log.stat().st_size
        restart = lv.restart_libvirtd()
        assert guest.virsh("domstate", "vm1").stdout.strip() == "running"
        wait_for(lambda: channel(started.libvirt_channel).clients, what="libvirtd reconnected")
        after = channel(started.libvirt_channel)
        assert after.queued == 0 and len(after.clients) == 1
        ping = guest.agent("guest-ping", check=False)
        print(f"round {round}: libvirtd restarted in {restart:.2f} s; its agent: "
              f"{ping.stdout.strip() or ping.stderr.strip()}")
        assert ping.returncode == 0 and ping.stdout.strip() == '{"return":{}}', ping.stderr
        assert not any("cannot parse json" in e for e in libvirt_errors(lv, log_mark))
        guest.libvirt_agent_works()
    define(daemon, guest, guest.ours)
    guest.libvirt_agent_works()
    assert quiesced_snapshot(daemon, "s4")["frozen_filesystems"] == 2
    guest.writes_on()
    assert guest.errors() == []
