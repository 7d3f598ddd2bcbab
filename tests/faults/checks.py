"""What every fault test checks afterwards: nothing left that nothing owns."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from blockbackupd.names import PREFIX
from tools.daemon import Daemon
from tools.vm import Vm


def store_records(daemon: Daemon) -> list[tuple[str, str]]:
    """(kind, payload) of every record of work in progress in the store."""
    db = sqlite3.connect(f"file:{Path(daemon.daemon_keys['state_dir']) / 'blockbackupd.db'}"
                         "?mode=ro", uri=True)
    try:
        return [(str(k), str(p)) for k, p in db.execute("SELECT kind, payload FROM intent")]
    finally:
        db.close()


def nbd_server_running(vm: Vm) -> bool:
    try:
        vm.qmp("nbd-server-stop")
    except RuntimeError as err:
        assert "not running" in str(err), err
        return False
    return True


def assert_nothing_left(daemon: Daemon, vm: Vm, nodes: set[str],
                        tops: dict[str, str]) -> None:
    """The block graph and I/O paths as before; no export, NBD server, block
    job, fdset or QEMU object of ours (a scratch's LUKS key), no scratch
    file, socket or store record; QEMU alive and its guest running."""
    assert vm.running, vm.stdout_path.read_text(errors="replace")[-2000:]
    assert vm.status() == "running"
    assert vm.node_names() == nodes
    assert vm.top_nodes() == tops
    assert vm.qmp("query-block-exports") == []
    assert [j["id"] for j in vm.qmp("query-jobs") if j["id"].startswith(PREFIX)] == []
    assert vm.qmp("query-fdsets") == []
    assert [o["name"] for o in vm.qmp("qom-list", path="/objects")
            if o["name"].startswith(PREFIX)] == []
    assert not nbd_server_running(vm)
    assert os.listdir(daemon.daemon_keys["scratch_dir"]) == []
    assert [p for p in os.listdir(daemon.daemon_keys["run_dir"]) if p.endswith(".nbd")] == []
    assert store_records(daemon) == []
