"""bbctl and the client library against a daemon on another host, over SSH and TLS.

Two "hosts" are network namespaces joined by a veth pair (tools/hosts.py),
each with an sshd of the test's own, its own daemon (inside its namespace,
with its TLS listener on the host's address) and its own VM. bbctl runs in
host A and drives host B's daemon through ``ssh://`` (OpenSSH, whose far end
is ``blockbackupd-ssh-helper``) and ``tls://`` (a client certificate whose
common name is the local user it acts as). The remote daemon's own access
rules decide: a user sshd lets in, or a certificate the CA signed, but whom
the daemon does not allow, is refused.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for
from tools.daemon import Daemon
from tools.hosts import Host, SshKeys, login_user, make_keys, network, privsep_dir, start_sshd
from tools.pki import Pki
from tools.vm import Vm

MiB = 1024 * 1024
BBCTL = str(Path(sys.executable).parent / "bbctl")
#: The client package needs only the standard library; the far side's helper
#: runs on the system's Python from a copy any user can read.
SYSTEM_PYTHON = "/usr/bin/python3"
TLS_PORT = 10810
#: The daemons' nbd.silence (30 s by default), short for the network-cut test.
NBD_SILENCE = 6
TRANSPORTS = ("ssh", "tls")
#: The daemon's debug line for each client connection.
CLIENT_CONNECTED = re.compile(r"client#\d+ connected \(")


@dataclass
class Site:
    host: Host
    vm: Vm
    daemon: Daemon


@dataclass
class Hosts:
    a: Site
    b: Site
    keys: SshKeys
    helper: Path
    user: str
    #: Client certificate directories by common name ("root", the user, ...).
    pki: dict[str, Path]

    def uri(self, site: Site, user: str = "root", transport: str = "ssh") -> str:
        if transport == "tls":
            return f"tls://{site.host.address}:{TLS_PORT}?pki={self.pki[user]}"
        return (f"ssh://{user}@{site.host.address}{site.daemon.socket}?{self.keys.options()}"
                f"&helper={self.helper}")

    def bbctl(self, *args: str, to: Site | None = None, user: str = "root",
              transport: str = "ssh", uri: str | None = None, timeout: float = 120
              ) -> subprocess.CompletedProcess[str]:
        """bbctl in host A (B when ``to`` is A) against ``to``'s daemon."""
        to = to or self.b
        here = self.b if to is self.a else self.a
        target = uri or self.uri(to, user, transport)
        # Over SSH a backup's NBD reads still need this client's certificates.
        env = {**os.environ, "BLOCKBACKUPD_PKI": str(self.pki.get(user, self.pki["root"]))}
        return here.host.run(BBCTL, "--connect", target, *args, timeout=timeout, env=env)

    def local(self, site: Site, *args: str) -> subprocess.CompletedProcess[str]:
        """bbctl on the daemon's own socket, for comparison."""
        return subprocess.run([BBCTL, "--socket", str(site.daemon.socket), *args],
                              capture_output=True, text=True, timeout=120)


def _helper(directory: Path) -> Path:
    """The helper as a host would have it installed, readable by every user."""
    directory.mkdir(mode=0o755)
    os.chmod(directory.parent, 0o755)
    shutil.copytree(Path(__file__).parent.parent / "client", directory / "blockbackup_client",
                    ignore=shutil.ignore_patterns("__pycache__"))
    script = directory / "blockbackupd-ssh-helper"
    script.write_text(f"#!/bin/sh\nPYTHONPATH={directory} exec {SYSTEM_PYTHON} "
                      f"-m blockbackup_client.sshhelper \"$@\"\n")
    for path in [directory, *directory.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() or path == script else 0o644)
    return script


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    with ExitStack() as stack:
        a_host, b_host = stack.enter_context(network())
        stack.enter_context(privsep_dir())
        shared = Path(tempfile.mkdtemp(prefix="bb-ssh-", dir="/tmp"))
        stack.callback(shutil.rmtree, shared, ignore_errors=True)
        keys = make_keys(shared)
        helper = _helper(shared / "helper")
        user = stack.enter_context(login_user(shared))
        ca = Pki(shared / "ca")
        pki = {cn: ca.client(shared / f"pki-{cn}", cn)
               for cn in ("root", user.pw_name, "nosuchuser")}
        # root's name, from another CA: as the daemon sees it (our CA trusted) and all of it.
        pki["foreign"] = Pki(shared / "foreign-ca").client(shared / "pki-foreign", "root")
        pki["foreign-client"] = shared / "pki-foreign-client"
        shutil.copytree(pki["foreign"], pki["foreign-client"])
        shutil.copy(ca.ca_cert, pki["foreign-client"] / "ca-cert.pem")
        sites = []
        for host in (a_host, b_host):
            start_sshd(host, keys, ["root", user.pw_name])
            tls_dir = ca.server(host.workdir / "tls", addresses=(host.address,))
            # The far side's user must reach the socket to be refused by the daemon.
            os.chmod(host.workdir, 0o711)
            vm = Vm(host.workdir, f"vm-{host.netns[-1]}", disks={"vda": 64 * MiB})
            stack.callback(vm.stop)
            vm.start()
            daemon = Daemon(host.workdir, socket_group=user.pw_gid,
                            listen=f"{host.address}:{TLS_PORT}", tls_dir=str(tls_dir))
            # The same directory serves the NBD exports of backups pulled from elsewhere.
            # QEMU drops an NBD client cut off mid-reply after NBD_SILENCE.
            daemon.config_extra = {"nbd": {"tls_dir": str(tls_dir), "silence": NBD_SILENCE}}
            daemon.prefix = host.argv()
            stack.callback(lambda d=daemon: d.proc is not None and d.stop())
            daemon.start()
            with daemon.client() as c:
                c.domain_define(vm.name, str(vm.daemon_qmp))
            sites.append(Site(host, vm, daemon))
        for site in sites:
            _wait_running(site)
        yield Hosts(sites[0], sites[1], keys, helper, user.pw_name, pki)


def _wait_running(site: Site, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    with site.daemon.client() as c:
        while c.domain_list()[0]["state"] != "running":
            assert time.monotonic() < deadline, "the daemon did not reach its VM"
            time.sleep(0.05)


def _json(r: subprocess.CompletedProcess[str]) -> Any:
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_command_runs_against_the_other_host(hosts: Hosts, transport: str) -> None:
    b, vm = hosts.b, hosts.b.vm.name

    def run(*args: str, to: Site | None = None) -> subprocess.CompletedProcess[str]:
        return hosts.bbctl(*args, to=to, transport=transport)

    # Reading commands answer exactly as on the host itself.
    for args in (["daemon", "info"], ["domain", "list"], ["domain", "xml", vm],
                 ["snapshot", "list", vm], ["checkpoint", "list", vm], ["export", "list", vm]):
        remote = run("--json", *args)
        assert _json(remote) == _json(hosts.local(b, "--json", *args)), args
    # The names are B's, not A's: the command went to the other host.
    assert [d["name"] for d in _json(run("--json", "domain", "list"))] == [vm]
    assert [d["name"] for d in _json(run("--json", "domain", "list", to=hosts.a))] \
        == [hosts.a.vm.name]

    # Every changing command, from A; each seen from B's own socket.
    made = _json(run("--json", "snapshot", "create", vm, "--name", "s1",
                             "--checkpoint"))
    assert made["name"] == "s1"
    assert _json(hosts.local(b, "--json", "snapshot", "list", vm)) == ["s1"]
    assert _json(hosts.local(b, "--json", "checkpoint", "list", vm)) == ["s1"]
    info = _json(run("--json", "snapshot", "info", vm, "s1"))
    assert info["disks"] == ["vda"] and info["state"] == "active"
    snapshot_doc = _json(run("--json", "snapshot", "xml", vm, "s1"))["xml"]
    assert "<name>s1</name>" in snapshot_doc and "<state>active</state>" in snapshot_doc
    assert _json(run("--json", "checkpoint", "info", vm, "s1"))["state"] == "valid"
    cp_xml = _json(run("--json", "checkpoint", "xml", vm, "s1"))["xml"]
    started = _json(run("--json", "export", "start", vm, "--snapshot", "s1",
                                "--disk", "vda"))
    assert [e["name"] for e in started["exports"]] == ["vda-s1"]
    assert _json(run("--json", "export", "server", vm)) == \
        _json(hosts.local(b, "--json", "export", "server", vm))
    assert [e["name"] for e in _json(hosts.local(b, "--json", "export", "list", vm))] == ["vda-s1"]
    assert _json(run("--json", "export", "stop", vm, "--snapshot", "s1",
                             "--disk", "vda")) == {}
    assert _json(hosts.local(b, "--json", "export", "list", vm)) == []

    # Writes land after the checkpoint: the change set read from A is B's own.
    hosts.b.vm.write("vda", MiB, 128 * 1024, 0x5a)
    changes = _json(run("--json", "checkpoint", "changes", vm, "s1", "--disk", "vda"))
    assert changes == _json(hosts.local(b, "--json", "checkpoint", "changes", vm, "s1",
                                        "--disk", "vda"))
    assert changes["extents"] == [[MiB, 128 * 1024]]

    # redefine reads its document on the caller's host and sends it over:
    # B's daemon reads the name in it, which B has.
    doc = hosts.a.host.workdir / "cp.xml"
    doc.write_text(cp_xml)
    r = run("checkpoint", "redefine", vm, "--xml", str(doc))
    assert r.returncode == 1 and r.stderr.strip().endswith("[already-exists]"), r.stderr

    assert run("snapshot", "delete", vm, "s1").returncode == 0
    assert _json(hosts.local(b, "--json", "snapshot", "list", vm)) == []
    assert run("checkpoint", "delete", vm, "s1").returncode == 0
    assert _json(hosts.local(b, "--json", "checkpoint", "list", vm)) == []

    # define and undefine: a domain whose QEMU is not there (yet), then gone.
    assert run("domain", "define", "other",
                       str(hosts.b.host.workdir / "other.qmp")).returncode == 0
    assert {d["name"]: d["state"] for d in _json(hosts.local(b, "--json", "domain", "list"))} \
        == {vm: "running", "other": "disconnected"}
    assert run("domain", "undefine", "other").returncode == 0
    assert [d["name"] for d in _json(hosts.local(b, "--json", "domain", "list"))] == [vm]

    # events: a subscription from A sees B's events.
    extra = Vm(hosts.b.host.workdir, "extra", disks={}, paused=True)
    clients = len(CLIENT_CONNECTED.findall(b.daemon.log()))
    watcher = subprocess.Popen(hosts.a.host.argv(BBCTL, "--connect",
                                                 hosts.uri(b, transport=transport),
                                                 "--json", "events", "--count", "1"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        extra.start()
        # The watcher's connection reached B's daemon; its subscription follows at once.
        deadline = time.monotonic() + 20
        while len(CLIENT_CONNECTED.findall(b.daemon.log())) == clients:
            assert time.monotonic() < deadline, "the watcher never reached B's daemon"
            time.sleep(0.05)
        time.sleep(0.5)
        assert run("domain", "define", "extra", str(extra.daemon_qmp)).returncode == 0
        out, err = watcher.communicate(timeout=30)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
        run("domain", "undefine", "extra")
        extra.stop()
    assert watcher.returncode == 0, err
    event = json.loads(out)
    assert event["domain"] == "extra" and event["type"] == "domain-connected", out


def _image_bytes(vm: Vm, disk: str, out: Path) -> bytes:
    """What the VM's disk holds now (no guest writes in these VMs)."""
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(vm.image(disk)), str(out)],
                   check=True, capture_output=True)
    data = out.read_bytes()
    out.unlink()
    return data


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_backup_pulled_from_the_other_host_restores_exactly(hosts: Hosts, transport: str,
                                                              tmp_path: Path) -> None:
    """bbctl backup on A of B's VM: the control over SSH or TLS, the data over
    NBD with TLS on B's address; a full, then an incremental, each restored."""
    b, vm = hosts.b, hosts.b.vm.name
    dest = tmp_path / f"backups-{transport}"
    b.vm.write("vda", 0, 4 * MiB, 0x11)
    b.vm.write("vda", 40 * MiB, 256 * 1024, 0x22)
    full = hosts.bbctl("--json", "backup", vm, "--dest", str(dest), "--level", "full",
                       transport=transport)
    assert full.returncode == 0, full.stderr
    first = _image_bytes(b.vm, "vda", tmp_path / "now.raw")
    b.vm.write("vda", (8 + TRANSPORTS.index(transport)) * MiB, 64 * 1024, 0x33)
    inc = hosts.bbctl("--json", "backup", vm, "--dest", str(dest), "--level", "inc",
                      transport=transport)
    assert inc.returncode == 0, inc.stderr
    second = _image_bytes(b.vm, "vda", tmp_path / "now.raw")
    manifest = json.loads((dest / "manifest.json").read_text())
    levels = [(x["level"], x["disks"]["vda"]["bytes_read"]) for x in manifest["backups"]]
    # The full reads what the disk holds (more after the other transport's run).
    assert levels[0][0] == "full" and levels[0][1] >= 4 * MiB + 256 * 1024
    assert levels[1] == ("inc", 64 * 1024)
    for at, expected in ((manifest["backups"][0]["id"], first),
                         (manifest["backups"][1]["id"], second)):
        out = tmp_path / f"restored-{at}.raw"
        r = subprocess.run([BBCTL, "restore", str(dest), "--disk", "vda", "--at", at,
                            "--output", str(out), "--format", "raw"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == expected
    v = subprocess.run([BBCTL, "verify", str(dest)], capture_output=True, text=True,
                       timeout=120)
    assert v.returncode == 0, v.stdout + v.stderr
    # Nothing left on B: no snapshot, no export, its NBD server stopped.
    assert _json(hosts.local(b, "--json", "snapshot", "list", vm)) == []
    assert _json(hosts.local(b, "--json", "export", "server", vm)) is None
    assert b.vm.running
    # B's checkpoint of the last backup remains for the next incremental.
    assert _json(hosts.local(b, "--json", "checkpoint", "list", vm)) == \
        [manifest["backups"][1]["checkpoint"]]
    for name in _json(hosts.local(b, "--json", "checkpoint", "list", vm)):
        hosts.local(b, "checkpoint", "delete", vm, name)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_client_library_reaches_the_other_host(hosts: Hosts, transport: str) -> None:
    script = """
import asyncio, json, sys
from blockbackup_client import AsyncClient, Client
with Client(sys.argv[1], timeout=30) as c:
    sync = c.domain_list()
async def main():
    async with AsyncClient(sys.argv[1]) as c:
        return await asyncio.gather(c.domain_list(), c.daemon_info(), c.snapshot_list(sys.argv[2]))
print(json.dumps([sync, asyncio.run(main())]))
"""
    r = hosts.a.host.run(sys.executable, "-c", script, hosts.uri(hosts.b, transport=transport),
                         hosts.b.vm.name)
    assert r.returncode == 0, r.stderr
    sync, (listed, info, snapshots) = json.loads(r.stdout)
    with hosts.b.daemon.client() as c:
        assert sync == listed == c.domain_list()
        assert info == c.daemon_info()
    assert snapshots == []


def test_the_remote_daemons_access_rules_decide(hosts: Hosts) -> None:
    """sshd lets the user in, and the CA signed the user's certificate; the
    daemon (which sees the helper's uid, or the certificate's user) does not."""
    uid = pwd.getpwnam(hosts.user).pw_uid
    refusals = {
        "ssh": (hosts.bbctl("domain", "list", user=hosts.user), f"uid {uid}"),
        "tls user": (hosts.bbctl("domain", "list", user=hosts.user, transport="tls"),
                     f"certificate CN={hosts.user} (uid {uid})"),
        "tls stranger": (hosts.bbctl("domain", "list", user="nosuchuser", transport="tls"),
                         "certificate CN='nosuchuser' (no user of this host)"),
    }
    for what, (r, who) in refusals.items():
        assert r.returncode == 1, what
        assert r.stderr == f"bbctl: error: {who} may not call methods of this daemon " \
                           "[permission-denied]\n", (what, r.stderr)
    log = hosts.b.daemon.log()
    assert "pid " in log and f"uid {uid} gid " in log and "is not allowed to call methods" in log
    assert f"certificate CN={hosts.user} (uid {uid}) from {hosts.a.host.address}:" in log
    # root's certificate may: the same rules as root on the socket.
    assert hosts.bbctl("domain", "list", transport="tls").returncode == 0


def test_failures_to_reach_the_other_host_are_one_line(hosts: Hosts) -> None:
    b = hosts.b
    cases = {
        # No sshd on that port.
        "refused": (hosts.bbctl("domain", "list", uri=hosts.uri(b).replace(
            f"@{b.host.address}", f"@{b.host.address}:2222")), "Connection refused"),
        # A host key that is not the one known.
        "host key": (hosts.bbctl("domain", "list", uri=hosts.uri(b).replace(
            hosts.keys.options(), f"keyfile={hosts.keys.key}&known_hosts=/dev/null&no_tty=1")),
            "Host key verification failed."),
        # The daemon's socket is not there.
        "no daemon": (hosts.bbctl("domain", "list", uri=hosts.uri(b).replace(
            str(b.daemon.socket), "/run/nothing-here.sock")),
            "blockbackupd-ssh-helper: cannot connect to the daemon at /run/nothing-here.sock: "
            "No such file or directory"),
        # A key sshd does not know for that user.
        "no login": (hosts.bbctl("domain", "list", user="nobody"), "Permission denied"),
    }
    for what, (r, words) in cases.items():
        assert r.returncode == 1, what
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bbctl: error: cannot connect to ssh://"), \
            (what, r.stderr)
        assert words in lines[0], (what, r.stderr)
    tls = {
        # No listener on that port.
        "refused": (hosts.bbctl("domain", "list", uri=hosts.uri(b, transport="tls").replace(
            f":{TLS_PORT}", ":2222")), "Connection refused"),
        # A certificate from another CA: the daemon ends the handshake.
        "foreign": (hosts.bbctl("domain", "list", user="foreign-client", transport="tls"),
                    "it does not accept this client's certificate"),
        # No client certificate at all: refused before connecting.
        "none": (hosts.bbctl("domain", "list", uri=f"tls://{b.host.address}:{TLS_PORT}"
                             f"?pki={hosts.a.host.workdir}"), "client-cert.pem"),
        # The daemon's certificate is not from the CA this client trusts.
        "untrusted": (hosts.bbctl("domain", "list", uri=hosts.uri(b, transport="tls").replace(
            str(hosts.pki["root"]), str(hosts.pki["foreign"]))), "CERTIFICATE_VERIFY_FAILED"),
    }
    for what, (r, words) in tls.items():
        assert r.returncode == 1, what
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("bbctl: error: cannot connect to tls://"), \
            (what, r.stderr)
        assert words in lines[0], (what, r.stderr)
    # The daemon is still there for everyone else.
    assert hosts.bbctl("domain", "list", transport="tls").returncode == 0
    # A bad connection string: refused before anything runs.
    r = hosts.bbctl("domain", "list", uri="ssh://host?keyfil=/x")
    assert r.returncode == 1 and "unknown option 'keyfil'" in r.stderr, r.stderr


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_backup_whose_network_is_cut_fails_in_one_line_and_leaves_nothing(
        hosts: Hosts, transport: str, tmp_path: Path) -> None:
    """Mid-pull, every packet between the hosts is dropped (no reset, no
    error: a pulled cable). The backup ends in one line of error after its
    lease's length of silence, with no file of it left; B deletes the
    snapshot when the lease ends unrenewed. Mended, the next backup works
    and clears the checkpoint the cut one left."""
    b, vm = hosts.b, hosts.b.vm.name
    dest = tmp_path / "backups"
    b.vm.write("vda", 0, 8 * MiB, 0x44)
    b.vm.write("vda", 32 * MiB, 8 * MiB, 0x55)
    hold = tmp_path / "hold"
    hold.touch()
    env = {**os.environ, "BLOCKBACKUPD_PKI": str(hosts.pki["root"]),
           "BBCTL_PAUSE_AT": "pull", "BBCTL_PAUSE_WHILE": str(hold)}
    lease = 6
    # 2 MB/s from B: the reads are still under way when the cable goes.
    b.host.limit_rate("16mbit")
    proc = hosts.a.host.popen(BBCTL, "--connect", hosts.uri(b, transport=transport), "backup",
                              vm, "--dest", str(dest), "--level", "full", "--lease", str(lease),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cut = False
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:
            seen.append(line.decode())
            if b"paused at pull" in line:
                break
        assert seen and "paused at pull" in seen[-1], seen
        hosts.a.host.cut()
        cut = True
        began = time.monotonic()
        hold.unlink()  # the backup reads on, into silence
        out, err = proc.communicate(timeout=120)
        took = time.monotonic() - began
        errors = [line for line in err.decode().splitlines() if line.startswith("bbctl: error")]
        assert proc.returncode == 1 and len(errors) == 1, err.decode()
        # The read that met the silence is named; and what could not be
        # deleted over the cut network is said, in the same line.
        assert "reading disk vda over NBD" in errors[0], errors
        assert "the next backup into" in errors[0], errors
        # The silence bound, not the kernel's retransmissions (15 min), ended it.
        assert took < 4 * lease + 10, took
        # No file of the cut backup (its pending record stays for the next one).
        assert sorted(p.name for p in dest.iterdir()) == ["pending.json"]
        # B: the lease ended unrenewed, and the snapshot with it.
        wait_for(lambda: _json(hosts.local(b, "--json", "snapshot", "list", vm)) == [],
                 timeout=lease + NBD_SILENCE + 15, what="B's snapshot deleted when its lease ended")
        assert _json(hosts.local(b, "--json", "export", "server", vm)) is None
        assert f"its lease was not renewed for {lease} s: deleting it" in b.daemon.log()
        # QEMU answers and its guest runs.
        assert b.vm.running and b.vm.status() == "running"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if cut:
            hosts.a.host.mend()
        b.host.limit_rate(None)
    again = hosts.bbctl("--json", "backup", vm, "--dest", str(dest), "--level", "full",
                        transport=transport)
    assert again.returncode == 0, again.stderr
    assert "deleted checkpoint" in again.stderr and "of an earlier failed backup" in again.stderr
    manifest = json.loads((dest / "manifest.json").read_text())
    assert len(manifest["backups"]) == 1
    assert _json(hosts.local(b, "--json", "checkpoint", "list", vm)) == \
        [manifest["backups"][0]["checkpoint"]]
    for name in _json(hosts.local(b, "--json", "checkpoint", "list", vm)):
        hosts.local(b, "checkpoint", "delete", vm, name)
