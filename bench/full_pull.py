"""Benchmark: a full backup's pull against the copiers users would otherwise run.

For each SIZE (default 1 and 4 GiB), one VM with one disk of that size whose
every fifth 8 MiB run holds no data and the rest does (80% allocated). Each
of REPEAT rounds (default 7) runs, onto this machine's disk and onto a tmpfs
(so the disk's noise is told apart from the copiers' own), one after the
other, in alternating order:

- ours: ``bbctl backup --level full`` end to end (snapshot, export, pull into
  a qcow2, flush, checksum, teardown), as a user runs it;
- ``nbdcopy --flush`` from the same kind of export (a snapshot of that disk,
  exported by the daemon) into a local file, flushed;
- the same with its setup timed too, as a user would run it:
  ``bbctl snapshot create --export``, ``nbdcopy --flush``, ``bbctl snapshot
  delete`` (bbctl backup's own setup and teardown are in its time).

At the largest size, onto the disk only, also:

- ``qemu-img convert -W -m 8 -t writeback -O qcow2`` from the same kind of
  export (writeback: it flushes the file when done);
- ``cp --sparse=always`` of the image file then ``sync`` of the copy: what
  this machine's disk allows.

Every copier here ends with its data on disk (or in the tmpfs), as a backup
must; without the flush the peers finish while the data is still in the page
cache. A row's ratio is the median of the rounds' ratios ours/peer (each pair
timed back to back, so a machine busy with other work moves both), with
their spread (min-max) over the rounds.

Run: ``make bench`` or ``.venv/bin/python -m bench.full_pull [SIZES_GIB] [REPEAT]``
(sizes comma-separated, e.g. ``1,4``).
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.common import GiB, Row, bbctl, cli, domain, gib, installed_env, spread, timed
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


def sizes(text: str) -> tuple[int, ...]:
    """Disk sizes in GiB, comma-separated (fractions allowed)."""
    return tuple(gib(t) for t in text.split(","))


def _ours(daemon_socket: Path, name: str, dest: Path, peak_rss: list[float]) -> float:
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _BBCTL_WITH_RSS, "--socket", str(daemon_socket),
                        "backup", name, "--dest", str(dest), "--level", "full"],
                       check=True, capture_output=True, text=True, env=installed_env())
    elapsed = time.perf_counter() - start
    peak_rss.append(int(r.stderr.split("MAXRSS")[1].split()[0]) / 1024)
    shutil.rmtree(dest)
    return elapsed


def _pull_size(size: int, repeat: int, peers: bool) -> list[Row]:
    """The rows of one disk size (``peers``: also qemu-img and cp, onto the disk)."""
    times: dict[tuple[str, str], list[float]] = {}
    peak_rss: list[float] = []
    filled: list[int] = []
    targets = ("disk", "tmpfs")
    with domain({"sda": size}, lambda vm: filled.append(fill(vm.image("sda"), size))) \
            as (vm, daemon), daemon.client() as c:
        tmpfs = vm.workdir / "tmpfs"
        tmpfs.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6g", "tmpfs", str(tmpfs)],
                       check=True)
        try:
            for i in range(repeat):
                for target in targets:
                    where = vm.workdir if target == "disk" else tmpfs
                    out = where / "peer.out"

                    def ours(where: Path = where) -> float:
                        return _ours(daemon.socket, vm.name, where / "ours", peak_rss)

                    def peer(argv: list[str], out: Path = out) -> float:
                        """Time one copier reading an export of a fresh snapshot."""
                        c.snapshot_create(vm.name, "<domainblocksnapshot><name>peer</name>"
                                                   "</domainblocksnapshot>")
                        try:
                            started = c.export_start(
                                vm.name, '<domainblockexport type="nbd">'
                                '<disk name="sda" snapshot="peer"/></domainblockexport>')
                            uri = (f"nbd+unix:///{started['exports'][0]['name']}"
                                   f"?socket={started['server']['socket']}")
                            took = timed(lambda: subprocess.run(
                                [a.replace("URI", uri) for a in argv] + [str(out)], check=True))
                            out.unlink()
                        finally:
                            c.snapshot_delete(vm.name, "peer")
                        return took

                    def setup_too(out: Path = out) -> float:
                        """nbdcopy between bbctl snapshot create --export and delete."""
                        env = installed_env()
                        start = time.perf_counter()
                        made = json.loads(subprocess.run(
                            [*bbctl(daemon), "--json", "snapshot", "create", vm.name,
                             "--name", "peer2", "--disk", "sda", "--export"],
                            check=True, capture_output=True, text=True, env=env).stdout)
                        export = made["export"]
                        uri = (f"nbd+unix:///{export['exports'][0]['name']}"
                               f"?socket={export['server']['socket']}")
                        subprocess.run(["nbdcopy", "--flush", uri, str(out)], check=True)
                        subprocess.run([*bbctl(daemon), "snapshot", "delete", vm.name, "peer2"],
                                       check=True, capture_output=True, env=env)
                        took = time.perf_counter() - start
                        out.unlink()
                        return took

                    runs: list[tuple[str, Callable[[], float]]] = [
                        ("ours", ours),
                        ("nbdcopy", lambda: peer(["nbdcopy", "--flush", "URI"])),
                        ("nbdcopy+setup", setup_too)]
                    if i % 2:
                        runs.reverse()
                    if peers and target == "disk":
                        runs.append(("qemu-img", lambda: peer(
                            ["qemu-img", "convert", "-W", "-m", "8", "-t", "writeback",
                             "-f", "raw", "-O", "qcow2", "URI"])))

                        def cp(out: Path = out) -> float:
                            """The image copied and synced, then removed (untimed)."""
                            took = timed(lambda: (
                                subprocess.run(["cp", "--sparse=always", str(vm.image("sda")),
                                                str(out)], check=True),
                                subprocess.run(["sync", str(out)], check=True)))
                            out.unlink()
                            return took

                        runs.append(("cp", cp))
                    for who, action in runs:
                        times.setdefault((target, who), []).append(action())
                print(f"  {size / GiB:g} GiB round {i}: " + ", ".join(
                    f"{t} {who} {v[-1]:.2f} s" for (t, who), v in times.items()), flush=True)
        finally:
            subprocess.run(["umount", str(tmpfs)], check=False)
    mib = filled[0] / MiB
    rows = []
    for target in targets:
        ours_t = times[(target, "ours")]
        for who, name in (("nbdcopy", "nbdcopy --flush"),
                          ("nbdcopy+setup", "bbctl snapshot create --export + nbdcopy --flush"
                                            " + bbctl snapshot delete"),
                          ("qemu-img", "qemu-img convert"), ("cp", "cp + sync")):
            if (target, who) not in times:
                continue
            theirs = times[(target, who)]
            ratios = [a / b for a, b in zip(ours_t, theirs, strict=True)]
            what = {"nbdcopy": "", "nbdcopy+setup": ", vs nbdcopy with its setup timed",
                    "qemu-img": ", vs qemu-img convert -W -m 8",
                    "cp": ", vs cp + sync of the image (the disk's limit)"}[who]
            rows.append(Row(
                f"full backup, {size / GiB:g} GiB disk, {mib:.0f} MiB data, onto "
                f"{'the disk' if target == 'disk' else 'a tmpfs'}{what} "
                f"(ours {spread(ours_t, '.2f')} s, {who} {spread(theirs, '.2f')} s; "
                f"{len(ratios)} rounds)",
                statistics.median(ours_t), statistics.median(theirs), peer_name=name,
                target="<= 1.0" if who == "nbdcopy" else "", ratios=ratios))
    rows.append(Row(f"bbctl peak RSS during the {size / GiB:g} GiB pull", max(peak_rss),
                    unit="MiB", target="bounded"))
    return rows


def run(sizes: tuple[int, ...] = (1 * GiB, 4 * GiB), repeat: int = 7) -> list[Row]:
    rows: list[Row] = []
    for size in sizes:
        rows += _pull_size(size, repeat, peers=size == max(sizes))
    return rows


if __name__ == "__main__":
    sys.exit(cli(run, sizes, int))
