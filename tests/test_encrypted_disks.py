"""Encrypted disks stay encrypted: while a snapshot of a LUKS-encrypted qcow2
lives, the guest's old data goes into a scratch that is itself LUKS under a
random key of that snapshot's own, never in the clear; backups stay exact.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.conftest import NbdReader, domain_state, export_xml, snapshot_xml, wait_for
from tests.vm_manager.manager import assert_restore_equals, backup, disk_level
from tools.daemon import Daemon
from tools.vm import MiB, Vm
from tools.vm_configs import EncryptedVm

OLD, NEW = 0x5A, 0xC3


def test_the_scratch_of_an_encrypted_disk_never_holds_its_plaintext(
        make_vm: Callable[..., Vm], daemon: Daemon, workdir: Path) -> None:
    vm = make_vm(kind=EncryptedVm, disks={"sda": 16 * MiB})
    with daemon.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    vm.write("sda", 0, 2 * MiB, OLD)
    # The image itself holds no plaintext (what the test relies on below).
    assert bytes([OLD]) * 4096 not in vm.image("sda").read_bytes()
    with daemon.client() as c:
        c.snapshot_create("vm1", snapshot_xml("s1"))
        scratch = Path(c.snapshot_lookup("vm1", "s1")["scratch"][0]["file"])
        vm.write("sda", 0, 2 * MiB, NEW)  # the old data is copied into the scratch now
        data = scratch.read_bytes()
        assert data[:6] == b"LUKS\xba\xbe"
        assert len(data.rstrip(b"\0")) > 2 * MiB  # the old data is in there, encrypted
        assert bytes([OLD]) * 4096 not in data
        assert bytes([NEW]) * 4096 not in data
        # The view reads the old data, decrypted.
        started = c.export_start("vm1", export_xml([("sda", "s1")]))
        with NbdReader(started["server"]["socket"], "sda-s1") as reader:
            assert reader.read(0, 2 * MiB) == bytes([OLD]) * (2 * MiB)
        c.snapshot_delete("vm1", "s1")
        assert not scratch.exists()
        # Its key went with it.
        assert [o for o in vm.qmp("qom-list", path="/objects") if o["name"].startswith("bb-")] \
            == []


def test_backups_of_an_encrypted_disk_are_exact_and_say_what_they_hold(
        make_vm: Callable[..., Vm], daemon: Daemon, workdir: Path) -> None:
    vm = make_vm(kind=EncryptedVm, disks={"sda": 16 * MiB})
    with daemon.client() as c:
        c.domain_define("vm1", str(vm.daemon_qmp))
    wait_for(lambda: domain_state(daemon, "vm1") == "running")
    vm.write("sda", 0, MiB, OLD)
    dest = workdir / "backups"
    first = backup(daemon, dest)
    assert disk_level(first, "sda") == "full"
    assert "sda is encrypted in the VM" in first["stderr"] and "in the clear" in first["stderr"]
    assert first["disks"]["sda"]["source_encrypted"] is True
    vm.write("sda", 4 * MiB, 64 * 1024, NEW)
    second = backup(daemon, dest, "--level", "auto")
    assert disk_level(second, "sda") == "inc"
    assert second["disks"]["sda"]["bytes_read"] == 64 * 1024
    # The restore equals the live disk, decrypted (the guest held still meanwhile).
    live = workdir / "live.raw"
    vm.qmp("stop")
    subprocess.run(["qemu-img", "convert", "-U", "--object",
                    f"secret,id=sec0,data={EncryptedVm.PASSPHRASE}", "--image-opts",
                    f"driver=qcow2,file.filename={vm.image('sda')},encrypt.key-secret=sec0",
                    "-O", "raw", str(live)], check=True)
    vm.qmp("cont")
    assert_restore_equals(daemon, dest, "sda", str(live))
