"""Benchmark: what a live snapshot costs the guest's writes.

The real Linux guest of tools/linux_guest on one virtio-blk disk that it uses
raw (no filesystem), every block of which holds data before the guest boots
(written offline with qemu-io), so that every first write after a snapshot
has old data to copy. Three conditions on the SAME VM in the same run:

- none: no snapshot;
- ours: a snapshot of blockbackupd (the real daemon: ``snapshot.create``
  before the measure, ``snapshot.delete`` after), whose copy-before-write
  filter copies the old data of every block the guest overwrites into a
  sparse raw scratch file first;
- classic: the scratch backup job libvirt runs for a pull backup, made here
  on the test's own QMP monitor: a qcow2 scratch backed by the disk,
  ``blockdev-backup sync=none`` onto it; ``block-job-cancel`` and
  ``blockdev-del`` after.

A fresh snapshot (or job) per measure, so each one writes blocks not copied
yet. Per measure (columns of the table):

- MiB/s: in the guest, on its monotonic clock, ``dd`` of MIB MiB (default
  256) of random data (made once at boot, in the guest's RAM) in 1 MiB
  O_DIRECT writes, then fsync, over the start of the disk;
- 1M device ms: the mean time QEMU's device took for each of those 1 MiB
  writes (``query-blockstats``): the host's part, which a guest faster than
  TCG's would see more of;
- 4K seq ms: in the guest, 1024 sequential 4 KiB O_DIRECT writes, each
  waiting for the device, in a region of their own: one in 16 is the first
  in its 64 KiB copy cluster and pays for the copy of it;
- 4K first ms: 128 single 4 KiB O_DIRECT writes 64 KiB apart, so that each
  is the first write to its cluster; one ``dd`` per write (a few ms of
  process start-up under TCG), so the figure is the median of their device
  latencies, from a latency histogram QEMU keeps on the device
  (``block-latency-histogram-set``, 10 us bins).

The conditions alternate, in an order that rotates every round, ROUNDS times
(default 5) after one warm-up measure; the figures are medians with their
spread (min-max), the ratios ours/none and ours/classic medians of each
round's own ratios. Both scratch images lie on the same filesystem (the
daemon's in ``<workdir>/state/scratch``, the classic one in
``<workdir>/state``, under /var/tmp); the output says which, with the host's
load average (the machine may be shared).

Run: ``make bench`` (or ``.venv/bin/python -m bench.guest_writes [--rounds N] [--mib M]``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import define_running, qemu_io
from tools.daemon import Daemon
from tools.linux_guest.accel import accelerator
from tools.linux_guest.build import build
from tools.linux_guest.vm import LinuxVm
from tools.vm import MiB

DISK = "vda"
CONDITIONS = ("none", "ours", "classic")
KiB = 1024
CLUSTER = 64 * KiB          # the copy granularity (QEMU's block-copy default, and
                            # the classic scratch qcow2's cluster size)
SEQ_WRITES = 1024           # 4 KiB writes of "4K seq" (4 MiB)
FIRST_WRITES = 128          # 4 KiB writes of "4K first", one per cluster
PHASE_TIMEOUT = 300.0

# Sourced by the guest's /init (the script workload): say, err, param, dev_of.
# It waits on a FIFO for the host's commands, sent through the guest agent.
GUEST_SCRIPT = r"""
dev=/dev/$(dev_of vda)
mib=$(param mib 128) seqn=$(param seq 1024) firstn=$(param first 128)
data=/run/bb/data
if ! dd if=/dev/urandom of=$data bs=1M count="$mib" 2>/run/bb/dd.err; then
    err "guest_writes: random data: $(tr '\n' ' ' < /run/bb/dd.err)"
    return 1
fi
mkfifo /run/bb/cmd
# Monotonic nanoseconds in $ns, with builtins only: a fork takes ms under TCG.
stamp() { { read -r _; read -r _; read -r _ _ ns _; } < /proc/timer_list; }
fail() { err "guest_writes $1: $(tr '\n' ' ' < /run/bb/dd.err)"; }
say "BB-GW ready dev=$dev"
while :; do
    read -r cmd < /run/bb/cmd || continue
    case "$cmd" in
    thr)
        stamp; t0=$ns
        dd if=$data of="$dev" bs=1M count="$mib" oflag=direct conv=notrunc,fsync \
            2>/run/bb/dd.err || { fail thr; continue; }
        stamp; say "BB-RESULT thr ns=$((ns - t0)) mib=$mib" ;;
    seq)
        stamp; t0=$ns
        dd if=$data of="$dev" bs=4k count="$seqn" seek=$((mib * 256)) oflag=direct \
            conv=notrunc 2>/run/bb/dd.err || { fail seq; continue; }
        stamp; say "BB-RESULT seq ns=$((ns - t0)) writes=$seqn" ;;
    first)
        base=$((mib * 256 + seqn)) i=0 ok=1
        stamp; t0=$ns
        while [ $i -lt "$firstn" ]; do
            dd if=$data of="$dev" bs=4k count=1 skip=$i seek=$((base + i * 16)) oflag=direct \
                conv=notrunc 2>/run/bb/dd.err || { fail first; ok=0; break; }
            i=$((i + 1))
        done
        stamp; [ $ok = 1 ] && say "BB-RESULT first ns=$((ns - t0)) writes=$i" ;;
    esac
done
"""


class Guest:
    """The guest's side of the measures: one command at a time, one result each."""

    def __init__(self, vm: LinuxVm) -> None:
        self.vm = vm

    def run(self, command: str) -> dict[str, str]:
        start = len(self.vm.console())
        self.vm.guest_exec(f"echo {command} > /run/bb/cmd", timeout=PHASE_TIMEOUT)
        # Whole lines only: QEMU writes the console as the guest prints it.
        m = self.vm.wait_console(rf"^(BB-RESULT {command}\b.*|BB-ERROR.*|.*Kernel panic.*)\n",
                                 PHASE_TIMEOUT, start=start)
        line = m.group(1)
        if not line.startswith("BB-RESULT"):
            raise RuntimeError(f"guest failed: {line}")
        return dict(p.split("=", 1) for p in line.split()[2:] if "=" in p)


#: Bounds (ns) of the device's write latency histogram: 10 us steps to 3 ms,
#: 100 us steps to 20 ms, then coarse.
HISTOGRAM = ([i * 10_000 for i in range(1, 301)] + [i * 100_000 for i in range(31, 201)]
             + [50_000_000, 100_000_000, 1_000_000_000])


def device_qdev(vm: LinuxVm) -> str:
    """The disk's device as query-blockstats names it (virtio-blk: its backend)."""
    for d in vm.qmp("query-blockstats"):
        qdev = str(d.get("qdev", ""))
        if qdev == DISK or qdev.startswith(f"/machine/peripheral/{DISK}/"):
            return qdev
    raise RuntimeError(f"no blockstats for device {DISK}")


def device_writes(vm: LinuxVm, qdev: str) -> tuple[int, int, list[int]]:
    """(write operations, their total ns, their latency histogram's bins) as
    QEMU accounts them on the disk's device."""
    for d in vm.qmp("query-blockstats"):
        if d.get("qdev") == qdev:
            stats = d["stats"]
            bins = [int(b) for b in stats["wr_latency_histogram"]["bins"]]
            return int(stats["wr_operations"]), int(stats["wr_total_time_ns"]), bins
    raise RuntimeError(f"no blockstats for device {qdev}")


def histogram_median(bins: list[int]) -> float:
    """The median (ns) of the latencies counted in bins of HISTOGRAM, as the
    middle of its bin."""
    half, seen = (sum(bins) + 1) / 2, 0
    for i, n in enumerate(bins):
        seen += n
        if seen >= half:
            low = HISTOGRAM[i - 1] if i else 0
            return (low + HISTOGRAM[i]) / 2 if i < len(HISTOGRAM) else low
    raise ValueError("empty histogram")


def measure(guest: Guest, vm: LinuxVm) -> dict[str, float]:
    qdev = device_qdev(vm)
    ops0, ns0, _ = device_writes(vm, qdev)
    thr = guest.run("thr")
    ops1, ns1, _ = device_writes(vm, qdev)
    seq = guest.run("seq")
    ops2, ns2, bins2 = device_writes(vm, qdev)
    first = guest.run("first")
    ops3, ns3, bins3 = device_writes(vm, qdev)
    if ops3 - ops2 != FIRST_WRITES:
        raise RuntimeError(f"device saw {ops3 - ops2} writes, the guest made {FIRST_WRITES}")
    secs = int(thr["ns"]) / 1e9
    return {"mibs": int(thr["mib"]) / secs,
            "seq_ms": int(seq["ns"]) / 1e6 / int(seq["writes"]),
            "first_ms": histogram_median([b - a for a, b in zip(bins2, bins3, strict=True)]) / 1e6,
            # diagnostics, printed under the table
            "first_mean_ms": (ns3 - ns2) / 1e6 / (ops3 - ops2),
            "first_guest_ms": int(first["ns"]) / 1e6 / int(first["writes"]),
            "seq_device_ms": (ns2 - ns1) / 1e6 / max(1, ops2 - ops1),
            "thr_requests": ops1 - ops0,
            "thr_device_ms": (ns1 - ns0) / 1e6 / max(1, ops1 - ops0),
            "thr_device_share": (ns1 - ns0) / 1e9 / secs}


class Ours:
    """A snapshot of the real daemon."""

    def __init__(self, daemon: Daemon, scratch_dir: Path) -> None:
        self.daemon = daemon
        self.scratch_dir = scratch_dir
        self.name: str | None = None

    def start(self) -> None:
        with self.daemon.client() as c:
            self.name = str(c.snapshot_create("vm1")["name"])

    def stop(self) -> int:
        """Delete the snapshot; the bytes its scratch image held."""
        assert self.name is not None
        path = self.scratch_dir / f"vm1-{DISK}-{self.name}.raw"
        used = path.stat().st_blocks * 512
        with self.daemon.client() as c:
            c.snapshot_delete("vm1", self.name)
        self.name = None
        if path.exists():
            raise RuntimeError(f"snapshot deleted, its scratch {path} still there")
        return used

    def cleanup(self) -> None:
        if self.name is not None and self.daemon.proc is not None:
            try:
                self.stop()
            except Exception as err:  # noqa: BLE001 - best effort on the way out
                print(f"cleanup: snapshot {self.name}: {err}", file=sys.stderr)


class Classic:
    """libvirt's pull-backup scratch: a qcow2 backed by the disk, a sync=none
    backup job onto it, all on the test's monitor."""

    FILE, NODE, JOB = "classic-file", "classic-scratch", "classic-job"

    def __init__(self, vm: LinuxVm, path: Path, size: int) -> None:
        self.vm = vm
        self.path = path
        self.size = size
        self.made: list[str] = []

    def start(self) -> None:
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u",
                        "-b", str(self.vm.image(DISK)), "-F", "qcow2",
                        str(self.path), str(self.size)], check=True, capture_output=True)
        self.vm.qmp("blockdev-add", driver="file", filename=str(self.path),
                    **{"node-name": self.FILE})
        self.made.append(self.FILE)
        self.vm.qmp("blockdev-add", driver="qcow2", file=self.FILE, backing=f"{DISK}-fmt",
                    **{"node-name": self.NODE})
        self.made.append(self.NODE)
        self.vm.qmp("blockdev-backup", device=f"{DISK}-fmt", target=self.NODE, sync="none",
                    **{"job-id": self.JOB})
        self.made.append(self.JOB)

    def stop(self) -> int:
        used = self.path.stat().st_blocks * 512
        self.cleanup()
        return used

    def cleanup(self) -> None:
        while self.made:
            what = self.made.pop()
            if what == self.JOB:
                self.vm.qmp("block-job-cancel", device=self.JOB)
                deadline = time.monotonic() + 30
                while any(j["device"] == self.JOB for j in self.vm.qmp("query-block-jobs")):
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"{self.JOB} did not end after block-job-cancel")
                    time.sleep(0.01)
            else:
                self.vm.qmp("blockdev-del", **{"node-name": what})
        self.path.unlink(missing_ok=True)


def spread(values: list[float], fmt: str) -> str:
    return (f"{statistics.median(values):{fmt}} "
            f"({min(values):{fmt}}-{max(values):{fmt}})")


def paired(res: dict[str, list[dict[str, float]]], peer: str, key: str) -> list[float]:
    """ours / peer of one figure, round by round."""
    return [o[key] / p[key] for o, p in zip(res["ours"], res[peer], strict=True)]


def filesystem(path: Path) -> str:
    out = subprocess.run(["df", "--output=source,fstype", str(path)], check=True,
                         capture_output=True, text=True).stdout.split()
    return f"{out[-2]} {out[-1]}"


def run(rounds: int, mib: int) -> dict[str, Any]:
    began = time.monotonic()
    load_before = os.getloadavg()[0]
    size = mib * MiB + SEQ_WRITES * 4 * KiB + FIRST_WRITES * CLUSTER
    size = -(-size // (16 * MiB)) * 16 * MiB
    image = build()
    accel = accelerator(image)
    workdir = Path(tempfile.mkdtemp(prefix="bb-bench-", dir="/var/tmp"))
    vm = LinuxVm(workdir, "vm1", disks={DISK: size}, script=GUEST_SCRIPT, memory=256 + 2 * mib,
                 params={"raw": DISK, "mib": mib, "seq": SEQ_WRITES, "first": FIRST_WRITES},
                 accel=accel, image=image)
    daemon = Daemon(workdir, log_level="warning")
    scratch_dir = Path(daemon.daemon_keys["scratch_dir"])
    ours = Ours(daemon, scratch_dir)
    classic = Classic(vm, workdir / "state" / "classic-scratch.qcow2", size)
    results: dict[str, list[dict[str, float]]] = {c: [] for c in CONDITIONS}
    setup: dict[str, list[float]] = {"ours": [], "classic": []}
    try:
        vm.create_images()
        qemu_io(vm.image(DISK), [f"write -P 0xaa 0 {size}"])  # every block holds data
        vm.start()
        boot = vm.wait_ready()
        ready = vm.wait_console(r"^BB-GW ready|^BB-ERROR.*", 120)
        if not ready.group(0).startswith("BB-GW"):
            raise RuntimeError(f"guest failed: {ready.group(0)}")
        data_ready = time.monotonic() - (vm.started_at or 0.0)
        daemon.start()
        define_running(daemon, "vm1", vm.daemon_qmp)
        scratch_dir.mkdir(parents=True, exist_ok=True)
        if scratch_dir.stat().st_dev != classic.path.parent.stat().st_dev:
            raise RuntimeError("the two scratch directories are on different filesystems")
        vm.qmp("block-latency-histogram-set", id=device_qdev(vm), **{"boundaries-write": HISTOGRAM})
        baseline = vm.node_names()
        guest = Guest(vm)
        measure(guest, vm)  # warm-up, not counted
        print(accel.describe())
        print(f"guest boot {boot:.1f} s (BB-READY; random data in RAM at {data_ready:.1f} s); "
              f"disk {DISK} {size // MiB} MiB virtio-blk, raw in the guest, all written before")
        print(f"scratch images: ours in {scratch_dir}, classic in {classic.path.parent} "
              f"(same filesystem: {filesystem(scratch_dir)}); host load {load_before:.2f}",
              flush=True)
        for r in range(rounds):
            order = CONDITIONS[r % 3:] + CONDITIONS[:r % 3]
            for cond in order:
                peer = ours if cond == "ours" else classic if cond == "classic" else None
                if peer is not None:
                    start = time.perf_counter()
                    peer.start()
                    setup[cond].append(time.perf_counter() - start)
                figures = measure(guest, vm)
                figures["scratch_mib"] = peer.stop() / MiB if peer is not None else 0.0
                if vm.node_names() != baseline:
                    raise RuntimeError(f"{cond}: nodes left: {vm.node_names() - baseline}")
                results[cond].append(figures)
            print(f"  round {r + 1}/{rounds} ({','.join(order)}): " + "; ".join(
                f"{c} {results[c][-1]['mibs']:.0f} MiB/s {results[c][-1]['seq_ms']:.3f}/"
                f"{results[c][-1]['first_ms']:.3f} ms" for c in CONDITIONS), flush=True)
        errors = vm.errors()
        if errors:
            raise RuntimeError(f"the guest reported errors: {errors[:5]}")
    finally:
        ours.cleanup()
        if vm.running:
            try:
                classic.cleanup()
            except Exception as err:  # noqa: BLE001 - best effort on the way out
                print(f"cleanup: classic scratch: {err}", file=sys.stderr)
        if daemon.proc is not None:
            daemon.stop()
        vm.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return {"rounds": rounds, "mib": mib, "results": results, "setup": setup,
            "accel": accel.name, "boot_s": boot, "load": [load_before, os.getloadavg()[0]],
            "seconds": time.monotonic() - began}


def report(out: dict[str, Any]) -> None:
    res = out["results"]
    med: dict[str, dict[str, float]] = {
        c: {k: statistics.median(f[k] for f in res[c]) for k in res[c][0]} for c in CONDITIONS}
    cols: list[tuple[str, str, str]] = [
        ("mibs", "MiB/s", ".1f"), ("thr_device_ms", "1M device ms", ".2f"),
        ("seq_ms", "4K seq ms", ".3f"), ("first_ms", "4K first ms", ".3f")]
    print(f"\nguest writes, medians (min-max) of {out['rounds']} rounds. MiB/s: {out['mib']} "
          "MiB in 1 MiB O_DIRECT writes + fsync (guest clock); 1M device ms: QEMU's time per "
          f"such write; 4K seq: {SEQ_WRITES} sequential 4 KiB O_DIRECT writes, mean (guest "
          f"clock); 4K first: {FIRST_WRITES} 4 KiB writes each first in its 64 KiB cluster, "
          "median (QEMU's latency histogram)")
    print(f"{'condition':<13}" + "".join(f" {title:>22}" for _, title, _ in cols)
          + f" {'scratch MiB':>12}")
    for c in CONDITIONS:
        print(f"{c:<13}" + "".join(f" {spread([f[k] for f in res[c]], fmt):>22}"
                                   for k, _, fmt in cols)
              + f" {med[c]['scratch_mib']:>12.1f}")
    for peer in ("none", "classic"):
        print(f"{'ours/' + peer:<13}" + "".join(
            f" {spread(paired(res, peer, k), '.2f'):>22}" for k, _, _ in cols))
    print("(ratios: median (min-max) of the rounds' own ratios, each between measures "
          "seconds apart)")
    s = out["setup"]
    print(f"setup: snapshot.create {statistics.median(s['ours']) * 1e3:.0f} ms, classic "
          f"(qemu-img create + blockdev-add x2 + blockdev-backup) "
          f"{statistics.median(s['classic']) * 1e3:.0f} ms (medians)")
    for key, what, fmt in (
            ("first_mean_ms", "4K first, device mean ms (outliers in)", ".3f"),
            ("first_guest_ms", "4K first, guest ms with dd start-up", ".2f"),
            ("seq_device_ms", "4K seq, device mean ms", ".3f"),
            ("thr_device_share", "throughput: device time / elapsed", ".2f")):
        print(f"  {what}: " + ", ".join(f"{c} {med[c][key]:{fmt}}" for c in CONDITIONS))
    print(f"run: {out['seconds']:.0f} s; host load {out['load'][0]:.2f} before, "
          f"{out['load'][1]:.2f} after")
    print(json.dumps({"bench": "guest_writes", "rounds": out["rounds"], "mib": out["mib"],
                      "accel": out["accel"], "boot_s": round(out["boot_s"], 2),
                      "seconds": round(out["seconds"], 1),
                      "median": {c: {k: round(v, 4) for k, v in med[c].items()}
                                 for c in CONDITIONS},
                      **{f"ours_over_{peer}": {
                          k: round(statistics.median(paired(res, peer, k)), 3)
                          for k, _, _ in cols} for peer in ("none", "classic")}}))


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.guest_writes",
                                     description="What a live snapshot costs the guest's writes.")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the three conditions")
    parser.add_argument("--mib", type=int, default=256, help="MiB written per throughput measure")
    args = parser.parse_args()
    if args.rounds < 1 or args.mib < 1:
        parser.error("--rounds and --mib must be at least 1")
    report(run(args.rounds, args.mib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
