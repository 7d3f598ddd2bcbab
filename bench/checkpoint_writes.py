"""Benchmark: guest write rate against the number of checkpoints.

The guest is tools/guest/writer.S: a vCPU writing one sector at a time to two
IDE disks in a loop, so the per-write cost of the block layer, dirty bitmaps
included, is what limits its rate. Checkpoints are made through the daemon
on both disks (0, 1, 10, then 100): with the chain of segments exactly one
bitmap per disk records whatever their number. The peer, in the same run and
on the same VM: the same 100 checkpoints plus 99 more bitmaps per disk that
all record, as a "one always-recording bitmap per checkpoint" design would
have; its phases alternate with the chain's so drift hits both alike.

Each figure: median over REPEAT windows of WINDOW seconds of the guest's
write operations per second (query-blockstats).

Run: ``make bench`` (or ``.venv/bin/python -m bench.checkpoint_writes [REPEAT]``).
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tools.daemon import Daemon
from tools.vm import MiB, Vm

WINDOW = 1.5
DISKS = ("hda", "hdb")


def write_ops(vm: Vm) -> int:
    return sum(int(d["stats"]["wr_operations"]) for d in vm.qmp("query-blockstats")
               if d.get("qdev") in DISKS)


def rate(vm: Vm) -> float:
    before = write_ops(vm)
    time.sleep(WINDOW)
    return (write_ops(vm) - before) / WINDOW


def recording(vm: Vm) -> int:
    return sum(1 for n in vm.qmp("query-named-block-nodes", flat=True)
               if n["node-name"] == "hda-fmt"
               for b in n.get("dirty-bitmaps", []) if b.get("recording"))


def main() -> int:
    repeat = int(sys.argv[1]) if len(sys.argv) > 1 else 7
    workdir = Path(tempfile.mkdtemp(prefix="bb-bench-", dir="/tmp"))
    vm = Vm(workdir, "vm1", disks={d: 16 * MiB for d in DISKS}, writer=True)
    daemon = Daemon(workdir, log_level="warning")
    rows = []
    try:
        vm.start()
        daemon.start()
        with daemon.client() as c:
            c.domain_define("vm1", str(vm.daemon_qmp))
            while c.domain_list()[0]["state"] != "running":
                time.sleep(0.01)
            rate(vm)  # warm up
            made = 0
            for target in (0, 1, 10, 100):
                while made < target:
                    c.snapshot_create("vm1", f"<domainblocksnapshot><name>cp{made}</name>"
                                      '<disk name="hda"/><disk name="hdb"/>'
                                      "</domainblocksnapshot>", checkpoint=True)
                    c.snapshot_delete("vm1", f"cp{made}")
                    made += 1
                if target < 100:
                    rows.append((f"{target} checkpoints", recording(vm),
                                 statistics.median(rate(vm) for _ in range(repeat))))
            chain, peer = [], []
            peer_recording = 0
            for _ in range(repeat):
                chain.append(rate(vm))
                for disk in DISKS:
                    for i in range(99):
                        vm.qmp("block-dirty-bitmap-add", node=f"{disk}-fmt", name=f"all-{i}")
                peer_recording = recording(vm)
                peer.append(rate(vm))
                for disk in DISKS:
                    for i in range(99):
                        vm.qmp("block-dirty-bitmap-remove", node=f"{disk}-fmt", name=f"all-{i}")
            rows.append(("100 checkpoints", recording(vm), statistics.median(chain)))
            rows.append(("peer: 100 recording bitmaps", peer_recording, statistics.median(peer)))
    finally:
        if daemon.proc is not None:
            daemon.stop()
        vm.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    base = rows[0][2]
    print(f"guest sector writes per second (two disks), medians of {repeat} x {WINDOW} s")
    print(f"{'configuration':<30} {'recording/disk':>14} {'writes/s':>9} {'vs 0':>6}")
    for label, rec, r in rows:
        print(f"{label:<30} {rec:>14} {r:>9.0f} {r / base:>6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
