"""NBD exports over TCP: TLS with a throwaway CA made here; plain TCP only when allowed."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest

from blockbackup_client import InvalidArgument
from tests.conftest import NbdReader, domain_state, export_xml, snapshot_xml, wait_for
from tools.daemon import Daemon
from tools.pki import make_pki
from tools.vm import MiB, Vm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_export_over_tls(make_vm: Callable[..., Vm], make_daemon: Callable[..., Daemon],
                         workdir: Path) -> None:
    server_dir, client_dir = make_pki(workdir)
    vm = make_vm()
    vm.write("sda", 0, 65536, 0x3C)
    daemon = make_daemon()
    daemon.stop()
    daemon.config_extra = {"nbd": {"tls_dir": str(server_dir)}}
    daemon.start()
    port = free_port()
    with daemon.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
        wait_for(lambda: domain_state(daemon, "vm1") == "running")
        c.call("snapshot.create", domain="vm1", xml=snapshot_xml("s1"))
        vm.write("sda", 0, 65536, 0x3D)
        started = c.call("export.start", domain="vm1", xml=export_xml(
            [("sda", "s1")], f'<address type="ip" host="127.0.0.1" port="{port}" tls="yes"/>'))
        assert started["server"] == {"transport": "tcp", "host": "127.0.0.1", "port": port,
                                     "tls": True}
        assert c.call("export.server", domain="vm1") == started["server"]
        with NbdReader("", "sda-s1", certificates=str(client_dir), host="127.0.0.1",
                       port=port) as r:
            assert r.h.get_tls_negotiated()
            assert r.read(0, 65536) == b"\x3C" * 65536
        # Without TLS the server does not talk to us.
        h = nbd.NBD()
        h.set_export_name("sda-s1")
        h.set_tls(nbd.TLS_DISABLE)
        with pytest.raises(nbd.Error):
            h.connect_tcp("127.0.0.1", str(port))
        # Nor with a certificate from another CA.
        (workdir / "other").mkdir()
        _, other_client = make_pki(workdir / "other")
        with pytest.raises(nbd.Error):
            NbdReader("", "sda-s1", certificates=str(other_client), host="127.0.0.1", port=port)
        # More exports without an address join the running server; another address
        # is refused while exports remain on it.
        more = c.call("export.start", domain="vm1", xml=export_xml([("sdb", "s1")]))
        assert more["server"] == started["server"]
        unix = f'<address type="unix" socket="{daemon.daemon_keys["run_dir"]}/vm1.nbd"/>'
        with pytest.raises(InvalidArgument, match="already listens on tcp:127.0.0.1"):
            c.call("export.start", domain="vm1",
                   xml=export_xml([("sdb", "s1", {"exportname": "b2"})], unix))
        c.call("snapshot.delete", domain="vm1", name="s1")
        assert c.call("export.server", domain="vm1") is None
        objects = {o["name"] for o in vm.qmp("qom-list", path="/objects")}
        assert not any(o.startswith("bb-") for o in objects)  # TLS credentials removed too


def test_a_tls_export_without_a_port_gets_a_free_one(
        make_vm: Callable[..., Vm], make_daemon: Callable[..., Daemon], workdir: Path) -> None:
    """No port: the daemon binds a free one itself and hands it to QEMU, since
    QEMU cannot say which port it took; export.server names it."""
    server_dir, client_dir = make_pki(workdir)
    vm = make_vm()
    vm.write("sda", 0, 65536, 0x4E)
    daemon = make_daemon()
    daemon.stop()
    daemon.config_extra = {"nbd": {"tls_dir": str(server_dir)}}
    daemon.start()
    with daemon.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
        wait_for(lambda: domain_state(daemon, "vm1") == "running")
        c.call("snapshot.create", domain="vm1", xml=snapshot_xml("s1"))
        started = c.call("export.start", domain="vm1", xml=export_xml(
            [("sda", "s1")], '<address type="ip" host="127.0.0.1" tls="yes"/>'))
        port = started["server"]["port"]
        assert started["server"] == {"transport": "tcp", "host": "127.0.0.1", "port": port,
                                     "tls": True} and 1024 <= port < 65536
        assert c.call("export.server", domain="vm1") == started["server"]
        with NbdReader("", "sda-s1", certificates=str(client_dir), host="127.0.0.1",
                       port=port) as r:
            assert r.h.get_tls_negotiated()
            assert r.read(0, 65536) == b"\x4E" * 65536
        # "Any port" again joins the server on the port it has.
        more = c.call("export.start", domain="vm1", xml=export_xml(
            [("sdb", "s1")], '<address type="ip" host="127.0.0.1" port="0" tls="yes"/>'))
        assert more["server"] == started["server"]
        # An address that is not this host's: refused, nothing made.
        c.call("export.stop", domain="vm1", xml=export_xml([("sda", "s1"), ("sdb", "s1")]))
        assert c.call("export.server", domain="vm1") is None
        with pytest.raises(InvalidArgument, match="cannot listen for NBD on '192.0.2.1'"):
            c.call("export.start", domain="vm1", xml=export_xml(
                [("sda", "s1")], '<address type="ip" host="192.0.2.1" tls="yes"/>'))
        assert c.call("export.server", domain="vm1") is None
        assert c.call("export.list", domain="vm1") == []
        c.call("snapshot.delete", domain="vm1", name="s1")
        objects = {o["name"] for o in vm.qmp("qom-list", path="/objects")}
        assert not any(o.startswith("bb-") for o in objects)
        with socket.socket() as probe:  # the port is free again: nobody listens
            assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_plain_tcp_only_when_allowed(make_vm: Callable[..., Vm],
                                     make_daemon: Callable[..., Daemon]) -> None:
    vm = make_vm()
    daemon = make_daemon()
    daemon.stop()
    daemon.config_extra = {"nbd": {"allow_plain_tcp": True}}
    daemon.start()
    port = free_port()
    with daemon.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
        wait_for(lambda: domain_state(daemon, "vm1") == "running")
        c.call("snapshot.create", domain="vm1", xml=snapshot_xml("s1", {"sda": None}))
        started = c.call("export.start", domain="vm1", xml=export_xml(
            [("sda", "s1")], f'<address type="ip" host="127.0.0.1" port="{port}"/>'))
        assert started["server"]["tls"] is False
        h = nbd.NBD()
        h.set_export_name("sda-s1")
        h.connect_tcp("127.0.0.1", str(port))
        assert h.get_size() == 64 * MiB
        h.shutdown()
        c.call("snapshot.delete", domain="vm1", name="s1")
