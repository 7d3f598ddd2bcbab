"""A client of the QEMU guest agent (qemu-ga) on the host side of its channel.

The agent's channel is a QEMU chardev (a UNIX socket QEMU listens on) joined
to a virtio-serial port in the guest. QEMU serves one client at a time on it:
a second client's connect succeeds but nothing it sends is read until the
first one leaves. So every call here opens the socket, synchronises, runs one
command and closes, holding the channel as briefly as it can, and is bounded
by a deadline: an agent that is absent, busy with another client or hung
costs at most that long.

A stream on this channel survives earlier clients: bytes one of them left
unread, or a reply to a command it gave up on, may still arrive. Each call
therefore starts with a 0xFF byte (which resets the agent's parser) and
``guest-sync`` with a fresh random id, and every line before the reply that
carries that id is dropped. Not ``guest-sync-delimited``: while another
client holds the channel (libvirt holds ``org.qemu.guest_agent.0`` for the
domain's life), our connection waits in the socket's accept queue with the
request unread, and when that client reconnects QEMU may serve the dead
connection first: the agent's answer then reaches the other client. Plain
JSON is an answer libvirt ignores as a stray reply; the 0xFF that
``guest-sync-delimited`` puts before it makes libvirt's parser fail and
its agent unusable until it reconnects (seen under libvirt 9.0 in 7 of 17
reconnects with queued ``guest-sync-delimited`` requests). The command itself
is sent only once the synchronisation is answered, so it can never wait in
that queue.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from typing import Any

#: The byte that resets qemu-ga's JSON parser when a client sends it (qemu-ga
#: also writes it before its answer to guest-sync-delimited, never used here).
_SYNC = b"\xff"
#: Longest reply line read; an fsfreeze reply is tens of bytes.
_LINE_LIMIT = 1 << 20


class AgentError(Exception):
    """The agent could not be reached, did not answer in time, or refused;
    the message says which. ``delivered``: whether the command itself reached
    the agent (after a synchronisation it answered), so it may have run or
    may yet run."""

    def __init__(self, message: str, delivered: bool = False) -> None:
        super().__init__(message)
        self.delivered = delivered


class GuestAgent:
    """The guest agent behind one channel; each command bounded by ``timeout``."""

    def __init__(self, path: str, timeout: float) -> None:
        self.path = path
        self.timeout = timeout

    async def command(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Run one guest agent command and return its ``return`` value.

        :raise AgentError: the socket cannot be reached, the agent does not
            answer within ``timeout`` seconds, or it answers with an error.
        """
        progress = _Progress()
        try:
            async with asyncio.timeout(self.timeout):
                return await _command(self.path, command, arguments, progress)
        except TimeoutError:
            what = command if progress.delivered else "guest-sync"
            busy = "" if progress.delivered else \
                " (is the guest agent running, or is another client using its channel?)"
            raise AgentError(f"the guest agent did not answer {what} within "
                             f"{self.timeout:g} s{busy}", progress.delivered) from None
        except AgentError as err:
            err.delivered = progress.delivered
            raise
        except OSError as err:
            raise AgentError(f"cannot reach the guest agent at {self.path}: "
                             f"{err.strerror or err}", progress.delivered) from None


class _Progress:
    delivered = False


async def _command(path: str, command: str, arguments: dict[str, Any] | None,
                   progress: _Progress) -> Any:
    reader, writer = await asyncio.open_unix_connection(path, limit=_LINE_LIMIT)
    try:
        sync_id = secrets.randbelow(1 << 31)
        writer.write(_SYNC + _message("guest-sync", {"id": sync_id}))
        await writer.drain()
        while True:
            reply = await _read_reply(reader, lenient=True)
            if reply.get("return") == sync_id:
                break
        progress.delivered = True  # from here on it may run, even if we give up
        writer.write(_message(command, arguments))
        await writer.drain()
        while True:
            reply = await _read_reply(reader)
            if "error" in reply:
                error = reply["error"]
                raise AgentError(f"the guest agent refused {command}: "
                                 f"{error.get('desc', error)}")
            if "return" in reply:
                return reply["return"]
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


async def _read_reply(reader: asyncio.StreamReader, lenient: bool = False) -> dict[str, Any]:
    """The next JSON object the agent sends (blank lines skipped; with
    ``lenient``, lines that are not JSON too: the tail of an earlier client's
    answer before the synchronisation).

    :raise AgentError: the agent closed the channel or sent something else.
    """
    while True:
        try:
            line = await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError:
            raise AgentError("the guest agent closed the channel") from None
        except asyncio.LimitOverrunError:
            raise AgentError("the guest agent sent an overlong line") from None
        line = line.strip(b"\xff \r\n")
        if not line:
            continue
        try:
            reply = json.loads(line)
        except ValueError:
            if lenient:
                continue
            raise AgentError(f"the guest agent sent something that is not JSON: "
                             f"{line[:80]!r}") from None
        if isinstance(reply, dict):
            return reply


def _message(command: str, arguments: dict[str, Any] | None) -> bytes:
    msg: dict[str, Any] = {"execute": command}
    if arguments:
        msg["arguments"] = arguments
    return json.dumps(msg).encode() + b"\n"
