"""Benchmark: instant recovery against a copy restore of the same backup chain.

One VM with one disk of SIZE (default 4 GiB): 768 MiB of data written
before it starts, a full backup, 256 MiB more written by the guest (qemu-io
through the device), an incremental backup. The VM stops. Each of REPEAT
rounds (default 5), one after the other:

- ours, ready: ``bbctl restore --instant`` (a new process, as a user runs
  it), a QEMU started on the new image and defined in the daemon, and a
  first read of the disk's first MiB through its device: seconds from the
  command's start to that read's answer;
- the copy's, ready: ``bbctl restore`` (``qemu-img convert`` of the chain
  into a standalone qcow2), then the same QEMU start and first read;
- ours, moved: seconds from the VM's definition in the daemon to the
  recovery's ``done`` (the daemon's ``block-stream`` in the VM's QEMU, no
  limit, the guest idle; polled every 20 ms), against ``qemu-img convert -O qcow2`` of the same
  chain alone (what ``bbctl restore`` runs), as rates over the chain's data.

The ratio of each row is the median of the rounds' same-run ratios
ours/copy. Everything lives under /var/tmp (this machine's disk); before
each restore the page cache is written back and dropped, so both read the
backup from the disk, as from backup storage.

Run: ``.venv/bin/python -m bench.instant_recovery [SIZE_GIB] [REPEAT]``.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from bench.common import (
    GiB,
    Row,
    bbctl,
    cli,
    domain,
    gib,
    installed_env,
    median,
    qemu_io,
    spread,
)
from tools.daemon import Daemon
from tools.vm import MiB, Vm

DISK = "sda"


def _run_bbctl(daemon: Daemon, *args: str) -> dict[str, object]:
    out = subprocess.run([*bbctl(daemon), "--json", *args], check=True, capture_output=True,
                         text=True, env=installed_env()).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def _first_read(daemon: Daemon, workdir: Path, name: str, size: int) -> tuple[Vm, float]:
    """Start a VM on ``<name>-sda.qcow2`` (made already), define it, read its
    first MiB; returns the VM and when it was defined."""
    vm = Vm(workdir, name, disks={DISK: size}).start()
    defined = time.perf_counter()
    with daemon.client() as c:
        c.domain_define(name, str(vm.daemon_qmp))
    out = vm.qemu_io(DISK, f"read 0 {MiB}")
    if "read " not in out:
        raise RuntimeError(f"first read failed: {out}")
    return vm, defined


def _cold() -> None:
    """Written back and out of the page cache: each restore reads the backup
    from the disk, as from backup storage."""
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _data_bytes(image: Path) -> int:
    """Bytes the chain holds data for (what a restore moves)."""
    extents = json.loads(subprocess.run(["qemu-img", "map", "--output=json", "-U", str(image)],
                                        check=True, capture_output=True, text=True).stdout)
    return sum(e["length"] for e in extents if e.get("data"))


def run(size: int = 4 * GiB, repeat: int = 5) -> list[Row]:
    def prepare(vm: Vm) -> None:
        qemu_io(vm.image(DISK), [f"write -P 0x31 {i * 16 * MiB} {8 * MiB}" for i in range(96)])

    ready_ours, ready_copy, moved_ours, moved_copy = [], [], [], []
    ready_ratios, moved_ratios = [], []
    with domain({DISK: size}, prepare) as (vm, daemon):
        dest = vm.workdir / "backups"
        _run_bbctl(daemon, "backup", vm.name, "--dest", str(dest), "--level", "full")
        for i in range(32):
            vm.write(DISK, size // 2 + i * 16 * MiB, 8 * MiB, 0x40 + i)
        point = str(_run_bbctl(daemon, "backup", vm.name, "--dest", str(dest),
                               "--level", "inc")["id"])
        vm.stop()
        data = 0
        for r in range(repeat):
            # The copy: restore, then start and read.
            name = f"copy{r}"
            image = vm.workdir / f"{name}-{DISK}.qcow2"
            top = dest / f"{point}-{DISK}.qcow2"
            _cold()
            start = time.perf_counter()
            subprocess.run(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "qcow2", str(top),
                            str(image)], check=True)
            moved_copy.append(time.perf_counter() - start)
            data = _data_bytes(image)
            image.unlink()
            _cold()
            start = time.perf_counter()
            _run_bbctl(daemon, "restore", str(dest), "--disk", DISK, "--at", point,
                       "--output", str(image))
            _first_read(daemon, vm.workdir, name, size)[0].stop()
            ready_copy.append(time.perf_counter() - start)
            image.unlink()
            # Ours: instant, then start and read, then the stream to its end.
            name = f"instant{r}"
            image = vm.workdir / f"{name}-{DISK}.qcow2"
            _cold()
            start = time.perf_counter()
            _run_bbctl(daemon, "restore", str(dest), "--disk", DISK, "--at", point,
                       "--output", str(image), "--instant")
            target, defined = _first_read(daemon, vm.workdir, name, size)
            ready_ours.append(time.perf_counter() - start)
            with daemon.client() as c:
                while c.call("recovery.lookup", file=str(image))["state"] != "done":
                    time.sleep(0.02)
                c.call("recovery.delete", file=str(image))
                moved_ours.append(time.perf_counter() - defined)
                target.stop()
                c.domain_undefine(name, force=True)
            image.unlink()
            ready_ratios.append(ready_ours[-1] / ready_copy[-1])
            moved_ratios.append(moved_ours[-1] / moved_copy[-1])
    mib = data / MiB
    print(f"chain: {mib:.0f} MiB of data on a {size / GiB:g} GiB disk; ready: instant "
          f"{spread(ready_ours, '.3f')} s, copy {spread(ready_copy, '.3f')} s; moved: stream "
          f"{spread(moved_ours, '.2f')} s, qemu-img convert {spread(moved_copy, '.2f')} s")
    return [
        Row(f"instant restore: command to the VM's first read ({size / GiB:g} GiB disk, "
            f"{mib:.0f} MiB data)", median(ready_ours), median(ready_copy),
            peer_name="bbctl restore + start", ratios=ready_ratios, target="< 1 s"),
        Row(f"instant restore: the stream to a standalone image ({mib:.0f} MiB)",
            mib / median(moved_ours), mib / median(moved_copy), unit="MiB/s",
            peer_name="qemu-img convert", ratios=[1 / x for x in moved_ratios],
            target="copy speed: ratio >= 0.8"),
    ]


def main() -> int:
    return cli(run, gib, int)


if __name__ == "__main__":
    raise SystemExit(main())
