"""Who may call methods: the peer's credentials, as the kernel gives them.

The socket's owner, group and mode decide who can connect; this decides who
may then call anything. root and the daemon's own user always may; anyone
else must be listed in ``allowed_users``, or be in a group (primary or
supplementary) listed in ``allowed_groups``. A peer that may not is answered
``permission-denied`` (1012) for every request, and nothing runs.

On the TLS listener (``daemon.listen``) the kernel knows no caller: there the
client certificate's common name names the local user the caller acts as,
and that user's uid and groups are checked the same way. A name that is no
user of this host may call nothing.
"""

from __future__ import annotations

import os
import pwd
import socket
import struct
from dataclasses import dataclass
from typing import Any

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
    #: Who this is in messages: "uid 1000", or the certificate for TLS callers.
    label: str = ""

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", f"uid {self.uid}")

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

    @classmethod
    def of_certificate(cls, peercert: dict[str, Any] | None) -> Credentials:
        """The local user a verified client certificate's CN names (nobody: uid -1)."""
        names = [value for rdn in (peercert or {}).get("subject", ())
                 for key, value in rdn if key == "commonName"]
        cn = names[-1] if names else ""
        try:
            user = pwd.getpwnam(cn) if cn else None
        except KeyError:
            user = None
        if user is None:
            return cls(0, -1, -1, frozenset(), f"certificate CN={cn!r} (no user of this host)")
        groups = frozenset(os.getgrouplist(user.pw_name, user.pw_gid))
        return cls(0, user.pw_uid, user.pw_gid, groups | {user.pw_gid},
                   f"certificate CN={cn} (uid {user.pw_uid})")


@dataclass(frozen=True)
class AccessPolicy:
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    def allows(self, peer: Credentials) -> bool:
        if peer.uid < 0:
            return False
        return (peer.uid in (0, os.geteuid()) or peer.uid in self.uids
                or bool(peer.groups & self.gids))
