"""bbctl backup / list / restore / verify against the real daemon and QEMU."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
from pathlib import Path
from typing import IO

import pytest

from tests.conftest import bbctl, domain_state, wait_for
from tests.test_qcow2 import check
from tools.daemon import Daemon
from tools.vm import MiB, Vm


def reference(vm: Vm, disk: str, out: Path) -> Path:
    """The disk as it is now: flush QEMU's caches, copy the image beside it."""
    vm.qemu_io(disk, "flush")
    subprocess.run(["qemu-img", "convert", "-U", "-f", "qcow2", "-O", "qcow2",
                    str(vm.image(disk)), str(out)], check=True)
    return out


def same(a: Path, b: Path) -> bool:
    return subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qcow2",
                           str(a), str(b)]).returncode == 0


def test_full_then_incrementals_restore_every_point(defined: tuple[Daemon, Vm],
                                                    workdir: Path) -> None:
    daemon, vm = defined
    dest = workdir / "backups"
    refs: list[dict[str, Path]] = []
    writes = [[("sda", 0, 1 * MiB, 0x11), ("sdb", 4 * MiB, 64 * 1024, 0x12)],
              [("sda", 2 * MiB, 64 * 1024, 0x21), ("sdb", 32 * MiB, 3 * 64 * 1024, 0x22),
               ("sda", 63 * MiB, 64 * 1024, 0x23)],
              [("sda", 0, 64 * 1024, 0x31), ("sdb", 4 * MiB, 64 * 1024, None)]]
    levels = []
    for i, batch in enumerate(writes):
        for disk, offset, length, pattern in batch:
            if pattern is None:
                vm.zero(disk, offset, length)
            else:
                vm.write(disk, offset, length, pattern)
        r = bbctl(daemon, "--json", "backup", "vm1", "--dest", str(dest),
                  "--level", ["full", "inc", "auto"][i])
        assert r.returncode == 0, r.stderr
        record = json.loads(r.stdout)
        levels.append(record["level"])
        refs.append({d: reference(vm, d, workdir / f"ref{i}-{d}.qcow2") for d in ("sda", "sdb")})
        read = {d: (e["bytes_read"], e["bytes_zeroed"]) for d, e in record["disks"].items()}
        # A full reads only the data; an incremental only what changed, and
        # changed blocks that now read as zeros become zero writes, unread.
        assert read == [{"sda": (MiB, 0), "sdb": (64 * 1024, 0)},
                        {"sda": (128 * 1024, 0), "sdb": (192 * 1024, 0)},
                        {"sda": (64 * 1024, 0), "sdb": (0, 64 * 1024)}][i]
    assert levels == ["full", "inc", "inc"]
    listing = bbctl(daemon, "list", str(dest)).stdout.splitlines()
    assert listing[0].split() == ["ID", "LEVEL", "TIME", "QUIESCED", "DISKS", "BYTES",
                                  "RESTORE"]
    assert [line.split()[-1] for line in listing[1:]] == ["restore,instant,mount"] * 3
    # No guest agent is defined: --quiesce auto took crash-consistent backups.
    assert [line.split()[4] for line in listing[1:]] == ["no", "no", "no"]
    assert [line.split()[1] for line in listing[1:]] == ["full", "inc", "inc"]
    manifest = json.loads((dest / "manifest.json").read_text())
    ids = [b["id"] for b in manifest["backups"]]
    for i, backup_id in enumerate(ids):
        for disk in ("sda", "sdb"):
            out = workdir / f"restored-{i}-{disk}.qcow2"
            r = bbctl(daemon, "restore", str(dest), "--disk", disk, "--at", backup_id,
                      "--output", str(out))
            assert r.returncode == 0, r.stderr
            assert same(out, refs[i][disk]), (backup_id, disk)
            # Every backup file is plain qcow2, its chain readable without bbctl.
            chain = subprocess.run(["qemu-img", "info", "--backing-chain", "--output=json",
                                    str(dest / manifest["backups"][i]["disks"][disk]["file"])],
                                   capture_output=True, text=True, check=True).stdout
            assert len(json.loads(chain)) == i + 1
            check(dest / manifest["backups"][i]["disks"][disk]["file"])
    raw = workdir / "raw.img"
    assert bbctl(daemon, "restore", str(dest), "--disk", "sda", "--output", str(raw),
                 "--format", "raw").returncode == 0
    assert raw.stat().st_size == 64 * MiB
    # No snapshot or export is left; only the newest backup's checkpoint stays
    # (the next incremental starts from it); the older ones are marked deleted.
    with daemon.client() as c:
        assert c.snapshot_list("vm1") == [] and c.export_list("vm1") == []
        assert c.call("checkpoint.list", domain="vm1") == ids[-1:]
    assert [b.get("checkpoint_deleted", False) for b in manifest["backups"]] == [
        True, True, False]


def test_verify_catches_a_flipped_byte_in_any_file(defined: tuple[Daemon, Vm],
                                                   workdir: Path) -> None:
    daemon, vm = defined
    dest = workdir / "b"
    vm.write("sda", 0, 64 * 1024, 0x55)
    assert bbctl(daemon, "backup", "vm1", "--dest", str(dest)).returncode == 0
    vm.write("sdb", 0, 64 * 1024, 0x56)
    assert bbctl(daemon, "backup", "vm1", "--dest", str(dest), "--level", "inc").returncode == 0
    assert bbctl(daemon, "verify", str(dest)).returncode == 0
    files = sorted(dest.glob("*.qcow2"))
    assert len(files) == 4
    for victim in files:
        original = victim.read_bytes()
        data = bytearray(original)
        data[len(data) // 2] ^= 0x01
        victim.write_bytes(bytes(data))
        r = bbctl(daemon, "verify", str(dest))
        assert r.returncode == 1 and r.stderr.strip() == f"bbctl: error: mismatch: {victim.name}"
        victim.write_bytes(original)
    assert bbctl(daemon, "verify", str(dest)).returncode == 0


def test_auto_after_a_crash_takes_a_full_and_says_why(defined: tuple[Daemon, Vm],
                                                      workdir: Path) -> None:
    daemon, vm = defined
    dest = workdir / "b"
    assert bbctl(daemon, "backup", "vm1", "--dest", str(dest)).returncode == 0
    vm.kill()
    vm.start()
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    r = bbctl(daemon, "--json", "backup", "vm1", "--dest", str(dest), "--level", "auto")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["level"] == "full"
    # Per disk: the checkpoint is broken on each (a killed QEMU wrote no bitmaps).
    first = json.loads((dest / "manifest.json").read_text())["backups"][0]["id"]
    for disk in ("sda", "sdb"):
        reason = record["disks"][disk]["reason"]
        assert reason.startswith(f"checkpoint {first} is broken on this disk: "), reason
        assert record["disks"][disk]["level"] == "full"
        assert f"bbctl: {disk}: full ({reason})" in r.stderr.splitlines()
    r = bbctl(daemon, "backup", "vm1", "--dest", str(dest), "--level", "inc")
    assert r.returncode == 0, r.stderr  # the fresh full starts a new chain


def test_a_directory_of_another_domain_is_refused(defined: tuple[Daemon, Vm],
                                                  workdir: Path) -> None:
    daemon, _ = defined
    dest = workdir / "b"
    dest.mkdir()
    (dest / "manifest.json").write_text(json.dumps({"domain": "other", "backups": []}))
    r = bbctl(daemon, "backup", "vm1", "--dest", str(dest))
    assert r.returncode == 1 and "holds backups of domain 'other'" in r.stderr
    with daemon.client() as c:
        assert c.snapshot_list("vm1") == [] and c.call("checkpoint.list", domain="vm1") == []


def wait_paused(stderr: IO[str], step: str) -> list[str]:
    """Read bbctl's stderr until it says it paused at step (it first says each
    disk's level); returns the lines before. Reads the pipe itself (select
    cannot see lines a file object has buffered), so use nothing else on it
    until the process ends."""
    fd, data = stderr.fileno(), b""
    while True:
        text = data.decode(errors="replace")
        lines = text.splitlines()
        # The whole line: print() may write the text and its newline apart.
        if f"bbctl: paused at {step}" in lines and text.endswith("\n"):
            return lines[:lines.index(f"bbctl: paused at {step}")]
        ready, _, _ = select.select([fd], [], [], 60)
        assert ready, f"bbctl did not reach {step}; it said {lines}"
        chunk = os.read(fd, 65536)
        assert chunk, f"bbctl ended before {step}; it said {lines}"
        data += chunk


def interrupt_at(args: list[str], step: str) -> list[str]:
    """Run ``bbctl args`` until it pauses at ``step`` (BBCTL_PAUSE_AT), then
    Ctrl-C it there: it must exit with 130. Returns what it said before."""
    # As a job in the foreground of a terminal: SIGINT not ignored, whoever
    # started the test run (`nohup make test &` ignores it, and Python then
    # leaves it ignored, as a background job should).
    proc = subprocess.Popen([sys.executable, "-m", "blockbackup_client.bbctl", *args],
                            env={**os.environ, "BBCTL_PAUSE_AT": step},
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stderr is not None
        said = wait_paused(proc.stderr, step)
        # SIGINT must reach Python's handler: not ignored nor blocked, else
        # this would hang.
        status = Path(f"/proc/{proc.pid}/status").read_text()
        masks = {k: int(v, 16) for k, v in (line.split(":\t") for line in status.splitlines())
                 if k in ("SigIgn", "SigBlk", "SigCgt")}
        assert masks["SigCgt"] & 2 and not (masks["SigIgn"] | masks["SigBlk"]) & 2, masks
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C on a terminal does
        try:
            assert proc.wait(60) == 130
        except subprocess.TimeoutExpired:
            wchan = Path(f"/proc/{proc.pid}/wchan").read_text()
            raise AssertionError(f"bbctl ignored Ctrl-C for 60 s (in {wchan}): "
                                 f"{Path(f'/proc/{proc.pid}/status').read_text()}") from None
        return said
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def _running_with(path: Path) -> list[int]:
    """PIDs of processes whose command line names a file in ``path`` (our temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (str(path) + "/").encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.mark.parametrize("step", ["snapshot", "export", "pull", "manifest"])
def test_ctrl_c_mid_backup_leaves_nothing_behind(defined: tuple[Daemon, Vm], workdir: Path,
                                                 step: str) -> None:
    daemon, vm = defined
    dest = workdir / "b"
    vm.write("sda", 0, MiB, 0x11)
    assert bbctl(daemon, "backup", "vm1", "--dest", str(dest)).returncode == 0
    manifest = (dest / "manifest.json").read_bytes()
    files = sorted(p.name for p in dest.iterdir())
    nodes = vm.node_names()
    scratch = sorted(p.name for p in (workdir / "state" / "scratch").iterdir())
    with daemon.client() as c:
        checkpoints = c.call("checkpoint.list", domain="vm1")
    vm.write("sda", 2 * MiB, 8 * MiB, 0x22)
    vm.write("sdb", 0, 8 * MiB, 0x23)
    interrupt_at(["--socket", str(daemon.socket), "backup", "vm1", "--dest", str(dest),
                  "--level", "inc"], step)
    # The directory and the daemon are as they were before the backup began.
    assert (dest / "manifest.json").read_bytes() == manifest
    assert sorted(p.name for p in dest.iterdir()) == files
    assert _running_with(dest) == []  # no qemu-nbd left writing a partial file
    with daemon.client() as c:
        assert c.snapshot_list("vm1") == [] and c.export_list("vm1") == []
        assert c.call("checkpoint.list", domain="vm1") == checkpoints
    assert vm.node_names() == nodes
    assert sorted(p.name for p in (workdir / "state" / "scratch").iterdir()) == scratch
    # The chain goes on from the last good backup: the next one is incremental.
    r = bbctl(daemon, "--json", "backup", "vm1", "--dest", str(dest), "--level", "auto")
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert record["level"] == "inc"
    assert {d: e["bytes_read"] for d, e in record["disks"].items()} == {
        "sda": 8 * MiB, "sdb": 8 * MiB}


def _paused_backup(daemon: Daemon, dest: Path, step: str, hold: Path | None = None
                   ) -> subprocess.Popen[str]:
    env = {**os.environ, "BBCTL_PAUSE_AT": step}
    if hold is not None:
        hold.touch()
        env["BBCTL_PAUSE_WHILE"] = str(hold)
    proc = subprocess.Popen([sys.executable, "-m", "blockbackup_client.bbctl", "--socket",
                             str(daemon.socket), "backup", "vm1", "--dest", str(dest)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    wait_paused(proc.stderr, step)
    return proc


def test_two_writers_of_one_directory_do_not_interleave(defined: tuple[Daemon, Vm],
                                                        workdir: Path) -> None:
    """While a backup runs, a second backup (or a prune) of the directory is
    refused in one line naming the first, and the first is left whole."""
    daemon, vm = defined
    dest = workdir / "b"
    vm.write("sda", 0, MiB, 0x11)
    earlier = bbctl(daemon, "--json", "backup", "vm1", "--dest", str(dest))
    assert earlier.returncode == 0, earlier.stderr
    before = json.loads(earlier.stdout)["id"]
    hold = workdir / "hold"
    first = _paused_backup(daemon, dest, "export", hold)
    try:
        holder = json.loads((dest / "lock.json").read_text())
        assert holder["pid"] == first.pid and holder["what"] == "a backup of vm1"
        with daemon.client() as c:
            ours = c.snapshot_list("vm1")
        assert len(ours) == 1 and ours != [before]
        for args in (["backup", "vm1", "--dest", str(dest)], ["prune", str(dest), "--keep", "1"]):
            r = bbctl(daemon, *args)
            assert r.returncode == 1, r.stderr
            lines = r.stderr.splitlines()
            assert len(lines) == 1 and f"{dest} is in use: a backup of vm1 (pid {first.pid} " \
                f"on {os.uname().nodename}" in lines[0], r.stderr
            assert "two writers of one backup directory at once would interleave" in lines[0]
        # The first backup's snapshot and pending record are untouched.
        with daemon.client() as c:
            assert c.snapshot_list("vm1") == ours
        assert json.loads((dest / "pending.json").read_text())["id"] == ours[0]
        hold.unlink()
        out, err = first.communicate(timeout=120)
        assert first.returncode == 0, err
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    manifest = json.loads((dest / "manifest.json").read_text())
    assert [b["id"] for b in manifest["backups"]] == [before, *ours]
    assert sorted(p.name for p in dest.iterdir()) == sorted(["manifest.json"] + [
        f"{b}-{d}.qcow2" for b in (before, *ours) for d in ("sda", "sdb")])
    assert bbctl(daemon, "verify", str(dest)).returncode == 0


def test_a_lock_whose_holder_is_gone_is_taken_over(defined: tuple[Daemon, Vm],
                                                   workdir: Path) -> None:
    """A backup killed outright leaves its lock: the next one takes it over
    (its process is gone) and cleans up after it. Another host's lock is
    respected while it is touched, and taken over when it is not."""
    daemon, vm = defined
    dest = workdir / "b"
    killed = _paused_backup(daemon, dest, "snapshot")
    killed.kill()
    killed.wait()
    assert (dest / "lock.json").exists()
    r = bbctl(daemon, "--json", "backup", "vm1", "--dest", str(dest))
    assert r.returncode == 0, r.stderr
    assert f"took over {dest / 'lock.json'}: a backup of vm1 (pid {killed.pid} " in r.stderr
    assert "is gone (its process ended)" in r.stderr
    assert "of an earlier failed backup" in r.stderr
    with daemon.client() as c:
        assert c.snapshot_list("vm1") == []
        assert c.call("checkpoint.list", domain="vm1") == [json.loads(r.stdout)["id"]]
    # A backup on another host: respected while it touches its lock.
    other = {"what": "a backup of vm1", "host": "elsewhere", "boot_id": "x", "pid": 1,
             "since": 1_700_000_000, "token": "t"}
    (dest / "lock.json").write_text(json.dumps(other))
    r = bbctl(daemon, "backup", "vm1", "--dest", str(dest))
    assert r.returncode == 1 and "is in use: a backup of vm1 (pid 1 on elsewhere" in r.stderr
    assert json.loads((dest / "lock.json").read_text()) == other
    # ... and taken over once it has not for longer than the stale bound.
    old = (dest / "lock.json").stat().st_mtime - 200
    os.utime(dest / "lock.json", (old, old))
    r = bbctl(daemon, "backup", "vm1", "--dest", str(dest))
    assert r.returncode == 0, r.stderr
    assert "(pid 1 on elsewhere" in r.stderr and "did not touch it for 2" in r.stderr
    assert not (dest / "lock.json").exists()
    assert len(json.loads((dest / "manifest.json").read_text())["backups"]) == 2
