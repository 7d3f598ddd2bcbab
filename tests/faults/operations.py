"""The multi-step operations the fault tests cut short, on any configuration
of :mod:`tests.faults.configs`: what each needs made first, the call itself,
and the clean refusal where this build does not serve a disk's exports."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from blockbackup_client import Unsupported
from blockbackup_client.client import Client
from tests.conftest import export_xml, snapshot_xml
from tests.faults.checks import nbd_server_running
from tests.test_checkpoints import changes, checkpoint
from tools.vm import Vm

#: Operations that serve NBD exports of a snapshot's disks (refused for disks
#: in I/O threads on a build whose NBD server aborts there).
EXPORTING = frozenset({"export.start", "export.stop"})


@dataclass(frozen=True)
class Setup:
    """One test's disks, and the file a copy writes into."""

    disks: tuple[str, str]
    target: Path

    @property
    def export(self) -> str:
        return export_xml([(d, "s1") for d in self.disks])

    def make_target(self, vm: Vm) -> None:
        """A qcow2 file of the first disk's size, as bbctl makes a copy's."""
        self.target.unlink(missing_ok=True)
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.target),
                        str(vm.disks[self.disks[0]])], check=True)


def prepare(c: Client, operation: str, s: Setup, vm: Vm) -> None:
    """What the operation needs to exist; made by the daemon that will die."""
    if operation in ("snapshot.delete", "export.start", "export.stop", "snapshot.copy"):
        c.snapshot_create("vm1", snapshot_xml("s1"))
    if operation == "export.stop":
        c.export_start("vm1", s.export)
    if operation == "snapshot.copy":
        s.make_target(vm)
    if operation == "checkpoint.delete":
        checkpoint(c, "cp2")


def run(c: Client, operation: str, s: Setup) -> Any:
    if operation == "snapshot.create":
        return c.snapshot_create("vm1", snapshot_xml("s2"), checkpoint=True)
    if operation == "snapshot.delete":
        return c.snapshot_delete("vm1", "s1")
    if operation == "export.start":
        return c.export_start("vm1", s.export)
    if operation == "export.stop":
        return c.call("export.stop", domain="vm1", xml=s.export)
    if operation == "checkpoint.changes":
        return changes(c, "cp1", disk=s.disks[0])
    if operation == "snapshot.copy":
        return copy(c, "s1", s)
    return c.call("checkpoint.delete", domain="vm1", name="cp2")


def copy(c: Client, snapshot: str, s: Setup) -> Any:
    return c.call("snapshot.copy", domain="vm1", name=snapshot, disk=s.disks[0],
                  target=str(s.target))


def assert_refused(c: Client, vm: Vm, s: Setup, why: str) -> None:
    """export.start of s1 answers unsupported, naming the build's verdict,
    and makes nothing: no export, no NBD server."""
    with pytest.raises(Unsupported) as refused:
        c.export_start("vm1", s.export)
    message = str(refused.value)
    assert "I/O thread" in message and "snapshot.copy" in message, message
    assert why.split(" (")[0] in message, (why, message)  # the same build judged
    assert c.export_list("vm1") == [] and c.export_server("vm1") is None
    assert vm.qmp("query-block-exports") == []
    assert not nbd_server_running(vm)


def serves(c: Client, vm: Vm, s: Setup, refused: str | None) -> None:
    """The domain serves as before: a snapshot, read as this build allows
    (an export, or QEMU's copy where exports are refused), deleted."""
    c.snapshot_create("vm1", snapshot_xml("s3"))
    if refused is None:
        c.export_start("vm1", export_xml([(s.disks[0], "s3")]))
    else:
        s.make_target(vm)
        assert copy(c, "s3", s)["bytes"] == vm.disks[s.disks[0]]
    c.snapshot_delete("vm1", "s3")
