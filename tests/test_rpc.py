"""The RPC framing and dispatch: JSON-RPC 2.0 errors, batches, hostile input, concurrency."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

from blockbackup_client import AsyncClient, NoSuchDomain
from tests.conftest import RawConnection
from tools.daemon import Daemon


def call(daemon: Daemon, payload: bytes) -> object:
    conn = RawConnection(daemon.socket)
    try:
        conn.send(payload)
        return conn.read()
    finally:
        conn.close()


def err(reply: object) -> tuple[int, str]:
    assert isinstance(reply, dict) and "error" in reply, reply
    return reply["error"]["code"], reply["error"]["message"]


def test_garbage_is_a_parse_error(daemon: Daemon) -> None:
    assert err(call(daemon, b"this is not json\n"))[0] == -32700
    assert err(call(daemon, b"\xff\xfe\x00garbage\n"))[0] == -32700
    assert err(call(daemon, b'{"jsonrpc": "2.0", "method": \n'))[0] == -32700


@pytest.mark.parametrize("request_obj", [
    {"jsonrpc": "1.0", "method": "daemon.info", "id": 1},
    {"method": "daemon.info", "id": 1},
    {"jsonrpc": "2.0", "method": 5, "id": 1},
    {"jsonrpc": "2.0", "id": 1},
    [],
    42,
])
def test_invalid_request(daemon: Daemon, request_obj: object) -> None:
    assert err(call(daemon, json.dumps(request_obj).encode() + b"\n"))[0] == -32600


def test_unknown_method(daemon: Daemon) -> None:
    reply = call(daemon, b'{"jsonrpc": "2.0", "method": "domain.frobnicate", "id": 7}\n')
    assert reply["id"] == 7  # type: ignore[index]
    assert err(reply)[0] == -32601


@pytest.mark.parametrize("params, field", [
    ({}, "name: Field required"),
    ({"name": "vm1"}, "qmp_socket: Field required"),
    ({"name": 5, "qmp_socket": "/x"}, "name: Input should be a valid string"),
    ({"name": "vm1", "qmp_socket": "/x", "colour": "red"}, "colour: unknown parameter"),
    (["vm1", "/x"], "params must be an object"),
])
def test_invalid_params_name_the_field(daemon: Daemon, params: object, field: str) -> None:
    request = {"jsonrpc": "2.0", "method": "domain.define", "params": params, "id": 1}
    code, message = err(call(daemon, json.dumps(request).encode() + b"\n"))
    assert code == -32602
    assert field in message


def test_strict_types(daemon: Daemon) -> None:
    request = {"jsonrpc": "2.0", "method": "domain.undefine",
               "params": {"name": "vm1", "force": "yes"}, "id": 1}
    code, message = err(call(daemon, json.dumps(request).encode() + b"\n"))
    assert (code, "force: Input should be a valid boolean" in message) == (-32602, True)


def test_application_error_carries_code_and_kind(daemon: Daemon) -> None:
    request = {"jsonrpc": "2.0", "method": "domain.get_xml", "params": {"domain": "nope"}, "id": 3}
    reply = call(daemon, json.dumps(request).encode() + b"\n")
    assert reply == {"jsonrpc": "2.0", "id": 3, "error": {
        "code": 1001, "message": "no domain named 'nope'", "data": {"kind": "no-such-domain"}}}


def test_batch_mixed_with_notification(daemon: Daemon) -> None:
    batch = [
        {"jsonrpc": "2.0", "method": "daemon.info", "id": "a"},
        {"jsonrpc": "2.0", "method": "domain.list"},  # notification: no answer
        {"jsonrpc": "2.0", "method": "domain.get_xml", "params": {"domain": "x"}, "id": "b"},
        {"jsonrpc": "2.0", "method": "nope", "id": "c"},
    ]
    reply = call(daemon, json.dumps(batch).encode() + b"\n")
    assert isinstance(reply, list)
    by_id = {r["id"]: r for r in reply}
    assert set(by_id) == {"a", "b", "c"}
    assert by_id["a"]["result"]["domains"] == 0
    assert by_id["b"]["error"]["code"] == 1001
    assert by_id["c"]["error"]["code"] == -32601


def test_notification_gets_no_answer(daemon: Daemon) -> None:
    conn = RawConnection(daemon.socket)
    try:
        conn.request({"jsonrpc": "2.0", "method": "daemon.info"})
        conn.request({"jsonrpc": "2.0", "method": "daemon.info", "id": 2})
        assert conn.read()["id"] == 2  # the first line answered nothing
    finally:
        conn.close()


def test_oversized_line_is_refused_and_connection_stays_usable(daemon: Daemon) -> None:
    conn = RawConnection(daemon.socket)
    other = RawConnection(daemon.socket)
    try:
        big = b'{"jsonrpc": "2.0", "method": "daemon.info", "id": 1, "pad": "' + \
            b"x" * (3 * 1024 * 1024) + b'"}\n'
        conn.send(big)
        code, message = err(conn.read())
        assert code == -32600 and "larger than 1048576 bytes" in message
        # Same connection still serves the next line; other clients never noticed.
        conn.request({"jsonrpc": "2.0", "method": "daemon.info", "id": 2})
        assert conn.read()["id"] == 2
        other.request({"jsonrpc": "2.0", "method": "daemon.info", "id": 3})
        assert other.read()["id"] == 3
    finally:
        conn.close()
        other.close()


def test_line_just_under_the_limit_is_served(daemon: Daemon) -> None:
    head = b'{"jsonrpc": "2.0", "method": "daemon.info", "id": 1, "params": {"x": "'
    line = head + b"y" * (1024 * 1024 - len(head) - 3) + b'"}}'
    assert len(line) == 1024 * 1024
    reply = call(daemon, line + b"\n")
    # Parsed and dispatched (then refused for its made-up param), not cut off.
    assert isinstance(reply, dict) and reply["id"] == 1
    assert err(reply) == (-32602, "invalid params: x: unknown parameter")


def test_endless_line_without_newline_does_not_grow_memory(daemon: Daemon) -> None:
    conn = RawConnection(daemon.socket)
    try:
        chunk = b"z" * (1024 * 1024)
        for _ in range(64):  # 64 MiB, never a newline
            conn.send(chunk)
        conn.send(b"\n")
        code, _ = err(conn.read())
        assert code == -32600
        conn.request({"jsonrpc": "2.0", "method": "daemon.info", "id": 9})
        assert conn.read()["id"] == 9
    finally:
        conn.close()
    rss_kib = int(next(line.split()[1] for line in
                       open(f"/proc/{daemon.pid}/status") if line.startswith("VmRSS")))
    assert rss_kib < 200 * 1024, f"daemon RSS {rss_kib} KiB after a 64 MiB line"


def test_client_disconnecting_mid_request_does_not_hurt(daemon: Daemon) -> None:
    half_a_line = b'{"jsonrpc": "2.0", "method": "daem'
    gone_before_answer = b'{"jsonrpc": "2.0", "method": "daemon.info", "id": 1}\n'
    for payload in (half_a_line, gone_before_answer):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(daemon.socket))
        s.sendall(payload)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()  # RST
    with daemon.client() as c:
        assert c.daemon_info()["domains"] == 0
    assert daemon.proc is not None and daemon.proc.poll() is None


def test_half_closed_client_still_gets_its_answers(daemon: Daemon) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(daemon.socket))
    try:
        s.sendall(b'{"jsonrpc": "2.0", "method": "daemon.info", "id": 1}\n'
                  b'{"jsonrpc": "2.0", "method": "domain.list", "id": 2}\n')
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    finally:
        s.close()
    replies = [json.loads(line) for line in data.splitlines()]
    assert sorted(r["id"] for r in replies) == [1, 2]


def test_answers_out_of_order_are_matched_by_id(daemon: Daemon) -> None:
    conn = RawConnection(daemon.socket)
    try:
        for i in range(20):
            conn.request({"jsonrpc": "2.0", "method": "daemon.info", "id": i})
        assert sorted(conn.read()["id"] for _ in range(20)) == list(range(20))
    finally:
        conn.close()


async def test_50_concurrent_clients_20_requests_each(daemon: Daemon) -> None:
    async def one_client(n: int) -> list[tuple[int, int]]:
        async with AsyncClient(str(daemon.socket)) as c:
            results = []
            for i in range(20):
                if i % 4 == 3:
                    try:
                        await c.domain_get_xml(f"missing-{n}-{i}")
                    except NoSuchDomain as e:
                        results.append((n, e.code))
                elif i % 2:
                    results.append((n, len(await c.domain_list())))
                else:
                    results.append((n, (await c.daemon_info())["domains"]))
            return results

    start = time.monotonic()
    all_results = await asyncio.gather(*(one_client(n) for n in range(50)))
    elapsed = time.monotonic() - start
    assert len(all_results) == 50
    for n, results in enumerate(all_results):
        expected = [(n, 1001) if i % 4 == 3 else (n, 0) for i in range(20)]
        assert results == expected
    print(f"50 clients x 20 requests: {1000 / elapsed:.0f} requests/s")
