"""The daemon process: directories, socket mode, single instance, stale socket, signals."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from blockbackup_client import OperationFailed
from blockbackupd import __version__
from tests.conftest import bbctl, domain_state, export_xml, snapshot_xml, wait_for
from tools.daemon import Daemon
from tools.vm import MiB, Vm


def test_creates_directories_and_socket_with_mode(make_daemon: Callable[..., Daemon],
                                                  workdir: Path) -> None:
    d = make_daemon(socket_mode="0600", socket=str(workdir / "sub" / "dir" / "bb.sock"))
    for key in ("state_dir", "scratch_dir", "run_dir"):
        assert Path(d.daemon_keys[key]).is_dir(), key
    st = (workdir / "sub" / "dir" / "bb.sock").stat()
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (Path(d.daemon_keys["state_dir"]) / "blockbackupd.db").is_file()


def test_default_socket_mode_is_0660(daemon: Daemon) -> None:
    assert stat.S_IMODE(daemon.socket.stat().st_mode) == 0o660


def test_daemon_info(daemon: Daemon) -> None:
    with daemon.client() as c:
        assert c.daemon_info() == {"version": __version__, "domains": 0, "per_domain": []}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_0_and_removes_socket(daemon: Daemon, sig: int) -> None:
    conn = daemon.client()  # an open client connection must not hold the exit
    assert daemon.stop(sig) == 0
    assert not daemon.socket.exists()
    conn.close()
    assert "stopping" in daemon.log()


def test_second_daemon_on_same_socket_is_refused(daemon: Daemon, workdir: Path) -> None:
    other = workdir / "other"
    other.mkdir()
    second = Daemon(other, socket=str(daemon.socket))  # same socket, other state
    second.write_config()
    result = subprocess.run([sys.executable, "-m", "blockbackupd", "--config",
                             str(second.config_path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert f"cannot start: another blockbackupd (pid {daemon.pid}) already uses socket" \
        in result.stderr
    with daemon.client() as c:  # the first one is untouched
        assert c.daemon_info()["domains"] == 0


def test_second_daemon_on_same_state_dir_is_refused(daemon: Daemon, workdir: Path) -> None:
    other = workdir / "other"
    other.mkdir()
    second = Daemon(other, state_dir=daemon.daemon_keys["state_dir"])
    second.write_config()
    result = subprocess.run([sys.executable, "-m", "blockbackupd", "--config",
                             str(second.config_path)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "already uses state_dir" in result.stderr


def test_live_foreign_socket_is_not_replaced(make_daemon: Callable[..., Daemon],
                                             workdir: Path) -> None:
    path = workdir / "bb.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    try:
        with pytest.raises(RuntimeError, match="another daemon is serving on"):
            make_daemon()
        assert path.exists()
    finally:
        listener.close()


def test_stale_socket_is_replaced(make_daemon: Callable[..., Daemon], workdir: Path) -> None:
    path = workdir / "bb.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays, nobody listens: what a SIGKILLed daemon leaves
    d = make_daemon()
    with d.client() as c:
        assert c.daemon_info()["version"] == __version__
    assert "replacing stale socket" in d.log()


def test_killed_daemon_restarts_on_its_leftovers(make_daemon: Callable[..., Daemon]) -> None:
    d = make_daemon()
    d.stop(signal.SIGKILL)
    assert d.socket.exists()  # SIGKILL leaves the socket behind
    d.start()
    with d.client() as c:
        assert c.daemon_info()["domains"] == 0


def test_regular_file_at_socket_path_is_refused(make_daemon: Callable[..., Daemon],
                                                workdir: Path) -> None:
    (workdir / "bb.sock").write_text("precious")
    with pytest.raises(RuntimeError, match="exists and is not a socket"):
        make_daemon()
    assert (workdir / "bb.sock").read_text() == "precious"


def test_systemd_notify_ready_only_once_serving_then_stopping(workdir: Path) -> None:
    """Type=notify: READY=1 comes when the RPC socket already answers; STOPPING=1
    comes on SIGTERM."""
    notify = workdir / "notify.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(notify))
    receiver.settimeout(20)
    d = Daemon(workdir)
    d.env = {"NOTIFY_SOCKET": str(notify)}
    d.write_config()
    with open(d.log_path, "ab") as log:
        d.proc = subprocess.Popen([sys.executable, "-m", "blockbackupd", "--config",
                                   str(d.config_path)], stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, **d.env})
    try:
        assert receiver.recv(4096) == b"READY=1"
        with d.client(timeout=5) as c:  # no retry: it must answer at once
            assert c.daemon_info()["version"] == __version__
        d.proc.send_signal(signal.SIGTERM)
        assert receiver.recv(4096) == b"STOPPING=1"
        assert d.proc.wait(20) == 0
    finally:
        d.kill()
        receiver.close()



def test_daemon_info_per_domain(make_daemon: Callable[..., Daemon],
                                make_vm: Callable[..., Vm]) -> None:
    d = make_daemon()
    d.stop()
    d.env = {"BLOCKBACKUPD_FAIL_AT": "export:added"}
    d.start()
    vm = make_vm()
    with d.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
        c.domain_define("vm2", str(vm.workdir / "nothing.qmp"))
        wait_for(lambda: domain_state(d, "vm1") == "running")
        c.snapshot_create("vm1", snapshot_xml("s1"), checkpoint=True)
        c.snapshot_create("vm1", snapshot_xml("s2"))
        with pytest.raises(OperationFailed):
            c.export_start("vm1", export_xml([("sda", "s1")]))
        before = int(time.time())
        info = c.daemon_info()
    assert info["domains"] == 2
    error = info["per_domain"][0].pop("last_error")
    assert error["message"] == "export.start: injected failure at export:added"
    assert abs(error["time"] - before) <= 1
    checked = info["per_domain"][0].pop("checked")
    assert abs(checked - before) <= 2
    # One checkpoint on two 64 MiB disks: a bitmap each, 1024 bits = 128 bytes.
    assert info["per_domain"] == [
        {"name": "vm1", "state": "running", "snapshots": 2, "exports": 0, "checkpoints": 1,
         "persistent_bitmaps": 2, "bitmap_memory": 256, "warnings": []},
        {"name": "vm2", "state": "disconnected", "snapshots": 0, "exports": 0,
         "checkpoints": 0, "last_error": None, "warnings": []}]
    r = bbctl(d, "daemon", "info")
    assert r.returncode == 0
    assert r.stdout.splitlines()[3].split()[:7] == ["DOMAIN", "STATE", "SNAPSHOTS", "EXPORTS",
                                                     "CHECKPOINTS", "BITMAPS", "BITMAP"]
    assert r.stdout.splitlines()[4].split()[:7] == ["vm1", "running", "2", "0", "1", "2",
                                                     "256B"]
    assert "injected failure at export:added" in r.stdout


def test_bitmap_memory_is_reported_and_warned_about(make_daemon: Callable[..., Daemon],
                                                    make_vm: Callable[..., Vm]) -> None:
    """QEMU holds every persistent bitmap in memory: 2 MiB per checkpoint of a
    (sparse) 1 TiB disk at 64 KiB. Past bitmap_memory_warning the daemon says so."""
    d = make_daemon(bitmap_memory_warning=3)
    vm = make_vm(disks={"sda": 1 << 40})
    with d.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
        wait_for(lambda: domain_state(d, "vm1") == "running")
        c.snapshot_create("vm1", snapshot_xml("s1"), checkpoint=True)
        c.snapshot_delete("vm1", "s1")
        c.call("checkpoint.changes", domain="vm1", disk="sda", name="s1")  # reads the images
        info = c.daemon_info()["per_domain"][0]
        assert (info["persistent_bitmaps"], info["bitmap_memory"], info["warnings"]) == (
            1, 2 * MiB, [])
        c.snapshot_create("vm1", snapshot_xml("s2"), checkpoint=True)
        c.snapshot_delete("vm1", "s2")
        c.call("checkpoint.changes", domain="vm1", disk="sda", name="s1")
        info = c.daemon_info()["per_domain"][0]
    assert (info["persistent_bitmaps"], info["bitmap_memory"]) == (2, 4 * MiB)
    assert info["warnings"] == [
        "2 persistent bitmaps take about 4 MiB of QEMU's memory (warning at 3 MiB): delete "
        "the checkpoints no backup needs"]
    assert d.log().count("persistent bitmaps take about") == 1  # logged once, when crossed
    r = bbctl(d, "daemon", "info")
    assert "warning: vm1: 2 persistent bitmaps take about 4 MiB" in r.stdout
