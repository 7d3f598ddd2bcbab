"""Benchmark: the control path and reconciling after a restart.

1. A running VM with 4 disks: REPEAT rounds of ``snapshot.create`` +
   ``export.start`` + ``export.stop`` + ``snapshot.delete`` as a client sees
   them, and the held-I/O window the daemon records (target < 20 ms).
2. The same VM with CHECKPOINTS (default 100) checkpoints on each disk, made
   through the daemon: QEMU quit and started again, the daemon's reconcile
   (intents, every bitmap against the store), as it logs it (target < 2 s);
   the peer is the same reconcile with no checkpoint.

Run: ``.venv/bin/python -m bench.control [REPEAT] [CHECKPOINTS]``.
"""

from __future__ import annotations

import re
import sys
import time

from bench.common import Row, cli, domain, median
from tools.daemon import Daemon
from tools.vm import MiB, Vm

DISKS = {f"sd{c}": 16 * MiB for c in "abcd"}
SNAP = "<domainblocksnapshot><name>{}</name></domainblocksnapshot>"
EXPORT = ('<domainblockexport type="nbd">' + "".join(
    f'<disk name="{d}" snapshot="{{0}}"/>' for d in DISKS) + "</domainblockexport>")


def control_path(repeat: int) -> list[Row]:
    timings: dict[str, list[float]] = {k: [] for k in
                                       ("create", "start", "stop", "delete", "window")}
    with domain(DISKS) as (_, daemon):
        with daemon.client() as c:
            for i in range(repeat):
                name = f"c{i}"
                steps = [("create", "snapshot.create", {"xml": SNAP.format(name)}),
                         ("start", "export.start", {"xml": EXPORT.format(name)}),
                         ("stop", "export.stop", {"xml": EXPORT.format(name)}),
                         ("delete", "snapshot.delete", {"name": name})]
                for key, method, params in steps:
                    if key == "delete":
                        timings["window"].append(
                            c.snapshot_lookup("bench", name)["held_io_window"])
                    start = time.perf_counter()
                    c.call(method, domain="bench", **params)
                    timings[key].append(time.perf_counter() - start)
    total = [sum(x) for x in zip(*(timings[k] for k in ("create", "start", "stop", "delete")),
                                 strict=True)]
    return [
        Row("4 disks: snapshot.create", median(timings["create"]), unit="s"),
        Row("4 disks: export.start", median(timings["start"]), unit="s"),
        Row("4 disks: export.stop", median(timings["stop"]), unit="s"),
        Row("4 disks: snapshot.delete", median(timings["delete"]), unit="s"),
        Row("4 disks: create + start + stop + delete", median(total), unit="s"),
        Row("4 disks: held-I/O window", median(timings["window"]), unit="s", target="< 20 ms"),
    ]


def _reconcile_ms(daemon: Daemon, vm: Vm, rounds: int) -> float:
    """Restart QEMU ``rounds`` times; the median reconcile the daemon logged."""
    found: list[float] = []
    for _ in range(rounds):
        seen = len(re.findall(r"reconciled with QEMU in", daemon.log()))
        vm.stop()  # quit: QEMU stores the bitmaps in the images
        vm.start()
        deadline = time.monotonic() + 60
        while len(matches := re.findall(r"reconciled with QEMU in ([0-9.]+) ms",
                                        daemon.log())) <= seen:
            if time.monotonic() > deadline:
                raise TimeoutError("no reconcile logged")
            time.sleep(0.05)
        found.append(float(matches[-1]))
    return median(found)


def restart(checkpoints: int, rounds: int) -> list[Row]:
    with domain(DISKS) as (vm, daemon):
        empty = _reconcile_ms(daemon, vm, rounds)
        with daemon.client() as c:
            deadline = time.monotonic() + 20
            while c.domain_list()[0]["state"] != "running":
                if time.monotonic() > deadline:
                    raise TimeoutError("not running")
                time.sleep(0.05)
            for i in range(checkpoints):
                c.snapshot_create("bench", SNAP.format(f"cp{i}"), checkpoint=True)
                c.snapshot_delete("bench", f"cp{i}")
        full = _reconcile_ms(daemon, vm, rounds)
        with daemon.client() as c:
            states = {c.call("checkpoint.lookup", domain="bench", name=f"cp{i}")["state"]
                      for i in range(checkpoints)}
        assert states == {"valid"}, states
    return [Row(f"reconcile after a VM restart, {checkpoints} checkpoints x 4 disks",
                full / 1e3, empty / 1e3, peer_name="no checkpoints", target="< 2 s")]


def run(repeat: int = 15, checkpoints: int = 100) -> list[Row]:
    return control_path(repeat) + restart(checkpoints, 3)


if __name__ == "__main__":
    sys.exit(cli(run, int, int))
