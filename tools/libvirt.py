"""A private libvirt for the tests and the benchmarks: its own virtlogd and
libvirtd, run as root (privileged, ``qemu:///system``) but with every
directory of theirs under a temporary root, so the machine's libvirt config
and state are never read or touched.

A privileged libvirtd takes its paths from compile-time constants
(/etc/libvirt with qemu.conf, /run/libvirt, /var/lib/libvirt,
/var/log/libvirt, /var/cache/libvirt): ``--config`` names libvirtd.conf
only, and no LIBVIRT_* variable moves the QEMU driver's files. So both
daemons run in a private mount namespace (``unshare -m``) in which those five
directories are bind mounts of directories under the temporary root; the
QEMU processes libvirtd starts inherit it. virsh, outside, reaches libvirtd
through ``qemu:///system?socket=<root>/run/libvirt-sock``.

Every process is started here and stopped here by PID (QEMU processes, which
outlive libvirtd by design, by the PID files libvirt writes), even when a
test fails.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path

MiB = 1024 * 1024

#: The directories a privileged libvirtd uses, and where they live under the root.
BINDS = {"etc": "/etc/libvirt", "run": "/run/libvirt", "lib": "/var/lib/libvirt",
         "log": "/var/log/libvirt", "cache": "/var/cache/libvirt"}

LIBVIRTD_CONF = """\
unix_sock_group = "root"
unix_sock_ro_perms = "0700"
unix_sock_rw_perms = "0700"
unix_sock_admin_perms = "0700"
auth_unix_ro = "none"
auth_unix_rw = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
"""

# QEMU runs as root: blockbackupd (root) creates the scratch images QEMU must
# open, and QEMU creates the extra QMP socket blockbackupd connects to. No
# other setting is needed here: this machine has neither AppArmor nor SELinux
# (libvirt's security drivers: "none" and "dac"), and dynamic ownership
# relabels the images to root:root, which they already are.
QEMU_CONF = """\
user = "root"
group = "root"
"""

VIRTLOGD_CONF = 'log_outputs = "3:file:/var/log/libvirt/virtlogd.log"\n'

MOUNT_SCRIPT = """\
set -e
for d in {pairs}; do
  src=${{d%%=*}}; dst=${{d#*=}}
  mkdir -p "$dst"
  mount --bind "$src" "$dst"
done
exec virtlogd --pid-file "$1"
"""


def _wait(predicate: Callable[[], object], timeout: float, what: str,
          proc: subprocess.Popen[bytes] | None = None, logs: tuple[Path, ...] = ()) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            text = "".join(f"--- {log} ---\n{log.read_text(errors='replace')}"
                           for log in logs if log.exists())
            raise RuntimeError(f"{what}: the process exited with {proc.returncode}\n{text}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Libvirt:
    """A private virtlogd + libvirtd pair under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.uri = f"qemu:///system?socket={root}/run/libvirt-sock"
        self.virtlogd: subprocess.Popen[bytes] | None = None
        self.libvirtd: subprocess.Popen[bytes] | None = None
        #: Seconds from starting libvirtd to its first answer (QEMU capabilities
        #: probing included: the cache directory is new each time).
        self.start_seconds = 0.0

    def path(self, key: str, *rest: str) -> Path:
        return self.root.joinpath(key, *rest)

    @property
    def libvirtd_log(self) -> Path:
        return self.path("log", "libvirtd.log")

    def domain_log(self, name: str) -> Path:
        """QEMU's stdout and stderr, through virtlogd (qemu-io prints there)."""
        return self.path("log", "qemu", f"{name}.log")

    def start(self) -> Libvirt:
        for key in BINDS:
            self.path(key).mkdir(parents=True, exist_ok=True)
        self.path("etc", "libvirtd.conf").write_text(LIBVIRTD_CONF)
        self.path("etc", "qemu.conf").write_text(QEMU_CONF)
        self.path("etc", "virtlogd.conf").write_text(VIRTLOGD_CONF)
        self.path("etc", "qemu").mkdir(exist_ok=True)
        pairs = " ".join(f"{self.path(k)}={v}" for k, v in BINDS.items())
        out = self.root / "daemons.out"
        with open(out, "ab") as f:
            # unshare execs sh, which execs virtlogd: the PID is virtlogd's.
            self.virtlogd = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private",
                 "sh", "-c", MOUNT_SCRIPT.format(pairs=pairs), "sh",
                 str(self.root / "virtlogd.pid")],
                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _wait(lambda: self.path("run", "virtlogd-sock").exists(), 20, "virtlogd's socket",
              self.virtlogd, (out, self.path("log", "virtlogd.log")))
        self.start_seconds = self._start_libvirtd()
        # Domains a crashed libvirtd left defined (restart()): none on a new root.
        for name in self.virsh("list", "--all", "--name").stdout.split():
            self.virsh("destroy", name, check=False)
            self.virsh("undefine", name, check=False)
        return self

    def _start_libvirtd(self) -> float:
        """Start libvirtd in virtlogd's mount namespace; seconds to its first answer."""
        assert self.virtlogd is not None and self.virtlogd.poll() is None, "virtlogd is down"
        out = self.root / "daemons.out"
        started = time.monotonic()
        with open(out, "ab") as f:
            # nsenter execs libvirtd in virtlogd's mount namespace.
            self.libvirtd = subprocess.Popen(
                ["nsenter", "--target", str(self.virtlogd.pid), "--mount", "--",
                 "libvirtd", "--pid-file", str(self.root / "libvirtd.pid")],
                stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        _wait(lambda: self.virsh("version", check=False).returncode == 0, 120,
              "libvirtd's first answer", self.libvirtd, (out, self.libvirtd_log))
        return time.monotonic() - started

    def restart_libvirtd(self) -> float:
        """Stop libvirtd alone (SIGTERM, by PID) and start it again, as an
        upgrade of libvirt would: the domains keep running, and the new
        libvirtd reconnects to their monitors and guest agents. Seconds from
        the new start to its first answer."""
        _stop(self.libvirtd)
        return self._start_libvirtd()

    def host_path(self, path: str | Path) -> Path:
        """A path as libvirt reports it (inside its mount namespace, e.g. a
        channel socket under /var/lib/libvirt) as seen from outside."""
        path = Path(path)
        for key, inside in BINDS.items():
            if path.is_relative_to(inside):
                return self.path(key, str(path.relative_to(inside)))
        return path

    @property
    def alive(self) -> bool:
        return all(p is not None and p.poll() is None for p in (self.virtlogd, self.libvirtd))

    def restart(self) -> None:
        """After libvirtd crashed: stop what is left, start both again on the
        same root (QEMU's capabilities stay cached: a fast start)."""
        self.stop()
        self.start()

    def virsh(self, *args: str, check: bool = True, timeout: float = 120
              ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["virsh", "-q", "-c", self.uri, *args], capture_output=True,
                           text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"virsh {' '.join(args)}: {r.stderr.strip()}")
        return r

    def qemu_pids(self) -> list[int]:
        """QEMU processes of this libvirtd's domains, by libvirt's PID files
        (checked against the process's command line: a stale file's PID may
        belong to someone else by now)."""
        pids = []
        for f in self.path("run", "qemu").glob("*.pid"):
            try:
                pid = int(f.read_text().strip())
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except (OSError, ValueError):
                continue
            if f"guest={f.stem},debug-threads=on".encode() in cmdline:
                pids.append(pid)
        return pids

    def stop(self) -> None:
        """Destroy and undefine every domain, then stop both daemons by PID."""
        try:
            if self.libvirtd is not None and self.libvirtd.poll() is None:
                names = self.virsh("list", "--all", "--name", check=False).stdout.split()
                for name in names:
                    self.virsh("destroy", name, check=False, timeout=30)
                    self.virsh("undefine", name, check=False, timeout=30)
        finally:
            for pid in self.qemu_pids():  # whatever the destroy missed
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _stop(self.libvirtd)
            _stop(self.virtlogd)


def make_libvirt() -> Libvirt:
    # Short path: the sockets under it must stay within 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="bb-lv-", dir="/tmp"))
    lv = Libvirt(root)
    try:
        return lv.start()
    except BaseException:
        lv.stop()
        shutil.rmtree(root, ignore_errors=True)
        raise


def domain_xml(name: str, images: dict[str, Path], aliases: dict[str, str], qmp: Path,
               iothread: bool = False) -> str:
    """q35 under TCG, no OS (SeaBIOS finds nothing to boot and idles), qcow2
    disks as scsi-hd on virtio-scsi (``sdX`` targets) or virtio-blk (``vdX``;
    with ``iothread``, in I/O thread 1: ``<driver iothread='1'>``, as hosts
    run them), and an extra QMP monitor for blockbackupd."""
    disks = []
    for target, image in images.items():
        alias = f"<alias name='{aliases[target]}'/>" if target in aliases else ""
        bus = "virtio" if target.startswith("vd") else "scsi"
        thread = " iothread='1'" if iothread and bus == "virtio" else ""
        disks.append(f"""
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'{thread}/>
      <source file='{image}'/>
      <target dev='{target}' bus='{bus}'/>{alias}
    </disk>""")
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>{"<iothreads>1</iothreads>" if iothread else ""}
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='scsi' index='0' model='virtio-scsi'/>
    <controller type='usb' model='none'/>{''.join(disks)}
{devices_end(qmp)}"""


def devices_end(qmp: Path | str) -> str:
    """The end of a domain document: no balloon, and the extra QMP monitor
    blockbackupd connects to (libvirt passes ``<qemu:commandline>`` on)."""
    return f"""    <memballoon model='none'/>
  </devices>
  <qemu:commandline>
    <qemu:arg value='-qmp'/>
    <qemu:arg value='unix:{qmp},server=on,wait=off'/>
  </qemu:commandline>
</domain>
"""


class Domain:
    """One persistent libvirt domain whose disks are qcow2 files in ``workdir``."""

    def __init__(self, lv: Libvirt, workdir: Path, name: str = "vm1",
                 disks: dict[str, int] | None = None,
                 aliases: dict[str, str] | None = None, iothread: bool = False) -> None:
        self.lv = lv
        self.iothread = iothread
        self.workdir = workdir
        self.name = name
        self.disks = disks if disks is not None else {"sda": 64 * MiB, "sdb": 64 * MiB}
        self.aliases = aliases if aliases is not None else {"sda": "ua-sda"}
        self.qmp = workdir / f"{name}.qmp"

    def image(self, target: str) -> Path:
        return self.workdir / f"{self.name}-{target}.qcow2"

    def start(self) -> Domain:
        """Defines and starts the domain, its images made first (empty) unless
        they exist (an instant restore's image, say)."""
        for target, size in self.disks.items():
            if self.image(target).exists():
                continue
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.image(target)),
                            str(size)], check=True)
        xml = self.workdir / f"{self.name}.xml"
        xml.write_text(domain_xml(self.name, {t: self.image(t) for t in self.disks},
                                  self.aliases, self.qmp, self.iothread))
        self.virsh("define", str(xml))
        self.virsh("start", self.name)
        _wait(self.qmp.exists, 30, "the extra QMP socket")
        return self

    def remove(self) -> None:
        if self.virsh("domstate", self.name, check=False).stdout.strip() != "shut off":
            self.virsh("destroy", self.name, check=False)
        self.virsh("undefine", self.name, check=False)

    def virsh(self, *args: str, check: bool = True, timeout: float = 120
              ) -> subprocess.CompletedProcess[str]:
        return self.lv.virsh(*args, check=check, timeout=timeout)

    def state(self) -> str:
        """``virsh domstate --reason``, e.g. "running (unpaused)"."""
        return self.virsh("domstate", self.name, "--reason").stdout.strip()

    @property
    def pid(self) -> int:
        return int(self.lv.path("run", "qemu", f"{self.name}.pid").read_text().strip())

    def qdevs(self) -> dict[str, str]:
        """Target name -> qdev id (libvirt's device alias), from the live XML."""
        root = ET.fromstring(self.virsh("dumpxml", self.name).stdout)
        out = {}
        for disk in root.iter("disk"):
            target, alias = disk.find("target"), disk.find("alias")
            if target is not None and alias is not None:
                out[target.attrib["dev"]] = alias.attrib["name"]
        return out

    def sources(self) -> dict[str, str]:
        """Target name -> the file at the top of its chain (``virsh domblklist``)."""
        out = {}
        for line in self.virsh("domblklist", self.name).stdout.splitlines():
            target, _, source = line.strip().partition(" ")
            if target:
                out[target] = source.strip()
        return out

    def log(self) -> str:
        return self.lv.domain_log(self.name).read_text(errors="replace")

    def qmp_cmd(self, command: str, **arguments: object) -> object:
        """A QMP command on libvirt's own monitor (``qemu-monitor-command``)."""
        msg: dict[str, object] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        out = self.virsh("qemu-monitor-command", self.name, json.dumps(msg)).stdout
        return json.loads(out)["return"]

    def write(self, target: str, offset: int, length: int, pattern: int) -> None:
        """A guest write, as the device would make it: qemu-io on the device
        through libvirt's monitor (HMP). QEMU prints qemu-io's report on its
        stdout, which libvirt's virtlogd appends to the domain's log."""
        qdev = self.qdevs()[target]
        if target.startswith("vd"):  # qemu-io reaches virtio-blk through its backend
            qdev += "/virtio-backend"
        log = self.lv.domain_log(self.name)
        before = log.stat().st_size
        self.virsh("qemu-monitor-command", self.name, "--hmp",
                   f'qemu-io -d {qdev} "write -P {pattern:#x} {offset} {length}"')
        expected = f"wrote {length}/{length} bytes at offset {offset}"

        def printed() -> bool:
            with open(log, "rb") as f:
                f.seek(before)
                return expected in f.read().decode(errors="replace")
        _wait(printed, 10, f"qemu-io's report of the write on {target} ({qdev})")

    def nodes_on_file(self, path: str) -> list[str]:
        nodes = self.qmp_cmd("query-named-block-nodes", flat=True)
        assert isinstance(nodes, list)
        return [n["node-name"] for n in nodes if n["image"]["filename"] == path]


def libvirt_errors(lv: Libvirt, since: int = 0) -> list[str]:
    """The ``error :`` lines libvirtd logged after byte offset ``since``."""
    with open(lv.libvirtd_log, "rb") as f:
        f.seek(since)
        text = f.read().decode(errors="replace")
    return [line for line in text.splitlines() if re.search(r": error : ", line)]
