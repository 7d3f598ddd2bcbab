"""Benchmark: a point-in-time view exported over NBD, begun and ended from
the command line, against libvirt's ``virsh backup-begin`` on the same VM.

A private libvirtd (``tools/libvirt.py``, which the tests use too)
runs a domain with one 64 MiB qcow2 disk and an extra QMP monitor for
blockbackupd. Each of REPEAT rounds (default 15), in alternating order:

- ours: ``bbctl snapshot create vm1 --disk ua-sda --export`` (a snapshot and
  its export in one request), then ``bbctl snapshot delete``;
- libvirt's: ``virsh backup-begin vm1 backup.xml`` (pull mode: a scratch
  image libvirt creates, the job, QEMU's NBD server and the export), then
  ``virsh domjobabort vm1``.

Each command is a new process, as a user runs it, timed from its start to
its end; bbctl's bytecode is cached, as in an installed package. Both
exports are checked (untimed) to serve the disk's first cluster. Both share
QEMU's one NBD server, so they never overlap.

Run: ``.venv/bin/python -m bench.backup_begin [REPEAT]``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import nbd

from bench.common import Row, bbctl, cli, define_running, installed_env, median, spread
from tools.daemon import Daemon
from tools.libvirt import Domain, make_libvirt
from tools.vm import MiB

DISK = "ua-sda"  # the qdev id libvirt gives sda (its user alias): the daemon's disk name
BACKUP_XML = """<domainbackup mode='pull'>
  <server transport='unix' socket='{sock}'/>
  <disks><disk name='sda' backup='yes' type='file'>
    <driver type='qcow2'/><scratch file='{scratch}'/>
  </disk></disks>
</domainbackup>
"""


def _timed(argv: list[str], **kwargs: object) -> tuple[float, str]:
    start = time.perf_counter()
    r = subprocess.run(argv, check=True, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    return time.perf_counter() - start, str(r.stdout)


def _first_cluster(socket_path: str, export: str) -> bytes:
    h = nbd.NBD()
    h.set_export_name(export)
    h.connect_unix(socket_path)
    try:
        return bytes(h.pread(64 * 1024, 0))
    finally:
        h.shutdown()


def run(repeat: int = 15) -> list[Row]:
    lv = make_libvirt()
    workdir = lv.root / "work"
    workdir.mkdir()
    domain = Domain(lv, workdir, disks={"sda": 64 * MiB})
    daemon = Daemon(workdir)
    times: dict[str, list[float]] = {k: [] for k in ("ours begin", "ours end",
                                                     "libvirt begin", "libvirt end")}
    try:
        domain.start()
        daemon.start()
        define_running(daemon, "vm1", domain.qmp)
        domain.write("sda", 0, 64 * 1024, 0x5a)
        expected = b"\x5a" * 64 * 1024
        command = bbctl(daemon)
        env = installed_env()
        subprocess.run([*command, "--help"], check=True, capture_output=True, env=env)  # bytecode
        xml = workdir / "backup.xml"
        sock, scratch = workdir / "libvirt-backup.sock", workdir / "libvirt-scratch.qcow2"
        xml.write_text(BACKUP_XML.format(sock=sock, scratch=scratch))
        for i in range(repeat):
            def ours(i: int = i) -> None:
                took, out = _timed([*command, "--json", "snapshot", "create", "vm1",
                                    "--name", f"s{i}", "--disk", DISK, "--export"], env=env)
                times["ours begin"].append(took)
                export = json.loads(out)["export"]
                assert _first_cluster(export["server"]["socket"],
                                      export["exports"][0]["name"]) == expected
                took, _ = _timed([*command, "snapshot", "delete", "vm1", f"s{i}"], env=env)
                times["ours end"].append(took)

            def libvirt() -> None:
                scratch.unlink(missing_ok=True)
                took, _ = _timed(["virsh", "-c", lv.uri, "backup-begin", "vm1", str(xml)])
                times["libvirt begin"].append(took)
                assert _first_cluster(str(sock), "sda") == expected
                took, _ = _timed(["virsh", "-c", lv.uri, "domjobabort", "vm1"])
                times["libvirt end"].append(took)

            for step in ((ours, libvirt) if i % 2 == 0 else (libvirt, ours)):
                step()
            print(f"  round {i}: " + ", ".join(f"{k} {v[-1] * 1000:.0f} ms"
                                              for k, v in times.items()), flush=True)
    finally:
        if daemon.proc is not None:
            daemon.stop()
        domain.remove()
        lv.stop()
        shutil.rmtree(lv.root, ignore_errors=True)
    rows = []
    for what, ours_key, theirs_key, peer in (
            ("begin: a point-in-time view of a running VM's disk exported over NBD",
             "ours begin", "libvirt begin", "virsh backup-begin"),
            ("end: the view and its export gone", "ours end", "libvirt end",
             "virsh domjobabort")):
        ours_t, theirs = times[ours_key], times[theirs_key]
        rows.append(Row(
            f"{what}, one command as a user runs it (bbctl {spread(ours_t, '.3f')} s, "
            f"{peer} {spread(theirs, '.3f')} s; {len(ours_t)} rounds)",
            median(ours_t), median(theirs), peer_name=peer,
            ratios=[a / b for a, b in zip(ours_t, theirs, strict=True)]))
    return rows


if __name__ == "__main__":
    sys.exit(cli(run, int))
