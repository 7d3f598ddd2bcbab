"""Builds the guest's kernel and initramfs from Debian packages, cached by content.

Inputs, all from apt (nothing else is downloaded):

* the kernel: the versioned ``linux-image-<abi>-amd64`` package that
  ``linux-image-amd64`` depends on, fetched with ``apt-get download`` and
  unpacked with ``dpkg-deb -x`` into the cache (the host's /boot and
  /lib/modules are not touched). Only the modules the guest needs are kept;
  their dependencies are read from each module's ``.modinfo`` section (the
  package ships no modules.dep), so no kmod tools are needed either;
* ``busybox-static`` and ``qemu-guest-agent``, also fetched with
  ``apt-get download``: installing busybox-static would remove the host's
  busybox package (they conflict), and the agent's package would register a
  service on the host;
* e2fsprogs (mke2fs, e2fsck, debugfs, dumpe2fs) and the shared libraries of
  every dynamically linked program (found with ldd, with the dynamic loader),
  copied from the host.

The key of a build is a hash of the packages' names, versions and .deb
checksums (from the apt index), the init script, this package's source and
the content of the host files copied. The package versions are resolved with
apt-cache once per state of /var/lib/apt/lists, so a build whose output exists
costs a few file hashes (~20 ms). The initramfs is an uncompressed newc cpio
written here (no cpio tool needed): under TCG, decompressing it would cost
more boot time than reading the extra megabytes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import lzma
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tools.cache import cache_dir as shared_cache_dir
from tools.cache import sha256_file

HERE = Path(__file__).resolve().parent
INIT_SCRIPT = HERE / "init.sh"
DEFAULT_CACHE = Path("/var/cache/blockbackupd-guest")
KERNEL_META = "linux-image-amd64"
DOWNLOADED = ("busybox-static", "qemu-guest-agent")

#: Modules loaded at boot, in this order after their dependencies. Everything
#: here is =m in Debian's 6.1 config (checked against the package's config
#: file at build time: a built-in one is skipped). xfs is left out: 4 MiB of
#: module, and no mkfs.xfs in the guest.
MODULES = (
    "virtio_pci",      # the PCI transport of every virtio device
    "virtio_blk",      # virtio-blk-pci disks (/dev/vdX)
    "virtio_scsi",     # the virtio-scsi-pci controller
    "sd_mod",          # scsi-hd disks on it (/dev/sdX)
    "virtio_console",  # virtio-serial ports: the guest agent's channel
    "crc32c_generic",  # ext4 and jbd2 checksums (crypto API "crc32c")
    "crc32c_intel",    # ... the SSE4.2 one, preferred when the CPU has it
    "ext4",
    "qemu_fw_cfg",     # /sys/firmware/qemu_fw_cfg: the host's script
    "button",          # ACPI power button (system_powerdown) ...
    "evdev",           # ... read from /dev/input/eventN
)
#: The config symbols of MODULES, to tell built-in from module.
CONFIG_SYMBOLS = {
    "virtio_pci": "VIRTIO_PCI", "virtio_blk": "VIRTIO_BLK", "virtio_scsi": "SCSI_VIRTIO",
    "sd_mod": "BLK_DEV_SD", "virtio_console": "VIRTIO_CONSOLE",
    "crc32c_generic": "CRYPTO_CRC32C", "crc32c_intel": "CRYPTO_CRC32C_INTEL",
    "ext4": "EXT4_FS", "qemu_fw_cfg": "FW_CFG_SYSFS", "button": "ACPI_BUTTON",
    "evdev": "INPUT_EVDEV",
}
#: Host programs copied into the guest's /usr/local/sbin (busybox's mke2fs
#: applet would otherwise shadow e2fsprogs' one).
E2FSPROGS = ("mke2fs", "e2fsck", "debugfs", "dumpe2fs", "tune2fs")
HOST_FILES = {"/etc/mke2fs.conf": "etc/mke2fs.conf"}
SBIN_PATH = "/usr/local/sbin:/usr/sbin:/sbin:/usr/bin:/bin"


class BuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class GuestImage:
    """A built guest: boot QEMU with ``-kernel kernel -initrd initrd``. The
    kernel is the uncompressed ELF (PVH entry) when it could be extracted,
    else the package's bzImage."""

    kernel: Path
    initrd: Path
    kernel_version: str     # e.g. 6.1.0-56-amd64
    key: str                # the content hash naming the build directory
    directory: Path
    packages: dict[str, str]  # package -> version
    modules: tuple[str, ...]  # in load order
    built_seconds: float | None  # None when it came from the cache

    @property
    def initrd_size(self) -> int:
        return self.initrd.stat().st_size


def cache_dir() -> Path:
    """$BB_GUEST_CACHE, else /var/cache/blockbackupd-guest (see tools.cache)."""
    return shared_cache_dir("BB_GUEST_CACHE", DEFAULT_CACHE)


@contextmanager
def locked(cache: Path, name: str = "build") -> Iterator[None]:
    """One builder (or probe) at a time per cache, across processes."""
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, **kwargs)
    if proc.returncode != 0:
        raise BuildError(f"{' '.join(args)} failed ({proc.returncode}):\n"
                         f"{proc.stdout}{proc.stderr}")
    return proc


# ---------------------------------------------------------------- apt side

def _apt_fingerprint() -> str:
    """Changes whenever apt's idea of the candidate versions may change."""
    h = hashlib.sha256()
    for d in (Path("/var/lib/apt/lists"), Path("/etc/apt")):
        for p in sorted(d.rglob("*")) if d.exists() else []:
            if p.is_file() and "partial" not in p.parts and p.name != "lock":
                st = p.stat()
                h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _apt_show(packages: Iterable[str]) -> dict[str, dict[str, str]]:
    # Not run(): apt-cache fails when one of them is unknown, yet shows the others.
    out = subprocess.run(["apt-cache", "show", "--no-all-versions", *packages],
                         capture_output=True, text=True).stdout
    result: dict[str, dict[str, str]] = {}
    for stanza in out.strip().split("\n\n"):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line[:1] not in (" ", "\t") and ":" in line:
                k, _, v = line.partition(":")
                fields[k] = v.strip()
        if "Package" in fields:
            result[fields["Package"]] = fields
    return result


def resolve_packages(cache: Path) -> dict[str, dict[str, str]]:
    """package -> {Version, SHA256, Filename} of the candidates apt would take.

    apt-cache is slow without its binary cache (Docker images disable it:
    0.6 s a call), so the answer is kept per state of apt's lists.
    """
    fingerprint = _apt_fingerprint()
    memo = cache / "resolved.json"
    try:
        saved = json.loads(memo.read_text())
        if saved["fingerprint"] == fingerprint:
            return dict(saved["packages"])
    except (OSError, ValueError, KeyError):
        pass
    meta = _apt_show([KERNEL_META]).get(KERNEL_META)
    if meta is None:
        # A fresh machine whose packages came preinstalled may have empty
        # lists: fetch them once, as `make`'s system-deps would.
        subprocess.run(["apt-get", "update", "-q"], capture_output=True)
        meta = _apt_show([KERNEL_META]).get(KERNEL_META)
    if meta is None:
        raise BuildError(f"apt knows no {KERNEL_META} (run apt-get update; Debian only)")
    kernel = next((d.split()[0] for d in meta.get("Depends", "").split(",")
                   if d.strip().startswith("linux-image-")), None)
    if kernel is None:
        raise BuildError(f"{KERNEL_META} depends on no linux-image-* package: {meta}")
    wanted = [kernel, *DOWNLOADED]
    shown = _apt_show(wanted)
    missing = [p for p in wanted if p not in shown]
    if missing:
        raise BuildError(f"apt has no candidate for {missing} (run apt-get update)")
    packages = {p: {k: shown[p][k] for k in ("Version", "SHA256", "Filename")} for p in wanted}
    memo.write_text(json.dumps({"fingerprint": fingerprint, "packages": packages}))
    return packages


def download(package: str, info: dict[str, str], debs: Path) -> Path:
    """The package's .deb in debs/, fetched with apt-get download if needed."""
    deb = debs / Path(info["Filename"]).name
    if deb.exists() and sha256_file(deb) == info["SHA256"]:
        return deb
    debs.mkdir(parents=True, exist_ok=True)
    for stale in debs.glob(f"{package}_*.deb"):
        stale.unlink()
    args = ["apt-get", "download", "-q", f"{package}={info['Version']}"]
    proc = subprocess.run(args, cwd=debs, capture_output=True, text=True)
    if proc.returncode != 0 and os.geteuid() == 0:
        # The index may be older than the mirror (a superseded security update).
        subprocess.run(["apt-get", "update", "-q"], capture_output=True)
        proc = subprocess.run(args, cwd=debs, capture_output=True, text=True)
    # apt names the file with the epoch (1%3a1.35...), the pool without it.
    fetched = list(debs.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or len(fetched) != 1:
        raise BuildError(f"{' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    fetched[0].replace(deb)
    if sha256_file(deb) != info["SHA256"]:
        raise BuildError(f"{deb}: checksum differs from apt's index")
    return deb


# ------------------------------------------------------------- kernel side

def modinfo(path: Path) -> dict[str, list[str]]:
    """The key=value strings of a module's .modinfo ELF section."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise BuildError(f"{path}: not a 64-bit ELF module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize)
        return name, offset, size

    _, stroff, _ = section(shstrndx)
    for i in range(shnum):
        name, offset, size = section(i)
        end = data.index(b"\0", stroff + name)
        if data[stroff + name:end] == b".modinfo":
            info: dict[str, list[str]] = {}
            for item in data[offset:offset + size].split(b"\0"):
                if b"=" in item:
                    k, _, v = item.decode(errors="replace").partition("=")
                    info.setdefault(k, []).append(v)
            return info
    return {}


def module_order(tree: Path, roots: Iterable[str], builtin: set[str]) -> list[Path]:
    """Module files for roots and their dependencies, dependencies first."""
    files = {p.name.split(".ko")[0].replace("-", "_"): p for p in tree.rglob("*.ko*")}
    order: list[Path] = []
    done: set[str] = set()

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if name in done or name in builtin:
            return
        if name in chain:
            raise BuildError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        path = files.get(name)
        if path is None:
            raise BuildError(f"module {name} not in the kernel package")
        if path.suffix != ".ko":
            raise BuildError(f"{path}: compressed modules are not supported")
        for dep in ",".join(modinfo(path).get("depends", [])).split(","):
            if dep:
                visit(dep, chain + (name,))
        done.add(name)
        order.append(path)

    for root in roots:
        visit(root, ())
    return order


def kernel_config(root: Path) -> dict[str, str]:
    config = next(root.glob("boot/config-*"), None)
    if config is None:
        raise BuildError("the kernel package has no boot/config-*")
    values = {}
    for line in config.read_text().splitlines():
        m = re.match(r"CONFIG_(\w+)=(.*)", line)
        if m:
            values[m.group(1)] = m.group(2)
    return values


def has_pvh_entry(elf: bytes) -> bool:
    """Whether an ELF kernel has the Xen PVH entry note QEMU boots it by."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        return False
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _flags, offset, _vaddr, _paddr, filesz = struct.unpack_from(
            "<IIQQQQ", elf, phoff + i * phentsize)
        if p_type != 4:  # PT_NOTE
            continue
        pos, end = offset, offset + filesz
        while pos + 12 <= end:
            namesz, descsz, n_type = struct.unpack_from("<III", elf, pos)
            name = elf[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            if name == b"Xen" and n_type == 18:  # XEN_ELFNOTE_PHYS32_ENTRY
                return True
            pos += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def pvh_kernel(bzimage: bytes) -> bytes | None:
    """The uncompressed ELF kernel inside a bzImage, if it can be booted by
    QEMU's PVH entry. Under TCG, that skips ~3 s of the decompressor (xz)
    and firmware: 3.0 s instead of 5.9 s from QEMU start to init's poweroff.
    """
    at = bzimage.find(b"\xfd7zXZ\x00")
    if at < 0:
        return None
    try:
        elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(bzimage[at:])
    except lzma.LZMAError:
        return None
    return elf if has_pvh_entry(elf) else None


# -------------------------------------------------------------- cpio (newc)

class Cpio:
    """An uncompressed newc archive, as the kernel unpacks into its rootfs."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[int, bytes, int]] = {}  # name -> mode, data, rdev

    def _parents(self, name: str) -> None:
        parts = name.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d not in self.entries:
                self.entries[d] = (stat.S_IFDIR | 0o755, b"", 0)

    def dir(self, name: str, mode: int = 0o755) -> None:
        self._parents(name)
        self.entries[name] = (stat.S_IFDIR | mode, b"", 0)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._parents(name)
        self.entries[name] = (stat.S_IFREG | mode, data, 0)

    def symlink(self, name: str, target: str) -> None:
        self._parents(name)
        self.entries[name] = (stat.S_IFLNK | 0o777, target.encode(), 0)

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._parents(name)
        self.entries[name] = (stat.S_IFCHR | mode, b"", (major << 8) | minor)

    def write(self, path: Path) -> None:
        def pad(n: int) -> bytes:
            return b"\0" * (-n % 4)

        with open(path, "wb") as out:
            # Parents sort before their children: the kernel creates in order.
            for ino, name in enumerate(sorted(self.entries) + ["TRAILER!!!"], start=1):
                mode, data, rdev = self.entries.get(name, (0, b"", 0))
                encoded = name.encode() + b"\0"
                fields = (ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
                          0, 0, rdev >> 8, rdev & 0xFF, len(encoded), 0)
                header = b"070701" + b"".join(f"{v:08X}".encode() for v in fields)
                out.write(header + encoded + pad(len(header) + len(encoded)))
                out.write(data + pad(len(data)))


def ldd(binary: Path) -> dict[str, Path]:
    """Install path in the guest -> host file, for binary's libraries and loader."""
    out = run(["ldd", str(binary)]).stdout
    libs: dict[str, Path] = {}
    for line in out.splitlines():
        line = line.strip()
        if "not found" in line:
            raise BuildError(f"{binary}: a library is missing on this host: {line}")
        m = re.match(r"(\S+) => (/\S+) \(", line)
        if m:
            libs[f"lib/x86_64-linux-gnu/{m.group(1)}"] = Path(m.group(2))
            continue
        m = re.match(r"(/\S+) \(", line)  # the dynamic loader
        if m:
            libs[m.group(1).lstrip("/")] = Path(m.group(1))
    return libs


def host_program(name: str) -> Path:
    found = shutil.which(name, path=SBIN_PATH)
    if found is None:
        raise BuildError(f"{name} not found on this host (apt-get install e2fsprogs)")
    return Path(found)


def host_inputs() -> dict[str, Path]:
    """Guest path -> host file, for everything copied from the host."""
    files: dict[str, Path] = {}
    for prog in E2FSPROGS:
        path = host_program(prog)
        files[f"usr/local/sbin/{prog}"] = path
        files.update(ldd(path))
    for src, dest in HOST_FILES.items():
        if Path(src).exists():
            files[dest] = Path(src)
    return files


def source_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(HERE.iterdir()):
        if p.suffix in (".py", ".sh"):
            h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------- build

def build(cache: Path | None = None, verbose: bool = False) -> GuestImage:
    """The guest for the current sources and packages, built if not cached."""
    cache = cache or cache_dir()
    with locked(cache):
        packages = resolve_packages(cache)
        host = host_inputs()
        h = hashlib.sha256(source_digest().encode())
        for name, info in sorted(packages.items()):
            h.update(f"{name} {info['Version']} {info['SHA256']}\n".encode())
        for dest, src in sorted(host.items()):
            h.update(f"{dest} {sha256_file(src)}\n".encode())
        key = h.hexdigest()[:20]
        out = cache / f"guest-{key}"
        manifest = out / "manifest.json"
        for stale in cache.glob(".build-*"):  # a builder killed half-way
            shutil.rmtree(stale, ignore_errors=True)
        if not manifest.exists():
            started = time.monotonic()
            _build(cache, out, packages, host, key, verbose)
            elapsed: float | None = time.monotonic() - started
        else:
            elapsed = None
        os.utime(manifest)  # last use, for prune()
        prune(cache, keep=out)
        m = json.loads(manifest.read_text())
        return GuestImage(kernel=out / m["kernel"], initrd=out / "initrd.cpio",
                          kernel_version=m["kernel_version"], key=key, directory=out,
                          packages=m["packages"], modules=tuple(m["modules"]),
                          built_seconds=elapsed)


def prune(cache: Path, keep: Path, unused_days: float = 14, most: int = 3) -> None:
    """Remove builds unused for two weeks, and all but the three last used."""
    builds = sorted((p for p in cache.glob("guest-*") if p != keep),
                    key=lambda p: _last_used(p), reverse=True)
    limit = time.time() - unused_days * 86400
    for i, p in enumerate(builds):
        if i >= most - 1 or _last_used(p) < limit:
            shutil.rmtree(p, ignore_errors=True)


def _last_used(build_dir: Path) -> float:
    try:
        return (build_dir / "manifest.json").stat().st_mtime
    except OSError:
        return 0.0  # a build that did not finish


def _build(cache: Path, out: Path, packages: dict[str, dict[str, str]],
           host: dict[str, Path], key: str, verbose: bool) -> None:
    def say(text: str) -> None:
        if verbose:
            print(f"linux guest: {text}", flush=True)

    debs = cache / "debs"
    kernel_pkg = next(p for p in packages if p.startswith("linux-image-"))
    cpio = Cpio()
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp_name:
        tmp = Path(tmp_name)
        paths = {}
        for name, info in packages.items():
            say(f"apt-get download {name}={info['Version']}")
            paths[name] = download(name, info, debs)
        say(f"unpacking {paths[kernel_pkg].name}")
        root = tmp / "kernel"
        run(["dpkg-deb", "-x", str(paths[kernel_pkg]), str(root)])
        vmlinuz = next(root.glob("boot/vmlinuz-*"))
        kernel_version = vmlinuz.name.removeprefix("vmlinuz-")
        config = kernel_config(root)
        builtin = {m for m in MODULES if config.get(CONFIG_SYMBOLS[m]) == "y"}
        tree = root / "lib/modules" / kernel_version
        order = module_order(tree, [m for m in MODULES if m not in builtin], builtin)
        names = [p.name.removesuffix(".ko") for p in order]
        for p in order:
            cpio.file(f"lib/modules/{p.name}", p.read_bytes())
        cpio.file("lib/modules/load", "".join(f"{n}\n" for n in names).encode())

        for name in DOWNLOADED:
            run(["dpkg-deb", "-x", str(paths[name]), str(tmp / name)])
        cpio.file("bin/busybox", (tmp / "busybox-static/bin/busybox").read_bytes(), 0o755)
        qga = tmp / "qemu-guest-agent/usr/sbin/qemu-ga"
        cpio.file("usr/local/sbin/qemu-ga", qga.read_bytes(), 0o755)
        files = dict(host)
        files.update(ldd(qga))  # the host's libraries, as the agent's package needs
        for dest, src in sorted(files.items()):
            mode = 0o755 if os.access(src, os.X_OK) else 0o644
            cpio.file(dest, src.read_bytes(), mode)
        for d in ("bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "run",
                  "tmp", "mnt", "root", "etc", "var"):
            cpio.dir(d)
        cpio.symlink("var/run", "/run")
        if not any(d.startswith("lib64/ld-linux") for d in files):
            raise BuildError("ldd named no dynamic loader for the guest's programs")
        cpio.symlink("usr/local/sbin/mkfs.ext4", "mke2fs")
        cpio.chardev("dev/console", 5, 1)
        cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        cpio.file("etc/group", b"root:x:0:\n")
        cpio.file("init", INIT_SCRIPT.read_bytes(), 0o755)
        # qemu-ga's guest-shutdown runs /sbin/shutdown; busybox has none.
        cpio.file("sbin/shutdown", b"#!/bin/sh\n# guest-shutdown: init powers off cleanly\n"
                  b"kill -USR1 1\n", 0o755)

        stage = tmp / "out"
        stage.mkdir()
        elf = pvh_kernel(vmlinuz.read_bytes())
        if elf is not None:
            (stage / "vmlinux").write_bytes(elf)
        else:
            shutil.copyfile(vmlinuz, stage / "vmlinuz")
        cpio.write(stage / "initrd.cpio")
        (stage / "manifest.json").write_text(json.dumps({
            "key": key, "kernel_version": kernel_version,
            "kernel": "vmlinux" if elf is not None else "vmlinuz",
            "packages": {n: i["Version"] for n, i in packages.items()},
            "modules": names, "builtin": sorted(builtin),
            "host_files": {d: str(s) for d, s in sorted(files.items())},
        }, indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
        say(f"built {out} (initramfs {(out / 'initrd.cpio').stat().st_size >> 10} KiB)")
