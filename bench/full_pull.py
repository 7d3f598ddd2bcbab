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

import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tools.daemon import Daemon
from tools.vm import MiB, Vm

GiB = 1024 * MiB
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


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def main() -> int:
    size = int(float(sys.argv[1]) * GiB) if len(sys.argv) > 1 else 4 * GiB
    repeat = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    workdir = Path(tempfile.mkdtemp(prefix="bb-bench-", dir="/var/tmp"))
    vm = Vm(workdir, "bench", disks={"sda": size})
    daemon = Daemon(workdir)
    results: dict[str, list[float]] = {"ours": [], "nbdcopy": [], "qemu-img": [], "cp": []}
    try:
        vm.create_images()
        data = fill(vm.image("sda"), size)
        vm.start()
        daemon.start()
        bbctl = [sys.executable, "-m", "blockbackup_client.bbctl", "--socket", str(daemon.socket)]
        with daemon.client() as c:
            c.domain_define(vm.name, str(vm.daemon_qmp))
            deadline = time.monotonic() + 10
            while c.domain_list()[0]["state"] != "running":
                if time.monotonic() > deadline:
                    raise TimeoutError("the daemon did not reach the VM")
                time.sleep(0.05)
            for i in range(repeat):
                dest = workdir / f"ours{i}"
                results["ours"].append(timed(lambda dest=dest: subprocess.run(
                    [*bbctl, "backup", vm.name, "--dest", str(dest), "--level", "full"],
                    check=True, capture_output=True)))
                shutil.rmtree(dest)
                c.snapshot_create(vm.name, "<domainblocksnapshot><name>peer</name>"
                                           "</domainblocksnapshot>")
                started = c.export_start(vm.name, '<domainblockexport type="nbd">'
                                         '<disk name="sda" snapshot="peer"/>'
                                         "</domainblockexport>")
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
        med = {k: statistics.median(v) for k, v in results.items()}
        mib = data / MiB
        print(f"full pull, {size // GiB} GiB disk, {mib:.0f} MiB of data, "
              f"medians of {repeat}")
        print(f"{'copier':<10} {'seconds':>8} {'MiB/s':>8} {'ours/peer':>10}")
        for name, seconds in med.items():
            print(f"{name:<10} {seconds:8.2f} {mib / seconds:8.0f} {med['ours'] / seconds:10.2f}")
        print(json.dumps({"data_bytes": data, "medians_s": med}))
        return 0
    finally:
        if daemon.proc is not None:
            daemon.stop()
        vm.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
