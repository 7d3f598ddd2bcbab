"""Benchmark: incremental backups proportional to change, and huge sparse disks.

1. A disk of SIZE (default 4 GiB) with 80% of it data; a full backup; then
   1% of the disk changed by the guest in scattered 64 KiB writes; an
   incremental. REPEAT rounds, medians: inc time / full time (target <= 0.1)
   and bytes read / bytes changed (target <= 1.05).
2. A 1 TiB virtual disk with 1 GiB of data in 16 runs spread over it: full
   backup time, the extent query alone (target < 5 s), and an incremental
   with nothing changed (target < 3 s).

Run: ``.venv/bin/python -m bench.incremental [SIZE_GIB] [REPEAT]``.
"""

from __future__ import annotations

import random
import sys
import time

from bench.common import GiB, Row, bbctl_backup, cli, domain, gib, median, qemu_io
from blockbackup_client import pull
from tools.vm import MiB

K64 = 64 * 1024


def proportional(size: int, repeat: int) -> list[Row]:
    def prepare(vm: object) -> None:
        from tools.vm import Vm
        assert isinstance(vm, Vm)
        qemu_io(vm.image("sda"), [f"write -P {0x10 + i % 200:#x} {off} {8 * MiB}"
                                  for i, off in enumerate(range(0, size, 8 * MiB)) if i % 5])

    full_s, inc_s, ratio_read, none_s = [], [], [], []
    rng = random.Random(7)
    with domain({"sda": size}, prepare) as (vm, daemon):
        for r in range(repeat):
            dest = vm.workdir / f"b{r}"
            seconds, _ = bbctl_backup(daemon, vm, dest, "full")
            full_s.append(seconds)
            # Nothing changed: what is left is the fixed cost of a backup.
            seconds, record = bbctl_backup(daemon, vm, dest, "inc")
            assert record["disks"]["sda"]["bytes_read"] == 0, record
            none_s.append(seconds)
            clusters = rng.sample(range(size // K64), size // 100 // K64)
            for c in clusters:
                vm.write("sda", c * K64, K64, 0x40 + r)
            seconds, record = bbctl_backup(daemon, vm, dest, "inc")
            inc_s.append(seconds)
            ratio_read.append(record["disks"]["sda"]["bytes_read"] / (len(clusters) * K64))
            print(f"  round {r}: full {full_s[-1]:.2f} s, no-change inc {none_s[-1]:.3f} s, "
                  f"inc {inc_s[-1]:.2f} s, read/changed {ratio_read[-1]:.3f}", flush=True)
    # What an incremental costs beyond a backup's fixed cost (the no-change
    # incremental of the same round), against the same for the full.
    beyond = [(i - n) / (f - n) for i, n, f in zip(inc_s, none_s, full_s, strict=True)]
    return [
        Row(f"incremental, nothing changed, {size // GiB} GiB disk: time end to end",
            median(none_s), median(full_s), peer_name="full backup"),
        Row("the same 1% incremental beyond the fixed cost (the no-change incremental), "
            "against the full beyond it", median(inc_s) - median(none_s),
            median(full_s) - median(none_s), peer_name="full backup", target="<= 0.05",
            ratios=beyond),
        Row(f"incremental, 1% of {size // GiB} GiB changed (64 KiB scattered): time",
            median(inc_s), median(full_s), peer_name="full backup", target="<= 0.1"),
        Row("incremental: bytes read / bytes changed", median(ratio_read), unit="x",
            target="<= 1.05"),
    ]


def sparse(repeat: int) -> list[Row]:
    size = 1024 * GiB

    def prepare(vm: object) -> None:
        from tools.vm import Vm
        assert isinstance(vm, Vm)
        qemu_io(vm.image("sda"), [f"write -P {0x20 + i:#x} {i * 64 * GiB} {64 * MiB}"
                                  for i in range(16)])

    full_s, query_s, inc_s = [], [], []
    with domain({"sda": size}, prepare) as (vm, daemon):
        for r in range(repeat):
            dest = vm.workdir / f"s{r}"
            seconds, record = bbctl_backup(daemon, vm, dest, "full")
            assert record["disks"]["sda"]["bytes_read"] == GiB
            full_s.append(seconds)
            with daemon.client() as c:
                c.snapshot_create(vm.name, "<domainblocksnapshot><name>q</name>"
                                           "</domainblocksnapshot>")
                started = c.export_start(vm.name, '<domainblockexport type="nbd"><disk '
                                         'name="sda" snapshot="q"/></domainblockexport>')
                start = time.perf_counter()
                pull.plan(started["server"]["socket"], started["exports"][0]["name"])
                query_s.append(time.perf_counter() - start)
                c.snapshot_delete(vm.name, "q")
            seconds, record = bbctl_backup(daemon, vm, dest, "inc")
            assert record["disks"]["sda"]["bytes_read"] == 0
            inc_s.append(seconds)
            print(f"  round {r}: full {full_s[-1]:.2f} s, extent query {query_s[-1]:.2f} s, "
                  f"inc (nothing changed) {inc_s[-1]:.2f} s", flush=True)
    return [
        Row("1 TiB disk, 1 GiB data: full backup", median(full_s)),
        Row("1 TiB disk: extent query (base:allocation)", median(query_s), target="< 5 s"),
        Row("1 TiB disk: incremental, nothing changed", median(inc_s), target="< 3 s"),
    ]


def run(size: int = 4 * GiB, repeat: int = 3) -> list[Row]:
    return proportional(size, repeat) + sparse(repeat)


if __name__ == "__main__":
    sys.exit(cli(run, gib, int))
