"""Test "hosts" on this machine: network namespaces joined by a veth pair, each
with an sshd of its own, so a test can reach one from the other as it would a
hypervisor from a backup server.

Everything made here (namespaces, links, sshd processes, keys, a login user)
is removed again by the context managers, also when a test fails. Processes
are ended by the PIDs we started, never by name.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

SSHD = "/usr/sbin/sshd"
#: sshd's privilege-separation directory, fixed when it was built.
PRIVSEP_DIR = Path("/run/sshd")


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@dataclass
class Host:
    """One network namespace with its end of the link and its address."""

    netns: str
    address: str
    workdir: Path
    sshd: subprocess.Popen[bytes] | None = None
    host_key_line: str = ""
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def argv(self, *argv: str) -> list[str]:
        """A command line that runs ``argv`` inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, *argv: str, timeout: float = 120, **kw: object
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*argv), capture_output=True, text=True,
                              timeout=timeout, **kw)  # type: ignore[call-overload, no-any-return]

    def popen(self, *argv: str, **kw: object) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(self.argv(*argv), **kw)  # type: ignore[call-overload]
        self.processes.append(proc)
        return proc  # type: ignore[no-any-return]

    def cut(self) -> None:
        """Drop every packet on this host's link, both ways, without a word:
        as a pulled cable, no reset and no error reaches either end (a link
        set down would fail new sends at once)."""
        for chain, side in (("INPUT", "-i"), ("OUTPUT", "-o")):
            _run(*self.argv("iptables", "-w", "-I", chain, side, "veth0", "-j", "DROP"))

    def limit_rate(self, rate: str | None) -> None:
        """Send at most ``rate`` (tc's units: ``16mbit``) out of this host's
        link, so that a transfer is still under way when the test acts
        (None: as fast as it goes)."""
        if rate is None:
            _run(*self.argv("tc", "qdisc", "del", "dev", "veth0", "root"))
        else:
            _run(*self.argv("tc", "qdisc", "replace", "dev", "veth0", "root", "tbf",
                            "rate", rate, "burst", "32kbit", "latency", "400ms"))

    def mend(self) -> None:
        for chain, side in (("INPUT", "-i"), ("OUTPUT", "-o")):
            _run(*self.argv("iptables", "-w", "-D", chain, side, "veth0", "-j", "DROP"))


@contextmanager
def network(count: int = 2, subnet: str = "10.77.0") -> Iterator[list[Host]]:
    """``count`` namespaces on one bridge-less link: two joined by a veth pair."""
    assert count == 2, "one veth pair joins two hosts"
    tag = f"bb{os.getpid() % 100000}x{int(time.monotonic() * 1000) % 10000}"
    hosts: list[Host] = []
    with ExitStack() as stack:
        for i in range(count):
            netns = f"{tag}-{'ab'[i]}"
            _run("ip", "netns", "add", netns)
            stack.callback(subprocess.run, ["ip", "netns", "delete", netns],
                           capture_output=True, timeout=30)
            workdir = Path(tempfile.mkdtemp(prefix=f"bb-host-{'ab'[i]}-", dir="/tmp"))
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
            hosts.append(Host(netns, f"{subnet}.{i + 1}", workdir))
        a, b = hosts
        _run("ip", "link", "add", "veth0", "netns", a.netns, "type", "veth",
             "peer", "name", "veth0", "netns", b.netns)
        for h in hosts:
            _run("ip", "-n", h.netns, "addr", "add", f"{h.address}/24", "dev", "veth0")
            _run("ip", "-n", h.netns, "link", "set", "dev", "veth0", "up")
            _run("ip", "-n", h.netns, "link", "set", "dev", "lo", "up")
        for h in hosts:
            stack.callback(_end_processes, h)
        yield hosts


def _end_processes(host: Host) -> None:
    for proc in [*host.processes, *([host.sshd] if host.sshd else [])]:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class SshKeys:
    """A client key and the known-hosts file that names every host's key."""

    directory: Path

    @property
    def key(self) -> Path:
        return self.directory / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.directory / "known_hosts"

    def options(self) -> str:
        """The ssh:// query that uses this key and trusts only these hosts."""
        return f"keyfile={self.key}&known_hosts={self.known_hosts}&no_tty=1"


@contextmanager
def privsep_dir() -> Iterator[None]:
    """sshd's /run/sshd, made for the test when the machine has none."""
    made = not PRIVSEP_DIR.exists()
    if made:
        PRIVSEP_DIR.mkdir(mode=0o755)
    try:
        yield
    finally:
        if made:
            shutil.rmtree(PRIVSEP_DIR, ignore_errors=True)


def start_sshd(host: Host, keys: SshKeys, users: list[str], timeout: float = 20) -> None:
    """An sshd of the test's own in ``host``'s namespace, on port 22 of its
    address: key logins only, for ``users``, whose keys are ``keys.key``."""
    d = host.workdir / "sshd"
    d.mkdir()
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key"))
    public = (d / "host_key.pub").read_text().split()
    host.host_key_line = f"{host.address} {public[0]} {public[1]}\n"
    with open(keys.known_hosts, "a") as f:
        f.write(host.host_key_line)
    auth = d / "authorized_keys"
    auth.mkdir()
    client_key = (keys.key.with_suffix(".pub")).read_text()
    for user in users:
        (auth / user).write_text(client_key)
    (d / "sshd_config").write_text(f"""\
ListenAddress {host.address}:22
HostKey {d / 'host_key'}
PidFile {d / 'sshd.pid'}
AuthorizedKeysFile {auth}/%u
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
PermitRootLogin prohibit-password
AllowUsers {' '.join(users)}
X11Forwarding no
AllowTcpForwarding no
PrintMotd no
LogLevel VERBOSE
""")
    log = open(d / "sshd.log", "ab")
    host.sshd = subprocess.Popen(host.argv(SSHD, "-D", "-e", "-f", str(d / "sshd_config")),
                                 stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    deadline = time.monotonic() + timeout
    while "Server listening" not in (d / "sshd.log").read_text(errors="replace"):
        if host.sshd.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"sshd in {host.netns} did not start:\n"
                               f"{(d / 'sshd.log').read_text(errors='replace')}")
        time.sleep(0.05)


def make_keys(directory: Path) -> SshKeys:
    keys = SshKeys(directory)
    _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys.key))
    keys.known_hosts.write_text("")
    return keys


@contextmanager
def login_user(home: Path) -> Iterator[pwd.struct_passwd]:
    """A user of the test's own that sshd lets in by key (no password: ``*``)."""
    name = f"bbssh{os.getpid() % 100000}"
    _run("useradd", "--system", "--no-create-home", "--home-dir", str(home),
         "--shell", "/bin/sh", "--password", "*", "--user-group", name)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], capture_output=True, timeout=30)


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False
