"""The VM manager changes a disk's chain while checkpoints exist: every
change set stays exact, or the checkpoint is broken with a reason and the
next backup of that disk is a full one. Never a short answer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from blockbackup_client import CheckpointBroken
from blockbackup_client.client import Client
from tests.conftest import snapshot_xml, wait_for
from tests.vm_manager.manager import (
    active_commit,
    assert_restore_equals_live,
    backup,
    disk_level,
    image_node,
    mirror,
    overlay,
    runs,
    stream,
    wait_job,
    write,
)
from tools.daemon import Daemon
from tools.vm import Vm

#: Pulls of a small disk in a row: the daemon's reaction to each new job
#: met its conclusion often enough to kill QEMU within these, before the
#: reaction read without the node list.
PULLS = 25


def changes(c: Client, name: str, disk: str = "sda") -> list[list[int]]:
    result = c.call("checkpoint.changes", domain="vm1", disk=disk, name=name)
    return list(result["extents"])


def test_overlay_with_bitmap_copy_continues_the_chain(defined: tuple[Daemon, Vm],
                                                      workdir: Path) -> None:
    """libvirt's external snapshot: the change set spans both images."""
    daemon, vm = defined
    dest = workdir / "b"
    write(vm, "sda", 1)
    first = backup(daemon, dest, "--level", "full")
    write(vm, "sda", 3, 4)          # W1, into the base image
    ovl = overlay(vm, "sda", "ovl1", copy_bitmaps=True)
    write(vm, "sda", 10)            # W2, into the overlay
    write(vm, "sdb", 7)
    with daemon.client() as c:
        assert changes(c, first["id"]) == runs({3, 4, 10})
        assert changes(c, first["id"], "sdb") == runs({7})
        info = c.call("checkpoint.lookup", domain="vm1", name=first["id"])
        assert info["state"] == "valid", info
    second = backup(daemon, dest, "--level", "auto")
    assert disk_level(second, "sda") == "inc" and disk_level(second, "sdb") == "inc"
    # Exactly W1 and W2 were read, and restores equal the live disks.
    assert second["disks"]["sda"]["bytes_read"] == 3 * 64 * 1024
    for disk in ("sda", "sdb"):
        assert_restore_equals_live(daemon, vm, dest, disk)
    # Another overlay, then a third backup: still incremental and exact.
    write(vm, "sda", 20)
    overlay(vm, "sda", "ovl2", copy_bitmaps=True)
    write(vm, "sda", 21)
    with daemon.client() as c:
        assert changes(c, second["id"]) == runs({20, 21})
        # The first backup's checkpoint went with the second backup: no next
        # backup of this directory needs it.
        assert c.call("checkpoint.list", domain="vm1") == [second["id"]]
    third = backup(daemon, dest, "--level", "inc")
    assert disk_level(third, "sda") == "inc"
    assert_restore_equals_live(daemon, vm, dest, "sda")
    assert ovl.exists()


def test_overlay_without_bitmap_breaks_with_reason(defined: tuple[Daemon, Vm],
                                                   workdir: Path) -> None:
    """A bare blockdev-snapshot: the writes to the overlay went unrecorded."""
    daemon, vm = defined
    dest = workdir / "b"
    first = backup(daemon, dest, "--level", "full")
    write(vm, "sda", 3)
    ovl = overlay(vm, "sda", "ovl1", copy_bitmaps=False)
    write(vm, "sda", 10)
    with daemon.client() as c:
        events = c.call("events.subscribe", domains=["vm1"])
        assert events == {}
        with pytest.raises(CheckpointBroken) as err:
            changes(c, first["id"])
        assert str(ovl) in err.value.message
        info = c.call("checkpoint.lookup", domain="vm1", name=first["id"])
        assert info["state"] == "broken" and str(ovl) in info["reason"]
        assert "sda" in info["broken_disks"] and "sdb" not in info["broken_disks"]
        # sdb is untouched and stays exact.
        write(vm, "sdb", 5)
        assert changes(c, first["id"], "sdb") == runs({5})
    second = backup(daemon, dest, "--level", "auto")
    assert disk_level(second, "sda") == "full"
    assert str(ovl) in second["stderr"]
    assert disk_level(second, "sdb") == "inc"
    for disk in ("sda", "sdb"):
        assert_restore_equals_live(daemon, vm, dest, disk)
    # The full started a fresh chain on sda, in the overlay.
    write(vm, "sda", 11)
    with daemon.client() as c:
        assert changes(c, second["id"]) == runs({11})


def test_active_commit_stays_exact(defined: tuple[Daemon, Vm], workdir: Path) -> None:
    daemon, vm = defined
    dest = workdir / "b"
    first = backup(daemon, dest, "--level", "full")
    write(vm, "sda", 2)
    overlay(vm, "sda", "ovl1", copy_bitmaps=True)
    write(vm, "sda", 6, 7)
    active_commit(vm, "sda")
    write(vm, "sda", 9)
    with daemon.client() as c:
        assert changes(c, first["id"]) == runs({2, 6, 7, 9})
    second = backup(daemon, dest, "--level", "inc")
    assert disk_level(second, "sda") == "inc"
    assert_restore_equals_live(daemon, vm, dest, "sda")


def test_commit_of_a_bare_overlay_unseen_stays_exact(defined: tuple[Daemon, Vm],
                                                     workdir: Path) -> None:
    """Overlay without bitmaps, committed before anyone asked: the commit wrote
    its data through the base image, whose bitmap recorded it."""
    daemon, vm = defined
    dest = workdir / "b"
    first = backup(daemon, dest, "--level", "full")
    overlay(vm, "sda", "ovl1", copy_bitmaps=False)
    write(vm, "sda", 4, 5)
    active_commit(vm, "sda")
    with daemon.client() as c:
        assert changes(c, first["id"]) == runs({4, 5})
    backup(daemon, dest, "--level", "inc")
    assert_restore_equals_live(daemon, vm, dest, "sda")


def test_mirror_pivot_breaks_and_auto_takes_a_full(defined: tuple[Daemon, Vm],
                                                   workdir: Path) -> None:
    daemon, vm = defined
    dest = workdir / "b"
    write(vm, "sda", 1)
    first = backup(daemon, dest, "--level", "full")
    write(vm, "sda", 2)
    target = mirror(vm, "sda", "moved")
    write(vm, "sda", 3)
    with daemon.client() as c:
        with pytest.raises(CheckpointBroken) as err:
            changes(c, first["id"])
        assert "replaced" in err.value.message and str(target) in err.value.message
    second = backup(daemon, dest, "--level", "auto")
    assert disk_level(second, "sda") == "full" and disk_level(second, "sdb") == "inc"
    assert_restore_equals_live(daemon, vm, dest, "sda")
    write(vm, "sda", 8)
    third = backup(daemon, dest, "--level", "inc")
    assert third["disks"]["sda"]["bytes_read"] == 64 * 1024
    assert_restore_equals_live(daemon, vm, dest, "sda")


def test_stream_keeps_a_checkpoint_of_the_top_exact(defined: tuple[Daemon, Vm],
                                                    workdir: Path) -> None:
    """Checkpoints made while the overlay is the top live in it alone: a
    stream that pulls the images below into it changes nothing they hold."""
    daemon, vm = defined
    dest = workdir / "b"
    write(vm, "sda", 1)
    overlay(vm, "sda", "ovl1", copy_bitmaps=False)
    write(vm, "sda", 2)
    overlay(vm, "sda", "ovl2", copy_bitmaps=False)
    first = backup(daemon, dest, "--level", "full")
    write(vm, "sda", 3)
    stream(vm, "sda")
    write(vm, "sda", 4)
    with daemon.client() as c:
        assert changes(c, first["id"]) == runs({3, 4})
    second = backup(daemon, dest, "--level", "inc")
    assert disk_level(second, "sda") == "inc"
    assert_restore_equals_live(daemon, vm, dest, "sda")


def test_stream_of_images_holding_a_change_set_breaks_it(defined: tuple[Daemon, Vm],
                                                         workdir: Path) -> None:
    """libvirt-style overlays carry the checkpoint's bitmap; a stream drops one
    of them with the writes it recorded and copies its data up unrecorded:
    broken with the reason, never a short change set."""
    daemon, vm = defined
    dest = workdir / "b"
    first = backup(daemon, dest, "--level", "full")
    overlay(vm, "sda", "ovl1", copy_bitmaps=True)
    write(vm, "sda", 2)              # recorded only in ovl1's copy
    overlay(vm, "sda", "ovl2", copy_bitmaps=True)
    write(vm, "sda", 4)
    stream(vm, "sda")                # ovl1 leaves; its data is copied into ovl2
    with daemon.client() as c:
        with pytest.raises(CheckpointBroken) as err:
            changes(c, first["id"])
        assert "stream" in err.value.message
    second = backup(daemon, dest, "--level", "auto")
    assert disk_level(second, "sda") == "full"
    assert_restore_equals_live(daemon, vm, dest, "sda")


def test_stream_seen_by_a_check_before_it_breaks_it_too(defined: tuple[Daemon, Vm]) -> None:
    """The same, with the daemon having seen ovl1 hold the bitmap: the image
    that left the chain is named."""
    daemon, vm = defined
    with daemon.client() as c:
        c.snapshot_create("vm1", "<domainblocksnapshot><name>cp1</name>"
                          "</domainblocksnapshot>", checkpoint=True)
        c.snapshot_delete("vm1", "cp1")
        ovl1 = overlay(vm, "sda", "ovl1", copy_bitmaps=True)
        write(vm, "sda", 2)
        overlay(vm, "sda", "ovl2", copy_bitmaps=True)
        assert changes(c, "cp1") == runs({2})
        stream(vm, "sda")
        with pytest.raises(CheckpointBroken) as err:
            changes(c, "cp1")
        assert "stream" in err.value.message or str(ovl1) in err.value.message


def test_resize_keeps_change_sets_exact(defined: tuple[Daemon, Vm], workdir: Path) -> None:
    daemon, vm = defined
    dest = workdir / "b"
    write(vm, "sda", 1)
    first = backup(daemon, dest, "--level", "full")
    vm.qmp("block_resize", **{"node-name": "sda-fmt", "size": 80 * 1024 * 1024})
    vm.disks["sda"] = 80 * 1024 * 1024
    write(vm, "sda", 2, 1100)        # cluster 1100 lies in the new 16 MiB
    with daemon.client() as c:
        assert changes(c, first["id"]) == runs({2, 1100})
    second = backup(daemon, dest, "--level", "auto")
    assert second["disks"]["sda"]["size"] == 80 * 1024 * 1024
    assert_restore_equals_live(daemon, vm, dest, "sda")


def test_commit_of_an_image_below_the_top(defined: tuple[Daemon, Vm], workdir: Path) -> None:
    """A commit that is not active: the middle image goes into its backing.
    The daemon saw the middle image hold part of the change set and cannot
    tell a commit from a stream afterwards, so it says broken: a full backup
    with the reason, and the restore equals the disk."""
    daemon, vm = defined
    dest = workdir / "b"
    first = backup(daemon, dest, "--level", "full")
    overlay(vm, "sda", "ovl1", copy_bitmaps=True)
    write(vm, "sda", 2)
    overlay(vm, "sda", "ovl2", copy_bitmaps=True)
    write(vm, "sda", 4)
    with daemon.client() as c:
        assert changes(c, first["id"]) == runs({2, 4})
    vm.qmp("block-commit", **{"job-id": "commit", "device": "ovl2", "top-node": "ovl1",
                              "base-node": "sda-fmt"})
    wait_job(vm, "commit", ready=False)
    vm.qmp("blockdev-del", **{"node-name": "ovl1"})
    vm.qmp("blockdev-del", **{"node-name": "ovl1-file"})
    write(vm, "sda", 6)
    with daemon.client() as c:
        try:
            assert changes(c, first["id"]) == runs({2, 4, 6})
            exact = True
        except CheckpointBroken as err:
            assert "ovl1" in err.message
            exact = False
    second = backup(daemon, dest, "--level", "auto")
    assert disk_level(second, "sda") == ("inc" if exact else "full")
    assert_restore_equals_live(daemon, vm, dest, "sda")


def test_the_managers_pulls_of_a_small_disk_keep_qemu_alive_beside_a_snapshot(
        defined: tuple[Daemon, Vm]) -> None:
    """A pull with nothing to copy concludes within milliseconds of its
    start, when the daemon reacts to the new job (a live snapshot makes it
    look). While such a job is concluded, not yet dismissed, QEMU 7.2 and
    10.0 die on query-named-block-nodes: the reaction reads without it.
    Like libvirt, the test dismisses each pull once it sees it concluded."""
    daemon, vm = defined
    with daemon.client() as c:
        c.snapshot_create("vm1", snapshot_xml("pit", {"sdb": None}))
        for i in range(PULLS):
            overlay(vm, "sda", f"o{i}", copy_bitmaps=False)
            top = image_node(vm, "sda")
            graph = vm.qmp("x-debug-query-block-graph")
            names = {n["id"]: n["name"] for n in graph["nodes"]}
            child = {(names[e["parent"]], e["name"]): names[e["child"]] for e in graph["edges"]}
            backing = child[(top, "backing")]  # the image the pull takes out of the chain
            vm.qmp("block-stream", **{"job-id": f"pull{i}", "device": top,
                                      "auto-dismiss": False})
            wait_for(lambda: vm.qmp("query-jobs")[0]["status"] == "concluded",
                     what=f"pull {i} concluded", interval=0.005)
            vm.qmp("job-dismiss", id=f"pull{i}")
            # As libvirt deletes it:
            vm.qmp("blockdev-del", **{"node-name": backing})
            vm.qmp("blockdev-del", **{"node-name": child[(backing, "file")]})
            assert vm.running, f"QEMU died at pull {i}: {vm.stdout_path.read_text()[-2000:]}"
        time.sleep(0.3)  # the daemon's reaction to the last pull has run
        assert vm.running
        assert c.snapshot_lookup("vm1", "pit")["state"] == "active"
        c.snapshot_delete("vm1", "pit")
    assert vm.qmp("query-jobs") == []
