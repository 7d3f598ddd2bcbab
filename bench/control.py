"""Benchmark: the control path and reconciling after a restart.

1. A running VM with 4 disks: REPEAT rounds of ``snapshot.create`` +
   ``export.start`` + ``export.stop`` + ``snapshot.delete`` as a client sees
   them, and the held-I/O window the daemon records (target < 20 ms).
2. The same VM with CHECKPOINTS (default 100) checkpoints on each disk, made
   through the daemon: QEMU quit and started again, the daemon's reconcile
   (intents, every bitmap against the store), as it logs it (target < 2 s);
   the peer is the same reconcile with no checkpoint.
3. ``bbctl domain list`` as a user runs it (a new process, start-up
   included, against the daemon of a running VM) STARTS times, against the
   floor: the same Python starting and doing nothing (``python -c pass``),
   and against ``virsh list --all`` if virsh is installed (libvirtd's
   ``qemu:///system`` if it answers, else libvirt's in-process test driver:
   virsh's start-up without a daemon). In turn, round by round; medians.
   Bytecode is cached (in a private directory) as in an installed package,
   whatever PYTHONDONTWRITEBYTECODE says.

Run: ``.venv/bin/python -m bench.control [REPEAT] [CHECKPOINTS] [STARTS]``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import Row, cli, domain, installed_env, median
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


def _virsh() -> tuple[list[str], str] | None:
    """``virsh list --all`` and what it talks to, or None without virsh."""
    if shutil.which("virsh") is None:
        return None
    for uri, what in (("qemu:///system", "libvirtd"),
                      ("test:///default", "test driver, no daemon")):
        argv = ["virsh", "-c", uri, "list", "--all"]
        if subprocess.run(argv, capture_output=True, timeout=30).returncode == 0:
            return argv, what
    return None


def bbctl_start(starts: int) -> list[Row]:
    script = Path(sys.executable).parent / "bbctl"
    bbctl = [str(script)] if script.exists() else [sys.executable, "-m",
                                                    "blockbackup_client.bbctl"]
    virsh = _virsh()
    with domain({"sda": 16 * MiB}) as (_, daemon):
        env = installed_env()
        commands = {"bbctl": [*bbctl, "--socket", str(daemon.socket), "domain", "list"],
                    "floor": [sys.executable, "-c", "pass"]}
        if virsh is not None:
            commands["virsh"] = virsh[0]
        timings: dict[str, list[float]] = {k: [] for k in commands}
        for argv in commands.values():  # warm-up: bytecode, page cache
            subprocess.run(argv, check=True, capture_output=True, env=env)
        listed = subprocess.run(commands["bbctl"], check=True, capture_output=True, text=True,
                                env=env).stdout
        assert "bench" in listed.split(), listed
        for _ in range(starts):
            for name, argv in commands.items():
                start = time.perf_counter()
                subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
                timings[name].append(time.perf_counter() - start)
    rows = [Row("bbctl domain list, a new process end to end", median(timings["bbctl"]),
                median(timings["floor"]), peer_name="python -c pass: the floor")]
    if virsh is not None:
        rows.append(Row("the same, against virsh list --all", median(timings["bbctl"]),
                        median(timings["virsh"]), peer_name=f"virsh, {virsh[1]}"))
    return rows


def run(repeat: int = 15, checkpoints: int = 100, starts: int = 30) -> list[Row]:
    return control_path(repeat) + restart(checkpoints, 3) + bbctl_start(starts)


if __name__ == "__main__":
    sys.exit(cli(run, int, int, int))
