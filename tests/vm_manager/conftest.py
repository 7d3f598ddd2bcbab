"""Fixtures shared by the tests that run libvirt."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tools.libvirt import Libvirt, make_libvirt


@pytest.fixture(scope="module")
def lv() -> Iterator[Libvirt]:
    """A private libvirtd (its config and state under a temporary directory),
    one per test module."""
    if os.geteuid() != 0:
        pytest.skip("a privileged libvirtd needs root")
    if shutil.which("libvirtd") is None:
        pytest.fail("libvirtd is missing: `make deps` installs libvirt-daemon-system")
    lv = make_libvirt()
    print(f"private libvirtd answered {lv.start_seconds:.2f} s after it started")
    try:
        yield lv
    finally:
        lv.stop()
        shutil.rmtree(lv.root, ignore_errors=True)
