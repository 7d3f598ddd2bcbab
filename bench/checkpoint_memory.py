"""Benchmark: what many checkpoints cost QEMU (start time, memory, image size).

Each checkpoint is one persistent dirty bitmap per disk in the qcow2 image,
and QEMU loads every persistent bitmap when it opens the image: about
disk size / granularity / 8 bytes each, 2 MiB for 1 TiB at 64 KiB.

For N in COUNTS (0 always included) checkpoints on sparse qcow2 disks of
SIZE (default 1 TiB, 64 KiB clusters), the checkpoints are made the way
production makes them: the real daemon, a VM, N x (``snapshot.create`` with
``checkpoint: true``, ``snapshot.delete``), one guest write of 64 KiB on each
disk after each checkpoint (``--via qmp`` instead adds the bitmaps in one
``transaction`` on the test's own monitor, the newest recording, the others
disabled, as the daemon leaves them). The counts are reached one after the
other on the same images: at each, the VM and then the daemon stop (QEMU's
clean quit stores the bitmaps in the images), each image is measured, then
both start again and go on.

The VM has one disk per pattern of what each checkpoint's bitmap holds
(sda, sdb; the checkpoints cover both):

- ``light``: only that 64 KiB write (one bit set, in one of 32 regions of
  the disk in turn);
- ``busy``: also one bit in every 2 GiB of the disk, as if the guest had
  written all over it between two backups. Every 4 KiB page of the
  bitmap in memory and every cluster of it in the image is then non-zero,
  which is what the 2 MiB figure assumes. Those bits are merged, right after
  the checkpoint is made, from a bitmap made once offline (qemu-io writes at
  that stride into a separate image), attached read-only on the test's
  monitor: 512 real guest writes per checkpoint would take an hour under TCG.

Measured for each N and disk, REPEAT times, on a fresh QEMU (the VM's machine
type and device model, paused with ``-S``, no guest running) opening that
one image:

- start: from Popen until QMP answers ``query-status`` and
  ``query-named-block-nodes`` lists the N bitmaps (QEMU loads them while it
  opens the image, before its monitor exists);
- RSS and HWM (VmRSS, VmHWM from /proc/PID/status) once settled, and VmSize;
- quit: a clean ``quit``, which stores every bitmap in the image again;
- once: the image's allocated size (st_blocks * 512) after the VM's own quit
  and after the repeats, ``qemu-img info``'s bitmap count and ``qemu-img
  check``'s time.

Then a "pruned" row per disk: from the largest N, every checkpoint but the
newest KEEP deleted, oldest first (through the daemon's ``checkpoint.delete``;
with ``--via qmp``, ``block-dirty-bitmap-remove``: the oldest segment merges
into nothing), measured the same way.

Run: ``make bench`` (or ``.venv/bin/python -m bench.checkpoint_memory
[--counts 1,100,1000] [--size 1T] [--repeat 5] [--patterns light,busy]
[--via daemon|qmp] [--keep 2]``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from xml.etree import ElementTree

from blockbackup_client import Client
from tools.daemon import Daemon
from tools.vm import MiB, Monitor, Vm

KiB = 1024
GRANULARITY = 64 * KiB
#: One 4 KiB page of the lowest level of QEMU's in-memory bitmap covers this
#: much of the disk (32768 bits of GRANULARITY).
PAGE_SPAN = 4096 * 8 * GRANULARITY
REGIONS = 32  # the 64 KiB write after each checkpoint moves over 32 regions of the disk
LAST = 20  # ms/op of a row: median of the last LAST checkpoints made before it
NODE = "sda-fmt"
TEMPLATE_NODE = "cpmem-template"
TEMPLATE_BITMAP = "everywhere"


def size_arg(text: str) -> int:
    """``1T``, ``64G``, ``512M``, ``4K`` (powers of 1024) or bytes."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def human_size(size: int) -> str:
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20)):
        if size >= scale:
            return f"{size / scale:g} {unit}"
    return f"{size} B"


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM and VmSize of a process, in KiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "VmSize"):
            out[key] = int(value.split()[0])
    return out


@dataclass
class Row:
    """One line of the table: one image, measured REPEAT times."""

    pattern: str
    label: str
    bitmaps_made: int
    via: str
    start_s: list[float] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    hwm_kib: list[int] = field(default_factory=list)
    vsz_kib: list[int] = field(default_factory=list)
    quit_s: list[float] = field(default_factory=list)
    loaded: list[int] = field(default_factory=list)
    image_before: int = 0
    image_after: int = 0
    info_bitmaps: int = 0
    info_in_use: int = 0
    check_s: float = 0.0
    check_rc: int = 0
    #: Median seconds per checkpoint made (or deleted) to reach this image.
    per_op_s: float | None = None


class Probe(Vm):
    """A fresh QEMU on an existing image, with the VM's machine and devices,
    its monitors in a directory of its own (the daemon never sees them)."""

    def __init__(self, workdir: Path, image: Path, size: int) -> None:
        super().__init__(workdir, "probe", disks={"sda": size}, paused=True)
        self.path = image

    def image(self, disk: str) -> Path:
        return self.path

    def launch(self, timeout: float = 300.0) -> float:
        """Popen QEMU and connect to its monitor (polled every ms); returns
        ``time.perf_counter()`` just before the Popen."""
        for path in (self.daemon_qmp, self.test_qmp):
            path.unlink(missing_ok=True)
        with open(self.stdout_path, "ab") as out:
            start = time.perf_counter()
            self.proc = subprocess.Popen(self.command_line(), stdout=out,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while self.monitor is None:
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited with {self.proc.returncode}: "
                                   f"{self.stdout_path.read_text(errors='replace')}")
            if time.monotonic() > deadline:
                raise TimeoutError("QEMU did not answer on QMP")
            try:
                self.monitor = Monitor(self.test_qmp, timeout=timeout)
            except (FileNotFoundError, ConnectionRefusedError):
                time.sleep(0.001)
        return start


def bitmaps_on(vm: Vm, node: str = NODE) -> list[dict[str, object]]:
    return next((list(n.get("dirty-bitmaps", []))
                 for n in vm.qmp("query-named-block-nodes", flat=True)
                 if n["node-name"] == node), [])


def settled(pid: int, limit: float = 5.0) -> dict[str, int]:
    """/proc status once VmRSS holds still for 3 samples 0.1 s apart (at most ``limit``)."""
    time.sleep(0.3)
    samples = [proc_status(pid)]
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(0.1)
        samples.append(proc_status(pid))
        if len({s["VmRSS"] for s in samples[-3:]}) == 1 and len(samples) >= 3:
            break
    return samples[-1]


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def measure(row: Row, image: Path, size: int, repeat: int, workdir: Path) -> Row:
    """Open the image REPEAT times in a fresh paused QEMU, then qemu-img info and check."""
    row.image_before = allocated(image)
    probe_dir = workdir / "probe"
    probe_dir.mkdir(exist_ok=True)
    for _ in range(repeat):
        probe = Probe(probe_dir, image, size)
        try:
            start = probe.launch()
            probe.qmp("query-status")
            loaded = bitmaps_on(probe)
            row.start_s.append(time.perf_counter() - start)
            row.loaded.append(len(loaded))
            st = settled(probe.pid)
            row.rss_kib.append(st["VmRSS"])
            row.hwm_kib.append(st["VmHWM"])
            row.vsz_kib.append(st["VmSize"])
            t0 = time.perf_counter()
            probe.stop(timeout=600)
            row.quit_s.append(time.perf_counter() - t0)
        finally:
            probe.kill()  # only if the clean quit above did not happen
    row.image_after = allocated(image)
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image)],
                                     check=True, capture_output=True, text=True).stdout)
    bitmaps = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    row.info_bitmaps = len(bitmaps)
    row.info_in_use = sum("in-use" in b.get("flags", []) for b in bitmaps)
    t0 = time.perf_counter()
    row.check_rc = subprocess.run(["qemu-img", "check", "-f", "qcow2", str(image)],
                                  capture_output=True).returncode
    row.check_s = time.perf_counter() - t0
    return row


class Series:
    """One VM whose disks (one per pattern) go from 0 checkpoints up to the
    largest count together, then are pruned."""

    def __init__(self, workdir: Path, patterns: list[str], size: int, via: str) -> None:
        self.workdir = workdir
        self.size = size
        self.via = via
        #: disk -> pattern: sda, sdb, ...
        self.patterns = {f"sd{chr(ord('a') + i)}": p for i, p in enumerate(patterns)}
        self.vm = Vm(workdir, "vm1", disks={d: size for d in self.patterns})
        self.daemon = Daemon(workdir, log_level="warning") if via == "daemon" else None
        self.client: Client | None = None
        self.defined = False
        self.template = workdir / "template.qcow2" if "busy" in patterns else None
        #: The checkpoints (one bitmap per disk each), oldest first.
        self.names: list[str] = []

    def make_template(self) -> None:
        """An image of the same size whose bitmap has one bit in every PAGE_SPAN."""
        assert self.template is not None
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.template),
                        str(self.size)], check=True)
        subprocess.run(["qemu-img", "bitmap", "--add", "-g", str(GRANULARITY),
                        str(self.template), TEMPLATE_BITMAP], check=True)
        writes: list[str] = []
        for offset in range(0, self.size, PAGE_SPAN):
            writes += ["-c", f"write -z {offset} {GRANULARITY}"]
        subprocess.run(["qemu-io", "-f", "qcow2", *writes, str(self.template)], check=True,
                       capture_output=True)

    def up(self) -> None:
        self.vm.start()
        if self.template is not None:
            self.vm.qmp("blockdev-add", driver="qcow2", **{"node-name": TEMPLATE_NODE},
                        **{"read-only": True},
                        file={"driver": "file", "filename": str(self.template),
                              "read-only": True})
        if self.daemon is None:
            return
        self.daemon.start()
        self.client = self.daemon.client(timeout=600)
        if not self.defined:
            self.client.domain_define("vm1", str(self.vm.daemon_qmp))
            self.defined = True
        deadline = time.monotonic() + 300
        while self.client.domain_list()[0]["state"] != "running":
            if time.monotonic() > deadline:
                raise TimeoutError(f"the daemon did not reach the VM:\n{self.daemon.log()}")
            time.sleep(0.05)
        known = self.client.call("checkpoint.list", domain="vm1")
        if known != self.names:
            raise RuntimeError(f"the daemon lists {len(known)} checkpoints, "
                               f"{len(self.names)} were made")
        if self.names:
            newest = self.client.call("checkpoint.lookup", domain="vm1", name=self.names[-1])
            if newest["state"] == "broken":
                raise RuntimeError(f"checkpoint broken after a restart: {newest}")

    def down(self) -> None:
        """Quit the VM cleanly (QEMU stores the bitmaps), then stop the daemon."""
        self.vm.stop(timeout=600)
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.daemon is not None and self.daemon.proc is not None:
            self.daemon.stop()

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.daemon is not None and self.daemon.proc is not None:
            self.daemon.stop()
        self.vm.stop(timeout=600)

    def checkpoint(self, index: int) -> float:
        """Make one checkpoint on every disk, then write; returns the seconds
        the checkpoint took."""
        start = time.perf_counter()
        bitmaps = {}
        if self.client is not None:
            name = str(self.client.snapshot_create("vm1", checkpoint=True)["name"])
            self.client.snapshot_delete("vm1", name)
            took = time.perf_counter() - start
            if self.template is not None:  # the bitmaps' names, for the merge
                xml = ElementTree.fromstring(self.client.call("checkpoint.get_xml",
                                                              domain="vm1", name=name))
                bitmaps = {d.get("name"): d.get("bitmap") for d in xml.iter("disk")}
        else:
            name = f"cp{index}"
            actions: list[dict[str, object]] = []
            for disk in self.patterns:
                if self.names:
                    actions.append({"type": "block-dirty-bitmap-disable", "data": {
                        "node": f"{disk}-fmt", "name": self.names[-1]}})
                actions.append({"type": "block-dirty-bitmap-add", "data": {
                    "node": f"{disk}-fmt", "name": name, "persistent": True,
                    "granularity": GRANULARITY}})
            self.vm.qmp("transaction", actions=actions)
            took = time.perf_counter() - start
        self.names.append(name)
        region = self.size // REGIONS // GRANULARITY * GRANULARITY
        for disk, pattern in self.patterns.items():
            self.vm.write(disk, index % REGIONS * region, GRANULARITY, index % 255 + 1)
            if pattern == "busy":
                self.vm.qmp("block-dirty-bitmap-merge", node=f"{disk}-fmt",
                            target=bitmaps.get(disk) or name,
                            bitmaps=[{"node": TEMPLATE_NODE, "name": TEMPLATE_BITMAP}])
        return took

    def prune(self, keep: int) -> float:
        """Delete every checkpoint but the newest ``keep``, oldest first; median seconds each."""
        times = []
        for name in self.names[:-keep]:
            start = time.perf_counter()
            if self.client is not None:
                self.client.call("checkpoint.delete", domain="vm1", name=name)
            else:
                self.vm.qmp("transaction", actions=[
                    {"type": "block-dirty-bitmap-remove", "data": {
                        "node": f"{disk}-fmt", "name": name}} for disk in self.patterns])
            times.append(time.perf_counter() - start)
        self.names = self.names[-keep:]
        return statistics.median(times) if times else 0.0

    def measure(self, label: str, bitmaps: int, per_op_s: float | None, repeat: int,
                report: Callable[[Row], None]) -> list[Row]:
        rows = []
        for disk, pattern in self.patterns.items():
            row = Row(pattern, label, bitmaps, self.via, per_op_s=per_op_s)
            rows.append(measure(row, self.vm.image(disk), self.size, repeat, self.workdir))
            report(row)
        return rows


def series(patterns: list[str], counts: list[int], size: int, repeat: int, via: str,
           keep: int, report: Callable[[Row], None]) -> tuple[list[Row], float]:
    """Every row, and the seconds spent making and deleting checkpoints."""
    workdir = Path(tempfile.mkdtemp(prefix="bb-bench-", dir="/var/tmp"))
    s = Series(workdir, patterns, size, via)
    rows: list[Row] = []
    spent = 0.0
    try:
        if s.template is not None:
            s.make_template()
        for target in counts:
            s.up()
            began = time.perf_counter()
            times = [s.checkpoint(len(s.names)) for _ in range(target - len(s.names))]
            spent += time.perf_counter() - began
            s.down()
            # The cost of a checkpoint at this N: the last ones made.
            per_op = statistics.median(times[-LAST:]) if times else None
            rows += s.measure(str(target), target, per_op, repeat, report)
        if 0 < keep < counts[-1]:
            s.up()
            began = time.perf_counter()
            per_delete = s.prune(keep)
            spent += time.perf_counter() - began
            s.down()
            rows += s.measure(f"{counts[-1]}->{keep}", keep, per_delete, repeat, report)
        return rows, spent
    finally:
        s.close()
        shutil.rmtree(workdir, ignore_errors=True)


def warm_up() -> None:
    """One unmeasured QEMU start and quit on a blank image, so the first row
    does not pay for a cold binary and libraries."""
    workdir = Path(tempfile.mkdtemp(prefix="bb-bench-", dir="/var/tmp"))
    try:
        image = workdir / "blank.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "1G"], check=True)
        probe = Probe(workdir, image, 1 << 30)
        try:
            probe.launch()
            probe.stop()
        finally:
            probe.kill()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def spread(values: list[float], fmt: str) -> str:
    """Median (min-max)."""
    return (f"{format(statistics.median(values), fmt)} "
            f"({format(min(values), fmt)}-{format(max(values), fmt)})")


HEADER = (f"{'pattern':<7} {'N':>9} {'via':<7} {'start s (min-max)':>20} "
          f"{'RSS MiB (min-max)':>21} {'HWM MiB':>8} {'VmSize MiB':>11} "
          f"{'quit s (min-max)':>20} {'image MiB':>15} {'bitmaps':>7} {'check s':>8} "
          f"{'ms/op':>6}")


def line(r: Row) -> str:
    mib = 1024.0
    image = f"{r.image_before / MiB:.1f}->{r.image_after / MiB:.1f}"
    bitmaps = str(r.info_bitmaps)
    if r.info_in_use or set(r.loaded) != {r.bitmaps_made} or r.info_bitmaps != r.bitmaps_made:
        bitmaps += "!"
    check = f"{r.check_s:.2f}" + ("" if r.check_rc == 0 else f" rc{r.check_rc}")
    per_op = "" if r.per_op_s is None else f"{r.per_op_s * 1e3:.1f}"
    return (f"{r.pattern:<7} {r.label:>9} {r.via:<7} {spread(r.start_s, '.3f'):>20} "
            f"{spread([v / mib for v in r.rss_kib], '.1f'):>21} "
            f"{statistics.median(r.hwm_kib) / mib:>8.1f} "
            f"{statistics.median(r.vsz_kib) / mib:>11.0f} {spread(r.quit_s, '.3f'):>20} "
            f"{image:>15} {bitmaps:>7} {check:>8} {per_op:>6}")


def slopes(rows: list[Row], size: int) -> list[str]:
    """Per-bitmap costs of each pattern between N=0 and the largest N, and
    the start time's slope between consecutive counts."""
    theory = size / GRANULARITY / 8 / KiB
    out = []
    for pattern in dict.fromkeys(r.pattern for r in rows):
        made = [r for r in rows if r.pattern == pattern and "->" not in r.label]
        if len(made) < 2:
            continue
        zero, top = made[0], made[-1]
        n = top.bitmaps_made

        def per(values: Callable[[Row], float], z: Row = zero, t: Row = top,
                count: int = n) -> float:
            return (values(t) - values(z)) / count

        rss = per(lambda r: statistics.median(r.rss_kib))
        vsz = per(lambda r: statistics.median(r.vsz_kib))
        image = per(lambda r: r.image_after / KiB)
        out.append(f"{pattern}: per bitmap, N=0 -> {n}: RSS {rss:+.1f} KiB "
                   f"({rss / theory:.1%} of the theoretical {human_size(size)} / "
                   f"{GRANULARITY // KiB} KiB / 8 = {theory:.0f} KiB), VmSize {vsz:+.0f} KiB "
                   f"(address space, noisy), "
                   f"image {image:+.0f} KiB (after the repeats), quit "
                   f"{per(lambda r: statistics.median(r.quit_s)) * 1e3:+.2f} ms")
        steps = []
        for a, b in zip(made, made[1:], strict=False):
            step = (statistics.median(b.start_s) - statistics.median(a.start_s)) \
                / (b.bitmaps_made - a.bitmaps_made)
            steps.append(f"{a.bitmaps_made}->{b.bitmaps_made}: {step * 1e3:.2f}")
        out.append(f"{pattern}: start time per bitmap added, ms: " + ", ".join(steps))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench.checkpoint_memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="0,1,100,1000",
                        help="checkpoint counts, comma-separated (0 is always added)")
    parser.add_argument("--size", type=size_arg, default=1 << 40, help="disk size (1T)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--patterns", default="light,busy",
                        help="what each checkpoint's bitmap holds: light, busy or both")
    parser.add_argument("--via", choices=("daemon", "qmp"), default="daemon",
                        help="make checkpoints through the daemon or on the test's monitor")
    parser.add_argument("--keep", type=int, default=2,
                        help="checkpoints left in the pruned row (0: no pruned row)")
    args = parser.parse_args(argv)
    counts = sorted({0, *(int(c) for c in args.counts.split(",") if c.strip())})
    patterns = [p.strip() for p in args.patterns.split(",") if p.strip()]
    for p in patterns:
        if p not in ("light", "busy"):
            parser.error(f"unknown pattern {p!r}")
    began = time.monotonic()
    how = ("snapshot.create with checkpoint + snapshot.delete through the daemon"
           if args.via == "daemon" else
           "block-dirty-bitmap-add/-disable in one transaction on the test's monitor")
    pruned = ("checkpoint.delete through the daemon" if args.via == "daemon"
              else "block-dirty-bitmap-remove")
    disks = ", ".join(f"sd{chr(ord('a') + i)} {p}" for i, p in enumerate(patterns))
    print(f"one VM, one sparse qcow2 disk of {human_size(args.size)} per pattern ({disks}), "
          f"{GRANULARITY // KiB} KiB clusters and bitmap granularity; checkpoints made by {how}; "
          f"after each, one 64 KiB guest write per disk (busy: plus one bit per "
          f"{human_size(PAGE_SPAN)} merged in); pruned rows: "
          f"{pruned}, oldest first; fresh paused QEMU, medians of {args.repeat} opens",
          flush=True)
    warm_up()
    print(HEADER, flush=True)
    rows, spent = series(patterns, counts, args.size, args.repeat, args.via, args.keep,
                         lambda r: print(line(r), flush=True))
    print()
    for text in slopes(rows, args.size):
        print(text)
    print("image MiB: allocated (st_blocks) after the VM's own quit -> after the repeated "
          f"opens and quits; ms/op: median of the last {LAST} checkpoints made before the "
          "row (of every delete on pruned rows); '!' after bitmaps: a count differs from N "
          "or a bitmap is in use")
    print(f"run time: {time.monotonic() - began:.0f} s, of which {spent:.0f} s making and "
          f"deleting checkpoints", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
