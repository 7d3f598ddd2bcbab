"""A pass-through between the daemon and a real QEMU's QMP socket that cuts
the connection when a chosen command goes by: what a QMP socket closed under
a running command looks like to the daemon, while QEMU itself stays up.

It forwards the daemon's JSON objects one by one, so the cut falls exactly
after the chosen command reached QEMU (``after=True``) or just before it
(``after=False``); what QEMU would have answered is lost. Later connections
(the daemon reconnecting) pass through untouched. Not a stand-in for QEMU:
every byte goes to and comes from the real one.
"""

from __future__ import annotations

import json
import select
import socket
import threading
from pathlib import Path


class QmpCut:
    def __init__(self, listen: Path, target: Path, command: str, nth: int = 1,
                 after: bool = True) -> None:
        self.listen, self.target = listen, target
        self.command, self.nth, self.after = command, nth, after
        self.seen = 0
        #: Set by the test when the operation under test begins.
        self.armed = threading.Event()
        self.cut = threading.Event()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(str(listen))
        self._server.listen(8)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        for t in self._threads:
            t.join(5)

    def _accept(self) -> None:
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

    def _pipe(self, client: socket.socket) -> None:
        qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            qemu.connect(str(self.target))
        except OSError:
            client.close()
            return
        pending = b""
        replies = b""
        waiting_for: object = None  # the id of the command whose answer we swallow
        decoder = json.JSONDecoder()
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([client, qemu], [], [], 0.1)
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is qemu:
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
                    armed = self.armed.is_set() and not self.cut.is_set()
                    if not armed or waiting_for is not None:
                        if waiting_for is None:
                            qemu.sendall(data)
                        continue  # after the cut command nothing more reaches QEMU
                    pending += data
                    while pending and waiting_for is None:
                        text = pending.decode(errors="replace").lstrip()
                        try:
                            message, end = decoder.raw_decode(text)
                        except ValueError:
                            break  # an object not complete yet
                        pending = text[end:].encode()
                        hit = message.get("execute") == self.command
                        if hit:
                            self.seen += 1
                            hit = self.seen == self.nth
                        if hit and not self.after:
                            self.cut.set()  # QEMU never sees it
                            return
                        qemu.sendall(text[:end].encode() + b"\n")
                        if hit:
                            waiting_for = message.get("id")
        except OSError:
            return
        finally:
            client.close()
            qemu.close()
