"""``blockbackupd-ssh-helper [SOCKET]``: the far end of ``ssh://`` connections.

sshd runs it as the SSH user; it connects to the daemon's socket and copies
bytes both ways between that socket and its stdin/stdout until either side
ends. It reads nothing of what passes: the daemon asks the kernel who is on
its socket (SO_PEERCRED), and that is this process, so the remote daemon's
access rules apply to the SSH user exactly as to a local one.

Without SOCKET: ``$BLOCKBACKUPD_SOCKET``, else the ``daemon.socket`` of
/etc/blockbackupd/blockbackupd.toml when that file sets it, else the default
/run/blockbackupd/blockbackupd.sock. Errors are one line on stderr (ssh
carries it to the client) and exit status 1.
"""

from __future__ import annotations

import os
import socket
import sys
import threading

CONFIG = "/etc/blockbackupd/blockbackupd.toml"
DEFAULT = "/run/blockbackupd/blockbackupd.sock"
_CHUNK = 256 * 1024


def default_socket() -> str:
    env = os.environ.get("BLOCKBACKUPD_SOCKET")
    if env:
        return env
    try:
        import tomllib

        with open(CONFIG, "rb") as f:
            path = tomllib.load(f).get("daemon", {}).get("socket")
        if isinstance(path, str) and path:
            return path
    except (OSError, ValueError):
        pass  # unreadable to this user, or absent: the daemon's default then
    return DEFAULT


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _to_daemon(sock: socket.socket, stdin: int) -> None:
    """stdin to the daemon; at the client's end, the daemon sees it end too."""
    try:
        while data := os.read(stdin, _CHUNK):
            sock.sendall(data)
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) > 1 or (args and args[0].startswith("-")):
        print("usage: blockbackupd-ssh-helper [SOCKET]", file=sys.stderr)
        return 2
    path = args[0] if args else default_socket()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError as err:
        print(f"blockbackupd-ssh-helper: cannot connect to the daemon at {path}: "
              f"{err.strerror or err}", file=sys.stderr)
        return 1
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    threading.Thread(target=_to_daemon, args=(sock, stdin), daemon=True).start()
    # The daemon's side decides the end: it closes after answering what came
    # before the client's end, and then so do we (the thread above is a daemon).
    try:
        while data := sock.recv(_CHUNK):
            _write_all(stdout, data)
    except OSError:
        pass  # the client went (broken pipe) or the daemon reset the connection
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
