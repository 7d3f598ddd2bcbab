"""A pass-through between the daemon and a real QEMU's QMP socket that cuts
the connection when a chosen command goes by: what a QMP socket closed under
a running command looks like to the daemon, while QEMU itself stays up.

It forwards the daemon's JSON objects one by one, so the cut falls exactly
after the chosen command reached QEMU (``after=True``) or just before it
(``after=False``); what QEMU would have answered is lost. Later connections
(the daemon reconnecting) pass through untouched. Not a stand-in for QEMU:
every byte goes to and comes from the real one, and so does every file
descriptor the daemon passes (SCM_RIGHTS, for ``add-fd``).

The socket the daemon connects to is listened on by the VM's QEMU process
itself, just before it becomes QEMU (:mod:`tests.faults.listen_exec`; start
the VM with ``qemu=cut.build(...)``, then :meth:`QmpCut.attach`): the daemon
sees QEMU's PID behind it (SO_PEERCRED) and judges that QEMU's build, as it
would on QEMU's own socket, not this Python process.
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tools.qemu_build import QemuBuild
from tools.vm import Vm

LISTEN_EXEC = Path(__file__).with_name("listen_exec.py")


class QmpCut:
    def __init__(self, listen: Path, command: str, nth: int = 1, after: bool = True,
                 where: Callable[[dict[str, Any]], bool] | None = None) -> None:
        self.listen = listen
        self.command, self.nth, self.after = command, nth, after
        #: Which of that command's calls count, by their arguments (None: all).
        self.where = where
        self.target: Path | None = None
        self.seen = 0
        #: Set by the test when the operation under test begins.
        self.armed = threading.Event()
        self.cut = threading.Event()
        self._handoff_path = listen.with_name(listen.name + ".handoff")
        self._handoff = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._handoff.bind(str(self._handoff_path))
        self._handoff.listen(1)
        self._server: socket.socket | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def build(self, qemu: QemuBuild) -> QemuBuild:
        """That build, started so that its process listens on ``listen`` first."""
        return QemuBuild(qemu.name, sys.executable,
                         (str(LISTEN_EXEC), str(self.listen), str(self._handoff_path), "--",
                          qemu.binary, *qemu.args), qemu.env)

    def attach(self, vm: Vm, timeout: float = 10.0) -> None:
        """Take the socket the VM's process listened on; serve it, forwarding
        to the VM's daemon monitor."""
        self.target = vm.daemon_qmp
        self._handoff.settimeout(timeout)
        conn, _ = self._handoff.accept()
        with conn:
            conn.settimeout(timeout)
            _, fds, _, _ = socket.recv_fds(conn, 16, 1)
        if len(fds) != 1:
            raise RuntimeError("the VM's process handed over no listening socket")
        self._server = socket.socket(fileno=fds[0])
        t = threading.Thread(target=self._accept, daemon=True)
        self._threads.append(t)
        t.start()

    def close(self) -> None:
        self._stop.set()
        self._handoff.close()
        if self._server is not None:
            self._server.close()
        for t in self._threads:
            t.join(5)

    def _accept(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._server], [], [], 0.1)
                if not ready:
                    continue
                client, _ = self._server.accept()
            except OSError:
                return
            t = threading.Thread(target=self._pipe, args=(client,), daemon=True)
            self._threads.append(t)
            t.start()

    def _hit(self, message: dict[str, Any]) -> bool:
        if message.get("execute") != self.command:
            return False
        if self.where is not None and not self.where(message.get("arguments") or {}):
            return False
        self.seen += 1
        return self.seen == self.nth

    def _pipe(self, client: socket.socket) -> None:
        assert self.target is not None
        qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            qemu.connect(str(self.target))
        except OSError:
            client.close()
            return
        pending = b""
        pending_fds: list[int] = []  # passed with what is still pending
        replies = b""
        waiting_for: object = None  # the id of the command whose answer we swallow
        decoder = json.JSONDecoder()
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([client, qemu], [], [], 0.1)
                for sock in ready:
                    if sock is qemu:
                        data = qemu.recv(65536)
                        if not data:
                            return
                        if waiting_for is None:
                            client.sendall(data)
                            continue
                        replies += data
                        while b"\n" in replies:
                            line, _, replies = replies.partition(b"\n")
                            message = json.loads(line)
                            if message.get("id") == waiting_for:
                                self.cut.set()  # QEMU ran it; its answer is lost
                                return
                            client.sendall(line + b"\n")
                        continue
                    data, fds, _, _ = socket.recv_fds(client, 65536, 16)
                    if not data:
                        _close(fds)
                        return
                    armed = self.armed.is_set() and not self.cut.is_set()
                    if not armed or waiting_for is not None:
                        if waiting_for is None:
                            _send(qemu, data, fds)
                        else:
                            _close(fds)  # after the cut command nothing more reaches QEMU
                        continue
                    pending += data
                    pending_fds += fds
                    while pending and waiting_for is None:
                        text = pending.decode(errors="replace").lstrip()
                        try:
                            message, end = decoder.raw_decode(text)
                        except ValueError:
                            break  # an object not complete yet (or a lone fd's byte)
                        pending = text[end:].encode()
                        hit = self._hit(message)
                        if hit and not self.after:
                            self.cut.set()  # QEMU never sees it
                            return
                        # A passed descriptor goes with the next command (add-fd's).
                        _send(qemu, text[:end].encode() + b"\n", pending_fds)
                        pending_fds = []
                        if hit:
                            waiting_for = message.get("id")
        except OSError:
            return
        finally:
            _close(pending_fds)
            client.close()
            qemu.close()


def _send(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    """Send data, with the descriptors passed along (then closed here)."""
    try:
        if not fds:
            sock.sendall(data)
            return
        sent = socket.send_fds(sock, [data], fds)
        if sent < len(data):
            sock.sendall(data[sent:])
    finally:
        _close(fds)


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()
