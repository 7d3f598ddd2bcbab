"""Reproduce, without the daemon, the guest I/O stall that ``stop`` and
``cont`` cause on QEMU 10.0.2 with a virtio-blk disk in an I/O thread while
the guest writes (docs/hosts.md, "stop and cont on 10.0").

The test guest writes and syncs 4 MiB over and over; this sends ``stop``
then ``cont`` CYCLES times, and reports a stall once the guest's round
counter stands still for 8 s, with the virtqueue's state: the ring empty and
every completion "signalled" while the guest's jbd2 waits on a buffer, a
completion interrupt lost. Not part of the suite (it needs thousands of
cycles): ``BB_QEMU=10.0 .venv/bin/python -m tools.stop_cont_stall [CYCLES]
[--no-iothread]``.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tools.linux_guest.accel import accelerator
from tools.linux_guest.vm import WRITE_ROUNDS, LinuxVm, write_rounds

QUEUE = {"path": "/machine/peripheral/vda/virtio-backend", "queue": 0}


def rounds(vm: LinuxVm) -> int:
    return write_rounds(vm.console())


def queue_state(vm: LinuxVm) -> dict[str, Any]:
    status = vm.qmp("x-query-virtio-queue-status", **QUEUE)
    return {k: status[k] for k in ("last-avail-idx", "used-idx", "inuse", "signalled-used")}


def run(cycles: int, iothread: bool) -> str:
    work = Path(tempfile.mkdtemp(prefix="bb-stall-", dir="/tmp"))
    vm = LinuxVm(work, "vm1", disks={"vda": 64 << 20}, iothread=iothread, script=WRITE_ROUNDS,
                 agent=False, accel=accelerator())
    try:
        vm.start()
        vm.wait_ready()
        while rounds(vm) < 1:
            time.sleep(0.1)
        last, since = rounds(vm), time.monotonic()
        for cycle in range(cycles):
            vm.qmp("stop")
            vm.qmp("cont")
            now, seen = time.monotonic(), rounds(vm)
            if seen != last:
                last, since = seen, now
            elif now - since > 8:
                return f"stalled at cycle {cycle} (round {seen}); virtqueue {queue_state(vm)}"
            if not vm.running:
                return f"QEMU died at cycle {cycle}: {vm.qemu_output()[-500:]}"
        time.sleep(3)
        if rounds(vm) > last:
            return f"{cycles} cycles, the guest still writing (round {rounds(vm)})"
        return f"stalled after the last cycle; virtqueue {queue_state(vm)}"
    finally:
        vm.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    numbers = [a for a in sys.argv[1:] if a.isdigit()]
    print(run(int(numbers[0]) if numbers else 3000, "--no-iothread" not in sys.argv))
