"""Domains: define/undefine/list/get_xml against real QEMU, reconnects, hangs, restarts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from blockbackup_client import (
    AlreadyExists,
    DomainNotConnected,
    InvalidArgument,
    NoSuchDomain,
    OperationFailed,
)
from blockbackupd.xml.document import schema
from tests.conftest import domain_state, wait_for
from tools.daemon import Daemon
from tools.vm import MiB, Vm


def test_define_list_get_xml(defined: tuple[Daemon, Vm]) -> None:
    daemon, vm = defined
    with daemon.client() as c:
        assert c.domain_list() == [
            {"name": "vm1", "qmp_socket": str(vm.daemon_qmp), "state": "running"}]
        xml = c.domain_get_xml("vm1")
        assert c.daemon_info()["domains"] == 1
    assert xml == (
        '<domain name="vm1" state="running">\n'
        f'  <disk name="sda" file="{vm.image("sda")}" format="qcow2" size="{64 * MiB}"/>\n'
        f'  <disk name="sdb" file="{vm.image("sdb")}" format="qcow2" size="{64 * MiB}"/>\n'
        '</domain>\n'
    )
    assert schema("domain").validate(etree.fromstring(xml.encode()))


def test_disks_are_read_from_qemu_each_time(defined: tuple[Daemon, Vm]) -> None:
    daemon, vm = defined
    extra = vm.workdir / "hot.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(extra), "8M"], check=True)
    vm.qmp("blockdev-add", driver="qcow2", **{"node-name": "hot-fmt"},
           file={"driver": "file", "filename": str(extra)})
    vm.qmp("device_add", driver="scsi-hd", drive="hot-fmt", id="sdc")
    with daemon.client() as c:
        root = etree.fromstring(c.domain_get_xml("vm1").encode())
        assert [d.get("name") for d in root] == ["sda", "sdb", "sdc"]
        assert root[2].attrib == {"name": "sdc", "file": str(extra), "format": "qcow2",
                                  "size": str(8 * MiB)}
        vm.qmp("device_del", id="sdc")
        wait_for(lambda: len(etree.fromstring(c.domain_get_xml("vm1").encode())) == 2,
                 what="sdc gone")


def test_disk_names_are_qdev_ids(make_vm: Callable[..., Vm], daemon: Daemon,
                                 workdir: Path) -> None:
    vda = workdir / "vda.qcow2"
    raw = workdir / "sdr.raw"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(vda), "16M"], check=True)
    raw.write_bytes(b"\0" * MiB)
    vm = make_vm(disks={}, extra_args=[
        "-blockdev", f"driver=file,filename={vda},node-name=n1",
        "-blockdev", "driver=qcow2,file=n1,node-name=n2",
        "-device", "virtio-blk-pci,drive=n2,id=vda",          # QEMU reports a QOM path
        "-blockdev", f"driver=file,filename={raw},node-name=n3,read-only=on",
        "-blockdev", "driver=raw,file=n3,node-name=n4,read-only=on",
        "-device", "scsi-hd,drive=n4,id=sdr",
        "-device", "scsi-cd,id=cd0",                           # no medium: not a disk
        "-blockdev", f"driver=file,filename={raw},node-name=n5,read-only=on",
        "-device", "scsi-hd,drive=n5",                         # no id: cannot be named
    ])
    with daemon.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
        wait_for(lambda: domain_state(daemon, "vm1") == "running")
        root = etree.fromstring(c.domain_get_xml("vm1").encode())
    assert [dict(d.attrib) for d in root] == [
        {"name": "vda", "file": str(vda), "format": "qcow2", "size": str(16 * MiB)},
        {"name": "sdr", "file": str(raw), "format": "raw", "size": str(MiB), "readonly": "yes"},
    ]


def test_define_again(defined: tuple[Daemon, Vm], workdir: Path) -> None:
    daemon, vm = defined
    with daemon.client() as c:
        assert c.domain_define("vm1", str(vm.daemon_qmp)) == {"name": "vm1"}  # no-op
        with pytest.raises(AlreadyExists, match="already defined with qmp_socket"):
            c.domain_define("vm1", str(workdir / "elsewhere.qmp"))
        with pytest.raises(AlreadyExists, match="already belongs to domain 'vm1'"):
            c.domain_define("vm2", str(vm.daemon_qmp))
        assert [d["name"] for d in c.domain_list()] == ["vm1"]


@pytest.mark.parametrize("name, qmp_socket, message", [
    ("a/b", "/q.qmp", "may only contain"),
    ("..", "/q.qmp", "may only contain"),
    ("-rf", "/q.qmp", "must not start with"),
    ("nul\0", "/q.qmp", "may only contain"),
    ("", "/q.qmp", "must not be empty"),
    ("x" * 10000, "/q.qmp", "longer than 64"),
    ("vm", "relative.qmp", "must be an absolute path"),
    ("vm", "/tmp/\0.qmp", "must be an absolute path"),
    ("vm", "/" + "d" * 200 + ".qmp", "too long for a UNIX socket"),
])
def test_define_refuses_bad_input(daemon: Daemon, name: str, qmp_socket: str,
                                  message: str) -> None:
    with daemon.client() as c:
        with pytest.raises(InvalidArgument, match=message) as err:
            c.domain_define(name, qmp_socket)
        assert (err.value.code, err.value.kind) == (1008, "invalid-argument")
        assert c.domain_list() == []


def test_undefine(defined: tuple[Daemon, Vm]) -> None:
    daemon, vm = defined
    with daemon.client() as c:
        assert c.domain_undefine("vm1") == {}
        assert c.domain_list() == []
        with pytest.raises(NoSuchDomain):
            c.domain_undefine("vm1")
        with pytest.raises(NoSuchDomain):
            c.domain_get_xml("vm1")
    # The session was closed: the QMP socket is free for the next definition.
    with daemon.client() as c:
        c.domain_define("again", str(vm.daemon_qmp))
    wait_for(lambda: domain_state(daemon, "again") == "running")


def test_domain_without_qemu_is_disconnected(daemon: Daemon, make_vm: Callable[..., Vm],
                                             workdir: Path) -> None:
    with daemon.client() as c:
        c.domain_define("vm1", str(workdir / "vm1.qmp"))  # QEMU not started yet
        assert c.domain_list()[0]["state"] == "disconnected"
        with pytest.raises(DomainNotConnected) as err:
            c.domain_get_xml("vm1")
        assert (err.value.code, err.value.kind) == (1006, "domain-not-connected")
    make_vm("vm1")
    wait_for(lambda: domain_state(daemon, "vm1") == "running", what="connected unaided")


def test_paused_states_follow_qemu(make_vm: Callable[..., Vm], daemon: Daemon) -> None:
    vm = make_vm(paused=True)  # -S: prelaunch
    with daemon.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
        wait_for(lambda: domain_state(daemon, "vm1") == "paused", what="prelaunch is paused")
        assert 'state="paused"' in c.domain_get_xml("vm1")
    vm.qmp("cont")
    wait_for(lambda: domain_state(daemon, "vm1") == "running", what="RESUME event")
    vm.qmp("stop")
    wait_for(lambda: domain_state(daemon, "vm1") == "paused", what="STOP event")


@pytest.mark.parametrize("how", ["quit", "kill"])
def test_qemu_restart_on_same_socket_reconnects_unaided(
        defined: tuple[Daemon, Vm], how: str) -> None:
    daemon, vm = defined
    vm.stop() if how == "quit" else vm.kill()
    wait_for(lambda: domain_state(daemon, "vm1") == "disconnected", what="disconnected")
    with daemon.client() as c, pytest.raises(DomainNotConnected):
        c.domain_get_xml("vm1")
    time.sleep(3)  # long enough for the backoff to reach its cap (0.5 s here)
    vm.start()
    start = time.monotonic()
    wait_for(lambda: domain_state(daemon, "vm1") == "running", timeout=5, what="reconnect")
    print(f"reconnected {time.monotonic() - start:.3f} s after QEMU came back")
    with daemon.client() as c:
        assert c.domain_get_xml("vm1").count("<disk ") == 2


def test_definitions_survive_daemon_restart(defined: tuple[Daemon, Vm],
                                            make_vm: Callable[..., Vm]) -> None:
    daemon, vm1 = defined
    vm2 = make_vm("vm2")
    with daemon.client() as c:
        c.domain_define("vm2", str(vm2.daemon_qmp))
        c.domain_define("gone", "/nonexistent/gone.qmp")
        c.domain_undefine("gone")
    assert daemon.stop() == 0
    daemon.start()
    wait_for(lambda: domain_state(daemon, "vm1") == domain_state(daemon, "vm2") == "running")
    with daemon.client() as c:
        assert [(d["name"], d["qmp_socket"]) for d in c.domain_list()] == [
            ("vm1", str(vm1.daemon_qmp)), ("vm2", str(vm2.daemon_qmp))]


def test_config_domains_are_defined_at_start(make_vm: Callable[..., Vm],
                                             make_daemon: Callable[..., Daemon],
                                             workdir: Path) -> None:
    vm = make_vm()
    daemon = make_daemon(domains=[{"name": "vm1", "qmp_socket": str(vm.daemon_qmp)}])
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    with daemon.client() as c:
        # Defined over RPC with the same socket: a no-op; with another: refused.
        c.domain_define("vm1", str(vm.daemon_qmp))
        with pytest.raises(AlreadyExists):
            c.domain_define("vm1", str(workdir / "x.qmp"))
    # The config file moves it: the file wins at the next start.
    daemon.stop()
    daemon.domains = [{"name": "vm1", "qmp_socket": str(workdir / "moved.qmp")}]
    daemon.start()
    with daemon.client() as c:
        assert c.domain_list() == [
            {"name": "vm1", "qmp_socket": str(workdir / "moved.qmp"), "state": "disconnected"}]
    assert "config file moves it" in daemon.log()


class SilentSocket:
    """A UNIX socket that accepts connections and never says a word."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(16)
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in self.accepted:
            conn.close()


def test_undefine_stops_reconnecting(daemon: Daemon, workdir: Path) -> None:
    path = workdir / "later.qmp"
    with daemon.client(timeout=10) as c:
        # Undefine lands at any point of the retry loop (connect failing, backoff).
        for i in range(30):
            c.domain_define(f"d{i}", str(path))
            time.sleep(i * 0.001)
            c.domain_undefine(f"d{i}")
    listener = SilentSocket(path)
    try:
        time.sleep(1.5)  # three times the backoff cap of this daemon
        assert listener.accepted == []  # nobody still tries this socket
    finally:
        listener.close()


def test_silent_qmp_socket_does_not_affect_others(defined: tuple[Daemon, Vm],
                                                  workdir: Path) -> None:
    daemon, vm = defined
    silent = SilentSocket(workdir / "silent.qmp")
    try:
        with daemon.client() as c:
            c.domain_define("mute", str(workdir / "silent.qmp"))
            wait_for(lambda: silent.accepted, what="daemon to connect to the silent socket")
            for _ in range(5):
                start = time.monotonic()
                assert "<disk " in c.domain_get_xml("vm1")
                states = {d["name"]: d["state"] for d in c.domain_list()}
                with pytest.raises(DomainNotConnected):
                    c.domain_get_xml("mute")
                # The daemon waits up to qmp_timeout (5 s) for a greeting; answers
                # about anything else must not wait for it.
                assert time.monotonic() - start < 1.0
                assert states == {"vm1": "running", "mute": "disconnected"}
                time.sleep(0.3)
            c.domain_undefine("mute")
    finally:
        silent.close()


def test_hung_qemu_fails_its_requests_only(make_daemon: Callable[..., Daemon],
                                           make_vm: Callable[..., Vm]) -> None:
    daemon = make_daemon(qmp_timeout=2.0)
    vm1, vm2 = make_vm("vm1"), make_vm("vm2")
    with daemon.client() as c:
        c.domain_define("vm1", str(vm1.daemon_qmp))
        c.domain_define("vm2", str(vm2.daemon_qmp))
    wait_for(lambda: domain_state(daemon, "vm1") == domain_state(daemon, "vm2") == "running")
    os.kill(vm1.pid, signal.SIGSTOP)  # QEMU alive, socket open, nobody answers
    try:
        outcome: dict[str, object] = {}

        def ask_hung() -> None:
            with daemon.client() as c:
                start = time.monotonic()
                try:
                    c.domain_get_xml("vm1")
                except OperationFailed as e:
                    outcome["error"] = e
                outcome["elapsed"] = time.monotonic() - start

        t = threading.Thread(target=ask_hung)
        t.start()
        time.sleep(0.2)
        with daemon.client() as c:
            for _ in range(5):
                start = time.monotonic()
                assert c.domain_get_xml("vm2").count("<disk ") == 2
                assert len(c.domain_list()) == 2
                assert time.monotonic() - start < 1.0
        t.join(10)
        err = outcome["error"]
        assert isinstance(err, OperationFailed)
        assert err.kind == "operation-failed"
        # The first command of a graph read; the message names it.
        assert "QEMU did not answer query-jobs within 2 s" in err.message
        assert 1.9 < float(outcome["elapsed"]) < 4  # type: ignore[arg-type]
    finally:
        os.kill(vm1.pid, signal.SIGCONT)
    with daemon.client() as c:  # and it recovers once QEMU answers again
        assert c.domain_get_xml("vm1").count("<disk ") == 2


class ResettingMonitor:
    """A stand-in QMP server for a fault QEMU cannot produce on demand: its
    first session greets again (a monitor reset) right after answering
    query-status, then refuses every command until capabilities are
    negotiated anew; later sessions answer like an idle QEMU with no disks."""

    GREETING = {"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                    "package": ""}, "capabilities": []}}

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.sessions = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.sessions += 1
            threading.Thread(target=self._session, args=(conn, self.sessions == 1),
                             daemon=True).start()

    def _session(self, conn: socket.socket, resets: bool) -> None:
        import json
        send = lambda obj: conn.sendall(json.dumps(obj).encode() + b"\n")  # noqa: E731
        negotiated = False
        send(self.GREETING)
        try:
            for msg in self._messages(conn):
                cmd, mid = msg.get("execute"), msg.get("id")
                if cmd == "qmp_capabilities":
                    negotiated = True
                    send({"return": {}, "id": mid})
                elif not negotiated:
                    send({"error": {"class": "CommandNotFound", "desc": "Expecting capabilities "
                                    "negotiation with 'qmp_capabilities'"}, "id": mid})
                elif cmd == "query-status":
                    send({"return": {"status": "running", "running": True}, "id": mid})
                    if resets:
                        negotiated = False
                        send(self.GREETING)
                elif cmd == "x-debug-query-block-graph":
                    send({"return": {"nodes": [], "edges": []}, "id": mid})
                else:
                    send({"return": [], "id": mid})
        except OSError:
            pass
        finally:
            conn.close()

    @staticmethod
    def _messages(conn: socket.socket) -> Iterator[dict[str, Any]]:
        """JSON texts as they arrive; clients need not end them with a newline."""
        import json
        decoder, buf = json.JSONDecoder(), ""
        while chunk := conn.recv(65536):
            buf += chunk.decode()
            while buf.strip():
                try:
                    msg, end = decoder.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                yield msg

    def close(self) -> None:
        self.sock.close()


def test_monitor_reset_after_negotiation_reconnects(daemon: Daemon, workdir: Path) -> None:
    monitor = ResettingMonitor(workdir / "reset.qmp")
    try:
        with daemon.client() as c:
            c.domain_define("vm1", str(workdir / "reset.qmp"))
            wait_for(lambda: monitor.sessions >= 2, what="a second session")

            def xml_ok() -> bool:
                try:
                    return c.domain_get_xml("vm1") == '<domain name="vm1" state="running"/>\n'
                except DomainNotConnected:
                    return False

            wait_for(xml_ok, timeout=10, what="a working session after the reset")
        assert "QEMU reset the monitor" in daemon.log() or \
            "reconciling after connect failed" in daemon.log()
    finally:
        monitor.close()
