"""Load: 200 clients at once, mixed reads and snapshot/export cycles across 10
domains, one of whose QEMU hangs (SIGSTOP) part of the time. Every request is
answered; the only errors are operation-failed about the hung domain (its
QMP commands time out); the others keep answering; afterwards nothing is
left in any VM or on disk. Bounded: 200 clients x 5 operations."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Callable

from tests.conftest import domain_state, wait_for
from tools.daemon import Daemon
from tools.load import run_load
from tools.vm import MiB, Vm

CLIENTS, OPS, DOMAINS = 200, 5, 10


def test_two_hundred_clients_ten_domains_one_hung(make_vm: Callable[..., Vm],
                                                   make_daemon: Callable[..., Daemon]) -> None:
    vms = [make_vm(f"vm{i}", disks={"sda": 8 * MiB}) for i in range(DOMAINS)]
    daemon = make_daemon(qmp_timeout=2.0, log_level="info")
    with daemon.client() as c:
        for vm in vms:
            c.domain_define(vm.name, str(vm.daemon_qmp))
    for vm in vms:
        wait_for(lambda vm=vm: domain_state(daemon, vm.name) == "running")
    baseline = {vm.name: (vm.node_names(), vm.top_nodes()) for vm in vms}
    hung = vms[-1]
    os.kill(hung.pid, signal.SIGSTOP)
    # Let it go again half-way through, as a QEMU stuck on slow storage would.
    thaw = threading.Timer(4.0, os.kill, (hung.pid, signal.SIGCONT))
    thaw.start()
    try:
        report = asyncio.run(run_load(daemon.socket, [vm.name for vm in vms], CLIENTS, OPS,
                                      hung=hung.name))
    finally:
        thaw.cancel()
        os.kill(hung.pid, signal.SIGCONT)
    print(f"{CLIENTS} clients x {OPS} operations over {DOMAINS} domains: {report.summary()}")
    assert report.requests >= CLIENTS * OPS
    unexpected = {k: n for k, n in report.errors.items()
                  if not (k[0] == hung.name and k[2] in ("operation-failed", "busy"))
                  and k[2] != "busy"}
    assert unexpected == {}
    # The hung QEMU never held up the others: none waited as long as its timeout.
    assert max(report.others) < 2.0
    wait_for(lambda: domain_state(daemon, hung.name) == "running", timeout=20)
    with daemon.client() as c:
        for vm in vms:
            assert c.snapshot_list(vm.name) == [] and c.export_list(vm.name) == []
    for vm in vms:
        assert (vm.node_names(), vm.top_nodes()) == baseline[vm.name], vm.name
    assert os.listdir(daemon.daemon_keys["scratch_dir"]) == []
