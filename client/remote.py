"""Where a client reaches a daemon: its local socket, another host over SSH, or TLS.

A *connection string* (bbctl's ``--connect``, the clients' first argument) is
one of:

- a path, or ``unix:///path``: the daemon's UNIX socket on this host;
- ``ssh://[user@]host[:port][/path/to/socket][?options]``: the system's OpenSSH
  client runs ``blockbackupd-ssh-helper`` on that host, which joins its stdin
  and stdout to the daemon's socket there (as libvirt's ``qemu+ssh://`` runs
  ``virt-ssh-helper``). The daemon sees the helper, so the SSH user's uid and
  groups decide what the caller may do. Options, as libvirt names them:
  ``keyfile`` (``-i``), ``known_hosts`` (``UserKnownHostsFile``),
  ``no_verify=1`` (accept an unknown host key), ``no_tty=1`` (never prompt:
  ``BatchMode``), ``command`` (the ssh program) and ``helper`` (the helper's
  path on the far side, when it is not on that user's PATH);
- ``tls://host:port[?pki=DIR]``: the daemon's TCP listener (``daemon.listen``),
  TLS only, with this client's certificate. ``DIR`` holds ``ca-cert.pem``,
  ``client-cert.pem`` and ``client-key.pem``, the layout of the NBD server's
  ``tls_dir`` and of libnbd's and QEMU's x509 directories, so one directory
  serves the control connection and the NBD reads of a remote backup.

No SSH or TLS protocol code is ours: OpenSSH and Python's ssl module do it.
"""

from __future__ import annotations

import os
import shlex
import socket
from urllib.parse import parse_qs, unquote, urlsplit

TYPE_CHECKING = False
if TYPE_CHECKING:
    import ssl
    import subprocess

#: The helper run on the far side of an SSH connection (a console script of
#: this package, installed with the daemon).
SSH_HELPER = "blockbackupd-ssh-helper"
SSH_OPTIONS = frozenset({"keyfile", "known_hosts", "no_verify", "no_tty", "command", "helper"})
TLS_OPTIONS = frozenset({"pki"})


#: Seconds a connection to another host may go without a word from the far
#: end (no acknowledgement, no answer to a keepalive) before it counts as
#: cut: a cable pulled or a host gone sends no reset, and a read would
#: otherwise wait for the kernel's retransmissions (15 minutes and more).
SILENCE = 30.0


def bound_silence(sock: socket.socket, seconds: float = SILENCE) -> None:
    """Make a TCP socket fail (ETIMEDOUT) after ``seconds`` of silence: keepalive
    probes while nothing is outstanding, TCP_USER_TIMEOUT while sent data waits
    for its acknowledgement."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    probe = max(1, int(seconds / 3))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, probe)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, probe)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(seconds * 1000))


#: What a TLS client's directory holds (QEMU's and libnbd's x509 layout).
CLIENT_CERTIFICATES = ("ca-cert.pem", "client-cert.pem", "client-key.pem")


def missing_certificates(directory: str) -> list[str]:
    """The files of :data:`CLIENT_CERTIFICATES` that ``directory`` lacks."""
    return [name for name in CLIENT_CERTIFICATES
            if not os.path.isfile(os.path.join(directory, name))]


def default_pki_dir() -> str:
    """Where a TLS client's certificates are looked for without ``?pki=``:
    ``$BLOCKBACKUPD_PKI``, else /etc/blockbackupd/pki for root and
    ``~/.config/blockbackupd/pki`` for anyone else."""
    env = os.environ.get("BLOCKBACKUPD_PKI")
    if env:
        return env
    if os.geteuid() == 0:
        return "/etc/blockbackupd/pki"
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return os.path.join(base, "blockbackupd", "pki")


class Target:
    """A parsed connection string.

    (A plain class: dataclasses would cost every bbctl start its import.)
    """

    __slots__ = ("scheme", "text", "path", "host", "port", "user", "options", "silence")

    def __init__(self, scheme: str, text: str, path: str = "", host: str = "",
                 port: int | None = None, user: str | None = None,
                 options: dict[str, str] | None = None) -> None:
        self.scheme = scheme      # "unix", "ssh" or "tls"
        self.text = text          # as given
        #: unix: the socket; ssh: the remote socket ("": the helper's default)
        self.path = path
        self.host = host
        self.port = port
        self.user = user
        self.options = options or {}
        #: Seconds of silence after which a remote connection counts as cut.
        self.silence = SILENCE

    def __repr__(self) -> str:
        return f"Target({self.text!r})"

    @property
    def remote(self) -> bool:
        return self.scheme != "unix"

    @property
    def display(self) -> str:
        """The connection string without its options, for messages."""
        return self.text.split("?", 1)[0]

    def ssh_argv(self) -> list[str]:
        """The OpenSSH client's command line that runs the helper on the host."""
        o = self.options
        argv = [o.get("command", "ssh"), "-T", "-e", "none", "-o", "ClearAllForwardings=yes",
                # A cut network ends ssh (and so the connection) after the silence bound.
                "-o", f"ServerAliveInterval={max(1, int(self.silence / 3))}",
                "-o", "ServerAliveCountMax=3"]
        if self.port is not None:
            argv += ["-p", str(self.port)]
        if self.user:
            argv += ["-l", self.user]
        if "keyfile" in o:
            argv += ["-i", o["keyfile"], "-o", "IdentitiesOnly=yes"]
        if "known_hosts" in o:
            argv += ["-o", f"UserKnownHostsFile={o['known_hosts']}"]
        if _flag(o.get("no_verify")):
            argv += ["-o", "StrictHostKeyChecking=no"]
        if _flag(o.get("no_tty")):
            argv += ["-o", "BatchMode=yes"]
        # ssh hands the command to the remote user's shell as one string.
        remote = [o.get("helper", SSH_HELPER)] + ([self.path] if self.path else [])
        return argv + ["--", self.host, " ".join(shlex.quote(a) for a in remote)]

    def ssl_context(self) -> ssl.SSLContext:
        """The client side of ``tls://``: this CA only, the host's name checked,
        this client's certificate shown.

        :raise ValueError: a certificate file is missing or unreadable.
        """
        import ssl

        pki = self.options.get("pki") or default_pki_dir()
        files = {name: os.path.join(pki, name) for name in CLIENT_CERTIFICATES}
        missing = [os.path.join(pki, name) for name in missing_certificates(pki)]
        if missing:
            raise ValueError(f"{self.text}: no {', '.join(missing)} (a TLS client needs "
                             f"ca-cert.pem, client-cert.pem and client-key.pem in {pki})")
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=files["ca-cert.pem"])
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            ctx.load_cert_chain(files["client-cert.pem"], files["client-key.pem"])
        except (OSError, ssl.SSLError) as err:
            raise ValueError(f"{self.text}: cannot load the client certificate in {pki}: "
                             f"{err}") from None
        return ctx


def _flag(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "yes", "true", "on")


def parse(text: str) -> Target:
    """Read a connection string.

    :raise ValueError: a scheme other than unix, ssh and tls; a missing host or
        port; an unknown option (the message names it).
    """
    if "://" not in text:
        if not text:
            raise ValueError("empty connection string")
        return Target("unix", text, path=text)
    url = urlsplit(text)
    scheme = url.scheme.lower()
    if scheme not in ("unix", "ssh", "tls"):
        raise ValueError(f"{text}: unknown scheme {url.scheme!r} (unix, ssh or tls; "
                         f"the daemon offers no plain TCP)")
    options = {key: values[-1] for key, values in parse_qs(url.query, keep_blank_values=True,
                                                           strict_parsing=False).items()}
    known = {"unix": frozenset(), "ssh": SSH_OPTIONS, "tls": TLS_OPTIONS}[scheme]
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{text}: unknown option {unknown[0]!r}"
                         + (f" (known: {', '.join(sorted(known))})" if known else ""))
    path = unquote(url.path)
    if scheme == "unix":
        if url.netloc or not path:
            raise ValueError(f"{text}: a unix connection is unix:///path/to/socket")
        return Target("unix", text, path=path)
    try:
        port = url.port
    except ValueError:
        raise ValueError(f"{text}: the port is not a number from 0 to 65535") from None
    if not url.hostname:
        raise ValueError(f"{text}: no host")
    if scheme == "tls":
        if port is None:
            raise ValueError(f"{text}: a TLS connection needs a port (tls://host:port)")
        if path not in ("", "/") or url.username:
            raise ValueError(f"{text}: a TLS connection is tls://host:port[?pki=DIR]; "
                             f"the certificate, not a user name, says who calls")
        return Target("tls", text, host=url.hostname, port=port, options=options)
    return Target("ssh", text, path="" if path in ("", "/") else path, host=url.hostname,
                  port=port, user=unquote(url.username) if url.username else None,
                  options=options)


class Channel:
    """A connected stream socket to a daemon (blocking), and what ended it.

    For ``ssh://`` the socket is one end of a socket pair whose other end is
    the OpenSSH client's stdin and stdout, so the callers read and write it as
    they would the local socket.
    """

    def __init__(self, target: Target, sock: socket.socket,
                 process: subprocess.Popen[bytes] | None = None) -> None:
        self.target = target
        self.sock = sock
        self._process = process

    @classmethod
    def open(cls, target: Target, timeout: float | None) -> Channel:
        """:raise OSError: the socket or host cannot be reached.
        :raise ValueError: a TLS client without its certificates."""
        if target.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(target.path)
            except BaseException:
                sock.close()
                raise
            return cls(target, sock)
        if target.scheme == "tls":
            ctx = target.ssl_context()
            raw = socket.create_connection((target.host, target.port or 0),
                                           timeout=min(timeout or 30.0, 30.0))
            try:
                bound_silence(raw, target.silence)
                sock = ctx.wrap_socket(raw, server_hostname=target.host)
            except BaseException:
                raw.close()
                raise
            sock.settimeout(timeout)
            return cls(target, sock)
        import subprocess

        ours, theirs = socket.socketpair()
        try:
            process = subprocess.Popen(target.ssh_argv(), stdin=theirs.fileno(),
                                       stdout=theirs.fileno(),
                                       stderr=subprocess.PIPE)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.settimeout(timeout)
        return cls(target, ours, process)

    def why_closed(self, err: OSError | None = None) -> str:
        """Why the connection ended (``err``: how it showed here): the SSH
        side's own words when it has any."""
        if self._process is None:
            return str(err) if err else "the daemon closed the connection"
        self._reap()
        assert self._process.stderr is not None
        return _last_words(self._process.stderr.read(), self._process.returncode, err)

    def close(self) -> None:
        self.sock.close()
        if self._process is not None:
            self._reap()
            if self._process.stderr is not None:
                self._process.stderr.close()

    def _reap(self) -> None:
        """Wait for ssh to end (the helper ends when the daemon closes, ssh
        with it); one that has not in 5 s is killed."""
        assert self._process is not None
        try:
            self._process.wait(timeout=5)
        except Exception:
            self._process.kill()
            self._process.wait()


def _last_words(stderr: bytes, status: int | None, err: OSError | None = None) -> str:
    """The line of ssh's (or the helper's) stderr that says what went wrong."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines()]
    lines = [line for line in lines if line and not line.startswith("Warning: Permanently added")]
    if lines:
        return lines[-1]
    if status:
        return f"ssh exited with status {status}"
    return str(err) if err else "the daemon closed the connection"
