"""Benchmark: a full backup's pull against the copiers users would otherwise run.

One VM with one disk of SIZE (default 4 GiB) whose every fifth 8 MiB run holds
no data and the rest does (60% allocated). In the same run, medians of REPEAT:

- ours: ``bbctl backup --level full`` end to end (snapshot, export, pull into
  a qcow2, fsync, checksum, teardown), as a user runs it;
- ``nbdcopy --flush`` from the same kind of export (a snapshot of that disk,
  exported by the daemon) into a local file, flushed to disk;
- ``qemu-img convert -W -m 8 -t writeback -O qcow2`` from the same kind of
  export (writeback: it flushes the file when done);
- ``cp --sparse=always`` of the image file then ``sync`` of the copy: what
  this machine's disk allows.

Every copier here ends with its data on disk, as a backup must; without the
flush the peers finish while the data is still in the page cache.

Run: ``make bench`` or ``.venv/bin/python -m bench.full_pull [SIZE_GIB] [REPEAT]``.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import GiB, Row, cli, domain, gib, timed
from tools.vm import MiB

RUN = 8 * MiB


def fill(image: Path, size: int) -> int:
    """Write 4 of every 5 runs of the image (offline, before QEMU opens it)."""
    commands = []
    data = 0
    for i, offset in enumerate(range(0, size, RUN)):
        if i % 5 != 4:
            commands += ["-c", f"write -P {0x10 + i % 200:#x} {offset} {RUN}"]
            data += RUN
    subprocess.run(["qemu-io", "-f", "qcow2", *commands, str(image)], check=True,
                   capture_output=True)
    return data


_BBCTL_WITH_RSS = (
    "import resource, sys\n"
    "from blockbackup_client.bbctl import main\n"
    "rc = main(sys.argv[1:])\n"
    "print('MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "sys.exit(rc)\n")


def run(size: int = 4 * GiB, repeat: int = 3) -> list[Row]:
    results: dict[str, list[float]] = {"ours": [], "nbdcopy": [], "qemu-img": [], "cp": []}
    peak_rss: list[float] = []
    filled: list[int] = []
    with domain({"sda": size}, lambda vm: filled.append(fill(vm.image("sda"), size))) \
            as (vm, daemon), daemon.client() as c:
        workdir = vm.workdir
        for i in range(repeat):
            dest = workdir / f"ours{i}"
            start = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", _BBCTL_WITH_RSS, "--socket",
                                str(daemon.socket), "backup", vm.name, "--dest", str(dest),
                                "--level", "full"], check=True, capture_output=True, text=True)
            results["ours"].append(time.perf_counter() - start)
            peak_rss.append(int(r.stderr.split("MAXRSS")[1].split()[0]) / 1024)
            shutil.rmtree(dest)
            c.snapshot_create(vm.name, "<domainblocksnapshot><name>peer</name>"
                                       "</domainblocksnapshot>")
            started = c.export_start(vm.name, '<domainblockexport type="nbd">'
                                     '<disk name="sda" snapshot="peer"/></domainblockexport>')
            uri = (f"nbd+unix:///{started['exports'][0]['name']}"
                   f"?socket={started['server']['socket']}")
            out = workdir / "peer.out"
            results["nbdcopy"].append(timed(lambda uri=uri, out=out: subprocess.run(
                ["nbdcopy", "--flush", uri, str(out)], check=True)))
            out.unlink()
            results["qemu-img"].append(timed(lambda uri=uri, out=out: subprocess.run(
                ["qemu-img", "convert", "-W", "-m", "8", "-t", "writeback", "-f", "raw",
                 "-O", "qcow2", uri, str(out)], check=True)))
            out.unlink()
            c.snapshot_delete(vm.name, "peer")
            results["cp"].append(timed(lambda out=out: (subprocess.run(
                ["cp", "--sparse=always", str(vm.image("sda")), str(out)], check=True),
                subprocess.run(["sync", str(out)], check=True))))
            out.unlink()
            print(f"  round {i}: " + ", ".join(f"{k} {v[-1]:.2f} s"
                                                for k, v in results.items()), flush=True)
    data = filled[0]
    med = {k: statistics.median(v) for k, v in results.items()}
    mib = data / MiB
    what = f"full backup, {size // GiB} GiB disk, {mib:.0f} MiB data"
    return [
        Row(f"{what} (ours {mib / med['ours']:.0f} MiB/s)", med["ours"], med["nbdcopy"],
            peer_name="nbdcopy --flush", target="<= 1.1"),
        Row(f"{what}, vs qemu-img convert -W -m 8", med["ours"], med["qemu-img"],
            peer_name="qemu-img convert", target="<= 1.1"),
        Row(f"{what}, vs cp + sync of the image (the disk's limit)", med["ours"], med["cp"],
            peer_name="cp + sync"),
        Row(f"bbctl peak RSS during the {size // GiB} GiB pull", max(peak_rss), unit="MiB",
            target="bounded"),
    ]


if __name__ == "__main__":
    sys.exit(cli(run, gib, int))
