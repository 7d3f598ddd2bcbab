"""blockbackupd beside libvirt 9.0, which owns the VM: a private libvirtd
starts QEMU with an extra QMP monitor for the daemon (``<qemu:commandline>``),
and the tests do what a libvirt user does (virsh) while blockbackupd has
checkpoints and, where QEMU allows, a live snapshot. Backups are made with
``bbctl backup`` and checked by restoring them and comparing with the live
disk. Disks are named by their qdev id: libvirt's ``ua-`` user alias for sda,
libvirt's own alias (``scsi0-0-0-<unit>``) for the others."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from blockbackup_client import Busy
from tests.conftest import (
    NbdReader,
    domain_state,
    export_xml,
    snapshot_xml,
    wait_for,
)
from tests.vm_manager.manager import assert_restore_equals, backup, disk_level
from tools.daemon import Daemon
from tools.libvirt import Domain, Libvirt, libvirt_errors
from tools.vm import MiB

#: libvirt's emulator is the system's QEMU (/usr/bin/qemu-system-x86_64) whatever
#: BB_QEMU selects: `make test`'s pass on another build deselects these.
pytestmark = pytest.mark.libvirt

K = 64 * 1024
SDA, SDB, SDC = "ua-sda", "scsi0-0-0-1", "scsi0-0-0-2"  # qdev ids = blockbackupd's disk names
NEED_ROOT = "Need a root block node"


@pytest.fixture
def dom(lv: Libvirt, workdir: Path, make_daemon: Any) -> Iterator[tuple[Daemon, Domain]]:
    """Domain vm1 started by libvirt and defined in a fresh daemon."""
    with started(lv, Domain(lv, workdir), make_daemon) as daemon_and_domain:
        yield daemon_and_domain


@contextlib.contextmanager
def started(lv: Libvirt, domain: Domain, make_daemon: Any) -> Iterator[tuple[Daemon, Domain]]:
    """The domain started by libvirt and defined in a fresh daemon; removed after."""
    if not lv.alive:
        print("libvirtd had died: started again")
        lv.restart()
    try:
        domain.start()
        daemon: Daemon = make_daemon()
        with daemon.client() as c:
            c.domain_define("vm1", str(domain.qmp))
        wait_for(lambda: domain_state(daemon, "vm1") == "running", what="vm1 running")
        yield daemon, domain
    finally:
        print(f"--- libvirt's log of vm1 ---\n{domain.log()[-5000:]}"
              if lv.domain_log("vm1").exists() else "")
        domain.remove()


def write(dom: Domain, target: str, *clusters: int) -> None:
    for c in clusters:
        dom.write(target, c * K, K, 0x30 + c % 128)


def pattern(c: int) -> bytes:
    return bytes([0x30 + c % 128]) * K


def ext_snapshot(dom: Domain) -> dict[str, Path]:
    """libvirt's external snapshot of every disk (it copies the recording
    bitmaps into the overlays). The overlays are made here first and given
    with --reuse-external: when libvirt makes them itself, with blockdev-create
    jobs, QEMU may abort (see the last test)."""
    overlays = {}
    for target, top in dom.sources().items():
        overlays[target] = Path(f"{top.removesuffix('.qcow2')}.{time.monotonic_ns()}.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", top,
                        "-F", "qcow2", str(overlays[target]), str(dom.disks[target])],
                       check=True)
    specs = [a for t, o in overlays.items()
             for a in ("--diskspec", f"{t},snapshot=external,file={o}")]
    dom.virsh("snapshot-create-as", "vm1", "--disk-only", "--no-metadata", "--atomic",
              "--reuse-external", *specs)
    assert dom.sources() == {t: str(o) for t, o in overlays.items()}
    return overlays


def blockcopy(dom: Domain, target: str, dest: Path, *args: str, check: bool = True
              ) -> subprocess.CompletedProcess[str]:
    """libvirt's mirror of a disk onto a new image (made here, as above)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(dest),
                    str(dom.disks[target])], check=True)
    return dom.virsh("blockcopy", "vm1", target, str(dest), "--format", "qcow2",
                     "--reuse-external", "--pivot", "--transient-job", *args, check=check)


def restore_equals_live(daemon: Daemon, dom: Domain, dest: Path, target: str) -> None:
    """The disk restored from the backups equals the live disk flattened,
    compared while libvirt has the guest suspended."""
    running = dom.state().startswith("running")
    if running:
        dom.virsh("suspend", "vm1")
    try:
        assert_restore_equals(daemon, dest, dom.qdevs()[target], dom.sources()[target])
    finally:
        if running:
            dom.virsh("resume", "vm1")


def our_nodes(dom: Domain) -> list[str]:
    nodes = dom.qmp_cmd("query-named-block-nodes", flat=True)
    assert isinstance(nodes, list)
    return [n["node-name"] for n in nodes if n["node-name"].startswith("bb-")]


def start_snapshot(daemon: Daemon, disks: tuple[str, ...], name: str = "s1") -> str:
    """A blockbackupd snapshot of the disks and an export of each; returns the NBD socket."""
    with daemon.client() as c:
        c.snapshot_create("vm1", snapshot_xml(name, {d: None for d in disks}))
        started = c.export_start("vm1", export_xml([(d, name) for d in disks]))
    return str(started["server"]["socket"])


def test_libvirt_domain_as_the_daemon_sees_it(dom: tuple[Daemon, Domain]) -> None:
    daemon, domain = dom
    assert domain.qdevs() == {"sda": SDA, "sdb": SDB}
    with daemon.client() as c:
        xml = c.domain_get_xml("vm1")
    assert f'name="{SDA}"' in xml and f'name="{SDB}"' in xml
    # What libvirt records about this setup.
    log = domain.log()
    assert "tainted: high-privileges" in log          # QEMU runs as root
    assert "tainted: custom-argv" in log               # the extra -qmp
    assert "tainted: custom-monitor" not in log
    write(domain, "sda", 1)
    assert "tainted: custom-monitor" in domain.log()   # the test's qemu-io, not the daemon


def test_external_snapshot_keeps_backups_incremental(dom: tuple[Daemon, Domain],
                                                     workdir: Path) -> None:
    daemon, domain = dom
    dest = workdir / "b"
    write(domain, "sda", 1)
    write(domain, "sdb", 1)
    backup(daemon, dest, "--level", "full")
    write(domain, "sda", 2)
    ext_snapshot(domain)
    write(domain, "sda", 3)
    write(domain, "sdb", 4)
    second = backup(daemon, dest, "--level", "auto")
    assert disk_level(second, SDA) == "inc" and disk_level(second, SDB) == "inc"
    assert second["disks"][SDA]["bytes_read"] == 2 * K
    assert second["disks"][SDB]["bytes_read"] == K
    for target in ("sda", "sdb"):
        restore_equals_live(daemon, domain, dest, target)

    # Again while a snapshot of ours is live: libvirt's snapshot succeeds
    # (the overlay goes below our filter) and our view keeps its instant.
    sock = start_snapshot(daemon, (SDA,))
    write(domain, "sda", 5)
    ext_snapshot(domain)
    write(domain, "sda", 6)
    with NbdReader(sock, f"{SDA}-s1") as r:
        assert r.read(3 * K, K) == pattern(3)
        assert r.read(5 * K, K) == bytes(K) and r.read(6 * K, K) == bytes(K)
    with daemon.client() as c:
        c.snapshot_delete("vm1", "s1")
    assert our_nodes(domain) == []
    third = backup(daemon, dest, "--level", "auto")
    assert disk_level(third, SDA) == "inc" and third["disks"][SDA]["bytes_read"] == 2 * K
    restore_equals_live(daemon, domain, dest, "sda")


def test_blockcommit(dom: tuple[Daemon, Domain], workdir: Path) -> None:
    """Commit of an overlay made after the last checkpoint: incremental and
    exact. Commit of an overlay holding the last checkpoint's bitmap: that
    bitmap began in an image that is gone, so a full, with the reason (a
    conservative answer: libvirt merged the bitmap into the base)."""
    daemon, domain = dom
    dest = workdir / "b"
    backup(daemon, dest, "--level", "full")
    write(domain, "sda", 1)
    ext_snapshot(domain)
    write(domain, "sda", 2)
    domain.virsh("blockcommit", "vm1", "sda", "--active", "--pivot")
    assert domain.sources()["sda"] == str(domain.image("sda"))
    write(domain, "sda", 3)
    second = backup(daemon, dest, "--level", "auto")
    assert disk_level(second, SDA) == "inc" and second["disks"][SDA]["bytes_read"] == 3 * K
    restore_equals_live(daemon, domain, dest, "sda")

    overlay = str(ext_snapshot(domain)["sda"])
    third = backup(daemon, dest, "--level", "auto")   # its bitmap lives in the overlay
    assert disk_level(third, SDA) == "inc"
    write(domain, "sda", 4)
    domain.virsh("blockcommit", "vm1", "sda", "--active", "--pivot")
    write(domain, "sda", 5)
    fourth = backup(daemon, dest, "--level", "auto")
    print("after the commit:", fourth["stderr"])
    assert disk_level(fourth, SDA) == "full" and disk_level(fourth, SDB) == "inc"
    reason = fourth["disks"][SDA]["reason"]
    assert "left the disk's chain" in reason and overlay in reason
    restore_equals_live(daemon, domain, dest, "sda")
    write(domain, "sda", 6)
    fifth = backup(daemon, dest, "--level", "auto")
    assert disk_level(fifth, SDA) == "inc" and fifth["disks"][SDA]["bytes_read"] == K
    restore_equals_live(daemon, domain, dest, "sda")


def test_blockcopy_takes_a_full(dom: tuple[Daemon, Domain], workdir: Path) -> None:
    daemon, domain = dom
    dest = workdir / "b"
    write(domain, "sda", 1)
    backup(daemon, dest, "--level", "full")
    write(domain, "sda", 2)
    target = workdir / "vm1-sda-copy.qcow2"
    blockcopy(domain, "sda", target)
    assert domain.sources()["sda"] == str(target)
    write(domain, "sda", 3)
    second = backup(daemon, dest, "--level", "auto")
    assert disk_level(second, SDA) == "full" and disk_level(second, SDB) == "inc"
    reason = second["disks"][SDA]["reason"]
    assert "disk replaced" in reason and str(target) in reason, reason
    restore_equals_live(daemon, domain, dest, "sda")
    write(domain, "sda", 4)
    third = backup(daemon, dest, "--level", "auto")
    assert disk_level(third, SDA) == "inc" and third["disks"][SDA]["bytes_read"] == K
    restore_equals_live(daemon, domain, dest, "sda")


def test_block_jobs_refused_while_our_snapshot_is_live(dom: tuple[Daemon, Domain],
                                                       workdir: Path) -> None:
    """QEMU starts commit and mirror only on a root node; under our snapshot
    neither the image nor our filter is one. libvirt's commands fail at once
    with QEMU's error and change nothing; after snapshot.delete they work."""
    daemon, domain = dom
    ext_snapshot(domain)
    write(domain, "sda", 1)
    sock = start_snapshot(daemon, (SDA,))
    copy = workdir / "vm1-sda-copy.qcow2"
    commit = domain.virsh("blockcommit", "vm1", "sda", "--active", "--pivot", check=False)
    mirror = blockcopy(domain, "sda", copy, check=False)
    print("blockcommit:", commit.stderr.strip(), "\nblockcopy:", mirror.stderr.strip())
    assert commit.returncode == 1 and mirror.returncode == 1
    assert ("unable to execute QEMU command 'block-commit': " + NEED_ROOT) in commit.stderr
    assert ("unable to execute QEMU command 'blockdev-mirror': " + NEED_ROOT) in mirror.stderr
    assert domain.qmp_cmd("query-block-jobs") == []
    assert domain.state().startswith("running")  # ("booted": a one-disk snapshot stops no vCPU)
    write(domain, "sda", 1, 2)
    with NbdReader(sock, f"{SDA}-s1") as r:
        assert r.read(K, K) == pattern(1) and r.read(2 * K, K) == bytes(K)
    with daemon.client() as c:
        c.snapshot_delete("vm1", "s1")
    domain.virsh("blockcommit", "vm1", "sda", "--active", "--pivot")
    assert domain.sources()["sda"] == str(domain.image("sda"))


def test_attach_and_detach(dom: tuple[Daemon, Domain], workdir: Path) -> None:
    daemon, domain = dom
    lv = domain.lv
    dest = workdir / "b"
    backup(daemon, dest, "--level", "full")
    sdc = workdir / "vm1-sdc.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(sdc), "32M"], check=True)
    domain.virsh("attach-disk", "vm1", str(sdc), "sdc", "--targetbus", "scsi",
                 "--subdriver", "qcow2", "--live")
    assert domain.qdevs()["sdc"] == SDC
    write(domain, "sdc", 2)
    second = backup(daemon, dest, "--level", "auto")
    assert disk_level(second, SDC) == "full"
    assert second["disks"][SDC]["reason"] == "new disk: no earlier backup of it"
    assert disk_level(second, SDA) == "inc" and disk_level(second, SDB) == "inc"
    restore_equals_live(daemon, domain, dest, "sdc")

    # Detach while a snapshot of ours (all disks) and its exports are live.
    start_snapshot(daemon, (SDA, SDB, SDC))
    log_mark = lv.libvirtd_log.stat().st_size
    began = time.monotonic()
    detach = domain.virsh("detach-disk", "vm1", "sdc", "--live", check=False)
    took = time.monotonic() - began
    assert detach.returncode == 0, detach.stderr
    assert "sdc" not in domain.sources()
    scratch = Path(daemon.daemon_keys["scratch_dir"])
    wait_for(lambda: len(os.listdir(scratch)) == 2, what="sdc's scratch file removed")
    gone = time.monotonic() - began
    with daemon.client() as c:
        info = c.snapshot_lookup("vm1", "s1")
        assert info["disks"] == [SDA, SDB] and SDC in info["removed_disks"]
        assert {e["disk"] for e in c.export_list("vm1")} == {SDA, SDB}
    # libvirt deleted the disk's nodes right after DEVICE_DELETED, while our
    # filter still used them; what QEMU answered is in libvirtd's log.
    errors = libvirt_errors(lv, log_mark)
    left = domain.nodes_on_file(str(sdc))
    print(f"detach-disk took {took:.3f} s; our part of s1 gone {gone:.3f} s after it "
          f"began; libvirt's nodes left on {sdc.name}: {left}; libvirtd errors: {errors}")
    with daemon.client() as c:
        c.snapshot_delete("vm1", "s1")
    assert our_nodes(domain) == []
    third = backup(daemon, dest, "--level", "auto")
    assert set(third["disks"]) == {SDA, SDB}
    assert disk_level(third, SDA) == "inc" and disk_level(third, SDB) == "inc"


@pytest.mark.xfail(strict=False, raises=AssertionError, reason=(
    "libvirt runs blockdev-del on the disk's nodes as soon as QEMU emits DEVICE_DELETED, "
    "before blockbackupd has removed its filter from above them: QEMU answers 'Block "
    "device libvirt-N-format is in use', libvirt's detach still succeeds and forgets the "
    "nodes, and QEMU keeps the image open (and locked) until it exits"))
def test_detach_under_our_snapshot_releases_the_image(dom: tuple[Daemon, Domain],
                                                      workdir: Path) -> None:
    daemon, domain = dom
    sdc = workdir / "vm1-sdc.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(sdc), "32M"], check=True)
    attach = ("attach-disk", "vm1", str(sdc), "sdc", "--targetbus", "scsi",
              "--subdriver", "qcow2", "--live")
    domain.virsh(*attach)
    start_snapshot(daemon, (SDC,))
    domain.virsh("detach-disk", "vm1", "sdc", "--live")
    scratch = Path(daemon.daemon_keys["scratch_dir"])
    wait_for(lambda: not os.listdir(scratch), what="sdc's scratch file removed")
    assert domain.nodes_on_file(str(sdc)) == []
    again = domain.virsh(*attach, check=False)   # now: Failed to get "write" lock
    assert again.returncode == 0, again.stderr


def test_destroy_and_start(dom: tuple[Daemon, Domain], workdir: Path) -> None:
    """virsh destroy sends SIGTERM first, and QEMU then exits cleanly, storing
    its bitmaps: the checkpoints stay valid. A QEMU killed with SIGKILL
    stores nothing: its checkpoints are broken and the next backup is full."""
    daemon, domain = dom
    dest = workdir / "b"
    write(domain, "sda", 1)
    backup(daemon, dest, "--level", "full")
    write(domain, "sda", 2)
    began = time.monotonic()
    domain.virsh("destroy", "vm1")
    print(f"virsh destroy took {time.monotonic() - began:.2f} s")
    assert "terminating on signal 15" in domain.log()
    wait_for(lambda: domain_state(daemon, "vm1") == "disconnected", what="vm1 disconnected")
    domain.virsh("start", "vm1")
    began = time.monotonic()
    wait_for(lambda: domain_state(daemon, "vm1") == "running", what="vm1 running again")
    print(f"daemon connected again {time.monotonic() - began:.2f} s after virsh start returned")
    second = backup(daemon, dest, "--level", "auto")
    assert disk_level(second, SDA) == "inc" and second["disks"][SDA]["bytes_read"] == K
    restore_equals_live(daemon, domain, dest, "sda")

    write(domain, "sda", 3)
    os.kill(domain.pid, signal.SIGKILL)
    wait_for(lambda: domain.state() == "shut off (crashed)", what="libvirt saw the crash")
    wait_for(lambda: domain_state(daemon, "vm1") == "disconnected", what="vm1 disconnected")
    domain.virsh("start", "vm1")
    wait_for(lambda: domain_state(daemon, "vm1") == "running", what="vm1 running again")
    third = backup(daemon, dest, "--level", "auto")
    print("after SIGKILL:", third["stderr"])
    for disk in (SDA, SDB):
        assert disk_level(third, disk) == "full"
        assert f"checkpoint {second['id']} is broken" in third["disks"][disk]["reason"]
    for target in ("sda", "sdb"):
        restore_equals_live(daemon, domain, dest, target)


def test_each_snapshot_is_a_suspend_resume_pair(dom: tuple[Daemon, Domain],
                                                workdir: Path) -> None:
    daemon, domain = dom
    events = workdir / "events.txt"
    with open(events, "wb") as out:
        proc = subprocess.Popen(["virsh", "-c", domain.lv.uri, "event", "--domain", "vm1",
                                 "--event", "lifecycle", "--loop", "--timestamp"],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        def timed() -> list[tuple[datetime, str]]:
            # "2026-11-26 02:17:30.167+0000: event 'lifecycle' for domain 'vm1': Resumed Unpaused"
            out = []
            for line in events.read_text().splitlines():
                stamp, sep, rest = line.partition(": event 'lifecycle' for domain 'vm1': ")
                if sep:
                    out.append((datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f%z"), rest))
            return out

        base = 0

        def lines() -> list[str]:
            return [what for _, what in timed()][base:]
        # Pairs by hand until one shows: the listener is registered (virsh
        # connects in its own time), and its output ends after a resume.
        deadline = time.monotonic() + 30
        while "Resumed Unpaused" not in lines():
            assert time.monotonic() < deadline, "virsh event shows nothing"
            domain.virsh("suspend", "vm1")
            domain.virsh("resume", "vm1")
            time.sleep(0.2)
        base = len(timed())
        pair = ["Suspended Paused", "Resumed Unpaused"]
        with daemon.client() as c:
            c.snapshot_create("vm1", snapshot_xml("p1"))
            c.snapshot_create("vm1", snapshot_xml("p2"), checkpoint=True)
            wait_for(lambda: len(lines()) == 4, what="two pairs")
            assert lines() == pair * 2
            assert domain.state() == "running (unpaused)"
            windows = [c.snapshot_lookup("vm1", n)["held_io_window"] for n in ("p1", "p2")]
            stamps = [t for t, _ in timed()][base:]
            paused = [(stamps[i + 1] - stamps[i]).total_seconds() for i in (0, 2)]
            print(f"held-I/O windows {windows} s; libvirt's Suspended->Resumed {paused} s")
            c.snapshot_delete("vm1", "p1")
            c.snapshot_delete("vm1", "p2")
            # One disk: its move alone is the instant, no pair (the user's
            # suspend below would otherwise come as the 7th line, not the 5th).
            c.snapshot_create("vm1", snapshot_xml("one", {SDA: None}), checkpoint=True)
            c.snapshot_delete("vm1", "one")
            # A guest libvirt suspended is left alone: no pair, still paused.
            domain.virsh("suspend", "vm1")
            wait_for(lambda: len(lines()) >= 5, what="the user's suspend")
            assert lines() == pair * 2 + ["Suspended Paused"]
            c.snapshot_create("vm1", snapshot_xml("p3"))
            assert domain.state() == "paused (user)"
            c.snapshot_delete("vm1", "p3")
            domain.virsh("resume", "vm1")
            wait_for(lambda: len(lines()) == 6, what="the user's resume")
            assert lines() == pair * 3
    finally:
        proc.terminate()
        proc.wait(10)


BACKUP_XML = """<domainbackup mode='pull'>
  <server transport='unix' socket='{sock}'/>
  <disks>
    <disk name='sda' backup='yes' type='file'>
      <driver type='qcow2'/><scratch file='{scratch}'/>
    </disk>
    <disk name='sdb' backup='no'/>
  </disks>
</domainbackup>
"""


def begin_libvirt_backup(domain: Domain, workdir: Path, check: bool = True,
                         create: bool = False) -> subprocess.CompletedProcess[str]:
    """libvirt's pull backup of sda, served by QEMU's NBD server on
    ``workdir/libvirt-backup.sock``. The scratch image is made here
    (``--reuse-external``) unless ``create``: then libvirt makes it with a
    blockdev-create job, see the last test."""
    xml = workdir / "backup.xml"
    scratch = workdir / "libvirt-scratch.qcow2"
    xml.write_text(BACKUP_XML.format(sock=workdir / "libvirt-backup.sock", scratch=scratch))
    scratch.unlink(missing_ok=True)
    if create:
        return domain.virsh("backup-begin", "vm1", str(xml), check=check)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(scratch),
                    str(domain.disks["sda"])], check=True)
    return domain.virsh("backup-begin", "vm1", str(xml), "--reuse-external", check=check)


def test_libvirt_pull_backup_holds_the_nbd_server(dom: tuple[Daemon, Domain],
                                                  workdir: Path) -> None:
    """QEMU has one NBD server; libvirt's pull backup holds it until
    domjobabort. A disk in libvirt's backup cannot be snapshotted meanwhile
    (the job's filter is in its I/O path); the other disk can."""
    daemon, domain = dom
    write(domain, "sda", 1)
    write(domain, "sdb", 2)
    begin_libvirt_backup(domain, workdir)
    with NbdReader(str(workdir / "libvirt-backup.sock"), "sda") as r:   # libvirt's export
        assert r.read(K, K) == pattern(1)
    with daemon.client() as c:
        with pytest.raises(Busy) as err:
            c.snapshot_create("vm1", snapshot_xml("s1"))
        print("snapshot.create during libvirt's backup:", err.value.message)
        assert f"disk '{SDA}' is in use by block job(s) backup-sda-" in err.value.message
        assert c.snapshot_list("vm1") == [] and our_nodes(domain) == []
        c.snapshot_create("vm1", snapshot_xml("s1", {SDB: None}))
        with pytest.raises(Busy) as err:
            c.export_start("vm1", export_xml([(SDB, "s1")]))
        assert err.value.code == 1010 and err.value.kind == "busy"
        assert "NBD server is already running for someone else" in err.value.message
        print("export.start during libvirt's backup:", err.value.message)
        assert c.export_list("vm1") == []
        domain.virsh("domjobabort", "vm1")
        assert domain.state().startswith("running")
        started = c.export_start("vm1", export_xml([(SDB, "s1")]))
        with NbdReader(str(started["server"]["socket"]), f"{SDB}-s1") as r:
            assert r.read(2 * K, K) == pattern(2)
        # And the other way round: libvirt's backup cannot start while ours runs.
        refused = begin_libvirt_backup(domain, workdir, check=False)
        print("backup-begin during our export:", refused.stderr.strip())
        assert refused.returncode == 1
        assert ("unable to execute QEMU command 'nbd-server-start': NBD server already "
                "running") in refused.stderr
        c.snapshot_delete("vm1", "s1")
        c.snapshot_create("vm1", snapshot_xml("s2"))   # sda too, now the job is gone
        c.snapshot_delete("vm1", "s2")
    assert our_nodes(domain) == []
    assert domain.state().startswith("running")


@pytest.mark.xfail(strict=False, raises=AssertionError, reason=(
    "libvirt's external snapshot under our snapshot moves our filter onto the overlay, "
    "but the filter's copy bitmap stays on the old image's node; blockpull then closes "
    "that node and QEMU aborts: bdrv_close: Assertion `QLIST_EMPTY(&bs->dirty_bitmaps)' "
    "failed. The daemon's reaction to the stream's start comes too late: the stream of "
    "this small disk has ended, and the node is closed, before its graph query is answered"))
def test_blockpull_after_external_snapshot_under_our_snapshot(dom: tuple[Daemon, Domain]
                                                              ) -> None:
    daemon, domain = dom
    write(domain, "sda", 1)
    start_snapshot(daemon, (SDA,))
    ext_snapshot(domain)
    domain.virsh("blockpull", "vm1", "sda", "--wait", check=False)
    time.sleep(0.5)
    assert domain.state().startswith("running"), domain.log()[-500:]
    with daemon.client() as c:
        c.snapshot_delete("vm1", "s1")


def test_libvirt_creating_images_beside_the_daemon(dom: tuple[Daemon, Domain],
                                                   workdir: Path) -> None:
    """libvirt makes the images of an external snapshot, and a backup's
    scratch, with blockdev-create jobs. QEMU 7.2 aborts (qcow2.c:5222
    qcow2_get_specific_info: Assertion 'false') when query-named-block-nodes
    meets an image being created; the daemon reacted to every new job with
    that query until its graph reads learned to wait for creations to end."""
    _, domain = dom
    lv = domain.lv
    for i in range(2):   # libvirt names the overlays <image>.<snapshot name>
        made = domain.virsh("snapshot-create-as", "vm1", f"made{i}", "--disk-only",
                            "--no-metadata", "--atomic", check=False)
        assert lv.alive, "libvirtd died"
        assert made.returncode == 0, made.stderr + domain.log()[-300:]
    begun = begin_libvirt_backup(domain, workdir, create=True, check=False)
    assert lv.alive, "libvirtd died"
    assert begun.returncode == 0, begun.stderr + domain.log()[-300:]
    domain.virsh("domjobabort", "vm1")
    assert domain.state().startswith("running"), domain.log()[-300:]


def test_virtio_blk_disks_in_an_io_thread_back_up_and_qemu_lives(
        lv: Libvirt, workdir: Path, make_daemon: Any) -> None:
    """libvirt's <driver iothread='1'> on virtio-blk, the way hosts run disks:
    on libvirt's QEMU (the system's 7.2, whose NBD server aborts when a client
    of such an export leaves) the backups go through QEMU's own copy, and the
    guest lives through all of it."""
    domain = Domain(lv, workdir, disks={"vda": 32 * MiB, "vdb": 16 * MiB}, aliases={},
                    iothread=True)
    since = lv.libvirtd_log.stat().st_size if lv.libvirtd_log.exists() else 0
    with started(lv, domain, make_daemon) as (daemon, _):
        disks = domain.qdevs()
        domain.write("vda", 0, MiB, 0x51)
        dest = workdir / "backups"
        first = backup(daemon, dest)
        assert {disk_level(first, disks[t]) for t in ("vda", "vdb")} == {"full"}
        domain.write("vda", 4 * MiB, K, 0x52)
        second = backup(daemon, dest, "--level", "auto")
        assert {disk_level(second, disks[t]) for t in ("vda", "vdb")} == {"inc"}
        assert second["disks"][disks["vda"]]["bytes_read"] == K
        for t in ("vda", "vdb"):
            restore_equals_live(daemon, domain, dest, t)
        assert domain.state().startswith("running")
        assert libvirt_errors(lv, since) == []
