"""``python listen_exec.py LISTEN HANDOFF -- QEMU ARGS...``: listen on the
UNIX socket LISTEN, hand the listening socket to whoever listens on HANDOFF
(SCM_RIGHTS), then become QEMU (exec, same PID).

The kernel records a UNIX socket's peer credentials when it is listened on:
a daemon connecting to LISTEN, which :mod:`tests.faults.qmp_cut` accepts and
serves, sees QEMU's PID through SO_PEERCRED, as it does on QEMU's own
socket, and so judges QEMU's real build (its I/O-thread checks), not the
test's Python. Standard library only: run as a script, not from the suite.
"""

from __future__ import annotations

import os
import socket
import sys


def main(argv: list[str]) -> None:
    listen, handoff, separator, *command = argv
    if separator != "--" or not command:
        raise SystemExit("usage: listen_exec.py LISTEN HANDOFF -- COMMAND...")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(listen)
    server.listen(8)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as to:
        to.connect(handoff)
        socket.send_fds(to, [b"L"], [server.fileno()])
    server.close()  # the receiver holds it now; QEMU never does
    os.execv(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
