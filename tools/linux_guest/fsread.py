"""Reading the guest's ext4 disks without mounting them (e2fsprogs on a raw copy).

For the tests and the demo, and for checking restored backups: any image
qemu-img reads (a qcow2 with its backing chain, a raw file, or an NBD URL such
as ``nbd+unix:///sda?socket=/run/x.sock``) is first converted to a sparse raw
temporary file, so nothing here changes the image itself; e2fsck's repairs and
journal replays change that copy only.

    with Ext4Image(vm.image("vda")) as fs:
        fs.needs_recovery()      # was it unmounted cleanly?
        fs.fsck().clean          # e2fsck -fn exit status 0
        fs.read("/log")
    check_crash_logs(Ext4Image(a), Ext4Image(b))  # the crash workload's invariant

e2fsck's exit status is a bit mask: 0 no errors, 1 errors corrected, 2 reboot
needed, 4 errors left uncorrected, 8 operational error (see FsckResult).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

E2FS = "/usr/sbin:/sbin:/usr/bin:/bin"


def _tool(name: str) -> str:
    found = shutil.which(name, path=E2FS)
    if found is None:
        raise FileNotFoundError(f"{name} not found (apt-get install e2fsprogs)")
    return found


@dataclass(frozen=True)
class FsckResult:
    returncode: int
    output: str

    @property
    def clean(self) -> bool:
        """No errors found (exit status 0)."""
        return self.returncode == 0

    @property
    def corrected(self) -> bool:
        return bool(self.returncode & 1)

    @property
    def uncorrected(self) -> bool:
        return bool(self.returncode & 4)

    @property
    def failed(self) -> bool:
        """e2fsck itself failed (usage or operational error, 8 or 16)."""
        return bool(self.returncode & 24)


class DebugfsError(RuntimeError):
    pass


class Ext4Image:
    """An ext4 filesystem image, read through a private raw copy.

    ``fmt``: the source's format for qemu-img (default: probed for files,
    raw for NBD URLs). ``force_share``: read an image a running QEMU holds
    (qemu-img -U; what it shows is then whatever was on the file at that time).
    """

    def __init__(self, source: Path | str, fmt: str | None = None,
                 force_share: bool = False, tmpdir: Path | None = None) -> None:
        self.source = str(source)
        self._dir = Path(tempfile.mkdtemp(prefix="bb-fsread-", dir=tmpdir))
        self.raw = self._dir / "fs.raw"
        if fmt is None and re.match(r"nbd(\+\w+)?:", self.source):
            fmt = "raw"
        args = ["qemu-img", "convert", "-O", "raw"]
        if fmt:
            args += ["-f", fmt]
        if force_share:
            args.append("-U")
        proc = subprocess.run([*args, self.source, str(self.raw)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            self.close()
            raise RuntimeError(f"qemu-img convert {self.source}: {proc.stderr.strip()}")

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Ext4Image:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ------------------------------------------------------------ superblock

    def superblock(self) -> dict[str, str]:
        """``dumpe2fs -h``'s fields ("Filesystem features", "Filesystem state"...)."""
        proc = subprocess.run([_tool("dumpe2fs"), "-h", str(self.raw)], capture_output=True,
                              text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"dumpe2fs {self.source}: {proc.stderr.strip()}")
        fields = {}
        for line in proc.stdout.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        return fields

    def features(self) -> set[str]:
        return set(self.superblock().get("Filesystem features", "").split())

    def needs_recovery(self) -> bool:
        """The journal holds transactions a mount (or e2fsck) would replay:
        the filesystem was not unmounted cleanly (or was frozen, not synced)."""
        return "needs_recovery" in self.features()

    # ------------------------------------------------------------------ fsck

    def fsck(self, repair: bool = False) -> FsckResult:
        """``e2fsck -fn`` (check only), or ``-fy`` (replay the journal and repair
        the copy) with repair=True."""
        proc = subprocess.run([_tool("e2fsck"), "-f", "-y" if repair else "-n", str(self.raw)],
                              capture_output=True, text=True)
        return FsckResult(proc.returncode, proc.stdout + proc.stderr)

    def recover(self) -> FsckResult:
        """Replay the journal only, as a mount would (e2fsck -E journal_only)."""
        proc = subprocess.run([_tool("e2fsck"), "-y", "-E", "journal_only", str(self.raw)],
                              capture_output=True, text=True)
        return FsckResult(proc.returncode, proc.stdout + proc.stderr)

    # ----------------------------------------------------------------- files

    def _debugfs(self, request: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([_tool("debugfs"), "-R", request, str(self.raw)],
                              capture_output=True)

    def listdir(self, path: str = "/") -> dict[str, int]:
        """name -> size of the entries of a directory (without . and ..)."""
        proc = self._debugfs(f"ls -p {path}")
        entries = {}
        for line in proc.stdout.decode(errors="replace").splitlines():
            parts = line.split("/")
            if len(parts) >= 7 and parts[5] not in (".", ".."):
                entries[parts[5]] = int(parts[6] or 0)
        if not entries and "not found" in proc.stderr.decode(errors="replace"):
            raise FileNotFoundError(f"{self.source}: {path}")
        return entries

    def exists(self, path: str) -> bool:
        proc = self._debugfs(f"stat {path}")
        return b"not found" not in proc.stderr and b"Inode:" in proc.stdout

    def read(self, path: str) -> bytes:
        proc = self._debugfs(f"cat {path}")
        err = proc.stderr.decode(errors="replace")
        if "not found" in err or "File not found" in err:
            raise FileNotFoundError(f"{self.source}: {path}")
        if proc.returncode != 0:
            raise DebugfsError(f"debugfs cat {path}: {err.strip()}")
        return proc.stdout

    def extract(self, dest: Path, path: str = "/") -> Path:
        """Copy a directory tree out (debugfs rdump) into dest; returns dest."""
        dest.mkdir(parents=True, exist_ok=True)
        proc = self._debugfs(f"rdump {path} {dest}")
        if proc.returncode != 0:
            raise DebugfsError(f"debugfs rdump {path}: {proc.stderr.decode(errors='replace')}")
        return dest


def read_file(source: Path | str, path: str, fmt: str | None = None,
              force_share: bool = False) -> bytes:
    with Ext4Image(source, fmt, force_share) as fs:
        return fs.read(path)


def fsck(source: Path | str, repair: bool = False) -> FsckResult:
    with Ext4Image(source) as fs:
        return fs.fsck(repair)


def needs_recovery(source: Path | str) -> bool:
    with Ext4Image(source) as fs:
        return fs.needs_recovery()


# ------------------------------------------------------- the crash workload

@dataclass
class CrashLog:
    """One disk's side of the crash workload: its log and the files found."""

    keep: int                          # files older than the last `keep` are deleted
    entries: list[tuple[str, str]]     # (file name, sha256) of each complete line
    torn: str | None                   # an incomplete last line, if any
    files: dict[str, str]              # name -> sha256 of the f<n> files present


@dataclass
class CrashCheck:
    a: CrashLog
    b: CrashLog
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def steps(self) -> int:
        """Complete steps (both halves written)."""
        return len(self.b.entries)

    def __str__(self) -> str:
        state = "consistent" if self.ok else "INCONSISTENT: " + "; ".join(self.problems)
        return (f"crash logs: A {len(self.a.entries)} entries, B {len(self.b.entries)}, "
                f"keep {self.a.keep}: {state}")


def crash_log(fs: Ext4Image) -> CrashLog:
    """The crash workload's state on one (recovered) filesystem image."""
    with tempfile.TemporaryDirectory(prefix="bb-crash-") as tmp:
        root = fs.extract(Path(tmp))
        log = root / "log"
        text = log.read_text(errors="replace") if log.exists() else ""
        files = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in root.iterdir() if re.fullmatch(r"f\d+", p.name)}
    lines = text.split("\n")
    torn = lines.pop() or None  # what follows the last newline
    keep = 0
    entries = []
    for line in lines:
        m = re.fullmatch(r"# crash keep=(\d+)", line)
        if m:
            keep = int(m.group(1))
            continue
        name, _, digest = line.partition(" ")
        entries.append((name, digest))
    return CrashLog(keep, entries, torn, files)


def check_crash_logs(a: Ext4Image, b: Ext4Image) -> CrashCheck:
    """Check the crash workload's invariant on the images of its disks A and B
    (each recovered first, as a mount would: pass images taken at one instant).

    At any instant B's log has as many complete lines as A's, or one fewer;
    the lines name f1, f2... in order; every file of the last `keep` lines
    exists with the checksum its line gives (an older one may have been
    deleted, but not changed); no file beyond the next step's exists.
    """
    for fs in (a, b):
        result = fs.recover()
        if result.failed:
            raise RuntimeError(f"{fs.source}: journal replay failed: {result.output}")
    check = CrashCheck(crash_log(a), crash_log(b))
    p = check.problems
    na, nb = len(check.a.entries), len(check.b.entries)
    if nb not in (na, na - 1):
        p.append(f"B has {nb} log lines and A {na}: B must have as many or one fewer")
    for side, log in (("A", check.a), ("B", check.b)):
        if log.torn is not None:
            p.append(f"{side}: the log ends with an incomplete line {log.torn!r}")
        n = len(log.entries)
        for i, (name, digest) in enumerate(log.entries, start=1):
            if name != f"f{i}":
                p.append(f"{side}: log line {i} names {name!r}, expected f{i}")
                break
            found = log.files.get(name)
            recent = log.keep == 0 or i > n - log.keep
            if found is None and recent:
                p.append(f"{side}: {name} is missing")
            elif found is not None and found != digest:
                p.append(f"{side}: {name} does not have the checksum of its log line")
        for name in log.files:
            if int(name[1:]) > n + 1:
                p.append(f"{side}: {name} exists beyond the log's next step f{n + 1}")
    return check
