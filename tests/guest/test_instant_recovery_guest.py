"""A Linux guest runs on an instant restore: it boots on the image ``bbctl
restore --instant`` made, mounts the backup's filesystem, reads and writes
files while the daemon streams the backup in, and ends on an image that
stands alone and holds both."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.conftest import bbctl, domain_state, wait_for
from tools.daemon import Daemon
from tools.linux_guest.fsread import Ext4Image
from tools.linux_guest.vm import LinuxVm
from tools.vm import MiB

#: What the first guest leaves on its disk: 16 MiB of random data and its sum.
WRITE = ('head -c 16777216 /dev/urandom > /mnt/vda/data && '
         'sha256sum /mnt/vda/data > /mnt/vda/sum && sync\n')


def _lookup(daemon: Daemon, image: Path) -> dict[str, Any]:
    with daemon.client() as c:
        return c.call("recovery.lookup", file=str(image))  # type: ignore[no-any-return]


def test_a_guest_boots_on_an_instant_restore_and_writes_while_it_streams(
        make_guest: Callable[..., LinuxVm], make_daemon: Callable[..., Daemon],
        workdir: Path) -> None:
    first = make_guest("ir1", disks={"vda": 64 * MiB}, agent=False, script=WRITE,
                       params={"exit": "poweroff"})
    first.wait_ready()
    assert first.wait_exit(120) == 0
    daemon = make_daemon()
    with daemon.client() as c:  # backed up stopped, from its images
        c.domain_define("ir1", str(first.daemon_qmp),
                        disks=[{"name": "vda", "file": str(first.image("vda"))}])
    dest = workdir / "backups"
    r = bbctl(daemon, "--json", "backup", "ir1", "--dest", str(dest))
    assert r.returncode == 0, r.stderr
    point = json.loads(r.stdout)["id"]

    image = first.workdir / "ir2-vda.qcow2"
    began = time.monotonic()
    # 256 KiB/s: the 16 MiB are still streaming when the guest has booted.
    r = bbctl(daemon, "--json", "restore", str(dest), "--disk", "vda", "--at", point,
              "--output", str(image), "--instant", "--speed", str(256 * 1024))
    assert r.returncode == 0, r.stderr
    made = json.loads(r.stdout)
    guest = make_guest("ir2", disks={"vda": 64 * MiB})  # on the image made above
    with daemon.client() as c:
        c.domain_define("ir2", str(guest.daemon_qmp))
    boot = guest.wait_ready()
    read = guest.guest_exec("cd /mnt/vda && sha256sum -c sum")
    first_read = time.monotonic() - began
    assert read.returncode == 0, read.stderr
    wrote = guest.guest_exec("cd /mnt/vda && head -c 1048576 /dev/urandom > new && "
                             "sha256sum new > newsum && sync")
    assert wrote.returncode == 0, wrote.stderr
    during = _lookup(daemon, image)
    print(f"instant restore made in {made['seconds']} s; guest booted in {boot:.1f} s; "
          f"its first read of the backup's data {first_read:.1f} s after the command; "
          f"stream at {during.get('progress')}")
    assert during["state"] == "streaming", during
    assert domain_state(daemon, "ir2") == "running"

    with daemon.client() as c:  # the rest at full speed
        c.call("recovery.delete", file=str(image))
        c.call("recovery.start", file=str(image))
    wait_for(lambda: _lookup(daemon, image)["state"] == "done", timeout=120, what="done")
    again = guest.guest_exec("cd /mnt/vda && sha256sum -c sum newsum")
    assert again.returncode == 0, again.stderr
    guest.shutdown()
    info = json.loads(subprocess.run(["qemu-img", "info", "--output=json", str(image)],
                                     check=True, capture_output=True, text=True).stdout)
    assert "backing-filename" not in info
    subprocess.run(["qemu-img", "check", "-q", str(image)], check=True)
    with Ext4Image(image) as fs:
        assert not fs.needs_recovery()
        assert fs.read("/sum").split()[0].decode() == \
            subprocess.run(["sha256sum"], input=fs.read("/data"), capture_output=True,
                           check=True).stdout.split()[0].decode()
        assert len(fs.read("/new")) == MiB
