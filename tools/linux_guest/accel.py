"""Which accelerator boots the guest here: KVM if it works, else TCG.

``/dev/kvm`` may exist and QEMU's query-kvm may say enabled while KVM still
cannot run this guest: in a nested setup ``-cpu host`` aborts QEMU ("failed to
set MSR 0x10a") and other CPU models hang early in boot. So the first call
boots the guest once with ``-accel kvm -cpu host`` (a probe workload that
prints BB-READY and powers off at once; 20 s to get there, then the QEMU is
killed) and falls back to ``-accel tcg -cpu max``. The verdict is kept in the
cache directory, keyed by the guest kernel, the QEMU version and the host
kernel, so the probe runs once per such combination.

``BB_GUEST_ACCEL=kvm`` or ``=tcg`` skips the probe.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tools.linux_guest.build import GuestImage, build, cache_dir, locked
from tools.qemu_build import selected

CANDIDATES: dict[str, tuple[str, ...]] = {
    "kvm": ("-accel", "kvm", "-cpu", "host"),
    "tcg": ("-accel", "tcg", "-cpu", "max"),
}
#: How long a boot to BB-READY may take before the accelerator is declared unusable.
PROBE_TIMEOUT = {"kvm": 20.0, "tcg": 120.0}


@dataclass(frozen=True)
class Accelerator:
    name: str                  # "kvm" or "tcg"
    args: tuple[str, ...]      # QEMU arguments selecting it
    boot_seconds: float | None  # QEMU start to BB-READY in the probe (no disks)
    how: str                   # "probed", "cached probe" or "BB_GUEST_ACCEL"
    note: str = ""             # why another accelerator was not taken

    def describe(self) -> str:
        """One line for test output, e.g. ``linux guest: tcg (-cpu max), boot 2.9 s``."""
        cpu = self.args[self.args.index("-cpu") + 1] if "-cpu" in self.args else "default"
        boot = f"boot {self.boot_seconds:.1f} s" if self.boot_seconds is not None \
            else "boot time not measured"
        extra = f"; {self.note}" if self.note else ""
        return f"linux guest: {self.name} (-cpu {cpu}), {boot} ({self.how}{extra})"


_chosen: Accelerator | None = None


def _qemu_version() -> str:
    """The version of the QEMU build LinuxVm starts (BB_QEMU), for the verdict's key."""
    return selected().version()


def _kvm_usable() -> bool:
    return os.access("/dev/kvm", os.R_OK | os.W_OK)


def probe(name: str, image: GuestImage) -> tuple[float | None, str]:
    """Boot the probe workload with one accelerator: (seconds to BB-READY, or
    None and the reason it failed). The QEMU never outlives the call."""
    from tools.linux_guest.vm import LinuxVm

    accel = Accelerator(name, CANDIDATES[name], None, "probe")
    workdir = Path(tempfile.mkdtemp(prefix="bb-probe-", dir="/tmp"))
    vm = LinuxVm(workdir, "probe", disks={}, workload="probe", agent=False,
                 accel=accel, image=image, memory=128)
    try:
        started = time.monotonic()
        vm.start()
        vm.wait_console(r"^BB-READY", timeout=PROBE_TIMEOUT[name])
        seconds = time.monotonic() - started
        vm.wait_exit(10.0)
        return seconds, ""
    except TimeoutError:
        return None, f"hung (no BB-READY in {PROBE_TIMEOUT[name]:.0f} s)"
    except Exception as e:  # any failure means: not this one
        vm.kill()
        said = [line for line in vm.qemu_output().splitlines() if "error" in line.lower()]
        reason = said or str(e).strip().splitlines() or [type(e).__name__]
        return None, reason[0].split("qemu-system-x86_64: ", 1)[-1]
    finally:
        vm.kill()
        shutil.rmtree(workdir, ignore_errors=True)


def accelerator(image: GuestImage | None = None) -> Accelerator:
    """The accelerator for LinuxVm (probed once, then cached)."""
    global _chosen
    if _chosen is not None:
        return _chosen
    image = image or build()
    cache = cache_dir()
    kernel = sorted(f"{p}={v}" for p, v in image.packages.items() if p.startswith("linux-image"))
    key = hashlib.sha256("\n".join([
        image.kernel_version, image.kernel.name, *kernel,
        _qemu_version(), platform.release(), str(_kvm_usable()),
    ]).encode()).hexdigest()[:16]
    verdict_path = cache / f"accel-{key}.json"
    forced = os.environ.get("BB_GUEST_ACCEL", "")
    if forced:
        if forced not in CANDIDATES:
            raise ValueError(f"BB_GUEST_ACCEL={forced}: expected one of {sorted(CANDIDATES)}")
        boot = None
        try:
            saved = json.loads(verdict_path.read_text())
            boot = saved["boot_seconds"] if saved["name"] == forced else None
        except (OSError, ValueError, KeyError):
            pass
        _chosen = Accelerator(forced, CANDIDATES[forced], boot, "BB_GUEST_ACCEL")
        return _chosen
    with locked(cache, "accel"):
        try:
            saved = json.loads(verdict_path.read_text())
            _chosen = Accelerator(saved["name"], tuple(saved["args"]), saved["boot_seconds"],
                                  "cached probe", saved.get("note", ""))
            return _chosen
        except (OSError, ValueError, KeyError):
            pass
        notes = []
        for name in CANDIDATES:
            if name == "kvm" and not _kvm_usable():
                notes.append("kvm: /dev/kvm not usable")
                continue
            seconds, reason = probe(name, image)
            if seconds is not None:
                note = "; ".join(notes)
                verdict_path.write_text(json.dumps({
                    "name": name, "args": list(CANDIDATES[name]), "boot_seconds": seconds,
                    "note": note, "probed_at": time.strftime("%Y-%m-%d %H:%M:%S")}) + "\n")
                _chosen = Accelerator(name, CANDIDATES[name], seconds, "probed", note)
                return _chosen
            notes.append(f"{name} {' '.join(CANDIDATES[name][2:])}: {reason}")
        raise RuntimeError("no accelerator boots the guest: " + "; ".join(notes))
