"""Host-side resources of the daemon process: directories, locks, the RPC socket, systemd."""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import ssl
import stat
from pathlib import Path

log = logging.getLogger("blockbackupd")


class StartupError(Exception):
    """The daemon cannot start; the message says why."""


def make_dirs(*dirs: Path) -> None:
    """Create the daemon's directories (mode 0750 for new ones).

    :raise StartupError: a directory cannot be created.
    """
    for d in dirs:
        try:
            d.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as err:
            raise StartupError(f"cannot create directory {d}: {err}") from err


class Lock:
    """An exclusive ``flock`` held for the life of the process.

    The file stays behind on exit on purpose: removing a lock file races with
    a process that has just opened it.
    """

    def __init__(self, path: Path, what: str) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as err:
            raise StartupError(f"cannot open lock file {path}: {err}") from err
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 32, 0).decode(errors="replace").strip()
            os.close(self._fd)
            raise StartupError(
                f"another blockbackupd (pid {holder or '?'}) already uses {what}"
            ) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        os.close(self._fd)


def bind_unix_socket(path: Path, mode: int, gid: int | None = None) -> socket.socket:
    """Bind and listen on a UNIX socket with the given mode (and group).

    A socket file that nothing answers on is stale and replaced; one that
    answers belongs to a live daemon and start-up is refused. A path that is
    not a socket is never removed.

    :raise StartupError: the path is in use or cannot be bound.
    """
    try:
        st = path.lstat()
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("replacing stale socket %s", path)
            path.unlink(missing_ok=True)
        else:
            raise StartupError(f"another daemon is serving on {path}")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Owner only until the group and mode are set: no window in which the
    # socket is open to more than the final group and mode allow.
    old_umask = os.umask(0o077 | (0o777 & ~mode))
    try:
        sock.bind(str(path))
        if gid is not None:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
        # Room for a burst of clients connecting at once while the loop is
        # busy (the kernel caps it at net.core.somaxconn).
        sock.listen(1024)
    except OSError as err:
        sock.close()
        raise StartupError(f"cannot listen on {path}: {err}") from err
    finally:
        os.umask(old_umask)
    sock.setblocking(False)
    return sock


def sd_notify(message: str) -> None:
    """Tell systemd about our state (``READY=1``, ``STOPPING=1``) when run as Type=notify."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.sendto(message.encode(), address)
        except OSError as err:
            log.warning("sd_notify(%s) failed: %s", message, err)


def server_tls_context(directory: Path) -> ssl.SSLContext:
    """The RPC listener's TLS: this server's certificate, and a client
    certificate from the directory's CA required of every caller.

    :raise StartupError: a file is missing or does not load.
    """
    files = {name: directory / name for name in ("ca-cert.pem", "server-cert.pem",
                                                 "server-key.pem")}
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        raise StartupError(f"daemon.listen: no {', '.join(missing)} (the TLS listener needs "
                           f"ca-cert.pem, server-cert.pem and server-key.pem in {directory})")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(files["ca-cert.pem"]))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(str(files["server-cert.pem"]), str(files["server-key.pem"]))
    except (OSError, ssl.SSLError) as err:
        raise StartupError(f"daemon.listen: cannot load the server certificate in "
                           f"{directory}: {err}") from None
    return ctx
