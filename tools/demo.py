"""``make demo``: the whole backup story on a real Linux guest that keeps writing.

Boots the tiny Linux guest of tools/linux_guest with two 64 MiB disks, ``vda``
on virtio-blk and ``sdb`` on scsi-hd, which it formats with ext4 at first
boot; its ``crash`` workload keeps writing files of random bytes to both and
logging their sha256 (fsync'd), step after step. Starts blockbackupd with a
demo config in a temporary directory, defines the domain with its QMP socket
and its guest agent channel, then, with ``bbctl`` only, while the guest
writes: a quiesced full backup (the daemon freezes the guest's filesystems
through the agent around the point in time), a quiesced incremental and a
crash-consistent one. It lists and verifies them, restores every point of
both disks to raw images and checks them without mounting them (debugfs,
e2fsck): a quiesced point needs no journal replay and is fsck-clean as it
is; every point (after the replay a mount would do) holds every file its
logs name with the logged checksum, and both disks show one instant. Then
it shows the guest was never left frozen, shuts it down cleanly, stops the
daemon, prints the figures it measured and removes everything it made.

Any failed check raises: the demo then prints the tails of the guest's
console and of the daemon's log, and exits 1. ``BB_DEMO_KEEP=1`` keeps the
work directory (images, backups, logs) instead of removing it.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tools.daemon import Daemon
from tools.linux_guest.accel import accelerator
from tools.linux_guest.build import build
from tools.linux_guest.fsread import Ext4Image, check_crash_logs
from tools.linux_guest.vm import LinuxVm
from tools.vm import MiB

KiB = 1024
DISKS = {"vda": 64 * MiB, "sdb": 64 * MiB}
#: The crash workload's files: 16..256 KiB each (A = vda, B = sdb).
GUEST_PARAMS: dict[str, str | int | float] = {"kmin": 16, "kmax": 256}
#: The backups, in turn: (quiesce mode, what it is). The first is the full.
PLAN = [("yes", "quiesced full"), ("yes", "quiesced incremental"),
        ("no", "crash-consistent incremental")]
#: Guest steps to see completed after each backup returned: the guest writes, not frozen.
STEPS_AFTER = 2


class DemoFailed(RuntimeError):
    """A check of the demo failed; the message says which."""


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait until condition() holds; seconds waited. Raises after timeout."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise DemoFailed(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)
    return time.monotonic() - started


@dataclass
class Backup:
    quiesce: str
    what: str
    record: dict[str, Any]
    seconds: float            # bbctl backup, end to end
    steps_before: int         # the guest's step when the backup started
    steps_at_return: int      # ... when bbctl returned
    steps_after: int          # ... once it had completed STEPS_AFTER more
    resumed_in: float         # seconds after bbctl returned until then
    #: How long the guest's I/O was held (vCPUs paused) for the switch to the
    #: point in time: the daemon logs it when it creates the snapshot.
    held_io_ms: float | None = None

    @property
    def id(self) -> str:
        return str(self.record["id"])

    @property
    def bytes_read(self) -> int:
        return sum(int(e["bytes_read"]) for e in self.record["disks"].values())

    @property
    def frozen_ms(self) -> float | None:
        window = self.record.get("frozen_window")
        return None if window is None else float(window) * 1e3


@dataclass
class PointCheck:
    backup: Backup
    needs_recovery: dict[str, bool]
    fsck: str
    steps_a: int
    steps_b: int
    seconds: float
    problems: list[str] = field(default_factory=list)


class Demo:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.vm = LinuxVm(workdir, "vm1", disks=DISKS, workload="crash",
                          params=GUEST_PARAMS, agent=True)
        self.daemon = Daemon(workdir, log_level="info", quiesce_timeout=20.0)
        self.dest = workdir / "backups"
        self.restored = workdir / "restored"
        self.boot_seconds = 0.0
        self.backups: list[Backup] = []
        self.checks: list[PointCheck] = []

    # ----------------------------------------------------------------- helpers

    def bbctl(self, *args: str, quiet: bool = False, show: bool = True) -> str:
        """Run bbctl as a user would (in the work directory, relative paths),
        show the command and what it printed (``quiet``: not its output,
        unless it fails; ``show=False``: nothing); raise if it fails."""
        if show:
            print("$ bbctl " + shlex.join(args), flush=True)
        r = subprocess.run([sys.executable, "-m", "blockbackup_client.bbctl",
                            "--socket", str(self.daemon.socket), *args],
                           capture_output=True, text=True, cwd=self.workdir)
        if not show and r.returncode:
            print("$ bbctl " + shlex.join(args), flush=True)
        for stream in (r.stderr if show or r.returncode else "",
                       r.stdout if not quiet or r.returncode else ""):
            if stream.strip():
                print("  " + stream.strip().replace("\n", "\n  "), flush=True)
        if r.returncode != 0:
            raise DemoFailed(f"bbctl {shlex.join(args)} failed with exit status "
                             f"{r.returncode}")
        return r.stdout

    def bbctl_json(self, *args: str, show: bool = True) -> Any:
        return json.loads(self.bbctl("--json", *args, quiet=True, show=show))

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.workdir))

    # ------------------------------------------------------------------- story

    def run(self) -> None:
        vm = self.vm
        image = build()
        accel = accelerator(image)
        step(f"boot the Linux guest (kernel {image.kernel_version}) in {self.workdir}")
        print(accel.describe())
        print(f"disks: vda {DISKS['vda'] // MiB} MiB on virtio-blk, sdb {DISKS['sdb'] // MiB} "
              "MiB on scsi-hd (qcow2 images, empty: the guest makes ext4 on them)")
        vm.start()
        self.boot_seconds = vm.wait_ready()
        print(f"guest ready in {self.boot_seconds:.1f} s (QEMU start to BB-READY: disks "
              "formatted and mounted, guest agent serving)")
        for disk, info in vm.guest_disks().items():
            print(f"  {disk}: {info['dev']} mounted at {info['mnt']}"
                  f"{', formatted at this boot' if info.get('formatted') == '1' else ''}")
        fsinfo = vm.agent("guest-get-fsinfo")
        for fs in sorted(fsinfo, key=lambda f: f["mountpoint"]):
            buses = ",".join(d.get("bus-type", "?") for d in fs.get("disk", []))
            print(f"  guest agent: {fs['mountpoint']} {fs['type']} on {buses}")
        vm.close_agent()  # the agent's channel serves one client: the daemon's from now on
        print("the guest's crash workload runs: step n writes f<n> (random bytes) on vda, "
              "fsync, logs its sha256 in vda's log, fsync, then the same on sdb")

        step("start blockbackupd and define the domain with its guest agent channel")
        self.daemon.start()
        print(f"(bbctl --socket {self.daemon.socket} below, run in {self.workdir})")
        self.bbctl("domain", "define", vm.name, str(vm.daemon_qmp),
                   "--guest-agent-socket", str(vm.agent_socket))
        wait_for(lambda: self.bbctl_state() == "running", 20, "the daemon to reach QEMU")
        self.bbctl("domain", "list")
        wait_for(lambda: vm.steps() >= 3, 60, "the guest's first three steps")

        for quiesce, what in PLAN:
            step(f"{what} while the guest writes (at step {vm.steps()})")
            self.backup(quiesce, what)

        step("what the backup directory holds")
        self.bbctl("list", self.rel(self.dest))
        self.bbctl("verify", self.rel(self.dest))
        self.show_chain()
        if self.bbctl_json("snapshot", "list", vm.name):
            raise DemoFailed("a backup left a snapshot behind")
        print("no snapshot left behind; the checkpoint of each backup stays for the next "
              "incremental:")
        self.bbctl("checkpoint", "list", vm.name)
        last = self.backups[-1].id
        changes = {d: self.bbctl_json("checkpoint", "changes", vm.name, last, "--disk", d)
                   for d in DISKS}
        print("  since " + last + ", the guest changed " + ", ".join(
            f"{d} {len(c['extents'])} extents ({c['bytes'] // KiB} KiB)"
            for d, c in changes.items()) + " so far: what the next incremental would read")

        step("restore every point of both disks; check them without mounting them")
        self.restored.mkdir()
        for b in self.backups:
            self.check_point(b)
        self.print_checks()

        step("the guest was never left frozen")
        self.check_never_frozen()

        step("shut the guest down cleanly, stop the daemon")
        started = time.monotonic()
        vm.shutdown(via="acpi")
        print(f"guest powered off cleanly in {time.monotonic() - started:.1f} s "
              f"(step {vm.steps()} was its last; every filesystem unmounted)")
        if vm.errors():
            raise DemoFailed("the guest reported errors: " + "; ".join(vm.errors()))
        code = self.daemon.stop()
        if code != 0:
            raise DemoFailed(f"blockbackupd exited with {code}")
        print("blockbackupd exited with 0")
        errors = [line for line in self.daemon.log().splitlines() if " ERROR " in line]
        if errors:
            raise DemoFailed("blockbackupd logged errors:\n" + "\n".join(errors[-10:]))
        self.report()

    def bbctl_state(self) -> str:
        domains = self.bbctl_json("domain", "list", show=False)
        return next((str(d["state"]) for d in domains if d["name"] == self.vm.name), "")

    def backup(self, quiesce: str, what: str) -> None:
        vm = self.vm
        before = vm.steps()
        started = time.monotonic()
        record = self.bbctl_json("backup", vm.name, "--dest", self.rel(self.dest),
                                 *(["--quiesce"] if quiesce == "yes" else ["--quiesce", "no"]))
        seconds = time.monotonic() - started
        b = Backup(quiesce, what, record, seconds, before, 0, 0, 0.0)
        if record["quiesced"] != (quiesce == "yes"):
            raise DemoFailed(f"backup {b.id}: quiesced is {record['quiesced']}, asked "
                             f"--quiesce {quiesce}")
        if quiesce == "yes" and b.frozen_ms is None:
            raise DemoFailed(f"backup {b.id} was quiesced but reports no frozen window")
        expected = "full" if not self.backups else "inc"
        if record["level"] != expected:
            raise DemoFailed(f"backup {b.id} is {record['level']}, expected {expected}")
        # Steps the guest completes from now on were written after the thaw.
        at_return = b.steps_at_return = vm.steps()
        b.resumed_in = wait_for(lambda: vm.steps() >= at_return + STEPS_AFTER, 60,
                                f"the guest to write again after backup {b.id}")
        b.steps_after = vm.steps()
        self.backups.append(b)
        frozen = f"filesystems frozen {b.frozen_ms:.0f} ms" if b.frozen_ms is not None \
            else "not frozen"
        print(f"  {b.id}: {record['level']}, "
              f"{'quiesced' if record['quiesced'] else 'crash-consistent'}, {frozen}; "
              f"{b.bytes_read / MiB:.1f} MiB read in {seconds:.1f} s")
        print(f"  the guest went on: step {before} when it started, {at_return} when it "
              f"returned, {b.steps_after} {b.resumed_in:.1f} s later")

    def show_chain(self) -> None:
        entry = self.backups[-1].record["disks"]["vda"]
        chain = [entry["file"]]
        while entry.get("backing"):
            chain.append(entry["backing"])
            entry = next(e for b in self.backups for e in [b.record["disks"]["vda"]]
                         if e["file"] == entry["backing"])
        print("vda's chain (qcow2 backing files, readable by qemu-img alone): "
              + " -> ".join(chain))

    def check_point(self, b: Backup) -> None:
        started = time.monotonic()
        paths = {}
        for disk in DISKS:
            out = self.restored / f"{b.id}-{disk}.raw"
            self.bbctl("restore", self.rel(self.dest), "--disk", disk, "--at", b.id,
                       "--output", self.rel(out), "--format", "raw", quiet=True)
            paths[disk] = out
        problems = []
        with Ext4Image(paths["vda"], "raw") as a, Ext4Image(paths["sdb"], "raw") as fs_b:
            images = {"vda": a, "sdb": fs_b}
            needs = {d: fs.needs_recovery() for d, fs in images.items()}
            fsck_note = ""
            if b.record["quiesced"]:
                # Frozen filesystems have their journal flushed and marked clean:
                # as restored, with nothing replayed.
                if any(needs.values()):
                    problems.append("quiesced, yet its journal needs a replay")
                for disk, fs in images.items():
                    result = fs.fsck()
                    if not result.clean:
                        problems.append(f"{disk}: e2fsck -fn exit {result.returncode}: "
                                        f"{result.output.strip()[-500:]}")
                fsck_note = "clean as restored"
            check = check_crash_logs(a, fs_b)  # replays the journals first, as a mount would
            problems += check.problems
            if not b.record["quiesced"]:
                for disk, fs in images.items():
                    result = fs.fsck()
                    if not result.clean:
                        problems.append(f"{disk}: e2fsck -fn after the journal replay: exit "
                                        f"{result.returncode}: {result.output.strip()[-500:]}")
                fsck_note = "clean after replay" if any(needs.values()) else "clean as restored"
            steps_a, steps_b = len(check.a.entries), len(check.b.entries)
        # The point lies within the backup: at least every step done before it
        # started, at most the steps seen once the guest went on afterwards.
        if not b.steps_before <= steps_b <= steps_a <= b.steps_after + 1:
            problems.append(f"logs at {steps_a}/{steps_b} steps: not between steps "
                            f"{b.steps_before} and {b.steps_after}")
        for path in paths.values():
            path.unlink()
        point = PointCheck(b, needs, fsck_note if not problems else "FAILED",
                           steps_a, steps_b, time.monotonic() - started, problems)
        self.checks.append(point)
        if problems:
            raise DemoFailed(f"restored point {b.id} ({b.what}): " + "; ".join(problems))

    def print_checks(self) -> None:
        print(f"{'point':<24} {'level':<5} {'quiesced':<8} {'frozen':>7} "
              f"{'log steps':>10} {'needs replay':<14} {'e2fsck -fn':<18}")
        for c in self.checks:
            b = c.backup
            frozen = f"{b.frozen_ms:.0f} ms" if b.frozen_ms is not None else "-"
            needs = "/".join("yes" if c.needs_recovery[d] else "no" for d in DISKS)
            print(f"{b.id:<24} {b.record['level']:<5} "
                  f"{'yes' if b.record['quiesced'] else 'no':<8} {frozen:>7} "
                  f"{f'{c.steps_a}/{c.steps_b}':>10} {needs:<14} {c.fsck:<18}")
        print("(log steps: complete lines in vda's / sdb's log; needs replay: vda/sdb "
              "journal holds transactions a mount would replay)")
        print("every point: every file its logs name is there with the logged sha256 "
              "(read with debugfs), and sdb's log is as long as vda's or one step behind: "
              "both disks at one instant")
        steps = [c.steps_b for c in self.checks]
        if steps != sorted(steps) or steps[-1] <= steps[0]:
            raise DemoFailed(f"the points do not move forward with the guest: steps {steps}")

    def check_never_frozen(self) -> None:
        vm = self.vm
        now = vm.steps()
        last = self.backups[-1].steps_after
        if now <= last:
            raise DemoFailed(f"the guest stopped writing: step {now}, already {last} right "
                             "after the last backup")
        status = vm.agent("guest-fsfreeze-status")
        vm.close_agent()
        if status != "thawed":
            raise DemoFailed(f"the guest agent says the filesystems are {status}")
        errors = vm.errors()
        if errors:
            raise DemoFailed("the guest's console shows errors: " + "; ".join(errors))
        print("the guest's step at each backup's start, return, and soon after: " + ", ".join(
            f"{b.steps_before} -> {b.steps_at_return} -> {b.steps_after}"
            for b in self.backups)
            + f"; now at step {now}")
        print("guest agent: guest-fsfreeze-status = thawed; console: no I/O error, "
              "no ext4 error, no BB-ERROR")

    def held_io_windows(self) -> None:
        log = self.daemon.log()
        for b in self.backups:
            m = re.search(rf"snapshot {self.vm.name}/{re.escape(b.id)} created: .*"
                          r"held-I/O window ([0-9.]+) ms", log)
            b.held_io_ms = float(m.group(1)) if m else None

    def report(self) -> None:
        step("figures")
        self.held_io_windows()
        print(f"guest boot: {self.boot_seconds:.1f} s to BB-READY "
              f"({accelerator().name}, 2 disks formatted at first boot)")
        print(f"{'backup':<30} {'wall s':>7} {'read MiB':>9} {'frozen ms':>10} "
              f"{'I/O held ms':>12} {'guest went on in':>17}")
        for b in self.backups:
            frozen = f"{b.frozen_ms:.0f}" if b.frozen_ms is not None else "-"
            held = f"{b.held_io_ms:.1f}" if b.held_io_ms is not None else "?"
            print(f"{b.what:<30} {b.seconds:>7.1f} {b.bytes_read / MiB:>9.1f} {frozen:>10} "
                  f"{held:>12} {b.resumed_in:>15.1f} s")
        print("(frozen: the guest's filesystems frozen through its agent, freeze asked to "
              "thaw answered; I/O held: vCPUs paused while the disks switch to the point "
              "in time)")
        per_disk = ", ".join(f"{d} {e['bytes_read'] / MiB:.1f}"
                             for d, e in self.backups[1].record["disks"].items())
        print(f"(read: what was pulled over NBD; the incrementals read only the blocks the "
              f"guest changed, e.g. {per_disk} MiB for the second)")
        total = sum(c.seconds for c in self.checks)
        print(f"restore + check of {len(self.checks)} points x {len(DISKS)} disks: "
              f"{total:.1f} s")


def tail(text: str, lines: int = 25) -> str:
    return "\n".join("  " + line for line in text.splitlines()[-lines:])


def console_tail(text: str, lines: int = 25) -> str:
    """The guest console's tail without the crash workload's BB-STEP lines
    (only the last one stays): what the guest said besides."""
    kept = text.splitlines()
    last_step = next((line for line in reversed(kept) if line.startswith("BB-STEP")), None)
    kept = [line for line in kept if not line.startswith("BB-STEP") or line is last_step]
    return tail("\n".join(kept), lines)


def main() -> int:
    started = time.monotonic()
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)  # in order with stderr in CI logs
    workdir = Path(tempfile.mkdtemp(prefix="bb-demo-", dir="/var/tmp"))
    demo = Demo(workdir)
    failure: str | None = "interrupted"
    try:
        demo.run()
        failure = None
    except Exception as e:
        failure = f"{type(e).__name__}: {e}"
        print(f"\nDEMO FAILED: {failure}", file=sys.stderr, flush=True)
        print("--- guest console (tail) ---\n" + console_tail(demo.vm.console()),
              file=sys.stderr)
        print("--- blockbackupd log (tail) ---\n" + tail(demo.daemon.log()), file=sys.stderr)
    finally:
        step("cleaning up")
        if demo.daemon.proc is not None:
            try:
                print(f"blockbackupd exited with {demo.daemon.stop()}")
            except Exception as e:
                demo.daemon.kill()
                print(f"blockbackupd killed ({e})")
        if demo.vm.running:
            demo.vm.kill()
            print("QEMU killed")
        demo.vm.close_agent()
        if os.environ.get("BB_DEMO_KEEP"):
            print(f"kept {workdir} (BB_DEMO_KEEP)")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            print(f"removed {workdir}")
    elapsed = time.monotonic() - started
    if failure is not None:
        print(f"demo FAILED after {elapsed:.0f} s: {failure}", file=sys.stderr)
        return 1
    print(f"demo passed in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
