"""bbctl as a subprocess against the real daemon and a real VM."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import bbctl
from tools.daemon import Daemon
from tools.vm import Vm


def ok(daemon: Daemon, *args: str, stdin: str | None = None) -> str:
    r = bbctl(daemon, *args, stdin=stdin)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_every_area_from_the_command_line(defined: tuple[Daemon, Vm]) -> None:
    daemon, vm = defined
    assert ok(daemon, "snapshot", "create", "vm1", "--name", "mon", "--checkpoint") == \
        "snapshot and checkpoint mon created\n"
    ok(daemon, "snapshot", "delete", "vm1", "mon")
    vm.write("sda", 2 * 1024 * 1024, 65536, 0x31)
    scratch = f"{daemon.daemon_keys['scratch_dir']}/tue-sda.qcow2"
    assert ok(daemon, "snapshot", "create", "vm1", "--name", "tue", "--disk",
              f"sda={scratch}", "--disk", "sdb") == "snapshot tue created\n"
    assert ok(daemon, "snapshot", "list", "vm1") == "tue\n"
    info = json.loads(ok(daemon, "--json", "snapshot", "info", "vm1", "tue"))
    assert info["disks"] == ["sda", "sdb"] and info["state"] == "active"
    assert f'<source file="{scratch}"/>' in ok(daemon, "snapshot", "xml", "vm1", "tue")
    assert ok(daemon, "checkpoint", "list", "vm1") == "mon\n"
    assert "state: valid" in ok(daemon, "checkpoint", "info", "vm1", "mon")
    assert "<name>mon</name>" in ok(daemon, "checkpoint", "xml", "vm1", "mon")
    changes = ok(daemon, "checkpoint", "changes", "vm1", "mon", "--disk", "sda",
                 "--until", "tue")
    assert changes.splitlines() == ["OFFSET   LENGTH", "2097152  65536", "65536 bytes changed"]
    out = ok(daemon, "export", "start", "vm1", "--snapshot", "tue", "--disk", "sda",
             "--checkpoint", "mon")
    sock = f"{daemon.daemon_keys['run_dir']}/vm1.nbd"
    assert out.splitlines()[0] == f"nbd+unix:///?socket={sock}"
    assert "sda-tue  sda   tue       mon         qemu:dirty-bitmap:mon" in out
    assert json.loads(ok(daemon, "--json", "export", "server", "vm1")) == {
        "transport": "unix", "socket": sock}
    assert [e["name"] for e in json.loads(ok(daemon, "--json", "export", "list", "vm1"))] == [
        "sda-tue"]
    doc = ('<domainblockexport type="nbd"><disk name="sdb" snapshot="tue" '
           'exportname="b-full"/></domainblockexport>')
    assert "b-full" in ok(daemon, "export", "start", "vm1", "--xml", "-", stdin=doc)
    ok(daemon, "export", "stop", "vm1", "--snapshot", "tue", "--disk", "sda", "--disk", "sdb")
    assert ok(daemon, "export", "server", "vm1") == "no NBD server\n"
    ok(daemon, "snapshot", "delete", "vm1", "tue")
    ok(daemon, "checkpoint", "delete", "vm1", "mon")
    assert ok(daemon, "checkpoint", "list", "vm1") == "\n"


def test_snapshot_create_with_its_exports(defined: tuple[Daemon, Vm]) -> None:
    """bbctl's backup-begin: the snapshot and its exports in one request."""
    daemon, vm = defined
    ok(daemon, "snapshot", "create", "vm1", "--name", "mon", "--checkpoint")
    ok(daemon, "snapshot", "delete", "vm1", "mon")
    vm.write("sdb", 65536, 65536, 0x31)
    sock = f"{daemon.daemon_keys['run_dir']}/vm1.nbd"
    out = ok(daemon, "snapshot", "create", "vm1", "--name", "tue", "--checkpoint",
             "--export-checkpoint", "mon")
    assert out.splitlines() == [
        "snapshot and checkpoint tue created", f"nbd+unix:///?socket={sock}",
        "EXPORT   DISK  SNAPSHOT  CHECKPOINT  META CONTEXT",
        "sda-tue  sda   tue       mon         qemu:dirty-bitmap:mon",
        "sdb-tue  sdb   tue       mon         qemu:dirty-bitmap:mon"]
    ok(daemon, "snapshot", "delete", "vm1", "tue")
    result = json.loads(ok(daemon, "--json", "snapshot", "create", "vm1", "--name", "wed",
                           "--disk", "sdb", "--export"))
    assert result["export"]["exports"] == [{"disk": "sdb", "snapshot": "wed", "checkpoint": None,
                                            "name": "sdb-wed", "bitmap": None}]
    doc = '<domainblockexport type="nbd"><disk name="sda" exportname="a"/></domainblockexport>'
    r = bbctl(daemon, "snapshot", "create", "vm1", "--name", "thu", "--disk", "sdb",
              "--export-xml", "-", stdin=doc)
    assert r.returncode != 0 and "no disk 'sda'" in r.stderr, r.stderr
    assert ok(daemon, "snapshot", "list", "vm1") == "wed\n"  # thu rolled back
    ok(daemon, "snapshot", "delete", "vm1", "wed")


def test_events_command(defined: tuple[Daemon, Vm]) -> None:
    daemon, vm = defined
    proc = subprocess.Popen([sys.executable, "-m", "blockbackup_client.bbctl", "--socket",
                             str(daemon.socket), "events", "--domain", "vm1", "--count", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        assert proc.stderr.readline() == "watching events of vm1 (Ctrl-C to stop)\n"
        vm.stop()
        vm.start()
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out.splitlines() == ["vm1 domain-disconnected", "vm1 domain-connected state=running"]


@pytest.mark.parametrize("args, message", [
    (["snapshot", "info", "vm1", "nope"], "no snapshot 'nope' [no-such-snapshot]"),
    (["checkpoint", "changes", "vm1", "nope", "--disk", "sda"],
     "no checkpoint 'nope' [no-such-checkpoint]"),
    (["snapshot", "create", "vm1", "--disk", "sdz"], "no disk 'sdz' [no-such-disk]"),
    (["export", "start", "vm1", "--xml", "-"], "[invalid-xml]"),
])
def test_errors_exit_non_zero_with_the_kind(defined: tuple[Daemon, Vm], args: list[str],
                                            message: str) -> None:
    daemon, _ = defined
    r = bbctl(daemon, *args, stdin="<broken")
    assert r.returncode == 1 and message in r.stderr and r.stdout == ""


def test_help_on_every_command(daemon: Daemon) -> None:
    commands = [["daemon", "info"], ["domain", "list"], ["domain", "define"],
                ["domain", "undefine"], ["domain", "xml"], ["snapshot", "create"],
                ["snapshot", "delete"], ["snapshot", "list"], ["snapshot", "info"],
                ["snapshot", "xml"], ["checkpoint", "list"], ["checkpoint", "info"],
                ["checkpoint", "xml"], ["checkpoint", "delete"], ["checkpoint", "changes"],
                ["checkpoint", "redefine"], ["export", "start"], ["export", "stop"],
                ["export", "list"], ["export", "server"], ["events"]]
    for cmd in commands:
        r = bbctl(daemon, *cmd, "--help")
        assert r.returncode == 0 and "usage: bbctl" in r.stdout, cmd
