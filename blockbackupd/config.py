"""Configuration: the TOML file of the contract, validated at start-up.

Every key has a default, so the daemon starts without a file. An unknown key
or a bad value stops start-up with a message naming the key
(``daemon.socket_mode: ...``).
"""

from __future__ import annotations

import grp
import pwd
import tomllib
from pathlib import Path
from typing import Any, Literal

import tomli_w
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from .names import check_name

DEFAULT_CONFIG_PATH = Path("/etc/blockbackupd/blockbackupd.toml")


class ConfigError(Exception):
    """The configuration file is unreadable or invalid; the message names the key."""


def _absolute_path(value: Path) -> Path:
    if not value.is_absolute():
        raise ValueError("must be an absolute path")
    return value


def _octal(value: str) -> str:
    if not (3 <= len(value) <= 4) or any(c not in "01234567" for c in value):
        raise ValueError("must be an octal file mode such as \"0660\"")
    return value


def _group_id(value: str | int) -> int:
    """A group name or number, as a gid; the group must exist."""
    try:
        return grp.getgrgid(value).gr_gid if isinstance(value, int) else grp.getgrnam(value).gr_gid
    except (KeyError, OverflowError):
        raise ValueError(f"no group {value!r} on this host") from None


def _user_id(value: str | int) -> int:
    """A user name or number, as a uid; the user must exist."""
    try:
        return pwd.getpwuid(value).pw_uid if isinstance(value, int) else pwd.getpwnam(value).pw_uid
    except (KeyError, OverflowError):
        raise ValueError(f"no user {value!r} on this host") from None


def _absolute_or_empty(value: str) -> str:
    if value and not Path(value).is_absolute():
        raise ValueError("must be an absolute path")
    return value


def listen_address(value: str) -> tuple[str, int]:
    """``host:port`` or ``[v6 address]:port`` as (host, port)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError("must be host:port (a port from 1 to 65535), e.g. 0.0.0.0:10810")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 address goes in brackets: [::]:10810")
    return host, int(port)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DaemonSection(_Section):
    socket: Path = Path("/run/blockbackupd/blockbackupd.sock")
    socket_mode: str = "0660"
    state_dir: Path = Path("/var/lib/blockbackupd")
    scratch_dir: Path = Path("/var/lib/blockbackupd/scratch")
    run_dir: Path = Path("/run/blockbackupd")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # Added to the contract's keys: how long one QMP command may take before the
    # request fails with operation-failed, so a hung QEMU cannot hold a request.
    qmp_timeout: float = Field(default=30.0, gt=0, le=3600)
    # Added: the cap of the exponential backoff between reconnection attempts.
    reconnect_max_delay: float = Field(default=2.0, gt=0, le=300)
    # Added: directories besides scratch_dir where a client may place scratch images.
    extra_scratch_dirs: list[Path] = []
    # Added: the group that owns the RPC socket and the NBD unix sockets (name or
    # number; empty: the daemon's own group). With mode 0660 its members can connect.
    socket_group: str | int = ""
    # Added: who may call methods, checked against the peer's credentials from
    # the kernel (SO_PEERCRED, SO_PEERGROUPS). root and the daemon's own user
    # always may; anyone else must be listed, by user or by one of its groups.
    allowed_users: list[str | int] = []
    allowed_groups: list[str | int] = []
    # Added: the longest a guest write may wait for its old data to reach the
    # scratch image; past it the snapshot breaks instead of the guest stalling.
    cbw_timeout: int = Field(default=10, ge=1, le=600)
    # Added: how often each snapshot's view is read to find out whether it broke
    # (QEMU 7.2 reports no event for that).
    snapshot_probe_interval: float = Field(default=5.0, gt=0, le=15)
    # Added: the longest snapshot.create waits for the guest agent to freeze the
    # guest's filesystems (and each thaw attempt); past it, quiesce-failed.
    quiesce_timeout: float = Field(default=30.0, gt=0, le=600)
    # Added: warn (log, daemon.info) when a domain's persistent bitmaps take more
    # than this many MiB of QEMU's memory (QEMU loads them all; 0: never warn).
    bitmap_memory_warning: int = Field(default=256, ge=0)
    # Added: the qemu-storage-daemon that serves a stopped domain's images
    # (empty: the one of the domain's own QEMU build, next to its binary, else
    # the one on PATH).
    storage_daemon: str = ""
    # Added: a TCP address ("host:port", "[v6]:port") where the daemon also
    # answers RPC, TLS only with a client certificate from tls_dir's CA, whose
    # common name names the local user the caller acts as. Empty: UNIX socket
    # only. Plain TCP is never offered.
    listen: str = ""
    # Added: ca-cert.pem, server-cert.pem, server-key.pem for that listener, the
    # layout of nbd.tls_dir (empty: nbd.tls_dir's own).
    tls_dir: str = ""
    # Added: a file to which every request, its answer and every notification
    # are appended, one JSON line each (to debug a client, or to check a
    # client against the API document; it holds every param). Empty: off.
    rpc_record: str = ""

    @field_validator("listen")
    @classmethod
    def _address(cls, value: str) -> str:
        if value:
            listen_address(value)
        return value

    @field_validator("tls_dir", "rpc_record")
    @classmethod
    def _absolute_text(cls, value: str) -> str:
        return _absolute_or_empty(value)

    @property
    def listen_host_port(self) -> tuple[str, int] | None:
        return listen_address(self.listen) if self.listen else None

    @field_validator("socket", "state_dir", "scratch_dir", "run_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return _absolute_path(value)

    @field_validator("extra_scratch_dirs")
    @classmethod
    def _absolute_list(cls, value: list[Path]) -> list[Path]:
        return [_absolute_path(v) for v in value]

    @field_validator("socket_group")
    @classmethod
    def _existing_group(cls, value: str | int) -> str | int:
        if value != "":
            _group_id(value)
        return value

    @field_validator("allowed_users")
    @classmethod
    def _existing_users(cls, value: list[str | int]) -> list[str | int]:
        for v in value:
            _user_id(v)
        return value

    @field_validator("allowed_groups")
    @classmethod
    def _existing_groups(cls, value: list[str | int]) -> list[str | int]:
        for v in value:
            _group_id(v)
        return value

    @property
    def socket_gid(self) -> int | None:
        """The gid to give the sockets, or None to leave the daemon's own."""
        return None if self.socket_group == "" else _group_id(self.socket_group)

    @property
    def allowed_uids(self) -> frozenset[int]:
        return frozenset(_user_id(v) for v in self.allowed_users)

    @property
    def allowed_gids(self) -> frozenset[int]:
        return frozenset(_group_id(v) for v in self.allowed_groups)

    @property
    def scratch_dirs(self) -> list[Path]:
        """Every directory where scratch images may be placed, scratch_dir first."""
        return [self.scratch_dir, *self.extra_scratch_dirs]

    @field_validator("socket_mode")
    @classmethod
    def _octal_mode(cls, value: str) -> str:
        return _octal(value)

    @property
    def socket_mode_bits(self) -> int:
        return int(self.socket_mode, 8)


class NbdSection(_Section):
    """The NBD servers QEMU runs for exports (added to the contract's keys)."""

    # Mode of the default UNIX socket of a domain's NBD server in run_dir.
    socket_mode: str = "0660"
    # Directory with ca-cert.pem, server-cert.pem and server-key.pem for TCP
    # exports with TLS (QEMU's tls-creds-x509 layout). Empty: no TLS available.
    tls_dir: str = ""
    # Whether NBD clients must present a certificate signed by that CA.
    tls_verify_peer: bool = True
    # TCP exports without TLS: refused unless this is true.
    allow_plain_tcp: bool = False
    # Seconds a TCP client may leave QEMU without a word (no acknowledgement,
    # no answer to a keepalive) before QEMU's socket to it fails: a client
    # whose network is cut holds its request, and every drain of the node it
    # reads (block jobs, the VM manager's snapshots), that long at most.
    silence: float = Field(default=30.0, ge=2, le=3600)

    @field_validator("socket_mode")
    @classmethod
    def _octal_mode(cls, value: str) -> str:
        return _octal(value)

    @field_validator("tls_dir")
    @classmethod
    def _tls_dir(cls, value: str) -> str:
        return _absolute_or_empty(value)

    @property
    def socket_mode_bits(self) -> int:
        return int(self.socket_mode, 8)


class DomainSection(_Section):
    name: str
    qmp_socket: Path
    # v1.1: the host side of the guest agent's channel (QEMU's chardev of
    # org.qemu.guest_agent.0); needed to quiesce.
    guest_agent_socket: Path | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_name(value, "domain name")

    @field_validator("qmp_socket")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return _absolute_path(value)

    @field_validator("guest_agent_socket")
    @classmethod
    def _absolute_agent(cls, value: Path | None) -> Path | None:
        return None if value is None else _absolute_path(value)


class Config(_Section):
    daemon: DaemonSection = DaemonSection()
    nbd: NbdSection = NbdSection()
    domain: list[DomainSection] = []

    @field_validator("domain")
    @classmethod
    def _unique(cls, value: list[DomainSection]) -> list[DomainSection]:
        names: set[str] = set()
        sockets: set[Path] = set()
        for d in value:
            if d.name in names:
                raise ValueError(f"domain {d.name!r} is defined twice")
            if d.qmp_socket in sockets:
                raise ValueError(f"qmp_socket {str(d.qmp_socket)!r} is used by two domains")
            names.add(d.name)
            sockets.add(d.qmp_socket)
        return value

    @model_validator(mode="after")
    def _listener_has_certificates(self) -> Config:
        if self.daemon.listen and not self.tls_dir:
            raise ValueError("daemon.listen: the TLS listener needs certificates "
                             "(daemon.tls_dir or nbd.tls_dir)")
        return self

    @property
    def tls_dir(self) -> str:
        """The RPC listener's certificate directory."""
        return self.daemon.tls_dir or self.nbd.tls_dir

    def to_toml(self) -> str:
        """The effective configuration, as a TOML document that loads back to itself."""
        data: dict[str, Any] = self.model_dump(mode="json")
        # TOML has no null: an unset optional key is left out.
        data["domain"] = [{k: v for k, v in d.items() if v is not None} for d in data["domain"]]
        if not data["domain"]:
            del data["domain"]
        return tomli_w.dumps(data)


def _describe(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"{where}: {msg}")
    return "; ".join(lines)


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse and validate TOML text.

    :raise ConfigError: on a TOML syntax error, an unknown key or a bad value.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML: {err}") from err
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(f"{source}: {_describe(err)}") from err


def load_config(path: Path | None) -> Config:
    """Load the configuration; with no path, the default file if it exists, else defaults.

    :raise ConfigError: when the file cannot be read or is invalid.
    """
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            return Config()
        path = DEFAULT_CONFIG_PATH
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read: {err}") from err
    return parse_config(text, str(path))
