"""Fixtures: real QEMU processes and a real blockbackupd process on temporary directories.

Every factory stops what it started, by PID, even when the test fails. The
QEMU is the build ``BB_QEMU`` selects (tools/qemu_build.py), named with its
version in pytest's header and summary. Tests marked ``libvirt`` run the
system's QEMU under the system's libvirt whatever BB_QEMU says; `make test`
runs them in its first pass only (``-m "not libvirt"`` in the second).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tools.daemon import Daemon
from tools.qemu_build import selected
from tools.vm import Vm

#: Where the daemons of this run record every RPC exchange (tools/daemon.py),
#: checked against the API document when the run ends.
_RECORDS: dict[str, Any] = {}


def pytest_configure(config: pytest.Config) -> None:
    if "BB_RPC_RECORD_DIR" not in os.environ:
        directory = tempfile.mkdtemp(prefix="bb-rpc-record-", dir="/tmp")
        os.chmod(directory, 0o1777)  # daemons of other users record too
        os.environ["BB_RPC_RECORD_DIR"] = _RECORDS["dir"] = directory
    config.addinivalue_line(
        "markers", "libvirt: runs a private libvirtd with the system's QEMU, whatever "
                   "BB_QEMU selects (deselect with -m 'not libvirt' on another build)")


def _qemu_line() -> str:
    try:
        return selected().describe()
    except Exception as e:  # the tests will fail with the details
        return f"qemu: unavailable ({e})"


def pytest_report_header(config: pytest.Config) -> str:
    return _qemu_line()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Every request and answer of the run's daemons, against the API document."""
    directory = _RECORDS.get("dir")
    if directory is None:
        return
    from tools.api_check import check_directory

    try:
        checker, findings, count = check_directory(Path(directory))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    _RECORDS.update(findings=findings, count=count, methods=len(checker.answered))
    if findings:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_line(_qemu_line())
    if "count" in _RECORDS:
        findings = _RECORDS["findings"]
        terminalreporter.write_line(
            f"api: {_RECORDS['count']} recorded RPC exchanges checked against the API "
            f"document ({_RECORDS['methods']} methods answered): "
            + ("all as documented" if not findings else f"{len(findings)} FINDINGS"),
            red=bool(findings))
        for finding in findings:
            terminalreporter.write_line(f"api: {finding}", red=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """A test on the private libvirtd (fixture ``lv``) must carry the libvirt
    mark, or a run on another QEMU build would repeat it unnoticed."""
    unmarked = [item.nodeid for item in items
                if "lv" in getattr(item, "fixturenames", ())
                and item.get_closest_marker("libvirt") is None]
    if unmarked:
        raise pytest.UsageError("tests using libvirt without @pytest.mark.libvirt: "
                                + ", ".join(unmarked))


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02,
             what: str = "condition") -> Any:
    """Poll predicate until it returns a true value; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def bbctl(daemon: Daemon, *args: str, stdin: str | None = None
          ) -> subprocess.CompletedProcess[str]:
    """Run the bbctl command line against the daemon, as a user would."""
    return subprocess.run([sys.executable, "-m", "blockbackup_client.bbctl",
                           "--socket", str(daemon.socket), *args],
                          capture_output=True, text=True, timeout=120, input=stdin)


def unmount(path: Path) -> None:
    """Unmount a test's file system; lazily if something still holds it (a
    failed test's QEMU, which its fixture ends a moment later)."""
    if subprocess.run(["umount", str(path)]).returncode != 0:
        subprocess.run(["umount", "-l", str(path)], check=True)


def domain_state(daemon: Daemon, name: str) -> str | None:
    with daemon.client() as c:
        for d in c.domain_list():
            if d["name"] == name:
                return str(d["state"])
    return None


class RawConnection:
    """Bytes in, JSON lines out: for tests of the framing itself."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, obj: Any) -> None:
        self.send(json.dumps(obj).encode() + b"\n")

    def read(self) -> Any:
        line = self.file.readline()
        assert line, "daemon closed the connection"
        return json.loads(line)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short paths: UNIX socket names are limited to 107 bytes.
    path = Path(tempfile.mkdtemp(prefix="bb-", dir="/tmp"))
    yield path
    if os.environ.get("BB_KEEP_WORKDIR"):  # to read its logs and images after a failure
        print(f"workdir kept: {path}")
        return
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_vm(workdir: Path) -> Iterator[Callable[..., Vm]]:
    vms: list[Vm] = []

    def make(name: str = "vm1", kind: type[Vm] = Vm, **kwargs: Any) -> Vm:
        vm = kind(workdir, name, **kwargs)
        vms.append(vm)
        return vm.start()

    yield make
    for vm in vms:
        vm.stop()
        if vm.stdout_path.exists():  # pytest shows it for failed tests only
            print(f"--- QEMU output of {vm.name} ---\n"
                  f"{vm.stdout_path.read_text(errors='replace')[-3000:]}")


@pytest.fixture
def make_loop_device(workdir: Path) -> Iterator[Callable[[int], Path]]:
    """A factory: ``make_loop_device(size)`` is a block device of that many
    bytes backed by a file of the test's (what LVM or ZFS would give);
    each is detached after the test."""
    made: list[str] = []

    def make(size: int) -> Path:
        backing = workdir / f"loop{len(made)}.img"
        with open(backing, "wb") as f:
            f.truncate(size)
        dev = subprocess.run(["losetup", "--find", "--show", str(backing)],
                             capture_output=True, text=True, check=True).stdout.strip()
        made.append(dev)
        return Path(dev)

    yield make
    for dev in made:
        subprocess.run(["losetup", "--detach", dev], check=True)


@pytest.fixture
def loop_device(make_loop_device: Callable[[int], Path]) -> Path:
    """A 32 MiB block device (see :func:`make_loop_device`)."""
    return make_loop_device(32 * 1024 * 1024)


@pytest.fixture
def make_daemon(workdir: Path) -> Iterator[Callable[..., Daemon]]:
    daemons: list[Daemon] = []

    def make(**kwargs: Any) -> Daemon:
        daemon = Daemon(workdir, **kwargs)
        daemons.append(daemon)
        return daemon.start()

    yield make
    for daemon in daemons:
        if daemon.proc is not None:
            try:
                daemon.stop()
            except Exception:
                daemon.kill()
        # Captured output: pytest shows it for failed tests only.
        print(f"--- blockbackupd log ({daemon.log_path}) ---\n{daemon.log()[-30000:]}")


@pytest.fixture
def vm(make_vm: Callable[..., Vm]) -> Vm:
    return make_vm()


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    return make_daemon()


@pytest.fixture
def defined(daemon: Daemon, vm: Vm) -> tuple[Daemon, Vm]:
    """A daemon with vm1 defined and connected."""
    with daemon.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
    wait_for(lambda: domain_state(daemon, "vm1") == "running", what="vm1 running")
    return daemon, vm


class NbdReader:
    """A libnbd connection to one export (read-only use)."""

    def __init__(self, socket_path: str, export: str, **tls: Any) -> None:
        import nbd

        self.h = nbd.NBD()
        self.h.set_export_name(export)
        self.h.add_meta_context("base:allocation")
        self.h.add_meta_context("qemu:allocation-depth")
        if tls:
            self.h.set_tls(nbd.TLS_REQUIRE)
            self.h.set_tls_certificates(tls["certificates"])
            self.h.connect_tcp(tls["host"], str(tls["port"]))
        else:
            self.h.connect_unix(socket_path)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.h.pread(length, offset))

    def close(self) -> None:
        try:
            self.h.shutdown()
        except Exception:
            pass  # the server may already have dropped us

    def __enter__(self) -> NbdReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def snapshot_xml(name: str | None = None, disks: dict[str, str | None] | None = None) -> str:
    parts = ["<domainblocksnapshot>"]
    if name is not None:
        parts.append(f"<name>{name}</name>")
    for disk, source in (disks or {}).items():
        if source is None:
            parts.append(f'<disk name="{disk}" type="file"/>')
        else:
            parts.append(f'<disk name="{disk}" type="file"><source file="{source}"/></disk>')
    parts.append("</domainblocksnapshot>")
    return "".join(parts)


def export_xml(disks: list[tuple[str, str]] | list[tuple[str, str, dict[str, str]]],
               address: str = "") -> str:
    body = [f'<domainblockexport type="nbd">{address}']
    for entry in disks:
        disk, snapshot = entry[0], entry[1]
        extra = entry[2] if len(entry) > 2 else {}  # type: ignore[misc]
        attrs = "".join(f' {k}="{v}"' for k, v in extra.items())
        body.append(f'<disk name="{disk}" snapshot="{snapshot}"{attrs}/>')
    body.append("</domainblockexport>")
    return "".join(body)


def restore_raw_onto(daemon: Daemon, dest: Path, point: str, target: str) -> None:
    """``bbctl restore`` of sda at point onto a raw target (a block device, an
    rbd: image): refused without ``--format raw``, then equal to the point."""
    r = bbctl(daemon, "restore", str(dest), "--disk", "sda", "--at", point, "--output", target)
    assert r.returncode == 1 and "--format raw" in r.stderr, r.stderr
    r = bbctl(daemon, "restore", str(dest), "--disk", "sda", "--at", point, "--output", target,
              "--format", "raw")
    assert r.returncode == 0, r.stderr
    compare = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw",
                              str(dest / f"{point}-sda.qcow2"), target],
                             capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout + compare.stderr
