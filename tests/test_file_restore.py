"""bbctl mount / umount: a backup point's guest filesystems, read through libguestfs.

The backups are real: a VM's disks are partitioned and filled offline with
libguestfs (ext4 on a partition, ext4 on an LVM volume, ext4 on a whole disk,
one blank disk), the real daemon backs them up (a full), the VM stops, a
libguestfs appliance changes the files and is killed with the filesystems
still mounted (their journals dirty), its writes are committed into the VM's
images (QEMU's block layer, so the persistent bitmaps see them), and the VM's
next backup is an incremental of a point that needs journal replay. Then
bbctl mounts points of that directory and the tests read the files back.

Every libguestfs appliance here runs on the system's QEMU, whatever BB_QEMU
selects for the VM, and a launch costs about 12 s without KVM: so the module
runs in `make test`'s first pass only (the system QEMU), and the backups are
made once for the module. KVM hangs on this host (tools/linux_guest/accel.py
probes it): libguestfs is then told to use TCG (LIBGUESTFS_BACKEND_SETTINGS).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import guestfs
import pytest

from tests.conftest import domain_state, wait_for
from tools.daemon import defined_domain
from tools.linux_guest.accel import accelerator
from tools.vm import MiB, Vm

pytestmark = [
    pytest.mark.skipif((os.environ.get("BB_QEMU") or "system") != "system",
                       reason="libguestfs runs the system QEMU whatever BB_QEMU says: the "
                              "first pass of make test covers it"),
    # Appliance launches take 12-20 s each here (TCG), the module's backups a minute.
    pytest.mark.timeout(900),
]

VG, LV = "bb-vg", "data"       # a dash in the VG name: the directory is bb--vg-data
LV_DIR = "bb--vg-data"
DISKS = {"sda": 256 * MiB, "sdb": 64 * MiB, "sdc": 16 * MiB}
#: What each point holds: {filesystem directory: {relative path: bytes}}.
Files = dict[str, dict[str, bytes]]


def _tcg() -> list[str]:
    return ["force_tcg"] if accelerator().name == "tcg" else []


def _environ(run_dir: Path) -> dict[str, str]:
    env = {**os.environ, "BBCTL_RUN_DIR": str(run_dir)}
    if _tcg():
        env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
    return env


def _handle() -> Any:
    g = guestfs.GuestFS(python_return_dict=True)
    g.set_backend_settings(_tcg())
    return g


def _data(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _put(g: Any, host_dir: Path, root: str, files: dict[str, bytes]) -> None:
    """Write files under root inside the appliance (host files uploaded)."""
    for rel, data in files.items():
        g.mkdir_p(os.path.dirname(f"{root}/{rel}"))
        local = host_dir / "upload"
        local.write_bytes(data)
        g.upload(str(local), f"{root}/{rel}")
        local.unlink()


POINT1: Files = {
    "sda1": {"etc/hostname": b"vm1\n", "data/blob.bin": _data(1, 3 * MiB + 123),
             "data/keep.txt": b"kept only in the full\n"},
    LV_DIR: {"srv/db.bin": _data(2, MiB + 7), "srv/notes.txt": b"on an LVM volume\n"},
    "sdb": {"whole.bin": _data(3, 200 * 1024)},
}
#: What the second point changes, and the files it deletes.
CHANGES: Files = {
    "sda1": {"data/blob.bin": _data(11, 3 * MiB + 123), "data/new.bin": _data(12, 700 * 1024)},
    LV_DIR: {"srv/db.bin": _data(13, MiB + 7), "srv/added.txt": b"written mid-journal\n"},
    "sdb": {"whole.bin": _data(14, 200 * 1024), "second.bin": _data(15, 4096)},
}
DELETED = {"sda1": ["data/keep.txt"]}
POINT2: Files = {fs: {**{k: v for k, v in files.items() if k not in DELETED.get(fs, [])},
                      **CHANGES[fs]} for fs, files in POINT1.items()}


def _prepare(vm: Vm) -> None:
    """Partition and fill the VM's images offline: sda holds ext4 on partition 1
    and an LVM PV on partition 2 (VG bb-vg, LV data, ext4); sdb an ext4 on the
    whole disk; sdc nothing."""
    g = _handle()
    try:
        for disk in ("sda", "sdb"):
            g.add_drive_opts(str(vm.image(disk)), format="qcow2")
        g.launch()
        g.part_init("/dev/sda", "mbr")
        g.part_add("/dev/sda", "p", 2048, 2048 + 96 * 2048 - 1)
        g.part_add("/dev/sda", "p", 2048 + 96 * 2048, -2048)
        g.mkfs("ext4", "/dev/sda1")
        g.pvcreate("/dev/sda2")
        g.vgcreate(VG, ["/dev/sda2"])
        g.lvcreate(LV, VG, 64)
        g.mkfs("ext4", f"/dev/{VG}/{LV}")
        g.mkfs("ext4", "/dev/sdb")
        for device, fs in (("/dev/sda1", "sda1"), (f"/dev/{VG}/{LV}", LV_DIR),
                           ("/dev/sdb", "sdb")):
            g.mount(device, "/")
            _put(g, vm.workdir, "", POINT1[fs])
            g.umount("/")
        g.shutdown()
    finally:
        g.close()


def _change_mid_write(vm: Vm) -> None:
    """The second point's writes, left in dirty journals: an appliance on
    overlays of sda and sdb mounts the three filesystems, writes, syncs and is
    SIGKILLed with them mounted; the overlays are then committed into the
    images by qemu-img (through QEMU's block layer: the checkpoints' bitmaps
    in the images record the writes)."""
    overlays = {d: vm.workdir / f"overlay-{d}.qcow2" for d in ("sda", "sdb")}
    for disk, overlay in overlays.items():
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                        str(vm.image(disk)), str(overlay)], check=True)
    g = _handle()
    appliance = None
    try:
        for overlay in overlays.values():
            g.add_drive_opts(str(overlay), format="qcow2")
        g.launch()
        appliance = g.get_pid()
        for device, fs in (("/dev/sda1", "sda1"), (f"/dev/{VG}/{LV}", LV_DIR),
                           ("/dev/sdb", "sdb")):
            g.mkmountpoint(f"/{fs}")
            g.mount(device, f"/{fs}")
            for rel in DELETED.get(fs, []):
                g.rm(f"/{fs}/{rel}")
            _put(g, vm.workdir, f"/{fs}", CHANGES[fs])
        g.sync()  # every write on the disks; the filesystems stay mounted
        os.kill(appliance, signal.SIGKILL)
        wait_for(lambda: not _running(appliance), what="the appliance killed")
    finally:
        with suppress(RuntimeError):
            g.close()
        if appliance is not None and _running(appliance):
            os.kill(appliance, signal.SIGKILL)
    for overlay in overlays.values():
        subprocess.run(["qemu-img", "check", "-q", str(overlay)], check=True)
        subprocess.run(["qemu-img", "commit", "-q", "-f", "qcow2", str(overlay)], check=True)
        overlay.unlink()


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Backups:
    dest: Path
    ids: list[str]
    levels: list[dict[str, str]]
    base: Path                        # a temporary directory of the module's


@pytest.fixture(scope="module")
def backups() -> Iterator[Backups]:
    """A full and an incremental backup of vm1 (sda, sdb, sdc) into one directory;
    the VM and the daemon are gone once it is made."""
    base = Path(tempfile.mkdtemp(prefix="bb-fr-", dir="/tmp"))
    dest = base / "backups"
    try:
        with defined_domain(DISKS, prefix="bb-fr-vm-", prepare=_prepare) as (vm, daemon):
            bbctl = [sys.executable, "-m", "blockbackup_client.bbctl", "--socket",
                     str(daemon.socket), "--json", "backup", "vm1", "--dest", str(dest)]
            levels = []
            r = subprocess.run([*bbctl, "--level", "full"], capture_output=True, text=True,
                               timeout=300)
            assert r.returncode == 0, r.stderr
            levels.append({d: e["level"] for d, e in json.loads(r.stdout)["disks"].items()})
            vm.stop()  # clean: the checkpoint's bitmaps are stored in the images
            wait_for(lambda: domain_state(daemon, "vm1") == "disconnected")
            _change_mid_write(vm)
            vm.start()
            wait_for(lambda: domain_state(daemon, "vm1") == "running")
            r = subprocess.run([*bbctl, "--level", "inc"], capture_output=True, text=True,
                               timeout=300)
            assert r.returncode == 0, r.stderr
            levels.append({d: e["level"] for d, e in json.loads(r.stdout)["disks"].items()})
        ids = [b["id"] for b in json.loads((dest / "manifest.json").read_text())["backups"]]
        yield Backups(dest, ids, levels, base)
    finally:
        subprocess.run(["rm", "-rf", str(base)])


@dataclass
class Mounts:
    """The test's bbctl: its own run directory; at the end every mount it made is
    unmounted and every process it recorded is gone, whatever happened."""
    run_dir: Path
    root: Path
    pids: list[int] = field(default_factory=list)
    points: list[Path] = field(default_factory=list)

    def bbctl(self, *args: str, env: dict[str, str] | None = None
              ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "blockbackup_client.bbctl", *args],
                              capture_output=True, text=True, timeout=600,
                              env=env or _environ(self.run_dir))

    def start(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen([sys.executable, "-m", "blockbackup_client.bbctl", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=_environ(self.run_dir))

    def mountpoint(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        self.points.append(path)
        return path

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.run_dir.glob("mount-*.json"))]

    def cleanup(self) -> None:
        for record in self.records():
            self.pids += [p for p in (record.get("pid"), record.get("appliance_pid")) if p]
            self.bbctl("umount", record["mountpoint"])
        for pid in self.pids:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        for path in self.points:
            if _mounted(path):
                subprocess.run(["fusermount", "-u", "-z", str(path)])


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    root = Path(tempfile.mkdtemp(prefix="bb-mnt-", dir="/tmp"))
    m = Mounts(root / "run", root)
    try:
        yield m
    finally:
        m.cleanup()
        subprocess.run(["rm", "-rf", "--one-file-system", str(root)])


def _mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def _mentioning(path: Path) -> list[int]:
    """Processes with path in their command line (the mount process has it)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with suppress(OSError):
            if str(path).encode() in Path(f"/proc/{entry}/cmdline").read_bytes():
                found.append(int(entry))
    return found


def _tree(directory: Path) -> dict[str, bytes]:
    """Every file under directory (lost+found aside): relative path -> bytes."""
    found = {}
    for here, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if d != "lost+found"]
        for name in files:
            path = Path(here) / name
            found[str(path.relative_to(directory))] = path.read_bytes()
    return found


def _sums(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir())}


def _host_vgs() -> list[str]:
    """The host's LVM volume groups and logical volumes, by name."""
    env = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1"}
    names = []
    for command in (["vgs", "--noheadings", "-o", "vg_name"],
                    ["lvs", "--noheadings", "-o", "vg_name,lv_name"]):
        r = subprocess.run(command, capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr
        names += r.stdout.split()
    return names + os.listdir("/dev/mapper")


def _no_guest_vg() -> None:
    names = _host_vgs()
    assert VG not in names and LV_DIR not in names, names


def _one_line_error(r: subprocess.CompletedProcess[str], text: str) -> None:
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stdout == ""
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bbctl: error: "), r.stderr
    assert text in lines[0], lines[0]


def test_each_point_mounts_its_files_byte_exact(backups: Backups, mounts: Mounts) -> None:
    assert backups.levels == [{"sda": "full", "sdb": "full", "sdc": "full"},
                              {"sda": "inc", "sdb": "inc", "sdc": "inc"}]
    before = _sums(backups.dest)
    _no_guest_vg()
    m1, m2 = mounts.mountpoint("full"), mounts.mountpoint("inc")
    # Both at once: two appliances reading the same chain (the full is the
    # incremental's backing file), each through its own throwaway overlay.
    began = time.monotonic()
    full = mounts.start("--json", "mount", str(backups.dest), "--disk", "sda", "--at",
                        backups.ids[0], str(m1))
    inc = mounts.start("mount", str(backups.dest), "--disk", "sda", str(m2))
    out1, err1 = full.communicate(timeout=600)
    out2, err2 = inc.communicate(timeout=600)
    seconds = time.monotonic() - began
    assert full.returncode == 0, err1
    assert inc.returncode == 0, err2
    assert err1 == err2 == ""  # no terminal: no progress line
    result = json.loads(out1)
    mounts.pids += [result["pid"], result["appliance_pid"]]
    assert result["backup"] == backups.ids[0] and result["mountpoint"] == str(m1)
    assert [(f["name"], f["path"], f["source"], f["type"], f["mounted"], f["note"])
            for f in result["filesystems"]] == [
        ("sda1", f"{m1}/sda1", "partition 1", "ext4", True, None),
        (LV_DIR, f"{m1}/{LV_DIR}", f"LVM {VG}/{LV}", "ext4", True, None)]
    # The human output says where each filesystem is, and that the incremental's
    # journals were replayed (in the overlay).
    lines = out2.splitlines()
    assert lines[0].startswith(f"mounted sda at {backups.ids[1]} read-only on {m2} in ")
    assert f"bbctl umount {m2} ends it" in lines[0]
    assert lines[1].split() == ["PATH", "SOURCE", "TYPE", "NOTE"]
    assert [line.split()[:4] for line in lines[2:]] == [
        [f"{m2}/sda1", "partition", "1", "ext4"], [f"{m2}/{LV_DIR}", "LVM", f"{VG}/{LV}", "ext4"]]
    assert all("journal replayed (in the throwaway overlay)" in line for line in lines[2:])
    inc_record = next(r for r in mounts.records() if r["mountpoint"] == str(m2))
    mounts.pids += [inc_record["pid"], inc_record["appliance_pid"]]
    print(f"two mounts at once: {seconds:.1f} s")

    for mountpoint, expected in ((m1, POINT1), (m2, POINT2)):
        assert sorted(os.listdir(mountpoint)) == sorted(["sda1", LV_DIR])
        for fs in ("sda1", LV_DIR):
            assert _tree(mountpoint / fs) == expected[fs], (mountpoint, fs)
    # Read-only: nothing can be written through the mount.
    with pytest.raises(OSError):
        (m1 / "sda1" / "new").write_bytes(b"x")
    _no_guest_vg()  # LVM ran inside the appliances only
    # A second mount on a mounted directory is refused, naming the first.
    r = mounts.bbctl("mount", str(backups.dest), "--disk", "sda", str(m1))
    _one_line_error(r, f"{m1} is already mounted (bbctl mount, pid {result['pid']}; "
                       f"bbctl umount {m1} ends it)")

    for mountpoint, record in ((m1, result), (m2, inc_record)):
        r = mounts.bbctl("--json", "umount", str(mountpoint))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["pid"] == record["pid"]
        assert not _running(record["pid"]) and not _running(record["appliance_pid"])
        assert not _mounted(mountpoint) and os.listdir(mountpoint) == []
    assert mounts.records() == [] and os.listdir(mounts.run_dir) == []
    r = mounts.bbctl("umount", str(m1))
    _one_line_error(r, f"{m1} is not mounted")
    _no_guest_vg()
    assert _sums(backups.dest) == before  # byte for byte: the replays went to the overlays


def test_a_point_that_needs_journal_replay_mounts_and_stays_as_it_was(
        backups: Backups, mounts: Mounts) -> None:
    before = _sums(backups.dest)
    manifest = json.loads((backups.dest / "manifest.json").read_text())
    files = [b["disks"] for b in manifest["backups"]]
    # The incremental's filesystems really need recovery (they were mounted,
    # their journals dirty, when the point was taken); the full's do not.
    g = _handle()
    try:
        for path in (files[1]["sda"]["file"], files[1]["sdb"]["file"], files[0]["sdb"]["file"]):
            g.add_drive_opts(str(backups.dest / path), format="qcow2", readonly=True)
        g.launch()
        dirty = {device: "needs_recovery" in g.tune2fs_l(device)["Filesystem features"].split()
                 for device in ("/dev/sda1", f"/dev/{VG}/{LV}", "/dev/sdb", "/dev/sdc")}
        g.shutdown()
    finally:
        g.close()
    assert dirty == {"/dev/sda1": True, f"/dev/{VG}/{LV}": True, "/dev/sdb": True,
                     "/dev/sdc": False}
    # sdb has its filesystem on the whole disk: one directory named after the disk.
    point = mounts.mountpoint("sdb")
    r = mounts.bbctl("--json", "mount", str(backups.dest), "--disk", "sdb", str(point))
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    mounts.pids += [result["pid"], result["appliance_pid"]]
    print(f"mount of one filesystem: {result['seconds']} s")
    assert [(f["name"], f["source"], f["note"]) for f in result["filesystems"]] == [
        ("sdb", "whole disk", "journal replayed (in the throwaway overlay)")]
    assert os.listdir(point) == ["sdb"]
    assert _tree(point / "sdb") == POINT2["sdb"]
    r = mounts.bbctl("umount", str(point))
    assert r.returncode == 0 and r.stdout == f"unmounted {point}\n", r.stderr
    assert not _running(result["pid"]) and not _running(result["appliance_pid"])
    assert os.listdir(point) == [] and not _mounted(point)
    assert _sums(backups.dest) == before


def test_bad_inputs_are_one_line_errors(backups: Backups, mounts: Mounts) -> None:
    dest = str(backups.dest)
    empty = mounts.mountpoint("empty")
    full = mounts.mountpoint("full")
    (full / "file").write_text("x")
    missing = backups.base / "nothing-here"
    plain = backups.base / "plain-file"
    plain.write_text("x")
    no_manifest = mounts.mountpoint("no-manifest")
    cases = [
        (["mount", str(missing), "--disk", "sda", str(empty)], f"no such directory: {missing}"),
        (["mount", str(no_manifest), "--disk", "sda", str(empty)],
         f"{no_manifest} holds no backups (manifest.json missing)"),
        (["mount", dest, "--disk", "sdz", str(empty)],
         f"backup {backups.ids[-1]} has no disk 'sdz'"),
        (["mount", dest, "--disk", "sda", "--at", "bk-nope", str(empty)],
         "no backup 'bk-nope' in this directory"),
        (["mount", dest, "--disk", "sda", str(missing)], f"no such directory: {missing}"),
        (["mount", dest, "--disk", "sda", str(plain)], f"{plain} is not a directory"),
        (["mount", dest, "--disk", "sda", str(full)], f"{full} is not an empty directory"),
        (["--json", "mount", dest, "--disk", "sda", str(full)],
         f"{full} is not an empty directory"),
        (["umount", str(empty)], f"{empty} is not mounted"),
    ]
    for args, text in cases:
        _one_line_error(mounts.bbctl(*args), text)
    # Without libguestfs's Python binding (shadowed here by a module that is
    # not there): which packages to install.
    shadow = backups.base / "no-guestfs"
    shadow.mkdir(exist_ok=True)
    (shadow / "guestfs.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'guestfs'\", name='guestfs')\n")
    env = {**_environ(mounts.run_dir), "PYTHONPATH": str(shadow)}
    r = mounts.bbctl("mount", dest, "--disk", "sda", str(empty), env=env)
    _one_line_error(r, "install the Debian packages libguestfs-tools and python3-guestfs")
    # A blank disk: the appliance starts, finds nothing, and is gone again.
    r = mounts.bbctl("mount", dest, "--disk", "sdc", str(empty))
    _one_line_error(r, "no filesystem found on sdc")
    assert os.listdir(empty) == [] and not _mounted(empty)
    assert os.listdir(mounts.run_dir) == [] and _mentioning(empty) == []
    # --help in the style of the others.
    r = mounts.bbctl("mount", "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: bbctl mount [-h] --disk DISK")
    assert "libguestfs's appliance reads them" in " ".join(r.stdout.split())
    r = mounts.bbctl("list", dest)
    assert r.returncode == 0, r.stderr
    assert [line.split()[-1] for line in r.stdout.splitlines()] == [
        "RESTORE", "restore,instant,mount", "restore,instant,mount"]
