"""bbctl backup when the VM manager changes things under it: per-disk levels
(a hot-added disk is full, the others incremental; a checkpoint broken on one
disk only; manifests from before per-disk levels), and faults that become
one line and leave nothing half-written (QEMU quitting or killed and the
daemon stopping mid-pull, the daemon down or refusing, the destination
full), with the failed backup's checkpoint deleted by the next run into the
same directory. Real QEMU, the real daemon, bbctl as a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import bbctl, domain_state, unmount, wait_for
from tests.test_backup import reference, same, wait_paused
from tools.daemon import Daemon
from tools.vm import MiB, Vm

KiB = 1024


# -- helpers -------------------------------------------------------------------------

def hot_add(vm: Vm, disk: str, size: int) -> None:
    """What a VM manager does to hot-plug a disk: an image, its nodes, a device."""
    image = vm.image(disk)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(size)],
                   check=True)
    vm.qmp("blockdev-add", driver="file", filename=str(image), **{"node-name": f"{disk}-file"})
    vm.qmp("blockdev-add", driver="qcow2", file=f"{disk}-file", **{"node-name": f"{disk}-fmt"})
    vm.qmp("device_add", driver="scsi-hd", drive=f"{disk}-fmt", id=disk)


def backup(daemon: Daemon, dest: Path, *args: str) -> tuple[dict[str, Any], list[str]]:
    """A successful ``bbctl --json backup``: its record and its stderr lines."""
    r = bbctl(daemon, "--json", "backup", "vm1", "--dest", str(dest), *args)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr.splitlines()


def references(vm: Vm, disks: Any, workdir: Path, tag: str) -> dict[str, Path]:
    """Copies of the live images, taken with the guest paused."""
    vm.qmp("stop")
    try:
        return {d: reference(vm, d, workdir / f"ref-{tag}-{d}.qcow2") for d in disks}
    finally:
        vm.qmp("cont")


def manifest(dest: Path) -> dict[str, Any]:
    return dict(json.loads((dest / "manifest.json").read_text()))


def checkpoints(daemon: Daemon) -> list[str]:
    with daemon.client() as c:
        return list(c.call("checkpoint.list", domain="vm1"))


def assert_restores(daemon: Daemon, dest: Path, workdir: Path,
                    refs: dict[str, dict[str, Path]]) -> None:
    """Every disk of every backup restores to what the guest had written then,
    and each file's backing chain is the one the manifest describes."""
    for backup_id, disks in refs.items():
        for disk, ref in disks.items():
            out = workdir / f"restored-{backup_id}-{disk}.qcow2"
            r = bbctl(daemon, "restore", str(dest), "--disk", disk, "--at", backup_id,
                      "--output", str(out))
            assert r.returncode == 0, r.stderr
            assert same(out, ref), (backup_id, disk)
            out.unlink()
    r = bbctl(daemon, "verify", str(dest))
    assert r.returncode == 0 and r.stdout == "all files match the manifest\n", r.stderr


def chain_length(dest: Path, file: str) -> int:
    out = subprocess.run(["qemu-img", "info", "--backing-chain", "--output=json",
                          str(dest / file)], capture_output=True, text=True, check=True).stdout
    return len(json.loads(out))


def one_error_line(stderr: str) -> str:
    """The failure said as bbctl must: no traceback, every line bbctl's own,
    exactly one of them the error; returns it."""
    assert "Traceback" not in stderr, repr(stderr)
    lines = stderr.splitlines()
    assert all(line.startswith("bbctl: ") for line in lines), repr(stderr)
    errors = [line for line in lines if line.startswith("bbctl: error: ")]
    assert len(errors) == 1, repr(stderr)
    return errors[0]


def start_paused(daemon: Daemon, dest: Path, hold: Path) -> subprocess.Popen[str]:
    """bbctl backup, held at its first progress report mid-pull while ``hold`` exists."""
    hold.touch()
    return subprocess.Popen(
        [sys.executable, "-m", "blockbackup_client.bbctl", "--socket", str(daemon.socket),
         "--json", "backup", "vm1", "--dest", str(dest), "--level", "auto"],
        env={**os.environ, "BBCTL_PAUSE_AT": "pull", "BBCTL_PAUSE_WHILE": str(hold)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def define(daemon: Daemon, vm: Vm) -> None:
    with daemon.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
    wait_for(lambda: domain_state(daemon, "vm1") == "running", what="vm1 running")


# -- per-disk levels -------------------------------------------------------------------

def test_hot_added_disk_is_full_the_others_incremental(defined: tuple[Daemon, Vm],
                                                       workdir: Path) -> None:
    daemon, vm = defined
    dest = workdir / "b"
    refs: dict[str, dict[str, Path]] = {}

    def point(record: dict[str, Any]) -> None:
        refs[record["id"]] = references(vm, record["disks"], workdir, record["id"])

    vm.write("sda", 0, MiB, 0x11)
    vm.write("sdb", 4 * MiB, 64 * KiB, 0x12)
    first, said = backup(daemon, dest)
    assert first["level"] == "full"
    assert said == [f"bbctl: {d}: full (no earlier backup in this directory)"
                    for d in ("sda", "sdb")]
    point(first)

    hot_add(vm, "sdc", 32 * MiB)
    vm.write("sda", 2 * MiB, 64 * KiB, 0x21)
    vm.write("sdb", 8 * MiB, 128 * KiB, 0x22)
    vm.write("sdc", 1 * MiB, 3 * MiB, 0x23)
    second, said = backup(daemon, dest, "--level", "auto")
    assert second["level"] == "mixed"
    assert said == [f"bbctl: sda: incremental from {first['id']}",
                    f"bbctl: sdb: incremental from {first['id']}",
                    "bbctl: sdc: full (new disk: no earlier backup of it)"]
    expected = {"sda": ("inc", None, first["id"], 64 * KiB),
                "sdb": ("inc", None, first["id"], 128 * KiB),
                "sdc": ("full", "new disk: no earlier backup of it", None, 3 * MiB)}
    for record in (second, manifest(dest)["backups"][1]):  # --json and the manifest
        assert {d: (e["level"], e["reason"], e["base"], e["bytes_read"])
                for d, e in record["disks"].items()} == expected
        assert record["disks"]["sda"]["backing"] == first["disks"]["sda"]["file"]
        assert record["disks"]["sdc"]["backing"] is None
    point(second)

    # The next one is incremental on every disk, sdc from the backup that first had it.
    vm.write("sdc", 0, 64 * KiB, 0x31)
    vm.zero("sdb", 8 * MiB, 64 * KiB)
    r = bbctl(daemon, "backup", "vm1", "--dest", str(dest))  # human output
    assert r.returncode == 0, r.stderr
    third = manifest(dest)["backups"][2]
    assert r.stdout == f"backup {third['id']} (inc, crash-consistent): {64 * KiB} bytes read\n"
    assert r.stderr.splitlines() == [f"bbctl: {d}: incremental from {second['id']}"
                                     for d in ("sda", "sdb", "sdc")]
    assert {d: (e["level"], e["reason"]) for d, e in third["disks"].items()} == {
        d: ("inc", None) for d in ("sda", "sdb", "sdc")}
    point(third)

    listing = bbctl(daemon, "list", str(dest)).stdout.splitlines()
    assert [(line.split()[1], line.split()[5]) for line in listing[1:]] == [
        ("full", "sda,sdb"), ("mixed", "sda:inc,sdb:inc,sdc:full"), ("inc", "sda,sdb,sdc")]
    listed = json.loads(bbctl(daemon, "--json", "list", str(dest)).stdout)
    assert [listed[1]["disks"][d]["level"] for d in ("sda", "sdb", "sdc")] == [
        "inc", "inc", "full"]
    # Each disk's own chain: sda goes back to the first backup, sdc to the second.
    assert chain_length(dest, third["disks"]["sda"]["file"]) == 3
    assert chain_length(dest, third["disks"]["sdc"]["file"]) == 2
    assert_restores(daemon, dest, workdir, refs)
    r = bbctl(daemon, "restore", str(dest), "--disk", "sdc", "--at", first["id"],
              "--output", str(workdir / "none.qcow2"))
    assert r.returncode == 1 and r.stderr == \
        f"bbctl: error: backup {first['id']} has no disk 'sdc'\n"
    assert not (workdir / "none.qcow2").exists()
    r = bbctl(daemon, "verify", str(dest), "--at", second["id"])
    assert r.returncode == 0, r.stderr
    with daemon.client() as c:
        assert c.snapshot_list("vm1") == [] and c.export_list("vm1") == []
    # Every disk's newest backup is the third: the older checkpoints went.
    assert checkpoints(daemon) == [third["id"]]
    assert not (dest / "pending.json").exists()


def test_inc_with_a_hot_added_disk_is_refused_and_creates_nothing(
        defined: tuple[Daemon, Vm], workdir: Path) -> None:
    daemon, vm = defined
    dest = workdir / "b"
    vm.write("sda", 0, 64 * KiB, 0x11)
    backup(daemon, dest, "--level", "full")
    hot_add(vm, "sdc", 16 * MiB)
    vm.write("sdc", 0, 64 * KiB, 0x12)
    before = manifest(dest)
    files = sorted(p.name for p in dest.iterdir())
    nodes = vm.node_names()
    scratch = sorted(os.listdir(daemon.daemon_keys["scratch_dir"]))
    cps = checkpoints(daemon)
    r = bbctl(daemon, "backup", "vm1", "--dest", str(dest), "--level", "inc")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == "bbctl: error: cannot take an incremental backup: " \
        "sdc: new disk: no earlier backup of it\n"
    assert manifest(dest) == before
    assert sorted(p.name for p in dest.iterdir()) == files
    with daemon.client() as c:
        assert c.snapshot_list("vm1") == [] and c.export_list("vm1") == []
    assert checkpoints(daemon) == cps
    assert vm.node_names() == nodes
    assert sorted(os.listdir(daemon.daemon_keys["scratch_dir"])) == scratch


def test_checkpoint_broken_on_one_disk_makes_only_that_disk_full(
        defined: tuple[Daemon, Vm], workdir: Path) -> None:
    daemon, vm = defined
    dest = workdir / "b"
    vm.write("sda", 0, MiB, 0x11)
    vm.write("sdb", 0, MiB, 0x12)
    first, _ = backup(daemon, dest)
    # The VM manager stops the VM cleanly (bitmaps saved), and the bitmap of
    # sdb goes from its image before it starts again.
    with daemon.client() as c:
        xml = c.call("checkpoint.get_xml", domain="vm1", name=first["id"])
    bitmap = re.search(r'<disk name="sdb" checkpoint="bitmap" bitmap="([^"]+)"', xml)
    assert bitmap is not None, xml
    vm.stop()
    subprocess.run(["qemu-img", "bitmap", "--remove", str(vm.image("sdb")), bitmap.group(1)],
                   check=True)
    vm.start()
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    with daemon.client() as c:
        info = c.call("checkpoint.lookup", domain="vm1", name=first["id"])
    assert info["state"] == "broken" and list(info["broken_disks"]) == ["sdb"], info
    vm.write("sda", 4 * MiB, 64 * KiB, 0x21)
    vm.write("sdb", 4 * MiB, 64 * KiB, 0x22)
    second, said = backup(daemon, dest)
    reason = f"checkpoint {first['id']} is broken on this disk: {info['broken_disks']['sdb']}"
    assert said == [f"bbctl: sda: incremental from {first['id']}", f"bbctl: sdb: full ({reason})"]
    assert second["level"] == "mixed"
    assert {d: (e["level"], e["reason"], e["bytes_read"]) for d, e in second["disks"].items()} \
        == {"sda": ("inc", None, 64 * KiB), "sdb": ("full", reason, MiB + 64 * KiB)}
    refs = {second["id"]: references(vm, ("sda", "sdb"), workdir, "last")}
    assert_restores(daemon, dest, workdir, refs)


def test_a_manifest_without_per_disk_levels_still_works(defined: tuple[Daemon, Vm],
                                                       workdir: Path) -> None:
    """Manifests of the code before per-disk levels: a disk's level is said
    by its backing file; list, verify, restore and the next backup work."""
    daemon, vm = defined
    dest = workdir / "b"
    vm.write("sda", 0, MiB, 0x11)
    first, _ = backup(daemon, dest, "--level", "full")
    vm.write("sdb", 0, 64 * KiB, 0x12)
    second, _ = backup(daemon, dest, "--level", "inc")
    old = manifest(dest)
    for record in old["backups"]:
        for entry in record["disks"].values():
            for key in ("level", "reason", "base"):
                del entry[key]
    (dest / "manifest.json").write_text(json.dumps(old, indent=2) + "\n")
    listing = bbctl(daemon, "list", str(dest)).stdout.splitlines()
    assert [(line.split()[1], line.split()[5]) for line in listing[1:]] == [
        ("full", "sda,sdb"), ("inc", "sda,sdb")]
    listed = json.loads(bbctl(daemon, "--json", "list", str(dest)).stdout)
    assert [[e["level"] for e in b["disks"].values()] for b in listed] == [
        ["full", "full"], ["inc", "inc"]]
    vm.write("sda", 8 * MiB, 64 * KiB, 0x13)
    third, said = backup(daemon, dest)
    assert said == [f"bbctl: {d}: incremental from {second['id']}" for d in ("sda", "sdb")]
    assert third["disks"]["sda"]["bytes_read"] == 64 * KiB
    refs = {third["id"]: references(vm, ("sda", "sdb"), workdir, "last")}
    assert_restores(daemon, dest, workdir, refs)


# -- faults -----------------------------------------------------------------------------

@pytest.mark.parametrize("gone", ["qemu-quit", "qemu-killed", "daemon-stopped"])
def test_qemu_or_daemon_gone_mid_pull(make_vm: Callable[..., Vm],
                                      make_daemon: Callable[..., Daemon], workdir: Path,
                                      gone: str) -> None:
    daemon = make_daemon()
    vm = make_vm(disks={"sda": 160 * MiB, "sdb": 64 * MiB})
    define(daemon, vm)
    dest = workdir / "b"
    vm.write("sda", 0, MiB, 0x11)
    first, _ = backup(daemon, dest)
    # More data than the pull has in flight (4 connections x 8 x 1 MiB), so
    # the pull is still reading when its source goes.
    vm.write("sda", 8 * MiB, 128 * MiB, 0x22)
    vm.write("sdb", 0, 4 * MiB, 0x23)
    saved = (dest / "manifest.json").read_bytes()
    files = sorted(p.name for p in dest.iterdir())
    hold = workdir / "hold"
    proc = start_paused(daemon, dest, hold)
    try:
        assert proc.stderr is not None
        said = wait_paused(proc.stderr, "pull")
        assert said == [f"bbctl: {d}: incremental from {first['id']}" for d in ("sda", "sdb")]
        failed = json.loads((dest / "pending.json").read_text())["id"]
        if gone == "qemu-quit":
            # The VM manager's quit on its own monitor, not waited for: QEMU
            # closes its NBD exports first and would wait for a client that
            # does not read, so bbctl is let go at once.
            assert vm.monitor is not None
            vm.monitor.sock.sendall(b'{"execute": "quit"}\n')
        elif gone == "qemu-killed":
            vm.kill()
        else:
            daemon.stop()  # SIGTERM: the daemon deletes its snapshots and exports
        hold.unlink()
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if gone == "qemu-quit":
        assert vm.proc is not None and vm.proc.wait(60) == 0
        vm.stop()
    assert proc.returncode == 1 and out == ""
    error = one_error_line(err)
    assert error.startswith("bbctl: error: reading disk sda over NBD: copying sda-"), error
    if gone == "daemon-stopped":
        assert " (the daemon does not answer); " in error, error
    # QEMU going (or gone) answers no snapshot.delete: the failed backup's
    # snapshot went with it, its checkpoint stays for the next run.
    assert f"; snapshot and checkpoint {failed} could not be deleted now (" in error, error
    assert error.endswith(f"); the next backup into {dest} deletes them"), error
    # Nothing half-written: no new qcow2 file, the manifest as it was; only
    # the record of the failed backup, for the next run.
    assert (dest / "manifest.json").read_bytes() == saved
    assert sorted(p.name for p in dest.iterdir()) == sorted([*files, "pending.json"])
    assert json.loads((dest / "pending.json").read_text())["domain"] == "vm1"

    if gone == "daemon-stopped":
        daemon.start()
    else:
        vm.start()  # the same images
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    assert checkpoints(daemon) == [first["id"], failed]
    with daemon.client() as c:
        info = c.call("checkpoint.lookup", domain="vm1", name=first["id"])
    if gone == "qemu-killed":  # a killed QEMU never wrote its bitmaps
        assert info["state"] == "broken" and set(info["broken_disks"]) == {"sda", "sdb"}
    # A backup into another directory leaves that record and checkpoint alone.
    other, said = backup(daemon, workdir / "other")
    assert not any("deleted checkpoint" in line for line in said)
    assert checkpoints(daemon) == [first["id"], failed, other["id"]]
    record, said = backup(daemon, dest)
    assert said[0] == f"bbctl: deleted checkpoint {failed} of an earlier failed backup"
    # ... and, once it succeeded, the first backup's: no next backup needs it.
    # The other directory's stays.
    assert checkpoints(daemon) == [other["id"], record["id"]]
    assert not (dest / "pending.json").exists()
    # Whichever the daemon says of the first backup's checkpoint, per disk,
    # the backup follows it.
    for disk in ("sda", "sdb"):
        entry = record["disks"][disk]
        broken = info.get("broken_disks", {}) if info["state"] == "broken" else {}
        if disk not in broken:
            assert (entry["level"], entry["reason"], entry["base"]) == (
                "inc", None, first["id"])
            assert f"bbctl: {disk}: incremental from {first['id']}" in said
        else:
            reason = f"checkpoint {first['id']} is broken on this disk: {broken[disk]}"
            assert (entry["level"], entry["reason"]) == ("full", reason)
            assert f"bbctl: {disk}: full ({reason})" in said
    if info["state"] == "valid":
        # The failed backup's changes went back into the first one's change set.
        assert record["disks"]["sda"]["bytes_read"] == 128 * MiB
        assert record["disks"]["sdb"]["bytes_read"] == 4 * MiB
    refs = {record["id"]: references(vm, ("sda", "sdb"), workdir, "last")}
    assert_restores(daemon, dest, workdir, refs)


def test_daemon_stopped_while_a_client_holds_its_export(
        make_vm: Callable[..., Vm], make_daemon: Callable[..., Daemon], workdir: Path) -> None:
    """The daemon stops while a paused pull holds the only export of the domain,
    so QEMU cannot delete that export before the daemon's time is up, and the
    NBD server outlives the daemon. The next daemon stops that server (it
    started it), and the next backup runs; it was refused as "busy" for as
    long as that QEMU ran."""
    daemon = make_daemon()
    vm = make_vm(disks={"sda": 160 * MiB})
    define(daemon, vm)
    dest = workdir / "b"
    vm.write("sda", 0, 128 * MiB, 0x22)
    hold = workdir / "hold"
    proc = start_paused(daemon, dest, hold)
    try:
        assert proc.stderr is not None
        wait_paused(proc.stderr, "pull")
        daemon.stop()  # its export deletion waits for the held client, in vain
        assert "left behind at exit" in daemon.log()
        hold.unlink()
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    assert vm.qmp("query-block-exports") == []  # gone with its client
    daemon.start()
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    record, said = backup(daemon, dest)
    assert record["disks"]["sda"]["bytes_read"] == 128 * MiB
    assert vm.qmp("query-block-exports") == []
    # The server went with the backup's export: QEMU can start one again.
    vm.qmp("nbd-server-start", addr={"type": "unix",
                                     "data": {"path": str(workdir / "probe.nbd")}})
    vm.qmp("nbd-server-stop")
    # The daemons' probes of the server said goodbye as NBD clients do: QEMU
    # logged no failed negotiation (only the held client's cut connections).
    said = vm.stdout_path.read_text(errors="replace").splitlines()
    assert [line for line in said if "qemu-system" in line
            and "Disconnect client, due to: Failed to send reply" not in line] == []


@pytest.mark.parametrize("how", ["no socket", "stopped", "killed", "refused", "no domain"])
def test_daemon_down_or_refusing_is_one_line(make_daemon: Callable[..., Daemon],
                                             make_vm: Callable[..., Vm], workdir: Path,
                                             how: str) -> None:
    dest = workdir / "b"
    if how == "no socket":
        r = subprocess.run([sys.executable, "-m", "blockbackup_client.bbctl", "--socket",
                            "/nonexistent", "backup", "vm1", "--dest", str(dest)],
                           capture_output=True, text=True, timeout=60)
        expected = "bbctl: error: cannot connect to /nonexistent: [Errno 2] No such file " \
            "or directory (is blockbackupd running?)"
    else:
        daemon = make_daemon()
        if how in ("stopped", "killed"):
            daemon.stop() if how == "stopped" else daemon.kill()
            reason = "No such file or directory" if how == "stopped" else "Connection refused"
            expected = f"bbctl: error: cannot connect to {daemon.socket}: [Errno " \
                f"{2 if how == 'stopped' else 111}] {reason} (is blockbackupd running?)"
            r = bbctl(daemon, "backup", "vm1", "--dest", str(dest))
        elif how == "refused":
            define(daemon, make_vm())
            r = bbctl(daemon, "backup", "vm1", "--dest", str(dest), "--disk", "sdz")
            expected = "bbctl: error: domain 'vm1' has no disk 'sdz' [no-such-disk]"
            with daemon.client() as c:
                assert c.snapshot_list("vm1") == [] and c.call(
                    "checkpoint.list", domain="vm1") == []
        else:
            r = bbctl(daemon, "backup", "vm9", "--dest", str(dest))
            expected = "bbctl: error: no domain named 'vm9' [no-such-domain]"
    assert r.returncode == 1 and r.stdout == ""
    assert one_error_line(r.stderr) == expected and r.stderr == expected + "\n"
    # Nothing written, not even the directory (its pending record went once
    # the daemon refused the snapshot).
    assert not dest.exists()


def test_an_unexpected_error_is_still_one_line(workdir: Path) -> None:
    """The last-resort handler: a manifest missing fields makes a KeyError."""
    dest = workdir / "b"
    dest.mkdir()
    (dest / "manifest.json").write_text(json.dumps({"domain": "vm1", "backups": [{"id": "x"}]}))
    r = subprocess.run([sys.executable, "-m", "blockbackup_client.bbctl", "list", str(dest)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == "bbctl: error: unexpected KeyError: 'disks'\n"


@pytest.fixture
def small_dest(workdir: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, unmounted whatever happens."""
    path = workdir / "small"
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        unmount(path)


def test_destination_full_is_one_line_and_leaves_nothing(defined: tuple[Daemon, Vm],
                                                         workdir: Path,
                                                         small_dest: Path) -> None:
    daemon, vm = defined
    dest = small_dest
    vm.write("sda", 0, 64 * KiB, 0x11)
    first, _ = backup(daemon, dest)  # fits
    saved = (dest / "manifest.json").read_bytes()
    files = sorted(p.name for p in dest.iterdir())
    scratch = sorted(os.listdir(daemon.daemon_keys["scratch_dir"]))
    vm.write("sda", MiB, 8 * MiB, 0x22)  # does not
    r = bbctl(daemon, "backup", "vm1", "--dest", str(dest))
    assert r.returncode == 1 and r.stdout == ""
    error = one_error_line(r.stderr)
    assert error.startswith(f"bbctl: error: writing {dest}/bk-"), error
    assert error.endswith("-sda.qcow2: No space left on device"), error
    assert (dest / "manifest.json").read_bytes() == saved
    assert sorted(p.name for p in dest.iterdir()) == files  # no partial file, no record
    with daemon.client() as c:
        assert c.snapshot_list("vm1") == [] and c.export_list("vm1") == []
    assert checkpoints(daemon) == [first["id"]]
    assert sorted(os.listdir(daemon.daemon_keys["scratch_dir"])) == scratch
