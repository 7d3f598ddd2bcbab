"""``make demo``: the whole backup story on a throwaway VM, as a user runs it.

Starts blockbackupd with a demo config in a temporary directory and a QEMU
with two qcow2 disks (no guest OS; the "guest" writes are qemu-io through the
VM's devices), then, with ``bbctl`` only: defines the domain, takes a full
backup, writes more, takes an incremental one, lists and verifies them,
restores both disks and proves them byte-identical to the VM's disks with
``qemu-img compare``. Prints a report and removes everything it made.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tools.daemon import Daemon
from tools.vm import MiB, Vm

KiB = 1024
DISKS = {"sda": 256 * MiB, "sdb": 128 * MiB}
#: (disk, offset, length, byte) written before the full backup; None writes zeros.
FIRST = [("sda", 0, 48 * MiB, 0x11), ("sda", 128 * MiB, 16 * MiB, 0x12),
         ("sdb", 8 * MiB, 24 * MiB, 0x21)]
#: ... and before the incremental one: scattered, and some zeros over old data.
SECOND = [("sda", 1 * MiB, 64 * KiB, 0x31), ("sda", 130 * MiB, 256 * KiB, 0x32),
          ("sda", 250 * MiB, 1 * MiB, 0x33), ("sdb", 9 * MiB, 128 * KiB, 0x41),
          ("sdb", 20 * MiB, 512 * KiB, None), ("sdb", 100 * MiB, 64 * KiB, 0x42)]


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.vm = Vm(workdir, "demo-vm", disks=DISKS)
        self.daemon = Daemon(workdir, log_level="info")
        self.dest = workdir / "backups"

    def bbctl(self, *args: str, quiet: bool = False) -> str:
        """Run bbctl as a user would, show the command and what it printed."""
        argv = ["bbctl", "--socket", str(self.daemon.socket), *args]
        print("$ " + shlex.join(argv), flush=True)
        r = subprocess.run([sys.executable, "-m", "blockbackup_client.bbctl", *argv[1:]],
                           capture_output=True, text=True)
        for stream in (r.stderr, r.stdout if not quiet else ""):
            if stream.strip():
                print("  " + stream.strip().replace("\n", "\n  "), flush=True)
        if r.returncode != 0:
            raise RuntimeError(f"bbctl {args[0]} failed with {r.returncode}")
        return r.stdout

    def write(self, batch: list[tuple[str, int, int, int | None]]) -> None:
        for disk, offset, length, byte in batch:
            if byte is None:
                self.vm.zero(disk, offset, length)
                print(f"  {disk}: zeros at {offset // KiB} KiB, {length // KiB} KiB")
            else:
                self.vm.write(disk, offset, length, byte)
                print(f"  {disk}: {length // KiB} KiB of {byte:#04x} at {offset // KiB} KiB")

    def backup(self, level: str) -> tuple[dict[str, Any], float]:
        start = time.monotonic()
        out = self.bbctl("--json", "backup", self.vm.name, "--dest", str(self.dest),
                         "--level", level, quiet=True)
        seconds = time.monotonic() - start
        record: dict[str, Any] = json.loads(out)
        print(f"  backup {record['id']} ({record['level']}) in {seconds:.2f} s")
        return record, seconds

    def restore(self, disk: str, at: str | None, reference: Path) -> None:
        out = self.workdir / f"restored-{disk}-{at or 'latest'}.qcow2"
        self.bbctl("restore", str(self.dest), "--disk", disk, "--output", str(out),
                   *(["--at", at] if at else []))
        cmp = subprocess.run(["qemu-img", "compare", "-U", str(out), str(reference)],
                             capture_output=True, text=True)
        print(f"$ qemu-img compare -U {out.name} {reference.name}\n  " + cmp.stdout.strip())
        if cmp.returncode != 0:
            raise RuntimeError(f"restored {disk} differs from {reference.name}")

    def run(self) -> int:
        vm, daemon = self.vm, self.daemon
        step(f"starting QEMU ({vm.name}: sda 256 MiB, sdb 128 MiB) and blockbackupd "
             f"in {self.workdir}")
        vm.start()
        daemon.start()
        self.bbctl("domain", "define", vm.name, str(vm.daemon_qmp))
        deadline = time.monotonic() + 10
        while "running" not in self.bbctl("domain", "list", quiet=True):
            if time.monotonic() > deadline:
                raise TimeoutError("the daemon did not reach the VM")
            time.sleep(0.1)
        self.bbctl("domain", "list")

        step("the guest writes its first data")
        self.write(FIRST)
        step("full backup")
        full, full_s = self.backup("full")
        # Keep a copy of the disks as they were, to check the restore of the full later.
        for disk in DISKS:
            vm.qemu_io(disk, "flush")
            subprocess.run(["qemu-img", "convert", "-U", "-O", "qcow2", str(vm.image(disk)),
                            str(self.workdir / f"then-{disk}.qcow2")], check=True)

        step("the guest writes more: scattered blocks on both disks, and zeros")
        self.write(SECOND)
        step("incremental backup: only the blocks changed since the full one")
        inc, inc_s = self.backup("inc")

        step("what the backup directory holds")
        self.bbctl("list", str(self.dest))
        self.bbctl("verify", str(self.dest))
        chain = subprocess.run(["qemu-img", "info", "--backing-chain",
                                str(self.dest / inc["disks"]["sda"]["file"])],
                               capture_output=True, text=True, check=True).stdout
        print("$ qemu-img info --backing-chain " + inc["disks"]["sda"]["file"])
        print("  " + "\n  ".join(line for line in chain.splitlines()
                                 if line.startswith(("image:", "backing file:"))))

        step("restore both disks from the latest backup; compare with the VM's disks")
        for disk in DISKS:
            vm.qemu_io(disk, "flush")  # so the image file holds what the guest wrote
            self.restore(disk, None, vm.image(disk))
        step("restore both disks as they were at the full backup; compare with the copies")
        for disk in DISKS:
            self.restore(disk, full["id"], self.workdir / f"then-{disk}.qcow2")

        if json.loads(self.bbctl("--json", "snapshot", "list", vm.name, quiet=True)):
            raise RuntimeError("a backup left a snapshot behind")
        print("  no snapshot left behind")
        self.report([(full, full_s), (inc, inc_s)])
        return 0

    def report(self, backups: list[tuple[dict[str, Any], float]]) -> None:
        step("report")
        changed = {d: sum(n for disk, _, n, _ in SECOND if disk == d) for d in DISKS}
        print(f"{'backup':<6} {'disk':<4} {'size':>8} {'changed':>9} {'read':>9} "
              f"{'zeroed':>9} {'file':>9} {'pull s':>7}")
        for record, _ in backups:
            for disk, e in record["disks"].items():
                print(f"{record['level']:<6} {disk:<4} {e['size'] // MiB:>6}Mi "
                      f"{(changed[disk] if record['level'] == 'inc' else 0) // KiB:>7}Ki "
                      f"{e['bytes_read'] // KiB:>7}Ki {e['bytes_zeroed'] // KiB:>7}Ki "
                      f"{e['bytes_written'] // KiB:>7}Ki {e['seconds']:>7.2f}")
        for record, seconds in backups:
            read = sum(e["bytes_read"] for e in record["disks"].values())
            print(f"{record['level']} backup: {read / MiB:.1f} MiB pulled, "
                  f"{seconds:.2f} s end to end (bbctl start, snapshot, export, pull, "
                  f"checksums, teardown)")
        print("every restored disk is byte-identical to the disk at that backup")


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="bb-demo-", dir="/var/tmp"))
    demo = Demo(workdir)
    try:
        return demo.run()
    finally:
        step("cleaning up")
        if demo.daemon.proc is not None:
            print(f"blockbackupd exited with {demo.daemon.stop()}")
        demo.vm.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"removed {workdir}")


if __name__ == "__main__":
    sys.exit(main())
