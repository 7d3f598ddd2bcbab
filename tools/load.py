"""A load generator for the daemon: many clients at once, mixed reads and
writes across domains, latency per request. Used by tests/faults/test_load.py
(bounded) and runnable by hand for longer:
``.venv/bin/python -m tools.load [CLIENTS] [OPS_PER_CLIENT] [DOMAINS]``.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from blockbackup_client import AsyncClient
from blockbackup_client.errors import ApplicationError, BlockbackupError
from tools.daemon import Daemon
from tools.vm import MiB, Vm

READS = ["daemon.info", "domain.list", "snapshot.list", "checkpoint.list", "export.list",
         "export.server", "domain.get_xml"]


@dataclass
class Report:
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    #: (domain, method, error kind) of every error answer.
    errors: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    #: latencies of reads about domains other than the hung one.
    others: list[float] = field(default_factory=list)

    @property
    def requests(self) -> int:
        return len(self.latencies)

    def percentile(self, q: float, values: list[float] | None = None) -> float:
        data = sorted(values if values is not None else self.latencies)
        return data[min(len(data) - 1, int(q * len(data)))]

    def summary(self) -> str:
        return (f"{self.requests} requests in {self.seconds:.2f} s = "
                f"{self.requests / self.seconds:.0f} req/s; latency p50 "
                f"{self.percentile(0.5) * 1e3:.1f} ms, p99 {self.percentile(0.99) * 1e3:.1f} ms, "
                f"max {max(self.latencies) * 1e3:.0f} ms; other domains while one hung: p99 "
                f"{self.percentile(0.99, self.others) * 1e3:.1f} ms, max "
                f"{max(self.others) * 1e3:.0f} ms; errors {dict(self.errors) or 0}")


async def _client(socket: str, index: int, domains: list[str], ops: int, hung: str | None,
                  report: Report, rng: random.Random) -> None:
    domain = domains[index % len(domains)]
    async with AsyncClient(socket) as c:
        for i in range(ops):
            plan: list[tuple[str, dict[str, object]]]
            if rng.random() < 0.2:  # a write: a whole snapshot and export cycle
                name = f"c{index}-{i}"
                export = (f'<domainblockexport type="nbd"><disk name="sda" snapshot="{name}"/>'
                          "</domainblockexport>")
                plan = [("snapshot.create", {"domain": domain, "xml":
                         f"<domainblocksnapshot><name>{name}</name></domainblocksnapshot>"}),
                        ("export.start", {"domain": domain, "xml": export}),
                        ("snapshot.lookup", {"domain": domain, "name": name}),
                        ("snapshot.delete", {"domain": domain, "name": name})]
            else:
                method = rng.choice(READS)
                target = rng.choice(domains)
                plan = [(method, {} if method in ("daemon.info", "domain.list")
                         else {"domain": target})]
            for method, params in plan:
                about = str(params.get("domain", ""))
                start = time.perf_counter()
                try:
                    await c.call(method, **params)
                    ok = True
                except ApplicationError as err:
                    report.errors[(about, method, err.kind)] += 1
                    ok = False
                except BlockbackupError as err:
                    report.errors[(about, method, type(err).__name__)] += 1
                    ok = False
                took = time.perf_counter() - start
                report.latencies.append(took)
                if hung is not None and about != hung and method in READS:
                    report.others.append(took)
                if not ok and method == "snapshot.create":
                    break  # nothing to export or delete


async def run_load(socket: Path, domains: list[str], clients: int, ops: int,
                   hung: str | None = None, seed: int = 1) -> Report:
    """``clients`` connections at once, ``ops`` operations each (20% writes)."""
    report = Report()
    rng = random.Random(seed)
    start = time.perf_counter()
    await asyncio.gather(*(_client(str(socket), i, domains, ops, hung, report,
                                   random.Random(rng.random())) for i in range(clients)))
    report.seconds = time.perf_counter() - start
    return report


def main() -> int:
    clients = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    ops = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    workdir = Path(tempfile.mkdtemp(prefix="bb-load-", dir="/tmp"))
    vms = [Vm(workdir, f"vm{i}", disks={"sda": 8 * MiB}) for i in range(count)]
    daemon = Daemon(workdir, log_level="warning")
    try:
        for vm in vms:
            vm.start()
        daemon.start()
        with daemon.client() as c:
            for vm in vms:
                c.domain_define(vm.name, str(vm.daemon_qmp))
        time.sleep(1)
        report = asyncio.run(run_load(daemon.socket, [vm.name for vm in vms], clients, ops))
        print(f"{clients} clients x {ops} operations over {count} domains: {report.summary()}")
        return 0
    finally:
        if daemon.proc is not None:
            daemon.stop()
        for vm in vms:
            vm.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
