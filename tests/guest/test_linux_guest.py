"""The Linux guest itself: disks on both buses, the agent's freeze, clean and
unclean stops, and the readers of its disks (tools/linux_guest)."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tools.linux_guest.accel import Accelerator
from tools.linux_guest.fsread import Ext4Image, check_crash_logs
from tools.linux_guest.vm import LinuxVm
from tools.vm import MiB


@pytest.fixture(scope="module")
def crash_vm(guest_workdir: Path, guest_accel: Accelerator) -> Iterator[LinuxVm]:
    """One guest for the module: vda on virtio-blk, sdb on SCSI, the crash
    workload on both, the agent. The last test shuts it down."""
    vm = LinuxVm(guest_workdir, "crash", disks={"vda": 64 * MiB, "sdb": 64 * MiB},
                 workload="crash", params={"kmax": 256}, accel=guest_accel)
    try:
        vm.start()
        boot = vm.wait_ready()
        print(f"crash guest ready in {boot:.1f} s")
        yield vm
    finally:
        vm.kill()
        print(f"--- console ---\n{vm.console()[-5000:]}")


def test_disks_on_both_buses_are_formatted_and_mounted(crash_vm: LinuxVm) -> None:
    disks = crash_vm.guest_disks()
    assert disks["vda"] == {"dev": "/dev/vda", "mnt": "/mnt/vda", "formatted": "1"}
    assert re.fullmatch(r"/dev/sd[a-z]", disks["sdb"]["dev"])
    assert disks["sdb"]["mnt"] == "/mnt/sdb" and disks["sdb"]["formatted"] == "1"
    fsinfo = {fs["mountpoint"]: fs for fs in crash_vm.agent("guest-get-fsinfo")}
    assert fsinfo["/mnt/vda"]["type"] == "ext4"
    assert fsinfo["/mnt/vda"]["disk"][0]["bus-type"] == "virtio"
    assert fsinfo["/mnt/sdb"]["type"] == "ext4"
    assert fsinfo["/mnt/sdb"]["disk"][0]["bus-type"] == "scsi"
    assert crash_vm.errors() == []


def test_freeze_stops_the_writes_and_thaw_resumes_them(crash_vm: LinuxVm) -> None:
    crash_vm.wait_console(r"^BB-STEP 3$", timeout=30)
    started = time.monotonic()
    assert crash_vm.agent("guest-fsfreeze-freeze") == 2
    frozen_in = time.monotonic() - started
    assert crash_vm.agent("guest-fsfreeze-status") == "frozen"
    at_freeze = crash_vm.steps()
    time.sleep(1.5)
    # A step whose writes were all done before the freeze may still print.
    assert crash_vm.steps() <= at_freeze + 1, "the workload wrote to frozen filesystems"
    stalled = crash_vm.steps()
    started = time.monotonic()
    assert crash_vm.agent("guest-fsfreeze-thaw") == 2
    thawed_in = time.monotonic() - started
    assert crash_vm.agent("guest-fsfreeze-status") == "thawed"
    crash_vm.wait_console(rf"^BB-STEP {stalled + 2}$", timeout=30)
    print(f"freeze {frozen_in * 1000:.0f} ms, thaw {thawed_in * 1000:.0f} ms")


def test_clean_shutdown_leaves_clean_filesystems_and_complete_logs(crash_vm: LinuxVm) -> None:
    crash_vm.wait_console(r"^BB-STEP 10$", timeout=60)
    crash_vm.shutdown(via="agent")
    assert crash_vm.errors() == []
    with Ext4Image(crash_vm.image("vda")) as a, Ext4Image(crash_vm.image("sdb")) as b:
        for fs in (a, b):
            assert not fs.needs_recovery()
            assert fs.fsck().clean, fs.fsck().output
        log_a = a.read("/log").decode()
        assert log_a.startswith("# crash keep=")
        name, digest = log_a.splitlines()[1].split()
        assert name == "f1" and len(digest) == 64
        check = check_crash_logs(a, b)
    assert check.ok, check
    # The workload finishes its step before the shutdown goes on.
    assert len(check.a.entries) == len(check.b.entries) >= 10


def test_killed_guest_leaves_a_recoverable_state_with_consistent_logs(
        make_guest: Callable[..., LinuxVm]) -> None:
    vm = make_guest("killed", disks={"vda": 32 * MiB, "vdb": 32 * MiB}, workload="crash",
                    params={"kmax": 128}, agent=False)
    vm.wait_ready()
    vm.wait_console(r"^BB-STEP 5$", timeout=30)
    vm.kill()
    with Ext4Image(vm.image("vda")) as a, Ext4Image(vm.image("vdb")) as b:
        assert a.needs_recovery() and b.needs_recovery()
        check = check_crash_logs(a, b)  # replays the journals first
        assert not a.needs_recovery()
        assert a.fsck().clean and b.fsck().clean
        assert check.ok, check
        assert check.steps >= 5
        # The checker does see a broken pair: A's last file gone.
        last = len(check.a.entries)
        subprocess.run(["debugfs", "-w", "-R", f"rm /f{last}", str(a.raw)], check=True,
                       capture_output=True)
        broken = check_crash_logs(a, b)
        assert broken.problems == [f"A: f{last} is missing"]


@pytest.mark.parametrize("via", ["acpi", "agent"])
def test_shutdown_is_clean_even_when_frozen(make_guest: Callable[..., LinuxVm],
                                            via: str) -> None:
    vm = make_guest(f"idle-{via}", disks={"sda": 32 * MiB})
    vm.wait_ready()
    assert vm.markers("READY")[0].endswith("workload=idle disks=sda")
    done = vm.guest_exec("echo hello > /mnt/sda/hello && sync && cat /proc/mounts")
    assert done.returncode == 0 and b"/mnt/sda ext4" in done.stdout
    assert vm.agent("guest-fsfreeze-freeze") == 1
    vm.shutdown(via=via)
    with Ext4Image(vm.image("sda")) as fs:
        assert not fs.needs_recovery()
        assert fs.fsck().clean
        assert fs.read("/hello") == b"hello\n"
        assert "hello" in fs.listdir("/")
        with pytest.raises(FileNotFoundError):
            fs.read("/nothing")


def test_write_workload_reports_throughput_and_latency(
        make_guest: Callable[..., LinuxVm]) -> None:
    vm = make_guest("write", disks={"vda": 64 * MiB, "sdb": 64 * MiB}, agent=False,
                    workload="write",
                    params={"disk": "sdb", "raw": "sdb", "mib": 16, "lat": 64,
                            "exit": "poweroff"})
    vm.wait_ready()
    assert vm.wait_exit(60) == 0
    assert vm.guest_disks()["sdb"].get("raw") == "1"
    (result,) = vm.results()
    assert result["kind"] == "write" and result["target"] == "raw" and result["disk"] == "sdb"
    assert float(result["write_mibs"]) > 0 and float(result["lat_ms"]) > 0
    assert "BB-POWEROFF" in vm.console() and vm.errors() == []


def test_script_from_the_host_runs_in_the_guest(make_guest: Callable[..., LinuxVm]) -> None:
    script = 'say "BB-RESULT script foo=$(param foo none) disks=$(mounted_disks)"\n' \
             'echo "from the script" > /mnt/vda/out\n'
    vm = make_guest("script", disks={"vda": 32 * MiB}, agent=False, script=script,
                    params={"foo": "bar", "exit": "poweroff"})
    vm.wait_ready()
    assert vm.wait_exit(60) == 0
    assert vm.results() == [{"kind": "script", "foo": "bar", "disks": "vda"}]
    assert "BB-DONE script rc=0" in vm.console()
    with Ext4Image(vm.image("vda")) as fs:
        assert fs.read("/out") == b"from the script\n"
        assert not fs.needs_recovery()
