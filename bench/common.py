"""Shared pieces of the benchmarks: a VM with a daemon that knows it, timing,
bbctl as a user runs it, and the rows of the summary table."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.daemon import Daemon, defined_domain
from tools.vm import MiB, Vm

GiB = 1024 * MiB


@dataclass
class Row:
    """One line of the table ``make bench`` prints."""

    figure: str
    ours: float
    peer: float | None = None
    unit: str = "s"
    peer_name: str = ""
    target: str = ""
    #: Same-run ratios ours/peer, one per round: the ratio is then their median.
    ratios: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if self.ratios:
            return statistics.median(self.ratios)
        return None if not self.peer else self.ours / self.peer


def spread(values: list[float], fmt: str) -> str:
    """A median with its min-max: ``1.23 (1.10-1.40)``."""
    return (f"{format(statistics.median(values), fmt)} "
            f"({format(min(values), fmt)}-{format(max(values), fmt)})")


def gib(text: str) -> int:
    """A size given in GiB on the command line (fractions allowed)."""
    return int(float(text) * GiB)


def cli(run: Callable[..., list[Row]], *casts: Callable[[str], object]) -> int:
    """Run one benchmark from the command line: positional arguments, cast in
    order, replace ``run``'s defaults; print its rows."""
    args = [cast(arg) for cast, arg in zip(casts, sys.argv[1:], strict=False)]
    for row in run(*args):
        print(row)
    return 0


def timed(action: Callable[[], object]) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


@contextmanager
def domain(disks: dict[str, int], prepare: Callable[[Vm], None] | None = None,
           **daemon_keys: Any) -> Iterator[tuple[Vm, Daemon]]:
    """A running VM named "bench", defined in a running daemon, under /var/tmp
    (a disk, not a tmpfs: the benchmarks measure it)."""
    with defined_domain(disks, "bench", workdir_base="/var/tmp", prefix="bb-bench-",
                        prepare=prepare, log_level="info", **daemon_keys) as pair:
        yield pair


_pycache: list[str] = []


def installed_env() -> dict[str, str]:
    """The environment to run bbctl in as an installed package runs: its
    bytecode compiled once and then read from a cache (a private directory,
    removed at exit), whatever PYTHONDONTWRITEBYTECODE says (else every
    start compiles every module it imports: 20 ms more for a backup)."""
    if not _pycache:
        _pycache.append(tempfile.mkdtemp(prefix="bb-bench-pyc-"))
        atexit.register(shutil.rmtree, _pycache[0], True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = _pycache[0]
    return env


def define_running(daemon: Daemon, name: str, qmp_socket: Path, timeout: float = 20) -> None:
    """Define a domain in the daemon and wait until it is connected and running.

    :raise TimeoutError: it was not running within ``timeout`` seconds.
    """
    with daemon.client() as c:
        c.domain_define(name, str(qmp_socket))
        deadline = time.monotonic() + timeout
        while next(d for d in c.domain_list() if d["name"] == name)["state"] != "running":
            if time.monotonic() > deadline:
                raise TimeoutError("the daemon did not reach the VM")
            time.sleep(0.05)


def bbctl(daemon: Daemon) -> list[str]:
    """bbctl talking to this daemon, as a new process (run it with installed_env())."""
    return [sys.executable, "-m", "blockbackup_client.bbctl", "--socket", str(daemon.socket)]


def bbctl_backup(daemon: Daemon, vm: Vm, dest: Path, level: str) -> tuple[float, dict[str, Any]]:
    """``bbctl --json backup``: seconds end to end and the manifest record."""
    argv = [*bbctl(daemon), "--json", "backup", vm.name, "--dest", str(dest), "--level", level]
    start = time.perf_counter()
    out = subprocess.run(argv, check=True, capture_output=True, text=True,
                         env=installed_env()).stdout
    return time.perf_counter() - start, json.loads(out)


def qemu_io(image: Path, commands: list[str]) -> None:
    """Write into an image before QEMU opens it (fast: no guest, no QMP)."""
    args = []
    for c in commands:
        args += ["-c", c]
    subprocess.run(["qemu-io", "-f", "qcow2", *args, str(image)], check=True,
                   capture_output=True)
