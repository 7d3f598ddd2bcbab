"""bbctl's start-up: a control command imports only what it uses.

Most of ``bbctl domain list``'s time is Python starting and importing, so
the control commands must not import asyncio, libnbd, blake3, lxml or tqdm:
those are for the backup application's commands, which import them when run.
Each command runs in a fresh interpreter with ``-X importtime``, which names
every module imported after start-up, including those imported inside a
function while the command runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tools.daemon import Daemon
from tools.vm import Vm

#: What a control command must not import (a name and its submodules).
HEAVY = ("asyncio", "asyncio.base_events", "nbd", "blake3", "lxml", "tqdm")

#: The console script's own code (``bbctl`` as pip writes it).
SCRIPT = "import sys; from blockbackup_client.bbctl import main; sys.exit(main())"


def run(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """bbctl ARGS in a fresh interpreter; its result and every module it imported."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", SCRIPT, *args],
                       capture_output=True, text=True, timeout=60)
    imported = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "blockbackup_client.bbctl" in imported, r.stderr[-2000:]
    return r, imported


def heavy(imported: set[str]) -> list[str]:
    return sorted(m for m in imported if any(m == h or m.startswith(h + ".") for h in HEAVY))


def ok(*args: str) -> set[str]:
    r, imported = run(*args)
    assert r.returncode == 0, r.stderr[-2000:]
    return imported


def test_help_imports_nothing_heavy() -> None:
    imported = ok("--help")
    assert heavy(imported) == []


def test_control_commands_import_nothing_heavy(defined: tuple[Daemon, Vm]) -> None:
    daemon, vm = defined
    s = ("--socket", str(daemon.socket))
    commands = [
        ["daemon", "info"],
        ["domain", "list"],
        ["domain", "define", "vm2", str(vm.workdir / "vm2.qmp")],
        ["domain", "undefine", "vm2"],
        ["snapshot", "create", "vm1", "--name", "s1", "--checkpoint"],
        ["snapshot", "list", "vm1"],
        ["export", "start", "vm1", "--snapshot", "s1", "--disk", "sda"],
        ["export", "list", "vm1"],
        ["export", "stop", "vm1", "--snapshot", "s1", "--disk", "sda"],
        ["snapshot", "delete", "vm1", "s1"],
        ["checkpoint", "list", "vm1"],
        ["--json", "domain", "list"],
    ]
    found = {" ".join(c): heavy(ok(*s, *c)) for c in commands}
    assert found == {" ".join(c): [] for c in commands}


def test_a_failing_control_command_imports_nothing_heavy(daemon: Daemon) -> None:
    r, imported = run("--socket", str(daemon.socket), "snapshot", "list", "nope")
    assert r.returncode == 1 and "[no-such-domain]" in r.stderr
    assert heavy(imported) == []


def test_the_backup_commands_still_import_what_they_use(tmp_path: Path) -> None:
    """The check can fail: the backup application's commands import these."""
    r, imported = run("verify", str(tmp_path / "none"))
    assert r.returncode == 1
    assert {"nbd", "blake3"} <= set(heavy(imported))


#: What ``bbctl backup`` needs no module of: they cost its every start ~20 ms
#: (typing; dataclasses with inspect; concurrent.futures with logging;
#: hashlib and subprocess, which only verify and restore use). (ctypes is
#: imported by libnbd's block status, not by us.)
BACKUP_NEEDS_NOT = ("asyncio", "lxml", "tqdm", "typing", "dataclasses", "inspect",
                    "concurrent", "logging", "hashlib", "subprocess")


def test_a_backup_imports_only_what_it_uses(defined: tuple[Daemon, Vm], tmp_path: Path) -> None:
    daemon, _ = defined
    r, imported = run("--socket", str(daemon.socket), "backup", "vm1",
                      "--dest", str(tmp_path / "b"), "--level", "full")
    assert r.returncode == 0, r.stderr[-2000:]
    assert {"nbd", "blake3", "blockbackup_client.pull"} <= imported
    assert sorted(m for m in imported if m.split(".")[0] in BACKUP_NEEDS_NOT) == []


def test_async_client_is_imported_when_asked_for() -> None:
    code = ("import sys\n"
            "import blockbackup_client\n"
            "from blockbackup_client import Client\n"
            "from blockbackup_client.client import Client as C2\n"
            "assert Client is C2 and 'asyncio' not in sys.modules\n"
            "from blockbackup_client import AsyncClient\n"
            "import blockbackup_client.aio, blockbackup_client.client\n"
            "assert 'asyncio' in sys.modules\n"
            "assert AsyncClient is blockbackup_client.aio.AsyncClient\n"
            "assert AsyncClient is blockbackup_client.client.AsyncClient\n"
            "assert AsyncClient.__module__ == 'blockbackup_client.aio'\n"
            "try:\n"
            "    blockbackup_client.Nothing\n"
            "except AttributeError:\n"
            "    pass\n"
            "else:\n"
            "    raise AssertionError('no AttributeError')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args, expected", [
    (["domain", "--help"], ["list", "define", "undefine", "xml"]),
    (["snapshot", "--help"], ["create", "delete", "list", "info", "xml"]),
    (["export", "start", "--help"], ["--snapshot", "--disk", "--checkpoint"]),
    (["backup", "--help"], ["--dest", "--level", "--quiesce"]),
    (["prune", "--help"], ["--keep"]),
])
def test_parsers_made_when_used_still_help(args: list[str], expected: list[str],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from blockbackup_client.bbctl import main

    with pytest.raises(SystemExit) as exit:
        main(args)
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert all(word in out for word in expected), out
