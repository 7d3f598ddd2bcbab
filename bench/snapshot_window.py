"""Benchmark: the held-I/O window of snapshot.create, and create + export latency.

For 1, 4 and 8 disks of a running VM, takes REPEAT snapshots through the real
daemon and reports medians of:

- the held-I/O window the daemon records (vCPUs stopped, every disk moved;
  for one disk no vCPU stops: the move alone, whose drain holds that disk);
- the floor it is compared with in the same run: a bare ``stop`` + ``cont``
  pair sent back to back on the test's own monitor (the least any
  stop-the-guest method can hold guest I/O);
- a second floor: the same commands the window needs (``stop``, one
  ``qom-set`` per disk, ``cont``) sent back to back on a raw socket to
  filters made by hand: what QEMU itself takes, with no daemon around it;
- snapshot.create and export.start latency seen by a client.

Run: ``make bench`` (or ``.venv/bin/python -m bench.snapshot_window [REPEAT]``).
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


def bare_stop_cont(vm: Vm) -> float:
    assert vm.monitor is not None
    sock = vm.monitor.sock
    start = time.perf_counter()
    sock.sendall(b'{"execute": "stop"}\n{"execute": "cont"}\n')
    answers = 0
    while answers < 2:
        msg = vm.monitor.read()
        if "return" in msg or "error" in msg:
            answers += 1
    return time.perf_counter() - start


def send_batch(vm: Vm, messages: list[dict[str, object]]) -> float:
    assert vm.monitor is not None
    start = time.perf_counter()
    vm.monitor.sock.sendall(b"".join(json.dumps(m).encode() + b"\n" for m in messages))
    answers = 0
    while answers < len(messages):
        msg = vm.monitor.read()
        if "error" in msg:
            raise RuntimeError(msg["error"])
        answers += "return" in msg
    return time.perf_counter() - start


def raw_switch(vm: Vm, workdir: Path, repeat: int) -> list[float]:
    """Time stop + qom-set per disk + cont, pipelined, onto hand-made filters."""
    def moves(target: Callable[[str], str]) -> list[dict[str, object]]:
        return ([{"execute": "stop"}]
                + [{"execute": "qom-set", "arguments": {
                    "path": f"/machine/peripheral/{d}", "property": "drive",
                    "value": target(d)}} for d in vm.disks]
                + [{"execute": "cont"}])

    for d in vm.disks:
        path = workdir / f"raw-{d}.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "64M"], check=True)
        vm.qmp("blockdev-add", driver="qcow2", **{"node-name": f"raw-{d}-s"},
               file={"driver": "file", "filename": str(path)})
        vm.qmp("blockdev-add", driver="copy-before-write", file=f"{d}-fmt", target=f"raw-{d}-s",
               **{"node-name": f"raw-{d}-c"})
    times = []
    for _ in range(repeat):
        times.append(send_batch(vm, moves(lambda d: f"raw-{d}-c")))
        send_batch(vm, moves(lambda d: f"{d}-fmt"))
    for d in vm.disks:
        vm.qmp("blockdev-del", **{"node-name": f"raw-{d}-c"})
        vm.qmp("blockdev-del", **{"node-name": f"raw-{d}-s"})
    return times


def run(disks: int, repeat: int) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="bb-bench-", dir="/tmp"))
    vm = Vm(workdir, "vm1", disks={f"sd{chr(ord('a') + i)}": 64 * MiB for i in range(disks)})
    daemon = Daemon(workdir, log_level="warning")
    try:
        vm.start()
        daemon.start()
        windows, floors, creates, exports = [], [], [], []
        raw = raw_switch(vm, workdir, repeat)
        with daemon.client() as c:
            c.domain_define("vm1", str(vm.daemon_qmp))
            while c.domain_list()[0]["state"] != "running":
                time.sleep(0.01)
            names = list(vm.disks)
            xml = ('<domainblockexport type="nbd">'
                   + "".join(f'<disk name="{d}" snapshot="s"/>' for d in names)
                   + "</domainblockexport>")
            for _ in range(repeat):
                floors.append(bare_stop_cont(vm))
                t0 = time.perf_counter()
                c.call("snapshot.create", domain="vm1",
                       xml="<domainblocksnapshot><name>s</name></domainblocksnapshot>")
                t1 = time.perf_counter()
                c.call("export.start", domain="vm1", xml=xml)
                t2 = time.perf_counter()
                windows.append(c.call("snapshot.lookup", domain="vm1",
                                      name="s")["held_io_window"])
                creates.append(t1 - t0)
                exports.append(t2 - t1)
                c.call("snapshot.delete", domain="vm1", name="s")
        med = statistics.median
        return {"disks": disks, "window_ms": med(windows) * 1e3,
                "stop_cont_ms": med(floors) * 1e3,
                "window_over_stop_cont": med(windows) / med(floors),
                "raw_ms": med(raw) * 1e3, "window_over_raw": med(windows) / med(raw),
                "create_ms": med(creates) * 1e3, "export_start_ms": med(exports) * 1e3}
    finally:
        if daemon.proc is not None:
            daemon.stop()
        vm.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    repeat = int(sys.argv[1]) if len(sys.argv) > 1 else 21
    print(f"medians of {repeat} runs each")
    print(f"{'disks':>5} {'window ms':>10} {'stop+cont ms':>13} {'ratio':>6} "
          f"{'raw QEMU ms':>12} {'ratio':>6} {'create ms':>10} {'export.start ms':>16}")
    for disks in (1, 4, 8):
        r = run(disks, repeat)
        print(f"{r['disks']:>5} {r['window_ms']:>10.2f} {r['stop_cont_ms']:>13.2f} "
              f"{r['window_over_stop_cont']:>6.2f} {r['raw_ms']:>12.2f} "
              f"{r['window_over_raw']:>6.2f} {r['create_ms']:>10.1f} "
              f"{r['export_start_ms']:>16.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
