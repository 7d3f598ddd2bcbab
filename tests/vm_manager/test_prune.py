"""``bbctl prune DIR --keep N``: the N newest restore points stay, each one
restoring exactly what the guest had then; the older ones are merged into a
synthetic full; Ctrl-C leaves the directory as it was."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import bbctl
from tests.test_backup import interrupt_at
from tests.vm_manager.test_backup_levels import assert_restores, backup, manifest, references
from tools.daemon import Daemon
from tools.vm import MiB, Vm

KiB = 1024


def five_backups(daemon: Daemon, vm: Vm, dest: Path,
                 workdir: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Path]]]:
    """A full and four incrementals, the guest writing between them; the
    disks as they were at each, for comparison."""
    records, refs = [], {}
    for i in range(5):
        vm.write("sda", i * MiB, 256 * KiB, 0x10 + i)
        vm.write("sdb", (i % 2) * MiB, 64 * KiB, 0x20 + i)
        if i == 3:
            vm.zero("sda", 0, 256 * KiB)  # the first backup's data, gone since
        record, _ = backup(daemon, dest)
        records.append(record)
        refs[record["id"]] = references(vm, record["disks"], workdir, record["id"])
    return records, refs


def test_prune_keeps_the_newest_points_exact(defined: tuple[Daemon, Vm], workdir: Path) -> None:
    daemon, vm = defined
    dest = workdir / "b"
    records, refs = five_backups(daemon, vm, dest, workdir)
    before = sum(p.stat().st_blocks * 512 for p in dest.glob("*.qcow2"))
    r = bbctl(daemon, "--json", "prune", str(dest), "--keep", "2")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    ids = [b["id"] for b in records]
    assert (result["kept"], result["dropped"]) == (ids[3:], ids[:3])
    assert result["merged"] == {"sda": f"{ids[3]}-sda.qcow2", "sdb": f"{ids[3]}-sdb.qcow2"}
    after = manifest(dest)["backups"]
    assert [b["id"] for b in after] == ids[3:]
    assert [b["level"] for b in after] == ["full", "inc"]
    for disk in ("sda", "sdb"):
        entry = after[0]["disks"][disk]
        assert (entry["level"], entry["backing"], entry["base"]) == ("full", None, None)
        assert entry["reason"] == f"synthetic full: {', '.join(ids[:3])} merged by prune"
        assert after[1]["disks"][disk]["backing"] == entry["file"]
    # Only the kept files are left; every kept point restores what the guest had.
    assert sorted(p.name for p in dest.glob("*.qcow2")) == sorted(
        f"{i}-{d}.qcow2" for i in ids[3:] for d in ("sda", "sdb"))
    assert result["freed"] > 0
    assert sum(p.stat().st_blocks * 512 for p in dest.glob("*.qcow2")) < before
    assert_restores(daemon, dest, workdir, {i: refs[i] for i in ids[3:]})
    for p in dest.glob("*.qcow2"):
        assert subprocess.run(["qemu-img", "check", "-q", str(p)]).returncode == 0
    # The chain goes on: the next backup is incremental from the newest.
    vm.write("sda", 10 * MiB, 64 * KiB, 0x77)
    record, _ = backup(daemon, dest)
    assert record["level"] == "inc"
    refs[record["id"]] = references(vm, record["disks"], workdir, record["id"])
    assert_restores(daemon, dest, workdir, {i: refs[i] for i in [*ids[3:], record["id"]]})
    # Pruning down to the newest point alone makes it a full of its own.
    r = bbctl(daemon, "prune", str(dest), "--keep", "1")
    assert r.returncode == 0 and r.stdout.startswith("pruned 2 backup(s), kept 1;"), r.stderr
    assert_restores(daemon, dest, workdir, {record["id"]: refs[record["id"]]})
    r = bbctl(daemon, "prune", str(dest), "--keep", "1")
    assert (r.returncode, r.stdout) == (0, "nothing to prune: 1 backup(s), --keep 1\n")


def test_ctrl_c_while_merging_leaves_the_directory_as_it_was(defined: tuple[Daemon, Vm],
                                                               workdir: Path) -> None:
    daemon, vm = defined
    dest = workdir / "b"
    records, refs = five_backups(daemon, vm, dest, workdir)
    saved = (dest / "manifest.json").read_bytes()
    files = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    # Beside its daemon: prune asks it which backups instant recoveries read.
    said = interrupt_at(["--socket", str(daemon.socket), "prune", str(dest), "--keep", "2"],
                        "prune-merged")
    assert said == [f"bbctl: sda: {records[3]['id']}-sda.qcow2 is now a full "
                    "(3 older file(s) merged)"]
    assert (dest / "manifest.json").read_bytes() == saved
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == files  # no temporary
    assert_restores(daemon, dest, workdir, refs)


def test_prune_refuses_to_drop_a_disks_last_backup(defined: tuple[Daemon, Vm],
                                                   workdir: Path) -> None:
    daemon, vm = defined
    dest = workdir / "b"
    vm.write("sda", 0, 64 * KiB, 0x11)
    first, _ = backup(daemon, dest)
    backup(daemon, dest, "--disk", "sda")
    saved = (dest / "manifest.json").read_bytes()
    r = bbctl(daemon, "prune", str(dest), "--keep", "1")
    assert r.returncode == 1
    assert r.stderr == (f"bbctl: error: disk sdb's newest backup is {first['id']}, older than "
                        "the 1 kept: back it up again first, or keep more\n")
    assert (dest / "manifest.json").read_bytes() == saved
    r = bbctl(daemon, "prune", str(dest), "--keep", "0")
    assert r.returncode == 1 and "--keep must be at least 1" in r.stderr
