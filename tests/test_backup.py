"""bbctl backup / list / restore / verify against the real daemon and QEMU."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import bbctl, domain_state, wait_for
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
              [("sda", 0, 64 * 1024, 0x31)]]
    levels = []
    for i, batch in enumerate(writes):
        for disk, offset, length, pattern in batch:
            vm.write(disk, offset, length, pattern)
        r = bbctl(daemon, "--json", "backup", "vm1", "--dest", str(dest),
                  "--level", ["full", "inc", "auto"][i])
        assert r.returncode == 0, r.stderr
        record = json.loads(r.stdout)
        levels.append(record["level"])
        refs.append({d: reference(vm, d, workdir / f"ref{i}-{d}.qcow2") for d in ("sda", "sdb")})
        if i == 1:  # an incremental reads only what changed: 64 KiB + 192 KiB + 64 KiB
            assert {d: e["bytes_read"] for d, e in record["disks"].items()} == {
                "sda": 128 * 1024, "sdb": 192 * 1024}
    assert levels == ["full", "inc", "inc"]
    listing = bbctl(daemon, "list", str(dest)).stdout.splitlines()
    assert listing[0].split() == ["ID", "LEVEL", "TIME", "DISKS", "BYTES"]
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
    raw = workdir / "raw.img"
    assert bbctl(daemon, "restore", str(dest), "--disk", "sda", "--output", str(raw),
                 "--format", "raw").returncode == 0
    assert raw.stat().st_size == 64 * MiB
    # No snapshot or export is left; each backup's checkpoint stays (the next
    # incremental starts from the newest).
    with daemon.client() as c:
        assert c.snapshot_list("vm1") == [] and c.export_list("vm1") == []
        assert c.call("checkpoint.list", domain="vm1") == ids


def test_verify_catches_a_flipped_byte(defined: tuple[Daemon, Vm], workdir: Path) -> None:
    daemon, vm = defined
    dest = workdir / "b"
    vm.write("sda", 0, 64 * 1024, 0x55)
    assert bbctl(daemon, "backup", "vm1", "--dest", str(dest)).returncode == 0
    assert bbctl(daemon, "verify", str(dest)).returncode == 0
    victim = next(dest.glob("*-sdb.qcow2"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    r = bbctl(daemon, "verify", str(dest))
    assert r.returncode == 1 and victim.name in r.stderr


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
    assert json.loads(r.stdout)["level"] == "full"
    assert "taking a full backup: checkpoint" in r.stderr and "broken" in r.stderr
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
