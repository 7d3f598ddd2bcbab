"""``make demo``: a throwaway VM and a real blockbackupd, driven through the client.

Starts the daemon on a temporary directory and a QEMU with two qcow2 disks
(no guest OS), defines the domain, shows ``domain.list`` and
``domain.get_xml``, then stops everything it started and removes its files.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
