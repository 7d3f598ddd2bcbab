"""Configuration: defaults, validation errors naming the key, --show-config."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from blockbackupd.config import Config, ConfigError, parse_config


def run_daemon(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blockbackupd", *args],
                          capture_output=True, text=True, timeout=30)


def test_defaults_are_the_contracts() -> None:
    c = Config()
    assert str(c.daemon.socket) == "/run/blockbackupd/blockbackupd.sock"
    assert c.daemon.socket_mode == "0660" and c.daemon.socket_mode_bits == 0o660
    assert str(c.daemon.state_dir) == "/var/lib/blockbackupd"
    assert str(c.daemon.scratch_dir) == "/var/lib/blockbackupd/scratch"
    assert str(c.daemon.run_dir) == "/run/blockbackupd"
    assert c.daemon.log_level == "info"
    assert c.domain == []


@pytest.mark.parametrize("text, message", [
    ('[daemon]\nsockett = "/x"\n', "daemon.sockett: unknown key"),
    ('[deamon]\n', "deamon: unknown key"),
    ('[daemon]\nsocket_mode = "0999"\n', "daemon.socket_mode: Value error, must be an octal"),
    ('[daemon]\nsocket_mode = 432\n', "daemon.socket_mode: Input should be a valid string"),
    ('[daemon]\nstate_dir = "relative"\n', "daemon.state_dir: Value error, must be an absolute"),
    ('[daemon]\nlog_level = "loud"\n', "daemon.log_level: Input should be 'debug'"),
    ('[daemon]\nqmp_timeout = 0\n', "daemon.qmp_timeout: Input should be greater than 0"),
    ('[[domain]]\nname = "vm1"\n', "domain.0.qmp_socket: Field required"),
    ('[[domain]]\nname = "a/b"\nqmp_socket = "/q"\n', "domain.0.name: Value error, domain name"),
    ('[[domain]]\nname = "vm1"\nqmp_socket = "/q"\ncolour = 1\n', "domain.0.colour: unknown key"),
    ('[[domain]]\nname = "a"\nqmp_socket = "/q"\n[[domain]]\nname = "a"\nqmp_socket = "/r"\n',
     "domain: Value error, domain 'a' is defined twice"),
    ('[[domain]]\nname = "vm1"\nqmp_socket = "/q"\nguest_agent_socket = "q.qga"\n',
     "domain.0.guest_agent_socket: Value error, must be an absolute path"),
    ('[daemon]\nquiesce_timeout = -1\n', "daemon.quiesce_timeout: Input should be greater than 0"),
    ('[daemon\n', "not valid TOML"),
    ('[daemon]\nsocket_group = "no-such-group"\n',
     "daemon.socket_group: Value error, no group 'no-such-group' on this host"),
    ('[daemon]\nallowed_users = ["root", "no-such-user"]\n',
     "daemon.allowed_users: Value error, no user 'no-such-user' on this host"),
    ('[daemon]\nallowed_groups = [4000000]\n',
     "daemon.allowed_groups: Value error, no group 4000000 on this host"),
    ('[daemon]\nlisten = "0.0.0.0:10810"\n',
     "daemon.listen: the TLS listener needs certificates (daemon.tls_dir or nbd.tls_dir)"),
    ('[daemon]\nlisten = "10810"\ntls_dir = "/etc/pki"\n',
     "daemon.listen: Value error, must be host:port"),
    ('[daemon]\nlisten = "::1:10810"\ntls_dir = "/etc/pki"\n',
     "daemon.listen: Value error, an IPv6 address goes in brackets"),
    ('[daemon]\nlisten = "h:99999"\ntls_dir = "/etc/pki"\n',
     "daemon.listen: Value error, must be host:port (a port from 1 to 65535)"),
    ('[daemon]\ntls_dir = "pki"\n', "daemon.tls_dir: Value error, must be an absolute path"),
])
def test_bad_config_names_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(text, "test.toml")
    assert str(err.value).startswith("test.toml: ")
    assert message in str(err.value)


def test_bad_config_file_stops_the_daemon_with_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[daemon]\nsocket = "/tmp/x.sock"\nsocket_mod = "0600"\n')
    result = run_daemon("--config", str(cfg))
    assert result.returncode == 2
    assert f"{cfg}: daemon.socket_mod: unknown key" in result.stderr


def test_a_listener_without_its_certificates_stops_the_daemon(tmp_path: Path) -> None:
    cfg = tmp_path / "tls.toml"
    cfg.write_text(f'[daemon]\nsocket = "{tmp_path}/bb.sock"\nstate_dir = "{tmp_path}/state"\n'
                   f'run_dir = "{tmp_path}/run"\nlisten = "127.0.0.1:10811"\n'
                   f'[nbd]\ntls_dir = "{tmp_path}"\n')
    assert parse_config(cfg.read_text()).daemon.listen_host_port == ("127.0.0.1", 10811)
    result = run_daemon("--config", str(cfg))
    assert result.returncode == 1
    assert f"cannot start: daemon.listen: no {tmp_path}/ca-cert.pem" in result.stderr
    assert not (tmp_path / "bb.sock").exists()


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    result = run_daemon("--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "cannot read" in result.stderr


def test_show_config_prints_the_effective_config(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[daemon]\nsocket_mode = "0600"\nlog_level = "debug"\n'
                   '[[domain]]\nname = "vm1"\nqmp_socket = "/run/vms/vm1.qmp"\n')
    result = run_daemon("--config", str(cfg), "--show-config")
    assert result.returncode == 0, result.stderr
    shown = tomllib.loads(result.stdout)
    assert shown["daemon"]["socket_mode"] == "0600"
    assert shown["daemon"]["log_level"] == "debug"
    assert shown["daemon"]["socket"] == "/run/blockbackupd/blockbackupd.sock"  # default filled in
    assert shown["domain"] == [{"name": "vm1", "qmp_socket": "/run/vms/vm1.qmp"}]
    # What it prints is itself a valid configuration that means the same.
    assert parse_config(result.stdout) == parse_config(cfg.read_text())


def test_example_config_is_valid_and_documents_every_key() -> None:
    example = Path(__file__).parent.parent / "etc" / "blockbackupd.toml"
    text = example.read_text()
    parse_config(text, str(example))
    # Every key appears, commented, in the example.
    for section in (Config().daemon, Config().nbd):
        for key in section.model_dump():
            assert f"\n{key} = " in text, key


def test_a_domain_with_a_guest_agent_shows_and_loads_back() -> None:
    text = ('[[domain]]\nname = "vm1"\nqmp_socket = "/run/vms/vm1.qmp"\n'
            'guest_agent_socket = "/run/vms/vm1.qga"\n'
            '[[domain]]\nname = "vm2"\nqmp_socket = "/run/vms/vm2.qmp"\n')
    config = parse_config(text)
    assert [str(d.guest_agent_socket) for d in config.domain] == ["/run/vms/vm1.qga", "None"]
    shown = config.to_toml()  # no agent: the key is left out (TOML has no null)
    assert shown.count("guest_agent_socket") == 1
    assert parse_config(shown) == config
