"""``make demo``: a throwaway VM and a real blockbackupd, driven through the client.

Starts the daemon on a temporary directory and a QEMU with two qcow2 disks
(no guest OS), defines the domain, shows ``domain.list`` and
``domain.get_xml``, takes a snapshot with a checkpoint, writes, takes a
second snapshot and reads over NBD what changed in between, then stops
everything it started and removes its files.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from blockbackupd.qemu.nbdread import dirty_extents
from tools.daemon import Daemon
from tools.vm import Vm


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def main() -> int:
    workdir = Path(tempfile.mkdtemp(prefix="bb-demo-", dir="/tmp"))
    vm = Vm(workdir, "demo-vm")
    daemon = Daemon(workdir, log_level="info")
    try:
        step(f"starting QEMU ({vm.name}, disks sda and sdb) and blockbackupd in {workdir}")
        vm.start()
        daemon.start()
        with daemon.client() as c:
            step(f"domain.define {{name: {vm.name}, qmp_socket: {vm.daemon_qmp}}}")
            print(json.dumps(c.domain_define(vm.name, str(vm.daemon_qmp))))
            deadline = time.monotonic() + 10
            while c.domain_list()[0]["state"] == "disconnected":
                if time.monotonic() > deadline:
                    raise TimeoutError("the daemon did not reach the VM")
                time.sleep(0.05)
            step("domain.list")
            print(json.dumps(c.domain_list(), indent=2))
            step(f"domain.get_xml {{domain: {vm.name}}}")
            print(c.domain_get_xml(vm.name), end="")
            step("snapshot.create {checkpoint: true} -> checkpoint 'monday'")
            print(c.snapshot_create(vm.name, "<domainblocksnapshot><name>monday</name>"
                                    "</domainblocksnapshot>", checkpoint=True)["xml"], end="")
            c.snapshot_delete(vm.name, "monday")
            step("guest writes 64 KiB at 1 MiB on sda and 128 KiB at 8 MiB on sdb")
            vm.write("sda", 1024 * 1024, 65536, 0x11)
            vm.write("sdb", 8 * 1024 * 1024, 131072, 0x22)
            step("snapshot.create 'tuesday'; export.start with checkpoint='monday'")
            c.snapshot_create(vm.name, "<domainblocksnapshot><name>tuesday</name>"
                                       "</domainblocksnapshot>")
            started = c.export_start(vm.name, '<domainblockexport type="nbd">'
                                     '<disk name="sda" snapshot="tuesday" checkpoint="monday"/>'
                                     '<disk name="sdb" snapshot="tuesday" checkpoint="monday"/>'
                                     "</domainblockexport>")
            print(json.dumps(started, indent=2))
            for export in started["exports"]:
                extents = dirty_extents(started["server"]["socket"], export["name"],
                                        export["bitmap"])
                print(f"{export['name']}: changed since monday (over NBD): {extents}")
            c.snapshot_delete(vm.name, "tuesday")
        step("bbctl domain list")
        subprocess.run([sys.executable, "-m", "blockbackup_client.bbctl", "--socket",
                        str(daemon.socket), "domain", "list"], check=True)
        return 0
    finally:
        step("cleaning up")
        if daemon.proc is not None:
            print(f"blockbackupd exited with {daemon.stop()}")
        vm.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"removed {workdir}")


if __name__ == "__main__":
    sys.exit(main())
