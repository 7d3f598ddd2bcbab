"""Fixtures for the tests on the Linux guest (tools/linux_guest).

The guest is built (or found in its cache) and the accelerator chosen once
per session; the choice is printed in pytest's header when these tests are
run on their own, and in the summary of any run that used them.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tools.linux_guest.accel import Accelerator, accelerator
from tools.linux_guest.vm import LinuxVm

_used: list[Accelerator] = []


def pytest_report_header(config: pytest.Config) -> str:
    try:
        return accelerator().describe()
    except Exception as e:  # the tests will fail with the details
        return f"linux guest: unavailable ({e})"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _used:
        terminalreporter.write_line(_used[0].describe())


@pytest.fixture(scope="session")
def guest_accel() -> Accelerator:
    accel = accelerator()
    _used[:] = [accel]
    return accel


@pytest.fixture(scope="module")
def guest_workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bb-guest-", dir="/tmp"))  # short socket paths
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def make_guest(guest_workdir: Path, guest_accel: Accelerator
               ) -> Iterator[Callable[..., LinuxVm]]:
    """Start LinuxVms (boot only: wait_ready is the test's); all killed at the end."""
    vms: list[LinuxVm] = []

    def make(name: str, **kwargs: Any) -> LinuxVm:
        vm = LinuxVm(guest_workdir, name, accel=guest_accel, **kwargs)
        vms.append(vm)
        return vm.start()

    yield make
    for vm in vms:
        vm.kill()
        # Captured: pytest shows it for failed tests only.
        print(f"--- {vm.name} console ---\n{vm.console()[-5000:]}")
