"""Instant recovery into a domain libvirt 9.0 runs: libvirt starts the VM on
the image ``bbctl restore --instant`` made (libvirt opens its backing chain,
the backup's files, with its own node names), the daemon streams the backup
into it in libvirt's QEMU, and libvirt's operations on the disk keep working
during and after the stream."""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import bbctl, domain_state, wait_for
from tools.daemon import Daemon
from tools.libvirt import Domain, Libvirt
from tools.vm import MiB

pytestmark = pytest.mark.libvirt

K = 64 * 1024
SDA = "ua-sda"


@pytest.fixture
def restored(lv: Libvirt, workdir: Path, make_daemon: Any
             ) -> Iterator[tuple[Daemon, Domain, Path, Path]]:
    """A backup of vm1's sda, then vm2 started by libvirt on an instant
    restore of it and defined in the daemon: (daemon, vm2, image, the backup
    point restored by copy)."""
    daemon: Daemon = make_daemon()
    vm1 = Domain(lv, workdir, "vm1", disks={"sda": 64 * MiB})
    vm2 = Domain(lv, workdir, "vm2", disks={"sda": 64 * MiB})
    try:
        vm1.start()
        with daemon.client() as c:
            c.domain_define("vm1", str(vm1.qmp))
        wait_for(lambda: domain_state(daemon, "vm1") == "running", what="vm1 running")
        vm1.write("sda", 0, 4 * MiB, 0x41)
        for cluster, pattern in ((1, 0x42), (100, 0x43), (700, 0x44)):
            vm1.write("sda", cluster * K, K, pattern)
        dest = workdir / "backups"
        r = bbctl(daemon, "--json", "backup", "vm1", "--dest", str(dest))
        assert r.returncode == 0, r.stderr
        point = json.loads(r.stdout)["id"]
        vm1.remove()
        image = vm2.image("sda")
        r = bbctl(daemon, "--json", "restore", str(dest), "--disk", SDA, "--at", point,
                  "--output", str(image), "--instant")
        assert r.returncode == 0, r.stderr
        copy = workdir / "point.qcow2"
        r = bbctl(daemon, "restore", str(dest), "--disk", SDA, "--at", point, "--output",
                  str(copy))
        assert r.returncode == 0, r.stderr
        vm2.aliases = {"sda": SDA}
        vm2.start()
        with daemon.client() as c:
            c.domain_define("vm2", str(vm2.qmp))
        wait_for(lambda: domain_state(daemon, "vm2") == "running", what="vm2 running")
        yield daemon, vm2, image, copy
    finally:
        print(f"--- libvirt's log of vm2 ---\n{vm2.log()[-5000:]}"
              if lv.domain_log("vm2").exists() else "")
        vm1.remove()
        vm2.remove()


def _lookup(daemon: Daemon, image: Path) -> dict[str, Any]:
    with daemon.client() as c:
        return c.call("recovery.lookup", file=str(image))  # type: ignore[no-any-return]


def _backing_store(dom: Domain) -> list[str]:
    """The files of sda's chain in libvirt's live XML, top first."""
    root = ET.fromstring(dom.virsh("dumpxml", dom.name).stdout)
    disk = next(d for d in root.iter("disk") if d.find("target").attrib["dev"] == "sda")  # type: ignore[union-attr]
    files = []
    node: ET.Element | None = disk
    while node is not None and node.find("source") is not None:
        files.append(node.find("source").attrib["file"])  # type: ignore[union-attr]
        node = node.find("backingStore")
    return files


def _same(a: Path, b: Path) -> bool:
    r = subprocess.run(["qemu-img", "compare", "-U", str(a), str(b)], capture_output=True,
                       text=True)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode == 0


def test_libvirt_pulls_the_backup_in_and_its_operations_keep_working(
        restored: tuple[Daemon, Domain, Path, Path], workdir: Path) -> None:
    daemon, vm2, image, copy = restored
    assert _backing_store(vm2) == [str(image), *_lookup(daemon, image)["backing"]]
    # The daemon does not stream behind libvirt's back (libvirt's later
    # block-commit would name nodes the stream closed): libvirt pulls.
    waiting = _lookup(daemon, image)
    assert waiting["state"] == "waiting" and "virsh blockpull" in waiting["waiting_for"], waiting
    vm2.virsh("blockpull", "vm2", "sda", "--bandwidth", "1")  # MiB/s: seconds for 4 MiB
    wait_for(lambda: _lookup(daemon, image)["state"] == "streaming", what="streaming")
    during = _lookup(daemon, image)
    assert during["manager_job"] and during["progress"]["done"] < during["progress"]["total"]
    vm2.write("sda", 1 * K, K, 0x51)  # over the backup's data
    vm2.write("sda", 300 * K, K, 0x52)  # where it has none
    wait_for(lambda: _lookup(daemon, image)["state"] == "done", timeout=60, what="done")
    assert _backing_store(vm2) == [str(image)]  # libvirt knows
    for offset, pattern in ((1 * K, 0x51), (300 * K, 0x52)):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -P {pattern:#x} {offset} {K}",
                        str(copy)], check=True, capture_output=True)
    vm2.virsh("qemu-monitor-command", "vm2", "--hmp", f'qemu-io -d {SDA} "flush"')
    assert _same(image, copy)
    # And libvirt's own jobs on the disk work afterwards.
    overlay = workdir / "vm2-sda.ov.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", str(image),
                    "-F", "qcow2", str(overlay), str(64 * MiB)], check=True)
    vm2.virsh("snapshot-create-as", "vm2", "--disk-only", "--no-metadata", "--reuse-external",
              "--diskspec", f"sda,snapshot=external,file={overlay}")
    vm2.virsh("blockcommit", "vm2", "sda", "--active", "--pivot", "--wait")
    assert _backing_store(vm2) == [str(image)]
    assert vm2.state().startswith("running")
