"""Backups of a real Linux guest that keeps writing: crash-consistent and quiesced.

The guest runs the ``crash`` workload on two ext4 disks, one virtio-blk and
one scsi-hd: step n writes a file of random bytes on A, fsyncs it, logs its
checksum on A, fsyncs the log, then does the same on B. Full and incremental
backups run meanwhile, some quiesced (the daemon freezes the guest's
filesystems through its agent around the instant), some not. Every restored
point must be a filesystem a mount accepts (journal replay only, then
``e2fsck -fn`` clean), every file its log names must have the logged
checksum, and the two disks must show one instant: B's log as long as A's
or one line shorter. A quiesced point must need no journal replay at all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import bbctl, domain_state, wait_for
from tools.daemon import Daemon
from tools.linux_guest.fsread import Ext4Image, check_crash_logs
from tools.linux_guest.vm import LinuxVm

MiB = 1024 * 1024
#: quiesce mode of each backup in turn (the first is the full).
PLAN = ["yes", "no", "yes", "no", "yes", "no"]


def define(daemon: Daemon, vm: LinuxVm) -> None:
    vm.close_agent()  # the agent's channel serves one client: the daemon's from now on
    with daemon.client() as c:
        c.domain_define(vm.name, str(vm.daemon_qmp), guest_agent_socket=str(vm.agent_socket))
    wait_for(lambda: domain_state(daemon, vm.name) == "running", what="domain running")


def backup(daemon: Daemon, dest: Path, quiesce: str) -> dict[str, Any]:
    r = bbctl(daemon, "--json", "backup", "vm1", "--dest", str(dest), "--quiesce", quiesce)
    assert r.returncode == 0, r.stderr
    record: dict[str, Any] = json.loads(r.stdout)
    return record


def restore(daemon: Daemon, dest: Path, disk: str, at: str) -> Path:
    out = dest.parent / f"restored-{at}-{disk}.raw"
    r = bbctl(daemon, "restore", str(dest), "--disk", disk, "--at", at, "--output", str(out),
              "--format", "raw")
    assert r.returncode == 0, r.stderr
    return out


def test_backups_of_a_writing_guest_restore_consistent_filesystems(
        make_guest: Callable[..., LinuxVm], make_daemon: Callable[..., Daemon],
        workdir: Path) -> None:
    vm = make_guest("vm1", disks={"vda": 64 * MiB, "sdb": 64 * MiB}, workload="crash",
                    params={"kmin": 16, "kmax": 256})
    boot = vm.wait_ready()
    daemon = make_daemon(quiesce_timeout=20.0)
    define(daemon, vm)
    wait_for(lambda: vm.steps() >= 3, timeout=60, what="the guest's first steps")
    dest = workdir / "backups"
    records = []
    for quiesce in PLAN:
        before = vm.steps()
        records.append(backup(daemon, dest, quiesce))
        # The guest goes on writing after every backup: never left frozen.
        wait_for(lambda before=before: vm.steps() >= before + 2, timeout=60,
                 what="the guest's steps after a backup")
    assert [r["level"] for r in records] == ["full"] + ["inc"] * (len(PLAN) - 1)
    assert [r["quiesced"] for r in records] == [q == "yes" for q in PLAN]
    verify = bbctl(daemon, "verify", str(dest))
    assert verify.returncode == 0, verify.stderr

    replayed = []
    steps = []
    for record, quiesce in zip(records, PLAN, strict=True):
        a_path = restore(daemon, dest, "vda", record["id"])
        b_path = restore(daemon, dest, "sdb", record["id"])
        with Ext4Image(a_path, "raw") as a, Ext4Image(b_path, "raw") as b:
            needs = [a.needs_recovery(), b.needs_recovery()]
            if quiesce == "yes":
                # Frozen filesystems have their journal flushed and marked clean.
                assert needs == [False, False], record["id"]
            replayed.append(any(needs))
            check = check_crash_logs(a, b)  # replays the journal first, as a mount would
            assert check.ok, f"{record['id']} (quiesced={quiesce}): {check}"
            for fs in (a, b):
                result = fs.fsck()  # after the replay: nothing left to repair
                assert result.clean, f"{record['id']}: {result.output}"
            steps.append(check.steps)
        for path in (a_path, b_path):
            path.unlink()
    # The guest wrote all along, and every point saw more of it than the one before.
    assert steps == sorted(steps) and steps[0] >= 3 and steps[-1] > steps[0], steps
    assert vm.errors() == []
    frozen = [r["frozen_window"] * 1e3 for r in records if r["quiesced"]]
    crash = [r for r, q in zip(replayed, PLAN, strict=True) if q == "no"]
    print(f"guest boot {boot:.1f} s; steps at each point {steps}; frozen windows "
          f"{', '.join(f'{ms:.0f}' for ms in frozen)} ms; crash-consistent points needing "
          f"journal replay: {sum(crash)} of {len(crash)}")

