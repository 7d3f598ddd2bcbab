"""Access control: socket group and mode, and the peer's credentials checked
against the allow-lists (SO_PEERCRED, SO_PEERGROUPS), with real processes
running as another user."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import domain_state, export_xml, snapshot_xml, wait_for
from tools.daemon import Daemon
from tools.vm import Vm

NOBODY = pwd.getpwnam("nobody").pw_uid
NOGROUP = grp.getgrnam("nogroup").gr_gid
DAEMON_GID = grp.getgrnam("daemon").gr_gid
#: The system's Python: the checkout's venv may not be readable by nobody.
OTHER_PYTHON = "/usr/bin/python3"

#: Run by the other user: one daemon.info, and what came back.
PROBE = """
import json, sys
from blockbackup_client import Client, ApplicationError
try:
    with Client(sys.argv[1], timeout=10) as c:
        print(json.dumps({"ok": c.daemon_info()["version"]}))
except ApplicationError as err:
    print(json.dumps({"code": err.code, "kind": err.kind, "message": err.message}))
except OSError as err:  # the client's ConnectionLost, caused by connect()'s error
    print(json.dumps({"oserror": getattr(err.__cause__, "errno", err.errno)}))
"""


@pytest.fixture(scope="module")
def client_copy() -> Iterator[Path]:
    """The client library where the other user can read it.

    The checkout (and its venv) may lie where ``nobody`` cannot go: under
    root's home, or a ``mktemp -d``. The client needs only the standard
    library, so the other user runs the system's Python on a copy of it.
    """
    top = Path(tempfile.mkdtemp(prefix="bb-client-", dir="/tmp"))
    try:
        os.chmod(top, 0o755)
        shutil.copytree(Path(__file__).parent.parent / "client", top / "blockbackup_client",
                        ignore=shutil.ignore_patterns("__pycache__"))
        for path in [top, *top.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def run_as_nobody(client: Path, script: str, *args: str, gid: int,
                  groups: list[int]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([OTHER_PYTHON, "-c", script, *args], user=NOBODY, group=gid,
                          extra_groups=groups, capture_output=True, text=True, timeout=60,
                          cwd="/", env={"PYTHONPATH": str(client), "PATH": "/usr/bin:/bin"})


def call_as(client: Path, socket_path: Path, gid: int, groups: list[int]) -> dict[str, object]:
    r = run_as_nobody(client, PROBE, str(socket_path), gid=gid, groups=groups)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


@pytest.fixture
def open_workdir(workdir: Path) -> Path:
    """The other user must reach the socket: let it through the directory."""
    os.chmod(workdir, 0o711)
    return workdir


def test_socket_group_and_mode(make_daemon: Callable[..., Daemon], make_vm: Callable[..., Vm],
                               open_workdir: Path, client_copy: Path) -> None:
    d = make_daemon(socket_group="nogroup", socket_mode="0660")
    st = d.socket.stat()
    assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (NOGROUP, 0o660)
    vm = make_vm()
    with d.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
        wait_for(lambda: domain_state(d, "vm1") == "running")
        c.snapshot_create("vm1", snapshot_xml("s1"))
        server = c.export_start("vm1", export_xml([("sda", "s1")]))["server"]
    nbd = Path(server["socket"]).stat()
    assert (nbd.st_gid, stat.S_IMODE(nbd.st_mode)) == (NOGROUP, 0o660)
    # A member of the group can connect, but is not on the allow-list.
    assert call_as(client_copy, d.socket, NOGROUP, [])["code"] == 1012
    # Someone outside the group cannot even connect.
    assert call_as(client_copy, d.socket, DAEMON_GID, [])["oserror"] == 13


@pytest.mark.parametrize("allow, gid, groups, allowed", [
    ({}, NOGROUP, [], False),
    ({"allowed_users": ["nobody"]}, NOGROUP, [], True),
    ({"allowed_users": [NOBODY]}, NOGROUP, [], True),
    ({"allowed_groups": ["nogroup"]}, NOGROUP, [], True),          # primary group
    ({"allowed_groups": ["nogroup"]}, DAEMON_GID, [NOGROUP], True),  # supplementary group
    ({"allowed_groups": ["nogroup"]}, DAEMON_GID, [], False),
    ({"allowed_users": ["root"], "allowed_groups": ["daemon"]}, NOGROUP, [], False),
])
def test_allow_lists(make_daemon: Callable[..., Daemon], open_workdir: Path, client_copy: Path,
                     allow: dict[str, list[str | int]], gid: int, groups: list[int],
                     allowed: bool) -> None:
    d = make_daemon(socket_mode="0666", **allow)
    result = call_as(client_copy, d.socket, gid, groups)
    if allowed:
        assert "ok" in result, result
    else:
        assert result == {"code": 1012, "kind": "permission-denied",
                          "message": f"uid {NOBODY} may not call methods of this daemon"}
        assert f"uid {NOBODY} gid {gid} is not allowed" in d.log()
    with d.client() as c:  # root always may
        assert c.daemon_info()["domains"] == 0


def test_a_denied_peer_changes_nothing(make_daemon: Callable[..., Daemon],
                                       make_vm: Callable[..., Vm], open_workdir: Path,
                                       client_copy: Path) -> None:
    d = make_daemon(socket_mode="0666")
    vm = make_vm()
    script = ("import json, sys\nfrom blockbackup_client import Client, ApplicationError\n"
              "c = Client(sys.argv[1], timeout=10)\n"
              "try:\n    c.domain_define('vm1', sys.argv[2])\n"
              "except ApplicationError as err:\n    print(err.code)\n")
    r = run_as_nobody(client_copy, script, str(d.socket), str(vm.daemon_qmp), gid=NOGROUP,
                      groups=[])
    assert r.stdout.strip() == "1012", r.stderr
    with d.client() as c:
        assert c.domain_list() == []
