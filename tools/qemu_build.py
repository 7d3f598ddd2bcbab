"""Which QEMU the tests start, and a private QEMU 10.0 from bookworm-backports.

``BB_QEMU`` selects the build, read here only:

* ``system`` (default): ``qemu-system-x86_64`` from PATH (Debian 12's 7.2);
* ``10.0``: the build ``python -m tools.qemu_build`` (``make qemu10``)
  unpacks into ``$BB_QEMU10_CACHE/prefix`` (default
  /var/cache/blockbackupd-qemu10);
* a directory: a prefix unpacked the same way (``<dir>/usr/bin/...``).

A private build is unpacked, not installed: the system's QEMU 7.2 (which the
libvirt tests and ``make install`` use) stays as it is. It needs
``-L PREFIX/usr/share/seabios -L PREFIX/usr/share/qemu`` for its firmware,
and ``QEMU_MODULE_DIR`` for its modules: without it, it would look in the
system's module folder and find 7.2's (accel-tcg, block-rbd...), which it
refuses. :func:`selected` gives the binary, those arguments and that
environment. qemu-img and qemu-io stay the system's: image files and the HMP
``qemu-io`` command do not depend on the emulator's version.

The install: a sources list of one line, ``deb URI bookworm-backports main``
(URI from the ``URIs:`` line of /etc/apt/sources.list.d/debian.sources), with
apt's lists, cache and dpkg status all under the cache directory, so that
apt sees nothing but bookworm-backports and the system's apt state is not
touched; ``apt-get update``, then ``apt-get download`` of each package at the
version that list has (pinned: ``pkg=VERSION``, never 7.2), checked against
the index's SHA256, then ``dpkg-deb -x`` into the prefix. A stamp written last
makes a later call a no-op (no network).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from tools.cache import cache_dir as shared_cache_dir
from tools.cache import sha256_file

SERIES = "10.0"
SUITE = "bookworm-backports"
PACKAGES = ("qemu-system-x86", "qemu-system-common", "qemu-system-data", "qemu-utils",
            "qemu-block-extra", "seabios")
DEFAULT_CACHE = Path("/var/cache/blockbackupd-qemu10")
DEBIAN_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
SYSTEM_BINARY = "qemu-system-x86_64"
STAMP = ".installed.json"
MODULE_DIR = "usr/lib/x86_64-linux-gnu/qemu"


class QemuBuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class QemuBuild:
    """How to start one QEMU build: ``[binary, *args, ...]`` with ``env``
    added to the environment."""

    name: str                                  # "system", "10.0" or the prefix
    binary: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)

    def command(self, *args: str) -> list[str]:
        return [self.binary, *self.args, *args]

    def environ(self) -> dict[str, str]:
        """os.environ with this build's variables (for subprocess's env=)."""
        return {**os.environ, **self.env}

    def version(self) -> str:
        """The first line of ``--version``, e.g. ``QEMU emulator version 10.0.2 (...)``."""
        return _version(self.binary, tuple(sorted(self.env.items())))

    def describe(self) -> str:
        """One line for test output: the selector, the binary and its version."""
        return f"qemu: BB_QEMU={self.name}: {self.binary}: {self.version()}"


@cache
def _version(binary: str, env: tuple[tuple[str, str], ...]) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True,
                         env={**os.environ, **dict(env)}).stdout
    return out.splitlines()[0]


def cache_dir() -> Path:
    """$BB_QEMU10_CACHE, else /var/cache/blockbackupd-qemu10 (see tools.cache)."""
    return shared_cache_dir("BB_QEMU10_CACHE", DEFAULT_CACHE)


def from_prefix(prefix: Path, name: str | None = None) -> QemuBuild:
    """The build unpacked in prefix (its firmware and modules, not the system's)."""
    binary = prefix / "usr/bin/qemu-system-x86_64"
    if not os.access(binary, os.X_OK):
        raise QemuBuildError(f"{binary} is missing: run `make qemu10` "
                             f"(python -m tools.qemu_build)")
    args: list[str] = []
    for sub in ("usr/share/seabios", "usr/share/qemu"):
        if (prefix / sub).is_dir():
            args += ["-L", str(prefix / sub)]
    env = {"QEMU_MODULE_DIR": str(prefix / MODULE_DIR)} if (prefix / MODULE_DIR).is_dir() \
        else {}
    return QemuBuild(name or str(prefix), str(binary), tuple(args), env)


def selected() -> QemuBuild:
    """The build BB_QEMU names (see the module's docstring)."""
    choice = os.environ.get("BB_QEMU", "system") or "system"
    if choice == "system":
        return QemuBuild("system", shutil.which(SYSTEM_BINARY) or SYSTEM_BINARY)
    if choice == SERIES:
        return from_prefix(cache_dir() / "prefix", SERIES)
    if "/" in choice:
        return from_prefix(Path(choice))
    raise QemuBuildError(f"BB_QEMU={choice}: expected system, {SERIES} or a prefix directory")


def system() -> QemuBuild:
    """Debian's own QEMU, whatever BB_QEMU says (libvirt's emulator)."""
    return QemuBuild("system", shutil.which(SYSTEM_BINARY) or SYSTEM_BINARY)


# ---------------------------------------------------------------- install

@contextmanager
def _locked(directory: Path) -> Iterator[None]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _run(args: list[str], cwd: Path | None = None) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise QemuBuildError(f"{' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}{proc.stderr}")
    return str(proc.stdout)


def mirror_uri(sources: Path = DEBIAN_SOURCES) -> str:
    """The Debian mirror this machine uses: the first ``URIs:`` of debian.sources."""
    try:
        text = sources.read_text()
    except OSError as e:
        raise QemuBuildError(f"cannot read {sources}: {e}") from None
    m = re.search(r"^URIs:\s*(\S+)", text, re.M)
    if m is None:
        raise QemuBuildError(f"{sources} has no URIs: line")
    return m.group(1)


def _apt_options(apt: Path) -> list[str]:
    """apt sees only the private list: its own lists, cache and (empty) dpkg status."""
    return ["-o", f"Dir::Etc::sourcelist={apt / 'sources.list'}",
            "-o", "Dir::Etc::sourceparts=/dev/null",
            "-o", f"Dir::State::Lists={apt / 'lists'}",
            "-o", f"Dir::State::status={apt / 'status'}",
            "-o", f"Dir::Cache={apt / 'cache'}"]


def _resolve(apt: Path) -> dict[str, dict[str, str]]:
    """package -> {Version, SHA256, Filename} as bookworm-backports has them."""
    out = subprocess.run(["apt-cache", *_apt_options(apt), "show", "--no-all-versions",
                          *PACKAGES], capture_output=True, text=True).stdout
    found: dict[str, dict[str, str]] = {}
    for stanza in out.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in stanza.splitlines()
                      if line[:1] not in (" ", "\t") and ": " in line)
        if "Package" in fields:
            found[fields["Package"]] = {k: fields.get(k, "") for k in
                                        ("Version", "SHA256", "Filename")}
    missing = [p for p in PACKAGES if p not in found]
    if missing:
        raise QemuBuildError(f"{SUITE} has no {missing}")
    version = found["qemu-system-x86"]["Version"]
    if not re.match(rf"(\d+:)?{re.escape(SERIES)}\.", version):
        raise QemuBuildError(f"{SUITE} has qemu-system-x86 {version}, not {SERIES}.x: "
                             f"update SERIES in {__file__}")
    return found


def install(cache: Path | None = None, verbose: bool = False) -> tuple[QemuBuild, bool]:
    """Unpack QEMU 10.0 into cache/prefix unless it is there: (the build,
    whether this call installed it)."""
    cache = cache or cache_dir()
    prefix = cache / "prefix"
    with _locked(cache):
        if (prefix / STAMP).exists():
            return from_prefix(prefix, SERIES), False

        def say(text: str) -> None:
            if verbose:
                print(text, flush=True)

        apt = cache / "apt"
        for d in (apt / "lists" / "partial", apt / "cache" / "archives" / "partial"):
            d.mkdir(parents=True, exist_ok=True)
        (apt / "status").touch()
        line = f"deb {mirror_uri()} {SUITE} main\n"
        (apt / "sources.list").write_text(line)
        say(f"apt-get update: {line.strip()} (private lists in {apt})")
        _run(["apt-get", "-q", *_apt_options(apt), "update"])
        packages = _resolve(apt)
        debs = cache / "debs"
        debs.mkdir(exist_ok=True)
        paths = []
        for name, info in packages.items():
            deb = debs / Path(info["Filename"]).name
            if not (deb.exists() and sha256_file(deb) == info["SHA256"]):
                say(f"apt-get download {name}={info['Version']}")
                for stale in debs.glob(f"{name}_*.deb"):
                    stale.unlink()
                _run(["apt-get", "-q", *_apt_options(apt), "download",
                      f"{name}={info['Version']}"], cwd=debs)
                fetched = list(debs.glob(f"{name}_*.deb"))  # apt writes the epoch as %3a
                if len(fetched) != 1:
                    raise QemuBuildError(f"apt-get download {name}: found {fetched}")
                fetched[0].replace(deb)
                if sha256_file(deb) != info["SHA256"]:
                    raise QemuBuildError(f"{deb}: checksum differs from {SUITE}'s index")
            paths.append(deb)
        new = cache / "prefix.new"
        shutil.rmtree(new, ignore_errors=True)
        shutil.rmtree(prefix, ignore_errors=True)
        for deb in paths:
            _run(["dpkg-deb", "-x", str(deb), str(new)])
        new.replace(prefix)
        build = from_prefix(prefix, SERIES)
        version = build.version()  # it runs, with its modules, before it counts as installed
        (prefix / STAMP).write_text(json.dumps({
            "suite": SUITE, "version": version,
            "packages": {p: i["Version"] for p, i in packages.items()}}, indent=1) + "\n")
        return build, True


def main() -> None:
    try:
        build, installed = install(verbose=True)
    except QemuBuildError as e:
        sys.exit(f"qemu10: {e}")
    stamp = json.loads((Path(build.binary).parents[2] / STAMP).read_text())
    print(f"QEMU {SERIES} {'installed' if installed else 'cached'} in "
          f"{Path(build.binary).parents[2]}: {build.version()}")
    print("packages: " + ", ".join(f"{p} {v}" for p, v in stamp["packages"].items()))
    print(f"use: BB_QEMU={SERIES}; runs as {' '.join(build.command())} "
          f"with {' '.join(f'{k}={v}' for k, v in build.env.items())}")


if __name__ == "__main__":
    main()
