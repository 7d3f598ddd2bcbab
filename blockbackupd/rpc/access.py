"""Who may call methods: the peer's credentials, as the kernel gives them.

The socket's owner, group and mode decide who can connect; this decides who
may then call anything. root and the daemon's own user always may; anyone
else must be listed in ``allowed_users``, or be in a group (primary or
supplementary) listed in ``allowed_groups``. A peer that may not is answered
``permission-denied`` (1012) for every request, and nothing runs.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

#: SO_PEERGROUPS (Linux 4.13+): the peer's supplementary groups. Python's
#: socket module does not name it; the value is the same on every architecture.
SO_PEERGROUPS = 59
#: getsockopt() buffers are capped at 1024 bytes in Python: 256 groups.
_GROUPS_BUFFER = 1024


@dataclass(frozen=True)
class Credentials:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int]

    @classmethod
    def of(cls, sock: socket.socket) -> Credentials:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        try:
            buf = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, _GROUPS_BUFFER)
            groups = frozenset(struct.unpack(f"{len(buf) // 4}I", buf[:len(buf) // 4 * 4]))
        except OSError:  # an old kernel, or more than 256 groups: the primary one only
            groups = frozenset()
        return cls(pid, uid, gid, groups | {gid})


@dataclass(frozen=True)
class AccessPolicy:
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    def allows(self, peer: Credentials) -> bool:
        return (peer.uid in (0, os.geteuid()) or peer.uid in self.uids
                or bool(peer.groups & self.gids))
