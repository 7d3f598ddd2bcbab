"""A Linux guest that keeps writing to a virtio-blk disk in an I/O thread:
snapshots, their deletion and a backup leave it alive and writing, on
every QEMU build.

Measured on QEMU 7.2 with this guest: a snapshot's nodes added above the
disk while the guest ran aborted QEMU (``qemu_mutex_unlock_impl: Operation
not permitted``) at the 12th snapshot. The daemon adds them inside the
held-I/O window on such builds; this test would lose the VM otherwise.

On QEMU 10.0.2 the held-I/O window itself (``stop``/``cont``) lost a
completion interrupt of this disk and stalled the guest's I/O in 1 run of
15-30 (docs/hosts.md); there these one-disk snapshots stop no vCPU.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import bbctl, domain_state, snapshot_xml, wait_for
from tools.ceph import Cluster
from tools.daemon import Daemon
from tools.linux_guest.accel import Accelerator
from tools.linux_guest.vm import WRITE_ROUNDS, LinuxVm, console_errors, write_rounds

pytest_plugins = ("tests.ceph_fixtures",)

MiB = 1024 * 1024
SNAPSHOTS = 40


def rounds(vm: LinuxVm) -> int:
    return write_rounds(vm.console())


def test_snapshots_of_a_writing_guest_on_an_io_thread_disk_keep_it_alive(
        make_guest: Callable[..., LinuxVm], make_daemon: Callable[..., Daemon],
        workdir: Path) -> None:
    vm = make_guest("vm1", disks={"vda": 64 * MiB}, iothread=True, script=WRITE_ROUNDS, agent=False)
    held, stops = snapshots_and_a_backup(vm, make_daemon(), workdir)
    # Where the nodes may be added while the guest runs, one disk's
    # snapshots stop no vCPU (the stop/cont that stalls 10.0's guest).
    assert stops == (SNAPSHOTS if held else 0)


class RbdGuest(LinuxVm):
    """The Linux guest with its disk on an RBD image (libvirt's shape: an
    ``rbd`` node under a ``raw`` one) instead of a qcow2 file."""

    def __init__(self, *args: Any, rbd: tuple[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rbd = rbd

    def create_images(self) -> None:
        pass  # the test made the image in its cluster

    def command_line(self) -> list[str]:
        args = super().command_line()
        (disk,) = self.disks
        at = args.index(f"driver=file,filename={self.image(disk)},node-name={disk}-file")
        image, conf = self.rbd
        args[at] = json.dumps({"driver": "rbd", "pool": "rbd", "image": image, "conf": conf,
                               "node-name": f"{disk}-file", "cache": {"direct": True}})
        args[at + 2] = f"driver=raw,file={disk}-file,node-name={disk}-fmt"
        return args


def test_snapshots_of_a_writing_guest_on_an_rbd_disk_in_an_io_thread_keep_it_alive(
        ceph_cluster: Cluster, ceph_image: Callable[[int], str], guest_workdir: Path,
        guest_accel: Accelerator, make_daemon: Callable[..., Daemon], workdir: Path) -> None:
    # (The image's fixture first: it is removed after the guest that holds it stops.)
    image = ceph_image(64 * MiB)
    vm = RbdGuest(guest_workdir, "rbd1", disks={"vda": 64 * MiB}, iothread=True,
                  script=WRITE_ROUNDS, agent=False, accel=guest_accel,
                  rbd=(image, str(ceph_cluster.conf)))
    try:
        vm.start()
        snapshots_and_a_backup(vm, make_daemon(), workdir)
    finally:
        vm.kill()
        print(f"--- {vm.name} console ---\n{vm.console()[-3000:]}")


def snapshots_and_a_backup(vm: LinuxVm, daemon: Daemon, workdir: Path) -> tuple[bool, int]:
    """40 snapshots, then a backup; returns whether the nodes were added held
    and how many times the guest's vCPUs were stopped for the snapshots."""
    vm.wait_ready()
    with daemon.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
    wait_for(lambda: domain_state(daemon, "vm1") == "running", what="domain running")
    wait_for(lambda: rounds(vm) >= 1, timeout=60, what="the guest writing")

    windows = []
    assert vm.monitor is not None
    vm.qmp("query-status")
    vm.monitor.events.clear()
    with daemon.client() as c:
        for i in range(SNAPSHOTS):
            # Every fourth with a checkpoint (on RBD: two RBD snapshots the
            # guest's librbd takes as the image's lock owner, mid-writes).
            c.snapshot_create("vm1", snapshot_xml(f"s{i}"), checkpoint=i % 4 == 0)
            windows.append(c.snapshot_lookup("vm1", f"s{i}")["held_io_window"])
            c.snapshot_delete("vm1", f"s{i}")
            assert vm.running, f"QEMU died at snapshot {i}:\n{vm.stdout_path.read_text()}"
    vm.qmp("query-status")  # reads the events QEMU sent before its answer
    stops = sum(e["event"] == "STOP" for e in vm.monitor.events)
    before = rounds(vm)
    r = bbctl(daemon, "--json", "backup", "vm1", "--dest", str(workdir / "b"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["disks"]
    assert vm.running, vm.stdout_path.read_text()
    wait_for(lambda: rounds(vm) > before + 1, timeout=60, what="the guest still writing")
    assert console_errors(vm.console()) == []
    held = "adding the snapshot's nodes with the guest's vCPUs stopped" in daemon.log()
    # Which builds need it is the daemon's own finding (a throwaway process);
    # either way every window was one the guest could live with.
    print(f"nodes added while held: {held}; windows (ms): "
          f"median {sorted(windows)[len(windows) // 2] * 1e3:.1f}, max {max(windows) * 1e3:.1f}; "
          f"vCPUs stopped {stops} times")
    assert max(windows) < 1.0
    return held, stops
