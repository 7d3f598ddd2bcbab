"""A backup application's usual clients against exports of every disk kind a
host runs (raw files, block devices, RBD images, LUKS qcow2), on both QEMU
builds: ``nbdinfo --list``, two ``nbdinfo`` connections, ``nbdcopy`` to
``null:``, and a read of the change set's meta context. QEMU lives through
all of it, the data and the extents are exact; or, where the build could
not survive the export (disks in I/O threads on QEMU 7.2), ``export.start``
answers ``unsupported`` cleanly and nothing is left (tests/test_iothreads.py
covers the qcow2 disks of both managers' shapes).
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blockbackup_client import Unsupported
from tests.conftest import NbdReader, domain_state, export_xml, snapshot_xml, wait_for
from tools.ceph import Cluster
from tools.daemon import Daemon
from tools.vm import MiB, Vm
from tools.vm_configs import EncryptedVm, ProxmoxVm, RbdVm

pytest_plugins = ("tests.ceph_fixtures",)

SIZE = 16 * MiB


def make(kind: str, make_vm: Callable[..., Vm], request: pytest.FixtureRequest) -> Vm:
    if kind == "raw-file":
        # Proxmox VE's "VirtIO SCSI" controller without iothread=1: its disks
        # run in the main loop, so every build can export them.
        return make_vm(kind=ProxmoxVm, iothread=False, fmt="raw", disks={"sda": SIZE})
    if kind == "raw-block-device":
        dev = request.getfixturevalue("loop_device")
        return make_vm(kind=ProxmoxVm, iothread=False, fmt="raw", images={"sda": dev},
                       disks={"sda": SIZE})
    assert kind == "luks-qcow2"
    return make_vm(kind=EncryptedVm, disks={"sda": SIZE})


def alive(vm: Vm) -> None:
    assert vm.running, vm.stdout_path.read_text(errors="replace")[-2000:]
    assert vm.status() == "running"


def run(args: list[str]) -> str:
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, (args, r.stderr)
    return r.stdout


@pytest.mark.parametrize("kind", ["raw-file", "raw-block-device", "luks-qcow2"])
def test_a_backup_applications_clients_against_local_disks(
        make_vm: Callable[..., Vm], daemon: Daemon, request: pytest.FixtureRequest,
        kind: str) -> None:
    clients_against(make(kind, make_vm, request), daemon)


@pytest.mark.parametrize("manager", ["libvirt", "proxmox"])
def test_a_backup_applications_clients_against_rbd_disks(
        ceph_cluster: Cluster, ceph_image: Callable[[int], str], make_vm: Callable[..., Vm],
        daemon: Daemon, manager: str) -> None:
    # (The image's fixture first: it is removed after the VM that holds it stops.)
    image = ceph_image(SIZE)
    if manager == "libvirt":
        vm = make_vm(kind=RbdVm, rbd={"sda": (image, str(ceph_cluster.conf))})
    else:
        # Without iothread=1: the test's writes (HMP qemu-io) to an RBD disk
        # in an I/O thread kill QEMU 10.0 (tools/vm_configs.py).
        vm = make_vm(kind=ProxmoxVm, iothread=False, fmt="raw", disks={"sda": SIZE},
                     images={"sda": Path(ceph_cluster.qemu_uri(image))})
    clients_against(vm, daemon)


def clients_against(vm: Vm, daemon: Daemon) -> None:
    with daemon.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    vm.write("sda", 0, SIZE, 0x31)
    with daemon.client() as c:
        c.snapshot_create("vm1", snapshot_xml("cp0"), checkpoint=True)
        c.snapshot_delete("vm1", "cp0")
        vm.write("sda", 5 * MiB, 192 * 1024, 0x32)
        c.snapshot_create("vm1", snapshot_xml("s1"))
        vm.write("sda", 5 * MiB, 4096, 0x33)  # after the instant: not in the view
        xml = export_xml([("sda", "s1", {"checkpoint": "cp0"})])
        if "sda" in c.snapshot_lookup("vm1", "s1")["copy_only"]:
            with pytest.raises(Unsupported, match="I/O thread"):
                c.export_start("vm1", xml)
            assert vm.qmp("query-block-exports") == []
        else:
            sock = c.export_start("vm1", xml)["server"]["socket"]
            uri = f"nbd+unix:///sda-s1?socket={sock}"
            for args in (["nbdinfo", "--list", f"nbd+unix://?socket={sock}"],
                         ["nbdinfo", uri], ["nbdinfo", uri], ["nbdcopy", uri, "null:"]):
                run(args)
                time.sleep(0.2)  # a close that would abort QEMU has run by now
                alive(vm)
            mapped: list[dict[str, Any]] = json.loads(run(
                ["nbdinfo", "--json", "--map=qemu:dirty-bitmap:cp0", uri]))
            dirty = [[m["offset"], m["length"]] for m in mapped if m["type"] & 1]
            assert dirty == [[5 * MiB, 192 * 1024]]
            with NbdReader(sock, "sda-s1") as reader:
                assert reader.read(5 * MiB, 4096) == b"\x32" * 4096
                assert reader.read(4 * MiB, 4096) == b"\x31" * 4096
        c.snapshot_delete("vm1", "s1")
        for name in c.call("checkpoint.list", domain="vm1"):
            c.call("checkpoint.delete", domain="vm1", name=name)
    alive(vm)
    assert {n for n in vm.node_names() if n.startswith("bb-")} == set()
    assert vm.qmp("query-block-exports") == []
