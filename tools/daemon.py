"""Start the real blockbackupd as a subprocess on temporary directories."""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import tomli_w

from blockbackup_client import Client
from tools.vm import Vm

_records = itertools.count(1)


class Daemon:
    """A blockbackupd process with its own config, socket and state under ``workdir``."""

    def __init__(self, workdir: Path, domains: list[dict[str, str]] | None = None,
                 **daemon_keys: Any) -> None:
        self.workdir = workdir
        self.config_path = workdir / "blockbackupd.toml"
        self.log_path = workdir / "blockbackupd.log"
        self.daemon_keys: dict[str, Any] = {
            "socket": str(workdir / "bb.sock"),
            "state_dir": str(workdir / "state"),
            "scratch_dir": str(workdir / "state" / "scratch"),
            "run_dir": str(workdir / "run"),
            "log_level": "debug",
            "qmp_timeout": 5.0,
            "reconnect_max_delay": 0.5,
            **daemon_keys,
        }
        # A test run records every RPC exchange, checked at its end against
        # the API document (tests/conftest.py).
        record_dir = os.environ.get("BB_RPC_RECORD_DIR")
        if record_dir and "rpc_record" not in self.daemon_keys:
            self.daemon_keys["rpc_record"] = str(
                Path(record_dir) / f"{os.getpid()}-{next(_records)}.jsonl")
        self.domains = domains or []
        #: Other sections of the config file, e.g. {"nbd": {"tls_dir": ...}}.
        self.config_extra: dict[str, Any] = {}
        #: Extra environment of the daemon process (e.g. BLOCKBACKUPD_FAIL_AT).
        self.env: dict[str, str] = {}
        #: A command the daemon runs under, e.g. ``ip netns exec NS`` (which
        #: execs it, so the PID is still the daemon's).
        self.prefix: list[str] = []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return Path(self.daemon_keys["socket"])

    def write_config(self) -> None:
        data: dict[str, Any] = {"daemon": self.daemon_keys, **self.config_extra}
        if self.domains:
            data["domain"] = self.domains
        self.config_path.write_text(tomli_w.dumps(data))

    def start(self, timeout: float = 20.0) -> Daemon:
        self.write_config()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "blockbackupd",
                 "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"blockbackupd exited with {self.proc.returncode}:\n"
                                   f"{self.log()}")
            try:
                with Client(str(self.socket), timeout=5) as c:
                    c.daemon_info()
                return self
            except Exception:
                if time.monotonic() > deadline:
                    self.kill()
                    raise TimeoutError(f"blockbackupd did not answer:\n{self.log()}") from None
                time.sleep(0.05)

    def client(self, timeout: float | None = 30.0) -> Client:
        return Client(str(self.socket), timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the daemon and wait; returns its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        code = self.proc.returncode
        self.proc = None
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


@contextmanager
def defined_domain(disks: dict[str, int], name: str = "vm1", *, workdir_base: str = "/tmp",
                   prefix: str = "bb-", prepare: Callable[[Vm], None] | None = None,
                   **daemon_keys: Any) -> Iterator[tuple[Vm, Daemon]]:
    """A running VM (its images prepared offline first by ``prepare``) defined in
    a running daemon, in a temporary directory; everything goes on exit."""
    workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir_base))
    vm = Vm(workdir, name, disks=disks)
    daemon = Daemon(workdir, **daemon_keys)
    try:
        vm.create_images()
        if prepare is not None:
            prepare(vm)
        vm.start()
        daemon.start()
        with daemon.client() as c:
            c.domain_define(vm.name, str(vm.daemon_qmp))
            deadline = time.monotonic() + 20
            while c.domain_list()[0]["state"] != "running":
                if time.monotonic() > deadline:
                    raise TimeoutError("the daemon did not reach the VM")
                time.sleep(0.05)
        yield vm, daemon
    finally:
        if daemon.proc is not None:
            daemon.stop()
        vm.stop()
        shutil.rmtree(workdir, ignore_errors=True)
