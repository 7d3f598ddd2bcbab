"""The client library, event notifications and bbctl, against the real daemon."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import blockbackup_client.errors as client_errors
import blockbackupd.errors as daemon_errors
from blockbackup_client import (
    AsyncClient,
    Client,
    ConnectionLost,
    NoSuchDomain,
    ProtocolError,
)
from tests.conftest import bbctl, domain_state, wait_for
from tools.daemon import Daemon
from tools.vm import Vm

# The contract's table, copied here on purpose: both sides must match it.
CONTRACT_ERRORS = {
    1001: "no-such-domain", 1002: "no-such-snapshot", 1003: "no-such-checkpoint",
    1004: "no-such-disk", 1005: "already-exists", 1006: "domain-not-connected",
    1007: "invalid-xml", 1008: "invalid-argument", 1009: "operation-failed", 1010: "busy",
    1011: "checkpoint-broken", 1012: "permission-denied", 1013: "unsupported",
    1014: "quiesce-failed",
}


def test_error_tables_match_the_contract() -> None:
    assert {c.code: c.kind for c in daemon_errors.ALL_ERRORS} == CONTRACT_ERRORS
    assert {code: c.kind for code, c in client_errors.BY_CODE.items()} == CONTRACT_ERRORS
    for cls in daemon_errors.ALL_ERRORS:  # same class names on both sides
        assert client_errors.BY_CODE[cls.code].__name__ == cls.__name__


def test_unknown_code_keeps_code_and_kind() -> None:
    err = client_errors.error_from_response(
        {"code": 1099, "message": "m", "data": {"kind": "future-kind"}})
    assert (err.code, err.kind, str(err)) == (1099, "future-kind", "m")  # type: ignore[attr-defined]


def test_sync_client_errors(daemon: Daemon) -> None:
    with daemon.client() as c:
        with pytest.raises(NoSuchDomain) as e:
            c.domain_get_xml("nope")
        assert (e.value.code, e.value.kind, e.value.message) == (
            1001, "no-such-domain", "no domain named 'nope'")
        with pytest.raises(ProtocolError) as p:
            c.call("no.such.method")
        assert p.value.code == -32601


def test_client_cannot_connect(workdir) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConnectionLost, match="cannot connect"):
        Client(str(workdir / "absent.sock"))


def test_events_follow_the_domain(defined: tuple[Daemon, Vm]) -> None:
    daemon, vm = defined
    with daemon.client() as sub:
        assert sub.events_subscribe(["vm1"]) == {}
        vm.stop()
        assert sub.next_event(10) == {"domain": "vm1", "type": "domain-disconnected"}
        vm.start()
        assert sub.next_event(10) == {"domain": "vm1", "type": "domain-connected",
                                      "state": "running"}
        # Calls still work on a subscribed connection.
        assert sub.domain_list()[0]["state"] == "running"


def test_events_are_filtered_by_domain(defined: tuple[Daemon, Vm],
                                       make_vm) -> None:  # type: ignore[no-untyped-def]
    daemon, vm1 = defined
    vm2 = make_vm("vm2")
    with daemon.client() as c:
        c.domain_define("vm2", str(vm2.daemon_qmp))
    wait_for(lambda: domain_state(daemon, "vm2") == "running")
    with daemon.client() as sub:
        sub.events_subscribe(["vm2"])
        vm1.stop()
        wait_for(lambda: domain_state(daemon, "vm1") == "disconnected")
        vm2.stop()
        assert sub.next_event(10) == {"domain": "vm2", "type": "domain-disconnected"}


def test_subscribe_to_unknown_domain(daemon: Daemon) -> None:
    with daemon.client() as c, pytest.raises(NoSuchDomain):
        c.events_subscribe(["nope"])


async def test_async_client_and_events(defined: tuple[Daemon, Vm]) -> None:
    daemon, vm = defined
    async with AsyncClient(str(daemon.socket)) as c:
        await c.events_subscribe()
        xmls = await asyncio.gather(*(c.domain_get_xml("vm1") for _ in range(10)))
        assert len(set(xmls)) == 1
        await asyncio.to_thread(vm.stop)
        seen = []
        async for event in c.events():
            seen.append(event)
            break
        with pytest.raises(NoSuchDomain):
            await c.domain_undefine("nope")
    assert seen == [{"domain": "vm1", "type": "domain-disconnected"}]


async def test_async_client_sees_daemon_go_away(daemon: Daemon) -> None:
    async with AsyncClient(str(daemon.socket)) as c:
        await c.daemon_info()
        await asyncio.to_thread(daemon.stop)
        with pytest.raises(ConnectionLost):
            await c.daemon_info()


def test_bbctl_domain_commands(daemon: Daemon, vm: Vm) -> None:
    r = bbctl(daemon, "domain", "define", "vm1", str(vm.daemon_qmp))
    assert (r.returncode, r.stdout) == (0, "domain vm1 defined\n")
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    r = bbctl(daemon, "domain", "list")
    assert r.returncode == 0
    width = len(str(vm.daemon_qmp))
    assert r.stdout.splitlines() == [
        "NAME  STATE    " + "QMP SOCKET".ljust(width) + "  GUEST AGENT",
        f"vm1   running  {vm.daemon_qmp}  -",
    ]
    r = bbctl(daemon, "--json", "domain", "list")
    assert json.loads(r.stdout) == [
        {"name": "vm1", "qmp_socket": str(vm.daemon_qmp), "state": "running"}]
    # The same definition with a guest agent socket adds it (and only it).
    agent = str(vm.workdir / "vm1.qga")
    r = bbctl(daemon, "domain", "define", "vm1", str(vm.daemon_qmp),
              "--guest-agent-socket", agent)
    assert (r.returncode, r.stdout) == (0, "domain vm1 defined\n")
    r = bbctl(daemon, "--json", "domain", "list")
    assert json.loads(r.stdout) == [
        {"name": "vm1", "qmp_socket": str(vm.daemon_qmp), "state": "running",
         "guest_agent_socket": agent}]
    r = bbctl(daemon, "domain", "define", "vm1", str(vm.daemon_qmp),
              "--guest-agent-socket", "relative.qga")
    assert r.returncode == 1
    assert r.stderr == ("bbctl: error: guest_agent_socket 'relative.qga' must be an absolute "
                        "path [invalid-argument]\n")
    r = bbctl(daemon, "domain", "xml", "vm1")
    assert r.stdout.startswith('<domain name="vm1" state="running">')
    r = bbctl(daemon, "domain", "xml", "nope")
    assert (r.returncode, r.stderr) == (1, "bbctl: error: no domain named 'nope' "
                                           "[no-such-domain]\n")
    r = bbctl(daemon, "domain", "undefine", "vm1")
    assert (r.returncode, r.stdout) == (0, "domain vm1 undefined\n")


def test_bbctl_without_daemon(workdir) -> None:  # type: ignore[no-untyped-def]
    r = subprocess.run([sys.executable, "-m", "blockbackup_client.bbctl", "--socket",
                        str(workdir / "none.sock"), "domain", "list"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "cannot connect to" in r.stderr


async def test_async_clients_wait_while_the_accept_queue_is_full(workdir: Path) -> None:
    """More clients than the server's accept queue holds, while it accepts
    nothing: each connect waits for room (a UNIX socket's EAGAIN), and every
    call is answered once the server gets to them; none fails with ENOTCONN."""
    path = workdir / "busy.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    served: list[int] = []

    def serve() -> None:
        time.sleep(0.5)  # the queue stays full meanwhile
        server.settimeout(5)  # a client that never came: the test fails, not hangs
        for _ in range(CLIENTS):
            try:
                conn, _ = server.accept()
            except TimeoutError:
                return
            with conn, conn.makefile("rwb") as f:
                request = json.loads(f.readline())
                f.write(json.dumps({"jsonrpc": "2.0", "id": request["id"],
                                    "result": {"version": "x"}}).encode() + b"\n")
                f.flush()
            served.append(request["id"])

    async def one() -> object:
        async with AsyncClient(str(path)) as c:
            return await c.daemon_info()

    CLIENTS = 8
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        answers = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(CLIENTS))), 30)
    finally:
        thread.join(30)
        server.close()
    assert answers == [{"version": "x"}] * CLIENTS and len(served) == CLIENTS
