"""Benchmark: the daemon's memory with many domains and checkpoints.

DOMAINS (default 50) running VMs with one disk each, every disk holding
CHECKPOINTS (default 100) checkpoint bitmaps (made in one QMP transaction per
VM on the test's own monitor, then recorded with ``checkpoint.redefine``, the
way a restored store is rebuilt). Reported: the daemon's RSS with all of them
connected, against the same daemon with no domain (the peer).

The backup tool's peak RSS during the 1 and 4 GiB pulls is measured by bench/full_pull.

Run: ``.venv/bin/python -m bench.memory [DOMAINS] [CHECKPOINTS]``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Row, cli
from tools.daemon import Daemon
from tools.vm import MiB, Vm


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def run(domains: int = 50, checkpoints: int = 100) -> list[Row]:
    workdir = Path(tempfile.mkdtemp(prefix="bb-mem-", dir="/tmp"))
    vms = [Vm(workdir, f"m{i}", disks={"sda": 8 * MiB}) for i in range(domains)]
    daemon = Daemon(workdir, log_level="warning")
    try:
        daemon.start()
        time.sleep(1)
        empty = rss_mib(daemon.pid)
        for vm in vms:
            vm.start()
            base = 1_700_000_000
            vm.qmp("transaction", actions=[
                {"type": "block-dirty-bitmap-add", "data": {
                    "node": "sda-fmt", "name": f"cp{k}", "persistent": True,
                    "disabled": k < checkpoints - 1}} for k in range(checkpoints)])
        with daemon.client(timeout=120) as c:
            for vm in vms:
                c.domain_define(vm.name, str(vm.daemon_qmp))
            deadline = time.monotonic() + 120
            while any(d["state"] != "running" for d in c.domain_list()):
                if time.monotonic() > deadline:
                    raise TimeoutError("domains did not connect")
                time.sleep(0.2)
            for vm in vms:
                for k in range(checkpoints):
                    c.call("checkpoint.redefine", domain=vm.name, xml=(
                        f"<domaincheckpoint><name>cp{k}</name><creationTime>{base + k}"
                        f'</creationTime><disks><disk name="sda" checkpoint="bitmap" '
                        f'bitmap="cp{k}"/></disks></domaincheckpoint>'))
            info = c.daemon_info()
        assert sum(d["checkpoints"] for d in info["per_domain"]) == domains * checkpoints
        time.sleep(1)
        loaded = rss_mib(daemon.pid)
        print(f"  daemon RSS: {empty:.1f} MiB alone, {loaded:.1f} MiB with {domains} domains "
              f"x {checkpoints} checkpoints", flush=True)
        return [Row(f"daemon RSS, {domains} domains x {checkpoints} checkpoints", loaded,
                    empty, unit="MiB", peer_name="no domain")]
    finally:
        if daemon.proc is not None:
            daemon.stop()
        for vm in vms:
            vm.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(cli(run, int, int))
