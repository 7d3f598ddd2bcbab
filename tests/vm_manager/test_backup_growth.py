"""Bounded growth: bbctl keeps only the checkpoints a directory's next backup
needs, so the images do not gather one persistent bitmap per backup forever
(QEMU holds every one of them in memory), and never touches another
directory's chain."""

from __future__ import annotations

import json
from pathlib import Path

from tests.test_checkpoints import checkpoint_of
from tests.vm_manager.manager import assert_restore_equals_live, backup
from tools.daemon import Daemon
from tools.vm import MiB, Vm

KiB = 1024


def our_bitmaps(vm: Vm, disk: str) -> list[str]:
    node = next(n for n in vm.qmp("query-named-block-nodes", flat=True)
                if n["node-name"] == f"{disk}-fmt")
    return sorted(checkpoint_of(b["name"]) for b in node.get("dirty-bitmaps", []) if "name" in b)


def checkpoints(daemon: Daemon) -> list[str]:
    with daemon.client() as c:
        return list(c.call("checkpoint.list", domain="vm1"))


def test_fifty_backups_keep_two_bitmaps_per_disk_and_another_chain_stays_exact(
        defined: tuple[Daemon, Vm], workdir: Path) -> None:
    daemon, vm = defined
    mine, other = workdir / "mine", workdir / "other"
    others: list[dict[str, object]] = []
    for i in range(50):
        vm.write("sda", (i % 48) * MiB, 64 * KiB, 1 + i)
        vm.write("sdb", (i % 32) * MiB + 128 * KiB, 4 * KiB, 101 + i)
        record = backup(daemon, mine)
        assert record["level"] == ("full" if i == 0 else "inc"), (i, record["stderr"])
        if i % 10 == 4:  # another backup application's chain, now and then
            others.append(backup(daemon, other))
            assert others[-1]["level"] == ("full" if len(others) == 1 else "inc")
            for disk in ("sda", "sdb"):
                assert_restore_equals_live(daemon, vm, other, disk)
        # The newest checkpoint of each directory, nothing else.
        newest = {record["id"], *([others[-1]["id"]] if others else [])}
        assert set(checkpoints(daemon)) == newest, i
        for disk in ("sda", "sdb"):
            assert set(our_bitmaps(vm, disk)) == newest, (i, disk)
    for disk in ("sda", "sdb"):
        assert_restore_equals_live(daemon, vm, mine, disk)
    manifest = json.loads((mine / "manifest.json").read_text())
    assert [b.get("checkpoint_deleted", False) for b in manifest["backups"]] == \
        [True] * 49 + [False]
    # The other directory's chain is still incremental after all that.
    last = backup(daemon, other)
    assert last["level"] == "inc"
    for disk in ("sda", "sdb"):
        assert_restore_equals_live(daemon, vm, other, disk)


def test_a_disk_left_out_keeps_its_checkpoint(defined: tuple[Daemon, Vm],
                                              workdir: Path) -> None:
    """Each disk's newest backup is where its next incremental starts: a disk
    left out of the last backups keeps the checkpoint of the one that held it."""
    daemon, vm = defined
    dest = workdir / "b"
    vm.write("sda", 0, 64 * KiB, 0x11)
    vm.write("sdb", 0, 64 * KiB, 0x12)
    first = backup(daemon, dest)
    vm.write("sda", MiB, 64 * KiB, 0x21)
    second = backup(daemon, dest, "--disk", "sda")
    assert checkpoints(daemon) == [first["id"], second["id"]]
    vm.write("sda", 2 * MiB, 64 * KiB, 0x31)
    vm.write("sdb", 2 * MiB, 64 * KiB, 0x32)
    third = backup(daemon, dest, "--disk", "sda")
    assert checkpoints(daemon) == [first["id"], third["id"]]
    fourth = backup(daemon, dest)
    assert {d: e["level"] for d, e in fourth["disks"].items()} == {"sda": "inc", "sdb": "inc"}
    assert fourth["disks"]["sdb"]["base"] == first["id"]
    assert checkpoints(daemon) == [fourth["id"]]
    for disk in ("sda", "sdb"):
        assert_restore_equals_live(daemon, vm, dest, disk)
