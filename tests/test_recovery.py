"""Instant recovery: bbctl restore --instant, the daemon's stream into the
new image in the VM's QEMU, prune's refusal, restores onto block devices."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blockbackup_client import InvalidArgument
from tests.conftest import bbctl, domain_state, restore_raw_onto, snapshot_xml, wait_for
from tools.daemon import Daemon
from tools.vm import MiB, Vm

KiB = 1024
GiB = 1024 * MiB


def _backup(daemon: Daemon, dest: Path, domain: str = "vm1") -> str:
    r = bbctl(daemon, "--json", "backup", domain, "--dest", str(dest))
    assert r.returncode == 0, r.stderr
    return str(json.loads(r.stdout)["id"])


def _instant(daemon: Daemon, dest: Path, at: str, output: Path, *extra: str) -> dict[str, Any]:
    r = bbctl(daemon, "--json", "restore", str(dest), "--disk", "sda", "--at", at,
              "--output", str(output), "--instant", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def _lookup(daemon: Daemon, image: Path) -> dict[str, Any]:
    with daemon.client() as c:
        return c.call("recovery.lookup", file=str(image))  # type: ignore[no-any-return]


def _backing(image: Path) -> str | None:
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(image)],
                                     check=True, capture_output=True, text=True).stdout)
    return info.get("backing-filename")


def same(image: Path, expected: Path) -> bool:
    """The images read the same (-U: the VM still runs on the first)."""
    r = subprocess.run(["qemu-img", "compare", "-U", "-f", "qcow2", "-F", "qcow2",
                        str(image), str(expected)], capture_output=True, text=True)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode == 0


def _reads(vm: Vm, offset: int, length: int, pattern: int) -> None:
    out = vm.qemu_io("sda", f"read -P {pattern:#x} {offset} {length}")
    assert "read " in out and "verification failed" not in out, out


#: What the guest writes while its data is being moved in: over data of the
#: backup (it must win), and where the backup has none.
GUEST_WRITES = [(8 * MiB + 64 * KiB, 64 * KiB, 0x55), (40 * MiB, 128 * KiB, 0x56)]


def _restored(daemon: Daemon, dest: Path, at: str, out: Path) -> Path:
    """The backup point, restored by copy."""
    r = bbctl(daemon, "restore", str(dest), "--disk", "sda", "--at", at, "--output", str(out))
    assert r.returncode == 0, r.stderr
    return out


def _expected(daemon: Daemon, dest: Path, at: str, out: Path) -> Path:
    """The backup point with the guest's writes on it, made without the daemon."""
    _restored(daemon, dest, at, out)
    for offset, length, pattern in GUEST_WRITES:
        subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                        f"write -P {pattern:#x} {offset} {length}", str(out)],
                       check=True, capture_output=True)
    return out


def _two_points(daemon: Daemon, vm: Vm, dest: Path) -> list[str]:
    vm.write("sda", 0, 2 * MiB, 0x11)
    vm.write("sda", 8 * MiB, MiB, 0x12)
    first = _backup(daemon, dest)
    vm.write("sda", MiB, 512 * KiB, 0x13)
    return [first, _backup(daemon, dest)]


def _vm_on(make_vm: Callable[..., Vm], daemon: Daemon, name: str) -> Vm:
    vm = make_vm(name, disks={"sda": 64 * MiB})  # its image exists: the recovery's
    with daemon.client() as c:
        c.domain_define(name, str(vm.daemon_qmp))
    wait_for(lambda: domain_state(daemon, name) == "running", what=f"{name} running")
    return vm


def test_a_vm_runs_on_a_backup_at_once_and_ends_on_its_own_image(
        defined: tuple[Daemon, Vm], make_vm: Callable[..., Vm], workdir: Path) -> None:
    daemon, vm = defined
    dest = workdir / "backups"
    points = _two_points(daemon, vm, dest)
    vm.stop()
    image = workdir / "vm2-sda.qcow2"
    # At 1 MiB/s of copied data (3.5 MiB here), the stream lasts seconds.
    made = _instant(daemon, dest, points[1], image, "--speed", str(MiB))
    assert made["seconds"] < 1.0, made
    assert _backing(image) == made["backing"] == str((dest / f"{points[1]}-sda.qcow2").resolve())
    assert made["recovery"]["state"] == "waiting"

    vm2 = _vm_on(make_vm, daemon, "vm2")
    # The backup's data, at once: the newest point's over the older one's.
    _reads(vm2, 0, MiB, 0x11)
    _reads(vm2, MiB, 512 * KiB, 0x13)
    _reads(vm2, 8 * MiB, MiB, 0x12)
    for offset, length, pattern in GUEST_WRITES:
        vm2.write("sda", offset, length, pattern)
    during = _lookup(daemon, image)
    assert during["state"] == "streaming" and during["disk"] == "sda", during
    assert during["progress"]["done"] < during["progress"]["total"], during
    wait_for(lambda: _lookup(daemon, image)["state"] == "done", timeout=60, what="recovery done")
    assert _backing(image) is None
    assert vm2.running
    vm2.qemu_io("sda", "flush")
    assert same(image, _expected(daemon, dest, points[1], workdir / "expected.qcow2"))
    done = _lookup(daemon, image)
    assert done["progress"] == {"done": 64 * MiB, "total": 64 * MiB}


def _older_point_restored(daemon: Daemon, vm: Vm, workdir: Path,
                          speed: int) -> tuple[Path, str, Path]:
    """Two backups of vm1, vm1 stopped, an instant restore of the older one
    (about 3 MiB of data) at ``speed``: (backup directory, point, image)."""
    dest = workdir / "backups"
    point = _two_points(daemon, vm, dest)[0]
    vm.stop()
    image = workdir / "vm2-sda.qcow2"
    _instant(daemon, dest, point, image, "--speed", str(speed))
    return dest, point, image


def test_a_restart_mid_stream_is_followed_to_the_end(
        defined: tuple[Daemon, Vm], make_vm: Callable[..., Vm], workdir: Path) -> None:
    daemon, vm = defined
    dest, point, image = _older_point_restored(daemon, vm, workdir, 512 * KiB)  # 6 s
    vm2 = _vm_on(make_vm, daemon, "vm2")
    wait_for(lambda: _lookup(daemon, image)["state"] == "streaming", what="streaming")
    daemon.stop()
    daemon.start()
    wait_for(lambda: domain_state(daemon, "vm2") == "running", what="vm2 reconnected")
    progress = _lookup(daemon, image)["progress"]
    assert 0 < progress["done"] < progress["total"], progress  # still streaming
    wait_for(lambda: _lookup(daemon, image)["state"] == "done", timeout=30, what="recovery done")
    assert _backing(image) is None
    assert vm2.running
    vm2.qemu_io("sda", "flush")
    assert same(image, _restored(daemon, dest, point, workdir / "point.qcow2"))


def test_a_vm_restarted_mid_stream_has_the_stream_started_again(
        defined: tuple[Daemon, Vm], make_vm: Callable[..., Vm], workdir: Path) -> None:
    daemon, vm = defined
    dest, point, image = _older_point_restored(daemon, vm, workdir, 256 * KiB)  # 12 s
    with daemon.client() as events:
        events.events_subscribe()
        vm2 = _vm_on(make_vm, daemon, "vm2")
        wait_for(lambda: _lookup(daemon, image)["state"] == "streaming", what="streaming")
        time.sleep(1.0)  # part of it copied
        vm2.stop()
        wait_for(lambda: domain_state(daemon, "vm2") == "disconnected", what="vm2 stopped")
        assert _backing(image) is not None
        with daemon.client() as c:
            c.call("recovery.delete", file=str(image))
            c.call("recovery.start", file=str(image))  # and now without a limit
        vm2.start()
        wait_for(lambda: _lookup(daemon, image)["state"] == "done", timeout=20,
                 what="recovery done")
        seen = []
        while "recovery-done" not in seen:
            seen.append(events.next_event(timeout=10)["type"])
        assert seen.count("recovery-started") == 2, seen
    assert _backing(image) is None
    vm2.qemu_io("sda", "flush")
    assert same(image, _restored(daemon, dest, point, workdir / "point.qcow2"))


def test_a_64_gib_disk_is_ready_to_run_in_well_under_a_second(
        daemon: Daemon, make_vm: Callable[..., Vm], workdir: Path) -> None:
    vm = make_vm(disks={"sda": 64 * GiB})
    with daemon.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
    wait_for(lambda: domain_state(daemon, "vm1") == "running", what="vm1 running")
    vm.write("sda", 63 * GiB, MiB, 0x21)
    dest = workdir / "backups"
    point = _backup(daemon, dest)
    vm.stop()
    start = time.perf_counter()
    made = _instant(daemon, dest, point, workdir / "vm2-sda.qcow2")
    took = time.perf_counter() - start
    print(f"64 GiB: made in {made['seconds']} s, the command took {took:.3f} s")
    assert took < 1.0
    assert made["seconds"] < 0.5, made
    vm2 = make_vm("vm2", disks={"sda": 64 * GiB})
    _reads(vm2, 63 * GiB, MiB, 0x21)


def test_prune_keeps_what_an_unfinished_recovery_reads(defined: tuple[Daemon, Vm],
                                                       workdir: Path) -> None:
    daemon, vm = defined
    dest = workdir / "backups"
    points = _two_points(daemon, vm, dest)
    vm.write("sda", 0, 64 * KiB, 0x14)
    points.append(_backup(daemon, dest))
    image = workdir / "new.qcow2"
    _instant(daemon, dest, points[1], image)  # reads points 1 and 0; no VM runs on it
    before = sorted(p.name for p in dest.iterdir())
    r = bbctl(daemon, "prune", str(dest), "--keep", "1")
    assert r.returncode == 1
    assert f"read by the unfinished instant recovery into {image}" in r.stderr, r.stderr
    assert sorted(p.name for p in dest.iterdir()) == before
    r = bbctl(daemon, "recovery", "delete", str(image))
    assert r.returncode == 0, r.stderr
    r = bbctl(daemon, "prune", str(dest), "--keep", "1")
    assert r.returncode == 0, r.stderr


def test_bad_instant_restores_change_nothing(defined: tuple[Daemon, Vm], workdir: Path) -> None:
    daemon, vm = defined
    dest = workdir / "backups"
    vm.write("sda", 0, 64 * KiB, 0x11)
    point = _backup(daemon, dest)
    exists = workdir / "exists.qcow2"
    exists.write_bytes(b"mine")
    for args, words in (
            (["--output", str(exists), "--instant"], "exists"),
            (["--output", str(workdir / "r.img"), "--instant", "--format", "raw"],
             "--instant makes a qcow2"),
            (["--output", str(workdir / "q.qcow2"), "--speed", "1000"], "with --instant")):
        r = bbctl(daemon, "restore", str(dest), "--disk", "sda", "--at", point, *args)
        assert r.returncode == 1 and words in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert exists.read_bytes() == b"mine"
    assert not (workdir / "r.img").exists() and not (workdir / "q.qcow2").exists()
    raw = workdir / "plain.raw"
    raw.write_bytes(bytes(4096))
    with daemon.client() as c:
        for file, words in ((str(raw), "not qcow2"), ("relative.qcow2", "absolute"),
                            (str(vm.image("sda")), "no backing file")):
            with pytest.raises(InvalidArgument, match=words):
                c.call("recovery.start", file=file)
        assert c.call("recovery.list") == []


def test_restore_onto_a_block_device(defined: tuple[Daemon, Vm], workdir: Path,
                                     make_loop_device: Callable[[int], Path]) -> None:
    daemon, vm = defined
    dest = workdir / "backups"
    vm.write("sda", 0, MiB, 0x31)
    vm.write("sda", 50 * MiB, 64 * KiB, 0x32)
    point = _backup(daemon, dest)
    restore_raw_onto(daemon, dest, point, str(make_loop_device(64 * MiB)))


def test_a_concluded_stream_of_the_vm_manager_is_waited_for(
        daemon: Daemon, make_vm: Callable[..., Vm], workdir: Path) -> None:
    """QEMU 7.2 and 10.0 crash on query-named-block-nodes while a stream job
    is concluded and not yet dismissed (libvirt dismisses its block pulls
    when it sees them end): the daemon reads the graph after the dismissal."""
    import threading

    base, top = workdir / "base.qcow2", workdir / "vm2-sda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), str(64 * MiB)],
                   check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x21 0 1M", str(base)], check=True,
                   capture_output=True)
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base),
                    str(top)], check=True)
    vm2 = _vm_on(make_vm, daemon, "vm2")
    # Rate-limited: the daemon's reaction to the new job reads the graph while
    # it runs (one that concludes between the reaction's query-jobs and its
    # node list kills QEMU all the same: a window no client can close).
    vm2.qmp("block-stream", **{"job-id": "pull", "device": "sda-fmt", "auto-dismiss": False,
                               "speed": 2 * MiB})
    wait_for(lambda: vm2.qmp("query-jobs")[0]["status"] == "concluded", what="concluded")
    answer: list[Any] = []

    def create() -> None:
        with daemon.client() as c:
            answer.append(c.snapshot_create("vm2", snapshot_xml("pit")))

    asker = threading.Thread(target=create)
    asker.start()
    time.sleep(0.5)
    assert not answer  # waiting
    vm2.qmp("job-dismiss", id="pull")
    asker.join(timeout=10)
    assert answer and answer[0]["name"] == "pit", answer
    assert vm2.running and vm2.qmp("query-jobs") == []
    with daemon.client() as c:
        c.snapshot_delete("vm2", "pit")
