"""Snapshots and exports against real QEMU, read back over NBD with libnbd."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import nbd
import pytest
from lxml import etree

from blockbackup_client import (
    AlreadyExists,
    Busy,
    DomainNotConnected,
    InvalidArgument,
    InvalidXml,
    NoSuchCheckpoint,
    NoSuchDisk,
    NoSuchDomain,
    NoSuchSnapshot,
    OperationFailed,
    Unsupported,
)
from blockbackup_client.errors import ApplicationError, ProtocolError
from blockbackupd.qemu.nbdread import dirty_extents
from tests.conftest import (
    NbdReader,
    domain_state,
    export_xml,
    snapshot_xml,
    unmount,
    wait_for,
)
from tools.daemon import Daemon
from tools.vm import MiB, Vm

KiB = 1024


def define(daemon: Daemon, vm: Vm, name: str = "vm1") -> None:
    with daemon.client() as c:
        c.domain_define(name, str(vm.daemon_qmp))
    wait_for(lambda: domain_state(daemon, name) != "disconnected", what=f"{name} connected")


def scratch_dir(daemon: Daemon) -> Path:
    return Path(daemon.daemon_keys["scratch_dir"])


def run_dir(daemon: Daemon) -> Path:
    return Path(daemon.daemon_keys["run_dir"])


def test_views_hold_the_instant_on_every_disk(defined: tuple[Daemon, Vm]) -> None:
    daemon, vm = defined
    vm.write("sda", 0, 64 * KiB, 0x11)
    vm.write("sdb", 1 * MiB, 64 * KiB, 0x21)
    with daemon.client() as c:
        created = c.call("snapshot.create", domain="vm1", xml=snapshot_xml("s1"))
        assert created["name"] == "s1"
        # After the instant: overwrite both, and write where nothing was.
        vm.write("sda", 0, 64 * KiB, 0x12)
        vm.write("sdb", 1 * MiB, 64 * KiB, 0x22)
        vm.write("sda", 8 * MiB, 64 * KiB, 0x13)
        started = c.call("export.start", domain="vm1",
                         xml=export_xml([("sda", "s1"), ("sdb", "s1")]))
        sock = str(run_dir(daemon) / "vm1.nbd")
        assert started == {
            "server": {"transport": "unix", "socket": sock},
            "exports": [
                {"disk": "sda", "snapshot": "s1", "checkpoint": None, "name": "sda-s1",
                 "bitmap": None},
                {"disk": "sdb", "snapshot": "s1", "checkpoint": None, "name": "sdb-s1",
                 "bitmap": None},
            ]}
        with NbdReader(sock, "sda-s1") as a, NbdReader(sock, "sdb-s1") as b, \
                NbdReader(sock, "sda-s1") as a2:
            assert a.h.get_size() == b.h.get_size() == 64 * MiB
            assert a.read(0, 64 * KiB) == b"\x11" * (64 * KiB)
            assert a.read(8 * MiB, 64 * KiB) == b"\0" * (64 * KiB)
            assert b.read(1 * MiB, 64 * KiB) == b"\x21" * (64 * KiB)
            assert a2.read(0, 4 * KiB) == b"\x11" * (4 * KiB)  # a second connection at once
            assert a.h.can_multi_conn() and a.h.is_read_only()
            assert a.h.can_meta_context("base:allocation")
            assert a.h.can_meta_context("qemu:allocation-depth")
            with pytest.raises(nbd.Error):
                a.h.pwrite(b"x" * 512, 0)
        # The guest sees its own writes, not the view.
        assert "Pattern verification failed" not in vm.qemu_io("sda", "read -P 0x12 0 64k")
        assert "Pattern verification failed" not in vm.qemu_io("sdb", "read -P 0x22 1M 64k")
        c.call("snapshot.delete", domain="vm1", name="s1")


def test_domain_xml_keeps_disks_and_marks_exports(defined: tuple[Daemon, Vm]) -> None:
    daemon, vm = defined
    with daemon.client() as c:
        before = c.domain_get_xml("vm1")
        c.call("snapshot.create", domain="vm1", xml=snapshot_xml("s1", {"sda": None}))
        assert c.domain_get_xml("vm1") == before  # a snapshot changes how no disk looks
        c.call("export.start", domain="vm1",
               xml=export_xml([("sda", "s1", {"exportname": "full-a"})]))
        root = etree.fromstring(c.domain_get_xml("vm1").encode())
        assert [dict(e.attrib) for e in root.iter("export")] == [
            {"name": "full-a", "snapshot": "s1"}]
        assert root.find("disk[@name='sda']/export") is not None
        assert "/run/" not in c.domain_get_xml("vm1")  # no server address in it
        assert c.call("export.list", domain="vm1") == [
            {"disk": "sda", "snapshot": "s1", "checkpoint": None, "name": "full-a",
             "bitmap": None}]
        c.call("snapshot.delete", domain="vm1", name="s1")
        assert c.domain_get_xml("vm1") == before


def test_snapshot_documents(defined: tuple[Daemon, Vm], workdir: Path) -> None:
    daemon, vm = defined
    custom = scratch_dir(daemon) / "sub"
    custom.mkdir()
    with daemon.client() as c:
        start = int(time.time())
        created = c.call("snapshot.create", domain="vm1", xml=snapshot_xml(
            "nightly", {"sdb": str(custom / "b.qcow2"), "sda": None}))
        xml = c.call("snapshot.get_xml", domain="vm1", name="nightly")
        assert created["xml"] == xml
        root = etree.fromstring(xml.encode())
        assert root.findtext("name") == "nightly"
        assert start <= int(root.findtext("creationTime")) <= time.time()
        assert root.findtext("state") == "active"
        window = float(root.findtext("heldIoWindow"))
        assert 0 < window < 5
        assert [(d.get("name"), d.find("source").get("file")) for d in root.iter("disk")] == [
            ("sdb", str(custom / "b.qcow2")),
            ("sda", str(scratch_dir(daemon) / "vm1-sda-nightly.raw"))]
        info = c.call("snapshot.lookup", domain="vm1", name="nightly")
        assert info["name"] == "nightly" and info["state"] == "active"
        assert info["disks"] == ["sdb", "sda"]
        assert info["held_io_window"] == pytest.approx(window, abs=1e-6)
        allocated = {s["disk"]: s["allocated"] for s in info["scratch"]}
        assert {s["disk"]: s["size"] for s in info["scratch"]} == {"sda": 64 * MiB,
                                                                   "sdb": 64 * MiB}
        # A sparse file, with one cluster taken at once (see scratch.RESERVED).
        assert allocated == {"sda": 64 * KiB, "sdb": 64 * KiB}
        # Overwriting 4 MiB of old data sends 4 MiB into sda's scratch.
        vm.write("sda", 0, 4 * MiB, 0x01)
        c.call("snapshot.delete", domain="vm1", name="nightly")
        c.call("snapshot.create", domain="vm1", xml=snapshot_xml("second", {"sda": None}))
        vm.write("sda", 0, 4 * MiB, 0x02)
        after = {s["disk"]: s["allocated"] for s in
                 c.call("snapshot.lookup", domain="vm1", name="second")["scratch"]}
        assert after["sda"] == 4 * MiB  # the old data at its own offsets, nothing more
        # A generated name is a UUID; list is oldest first.
        gen = c.call("snapshot.create", domain="vm1", xml=snapshot_xml(disks={"sdb": None}))
        assert len(gen["name"]) == 36 and gen["name"].count("-") == 4
        assert c.call("snapshot.list", domain="vm1") == ["second", gen["name"]]
        # Without any XML: every disk.
        c.call("snapshot.delete", domain="vm1", name="second")
        c.call("snapshot.delete", domain="vm1", name=gen["name"])
        whole = c.call("snapshot.create", domain="vm1")
        assert c.call("snapshot.lookup", domain="vm1", name=whole["name"])["disks"] == [
            "sda", "sdb"]


def test_one_instant_across_disks_of_a_writing_guest(make_vm: Callable[..., Vm],
                                                     daemon: Daemon) -> None:
    vm = make_vm(disks={"hda": 16 * MiB, "hdb": 16 * MiB}, writer=True)
    define(daemon, vm)

    def counters(reader_a: NbdReader, reader_b: NbdReader) -> tuple[int, int]:
        return (int.from_bytes(reader_a.read(0, 2), "little"),
                int.from_bytes(reader_b.read(0, 2), "little"))

    sock = str(run_dir(daemon) / "vm1.nbd")
    seen = []
    with daemon.client() as c:
        wait_for(lambda: vm.qmp("query-blockstats")[2]["stats"]["wr_operations"] > 100,
                 what="the guest to write")
        for i in range(8):
            name = f"s{i}"
            c.call("snapshot.create", domain="vm1", xml=snapshot_xml(name))
            c.call("export.start", domain="vm1", xml=export_xml([("hda", name), ("hdb", name)]))
            with NbdReader(sock, f"hda-{name}") as a, NbdReader(sock, f"hdb-{name}") as b:
                first = counters(a, b)
                time.sleep(0.05)  # the guest goes on writing; the views do not move
                assert counters(a, b) == first
            seen.append(first)
            c.call("snapshot.delete", domain="vm1", name=name)
            time.sleep(0.03 * i)
    assert vm.status() == "running"
    for a, b in seen:
        # The guest writes k to hda, then k to hdb, then k + 1 to hda: any
        # instant shows a == b or a == b + 1 (modulo the 16-bit counter).
        assert (a - b) % 65536 in (0, 1), f"views from different instants: {seen}"
    assert len(set(seen)) == len(seen), f"the guest did not write between snapshots: {seen}"


@pytest.mark.parametrize("start", ["prelaunch", "paused", "running"])
def test_run_state_is_kept(make_vm: Callable[..., Vm], daemon: Daemon, start: str) -> None:
    vm = make_vm(paused=start == "prelaunch")
    if start == "paused":
        vm.qmp("stop")
    define(daemon, vm)
    with daemon.client() as c:
        c.call("snapshot.create", domain="vm1", xml=snapshot_xml("s1"))
        assert vm.status() == start
        window = c.call("snapshot.lookup", domain="vm1", name="s1")["held_io_window"]
        assert window > 0
        c.call("snapshot.delete", domain="vm1", name="s1")
        assert vm.status() == start
    # Only a running VM was stopped, for the window, and resumed.
    assert vm.monitor is not None
    stops = [e["event"] for e in vm.monitor.events if e["event"] in ("STOP", "RESUME")]
    assert stops == {"prelaunch": [], "paused": ["STOP"], "running": ["STOP", "RESUME"]}[start]
    log = daemon.log()
    assert "held-I/O window" in log


def graph(vm: Vm) -> tuple[set[str], dict[str, str]]:
    return vm.node_names(), vm.top_nodes()


def test_delete_restores_graph_and_scratch_dir(defined: tuple[Daemon, Vm]) -> None:
    daemon, vm = defined
    before = graph(vm)
    files_before = sorted(scratch_dir(daemon).iterdir())
    with daemon.client() as c:
        c.call("snapshot.create", domain="vm1", xml=snapshot_xml("s1"))
        during = graph(vm)
        new = during[0] - before[0]
        # Per disk: scratch (and its file node), filter, view, probe window and sink.
        assert sorted(n.rsplit("-", 1)[1] for n in new if n.startswith("bb-")) == sorted(
            ["scratch", "filter", "view", "probe", "sink"] * 2)
        assert len([n for n in new if n.startswith("#block")]) == 2
        assert during[1]["sda"] != before[1]["sda"]
        c.call("export.start", domain="vm1", xml=export_xml([("sda", "s1")]))
        sock = run_dir(daemon) / "vm1.nbd"
        assert sock.exists()
        reader = NbdReader(str(sock), "sda-s1")  # still connected at delete
        c.call("snapshot.delete", domain="vm1", name="s1")  # stops the export first
        with pytest.raises(nbd.Error):
            reader.read(0, 512)
        reader.close()
        assert c.call("export.list", domain="vm1") == []
        assert c.call("export.server", domain="vm1") is None
        assert c.call("snapshot.list", domain="vm1") == []
    assert graph(vm) == before
    assert vm.qmp("query-block-exports") == []
    assert sorted(scratch_dir(daemon).iterdir()) == files_before
    assert not sock.exists()
    # Guest writes reach the disk directly again.
    vm.write("sda", 0, 64 * KiB, 0x5A)
    assert "Pattern verification failed" not in vm.qemu_io("sda", "read -P 0x5a 0 64k")


def test_a_snapshot_whose_lease_ends_is_deleted(defined: tuple[Daemon, Vm]) -> None:
    daemon, vm = defined
    before = graph(vm)
    files_before = sorted(scratch_dir(daemon).iterdir())
    with daemon.client() as c:
        for lease in (0, 86_401, 1.5, "2"):
            with pytest.raises(ProtocolError) as err:
                c.call("snapshot.create", domain="vm1", lease=lease)
            assert err.value.code == -32602 and "lease" in err.value.message
        assert c.call("snapshot.list", domain="vm1") == []
        made = time.time()
        c.call("snapshot.create", domain="vm1", xml=snapshot_xml("s1"), lease=2)
        info = c.call("snapshot.lookup", domain="vm1", name="s1")
        assert info["lease"] == 2 and made + 2 <= info["expires"] <= time.time() + 2
        c.call("export.start", domain="vm1", xml=export_xml([("sda", "s1")]))
        # Renewed past its first end, it lives on.
        for _ in range(4):
            time.sleep(1)
            renewed = c.call("snapshot.renew", domain="vm1", name="s1")
            assert renewed["lease"] == 2 and renewed["expires"] >= time.time() + 1.9
        assert c.call("snapshot.list", domain="vm1") == ["s1"]
        stopped = time.monotonic()
        wait_for(lambda: c.call("snapshot.list", domain="vm1") == [], timeout=10,
                 what="the snapshot deleted when its lease ended")
        assert 1.9 <= time.monotonic() - stopped <= 4
        with pytest.raises(NoSuchSnapshot):
            c.call("snapshot.renew", domain="vm1", name="s1")
        assert c.call("export.list", domain="vm1") == []
        # A snapshot without a lease lives on.
        c.call("snapshot.create", domain="vm1", xml=snapshot_xml("s2"))
        time.sleep(2.5)
        assert c.call("snapshot.list", domain="vm1") == ["s2"]
        assert "lease" not in c.call("snapshot.lookup", domain="vm1", name="s2")
        c.call("snapshot.delete", domain="vm1", name="s2")
    assert graph(vm) == before
    assert sorted(scratch_dir(daemon).iterdir()) == files_before
    assert "snapshot vm1/s1: its lease was not renewed for 2 s: deleting it" in daemon.log()
    assert "snapshot vm1/s1 deleted: its lease ended" in daemon.log()
    assert vm.status() == "running"


def test_export_stop_and_server_lifecycle(defined: tuple[Daemon, Vm]) -> None:
    daemon, vm = defined
    sock = str(run_dir(daemon) / "vm1.nbd")
    with daemon.client() as c:
        assert c.export_server("vm1") is None
        c.snapshot_create("vm1", snapshot_xml("s1"))
        c.export_start("vm1", export_xml([("sda", "s1")]))
        assert c.export_server("vm1") == {"transport": "unix", "socket": sock}
        assert oct(os.stat(sock).st_mode & 0o777) == "0o660"
        c.export_start("vm1", export_xml([("sdb", "s1")]))
        c.export_stop("vm1", export_xml([("sda", "s1")]))
        assert [e["name"] for e in c.export_list("vm1")] == ["sdb-s1"]
        with NbdReader(sock, "sdb-s1") as b:
            assert b.h.get_size() == 64 * MiB
        c.export_stop("vm1", export_xml([("sdb", "s1")]))
        assert c.export_server("vm1") is None
        assert not os.path.exists(sock)
        assert c.snapshot_list("vm1") == ["s1"]  # the snapshot stays


def test_requests_need_a_connected_domain(defined: tuple[Daemon, Vm]) -> None:
    daemon, vm = defined
    with daemon.client() as c:
        c.call("snapshot.create", domain="vm1", xml=snapshot_xml("s1"))
        c.call("export.start", domain="vm1", xml=export_xml([("sda", "s1")]))
        scratch_files = list(scratch_dir(daemon).iterdir())
        assert len(scratch_files) == 2
        vm.kill()
        wait_for(lambda: domain_state(daemon, "vm1") == "disconnected")
        # (snapshot.create works on a stopped domain's images: tests/test_offline.py)
        for method, params in [
            ("export.start", {"xml": export_xml([("sdb", "s1")])}),
            ("export.stop", {"xml": export_xml([("sda", "s1")])}),
            ("domain.get_xml", {}),
        ]:
            with pytest.raises(DomainNotConnected):
                c.call(method, domain="vm1", **params)
        # QEMU took the views with it: they are forgotten, their files removed.
        assert c.call("snapshot.list", domain="vm1") == []
        with pytest.raises(NoSuchSnapshot):
            c.call("snapshot.lookup", domain="vm1", name="s1")
        assert c.call("export.list", domain="vm1") == []
        assert list(scratch_dir(daemon).iterdir()) == []
        assert not (run_dir(daemon) / "vm1.nbd").exists()


def test_undefine_refused_while_snapshots_exist(defined: tuple[Daemon, Vm]) -> None:
    daemon, _ = defined
    with daemon.client() as c:
        c.call("snapshot.create", domain="vm1", xml=snapshot_xml("s1"))
        with pytest.raises(Busy, match="it has 1 snapshot"):
            c.domain_undefine("vm1")
        c.call("snapshot.delete", domain="vm1", name="s1")
        c.domain_undefine("vm1")


# -- every error leaves the graph and the scratch dir as they were ----------------


@pytest.fixture
def untouched(defined: tuple[Daemon, Vm]) -> Iterator[tuple[Daemon, Vm]]:
    """A domain with snapshot "s1" (sda only) exported; checks after the test
    that nothing in QEMU or in the scratch dir changed."""
    daemon, vm = defined
    with daemon.client() as c:
        c.call("snapshot.create", domain="vm1", xml=snapshot_xml("s1", {"sda": None}))
        c.call("export.start", domain="vm1", xml=export_xml([("sda", "s1")]))
    before = (graph(vm), sorted(scratch_dir(daemon).iterdir()),
              vm.qmp("query-block-exports"), sorted(run_dir(daemon).iterdir()))
    yield daemon, vm
    after = (graph(vm), sorted(scratch_dir(daemon).iterdir()),
             vm.qmp("query-block-exports"), sorted(run_dir(daemon).iterdir()))
    assert after == before
    assert vm.status() == "running"
    with daemon.client() as c:
        assert c.call("snapshot.list", domain="vm1") == ["s1"]
        assert [e["name"] for e in c.call("export.list", domain="vm1")] == ["sda-s1"]


def _case_params(workdir: Path) -> list[tuple[str, dict[str, object], type[ApplicationError],
                                               str]]:
    outside = workdir / "outside"
    return [
        ("snapshot.create", {"domain": "nope"}, NoSuchDomain, "no domain named 'nope'"),
        ("snapshot.lookup", {"domain": "vm1", "name": "s9"}, NoSuchSnapshot, "no snapshot 's9'"),
        ("snapshot.delete", {"domain": "vm1", "name": "s9"}, NoSuchSnapshot, "no snapshot"),
        ("snapshot.get_xml", {"domain": "vm1", "name": "s9"}, NoSuchSnapshot, "no snapshot"),
        ("snapshot.renew", {"domain": "vm1", "name": "s9"}, NoSuchSnapshot, "no snapshot"),
        ("snapshot.renew", {"domain": "vm1", "name": "s1"}, InvalidArgument,
         "has no lease to renew"),
        ("export.start", {"domain": "vm1", "xml": export_xml([("sda", "s9")])},
         NoSuchSnapshot, "no snapshot 's9'"),
        ("export.start", {"domain": "vm1",
                          "xml": export_xml([("sda", "s1", {"checkpoint": "cp1"})])},
         NoSuchCheckpoint, "no checkpoint 'cp1'"),
        ("snapshot.create", {"domain": "vm1", "xml": snapshot_xml("s2", {"sdz": None})},
         NoSuchDisk, "no disk 'sdz'"),
        ("export.start", {"domain": "vm1", "xml": export_xml([("sdb", "s1")])},
         NoSuchDisk, "snapshot 's1' has no disk 'sdb'"),
        ("snapshot.create", {"domain": "vm1", "xml": snapshot_xml("s1", {"sdb": None})},
         AlreadyExists, "already has a snapshot 's1'"),
        ("export.start", {"domain": "vm1", "xml": export_xml([("sda", "s1")])},
         AlreadyExists, "already exists"),
        ("snapshot.create", {"domain": "vm1", "xml": "<domainblocksnapshot>"},
         InvalidXml, "domainblocksnapshot: line 1: "),
        ("snapshot.create", {"domain": "vm1",
                             "xml": "<domainblocksnapshot>\n<bogus/></domainblocksnapshot>"},
         InvalidXml, "line 2: Did not expect element bogus there"),
        ("export.start", {"domain": "vm1", "xml": '<domainblockexport type="nbd"/>'},
         InvalidXml, "domainblockexport: line 1"),
        ("snapshot.create", {"domain": "vm1",
                             "xml": snapshot_xml("s2", {"sdb": str(outside / "x.qcow2")})},
         InvalidArgument, "not under an allowed directory"),
        ("snapshot.create", {"domain": "vm1",
                             "xml": snapshot_xml("s2", {"sdb": str(workdir / "link" / "x")})},
         InvalidArgument, "not under an allowed directory"),
        ("export.start", {"domain": "vm1", "xml": export_xml(
            [("sda", "s1", {"exportname": "x"})],
            f'<address type="unix" socket="{workdir}/elsewhere.nbd"/>')},
         InvalidArgument, "must be directly in"),
        ("export.start", {"domain": "vm1", "xml": export_xml(
            [("sda", "s1", {"exportname": "x"})],
            '<address type="ip" host="127.0.0.1" port="10809"/>')},
         InvalidArgument, "without TLS is refused"),
        ("export.start", {"domain": "vm1", "xml": export_xml(
            [("sda", "s1", {"exportname": "x"})],
            '<address type="ip" host="127.0.0.1" port="10809" tls="yes"/>')},
         Unsupported, "TLS for NBD is not configured"),
        ("export.stop", {"domain": "vm1", "xml": export_xml([("sdb", "s1")])},
         InvalidArgument, "is not exported"),
    ]


def test_every_error_changes_nothing(untouched: tuple[Daemon, Vm], workdir: Path) -> None:
    daemon, vm = untouched
    (workdir / "outside").mkdir()
    # A symlink inside the scratch dir pointing out of it must not be followed.
    os.symlink(workdir / "outside", scratch_dir(daemon) / "escape")
    (workdir / "link").symlink_to(scratch_dir(daemon) / "escape")
    (workdir / "exists.qcow2").write_bytes(b"")
    os.symlink(workdir / "exists.qcow2", scratch_dir(daemon) / "taken.qcow2")
    (scratch_dir(daemon) / "plain.qcow2").write_bytes(b"keep")
    extra_files = sorted(set(scratch_dir(daemon).iterdir()) - set(
        scratch_dir(daemon).glob("vm1-*")))
    cases = _case_params(workdir)
    cases.append(("snapshot.create", {"domain": "vm1", "xml": snapshot_xml(
        "s2", {"sdb": str(scratch_dir(daemon) / "plain.qcow2")})},
        InvalidArgument, "already exists"))
    cases.append(("snapshot.create", {"domain": "vm1", "xml": snapshot_xml(
        "s2", {"sdb": str(scratch_dir(daemon) / "taken.qcow2")})},
        InvalidArgument, "already exists"))
    cases.append(("snapshot.create", {"domain": "vm1", "xml": snapshot_xml(
        "s2", {"sdb": str(scratch_dir(daemon) / "escape" / "x.qcow2")})},
        InvalidArgument, "not under an allowed directory"))
    try:
        with daemon.client() as c:
            for method, params, error, message in cases:
                with pytest.raises(error) as err:
                    c.call(method, **params)
                assert message in err.value.message, (method, params, err.value.message)
        assert (scratch_dir(daemon) / "plain.qcow2").read_bytes() == b"keep"
    finally:
        for path in extra_files:
            path.unlink()


def test_failure_midway_rolls_back(make_vm: Callable[..., Vm],
                                   make_daemon: Callable[..., Daemon], workdir: Path) -> None:
    """The second disk's scratch cannot be created (its filesystem is full) after
    the first disk's scratch file, nodes and filter were made: all must go."""
    full = workdir / "full"
    full.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], check=True)
    try:
        with open(full / "filler", "wb") as f:
            try:
                f.write(b"\0" * (2 * MiB))
            except OSError:
                pass  # full: what we wanted
        vm = make_vm()
        daemon = make_daemon(extra_scratch_dirs=[str(full)])
        define(daemon, vm)
        before = graph(vm)
        with daemon.client() as c:
            with pytest.raises(OperationFailed, match="No space left on device"):
                c.call("snapshot.create", domain="vm1", xml=snapshot_xml(
                    "s2", {"sda": None, "sdb": str(full / "b.qcow2")}))
            assert c.call("snapshot.list", domain="vm1") == []
        assert graph(vm) == before
        assert list(scratch_dir(daemon).iterdir()) == []
        assert sorted(os.listdir(full)) == ["filler"]
        assert vm.status() == "running"
        assert "rolled back scratch file" in daemon.log()
    finally:
        unmount(full)


@pytest.mark.parametrize("step", [
    "snapshot:scratch-created", "snapshot:filter-added", "snapshot:switched",
    "snapshot:view-added", "export:server-started", "export:added",
])
def test_failure_at_every_step_rolls_back(make_vm: Callable[..., Vm],
                                          make_daemon: Callable[..., Daemon],
                                          step: str) -> None:
    vm = make_vm()
    daemon = make_daemon()
    daemon.stop()
    daemon.env = {"BLOCKBACKUPD_FAIL_AT": step}
    daemon.start()
    define(daemon, vm)
    before = graph(vm)
    with daemon.client() as c:
        if step.startswith("export:"):
            c.call("snapshot.create", domain="vm1", xml=snapshot_xml("s1"))
            before = graph(vm)
            files = sorted(scratch_dir(daemon).iterdir())
            with pytest.raises(OperationFailed, match=f"injected failure at {step}"):
                c.call("export.start", domain="vm1",
                       xml=export_xml([("sda", "s1"), ("sdb", "s1")]))
            assert c.call("export.list", domain="vm1") == []
            assert c.call("export.server", domain="vm1") is None
            assert sorted(scratch_dir(daemon).iterdir()) == files
        else:
            with pytest.raises(OperationFailed, match=f"injected failure at {step}"):
                c.call("snapshot.create", domain="vm1", xml=snapshot_xml("s1"))
            assert c.call("snapshot.list", domain="vm1") == []
            assert list(scratch_dir(daemon).iterdir()) == []
    assert graph(vm) == before
    assert vm.qmp("query-block-exports") == []
    assert list(run_dir(daemon).iterdir()) == []
    assert vm.status() == "running"


def test_full_scratch_breaks_the_view_not_the_guest(make_vm: Callable[..., Vm],
                                                    make_daemon: Callable[..., Daemon],
                                                    workdir: Path) -> None:
    tiny = workdir / "tiny"
    tiny.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(tiny)], check=True)
    try:
        vm = make_vm(disks={"sda": 64 * MiB})
        daemon = make_daemon(extra_scratch_dirs=[str(tiny)])  # default probe interval: 5 s
        define(daemon, vm)
        vm.write("sda", 0, 32 * MiB, 0x44)  # old data the view must keep
        with daemon.client() as c, daemon.client() as events:
            events.events_subscribe(["vm1"])
            c.call("snapshot.create", domain="vm1",
                   xml=snapshot_xml("s1", {"sda": str(tiny / "sda.qcow2")}))
            c.call("export.start", domain="vm1", xml=export_xml([("sda", "s1")]))
            sock = str(run_dir(daemon) / "vm1.nbd")
            with NbdReader(sock, "sda-s1") as view:
                assert view.read(0, 4096) == b"\x44" * 4096
                start = time.monotonic()
                vm.write("sda", 0, 32 * MiB, 0x77)  # 32 MiB of old data cannot fit in 8 MiB
                assert vm.status() == "running"
                event = events.next_event(timeout=15)
                noticed = time.monotonic() - start
                assert {k: event[k] for k in ("domain", "type", "snapshot", "disk")} == {
                    "domain": "vm1", "type": "snapshot-broken", "snapshot": "s1", "disk": "sda"}
                print(f"break noticed {noticed:.1f} s after the guest write")
                with pytest.raises(nbd.Error):
                    view.read(16 * MiB, 4096)  # a broken view never serves data
            info = c.call("snapshot.lookup", domain="vm1", name="s1")
            assert info["state"] == "broken" and "can no longer be read" in info["reason"]
            xml = c.call("snapshot.get_xml", domain="vm1", name="s1")
            assert "<state>broken</state>" in xml
            with pytest.raises(OperationFailed, match="is broken"):
                c.call("export.start", domain="vm1",
                       xml=export_xml([("sda", "s1", {"exportname": "again"})]))
            # The guest's data is all there.
            assert "Pattern verification failed" not in vm.qemu_io("sda", "read -P 0x77 0 32M")
            c.call("snapshot.delete", domain="vm1", name="s1")
        assert os.listdir(tiny) == []
        assert vm.status() == "running"
    finally:
        unmount(tiny)


def test_daemon_exit_removes_its_snapshots(defined: tuple[Daemon, Vm]) -> None:
    daemon, vm = defined
    before = graph(vm)
    with daemon.client() as c:
        c.call("snapshot.create", domain="vm1", xml=snapshot_xml("s1"))
        c.call("export.start", domain="vm1", xml=export_xml([("sda", "s1")]))
    assert daemon.stop() == 0
    assert graph(vm) == before
    assert vm.qmp("query-block-exports") == []
    assert list(scratch_dir(daemon).iterdir()) == []
    assert list(run_dir(daemon).iterdir()) == []


def test_daemon_stopped_mid_create_rolls_back(make_vm: Callable[..., Vm],
                                              make_daemon: Callable[..., Daemon]) -> None:
    """SIGTERM while snapshot.create holds the disks on their filters: the
    request is cancelled, undoes everything, and the daemon still exits 0."""
    import threading

    vm = make_vm()
    daemon = make_daemon()
    daemon.stop()
    daemon.env = {"BLOCKBACKUPD_PAUSE_AT": "snapshot:switched"}
    daemon.start()
    define(daemon, vm)
    before = graph(vm)
    outcome: list[BaseException] = []

    def create() -> None:
        try:
            with daemon.client() as c:
                c.snapshot_create("vm1", snapshot_xml("s1"))
        except BaseException as err:  # the connection closes under it
            outcome.append(err)

    t = threading.Thread(target=create)
    t.start()
    wait_for(lambda: "pausing at snapshot:switched" in daemon.log(), what="the pause")
    assert graph(vm) != before  # the disks sit on their filters now
    assert daemon.stop() == 0
    t.join(10)
    assert outcome, "the request must not succeed"
    assert graph(vm) == before
    assert list(scratch_dir(daemon).iterdir()) == []
    assert vm.status() == "running"


def test_snapshot_and_its_exports_in_one_request(defined: tuple[Daemon, Vm]) -> None:
    """snapshot.create with ``export`` (libvirt's backup-begin in one call):
    the exports of the new snapshot start with it, a change set included;
    an export that cannot start leaves nothing, the checkpoint included."""
    daemon, vm = defined
    k = 64 * KiB
    with daemon.client() as c:
        c.snapshot_create("vm1", snapshot_xml("cp1"), checkpoint=True)
        c.snapshot_delete("vm1", "cp1")
        vm.write("sda", 3 * k, k, 0x33)
        vm.write("sda", 9 * k, 2 * k, 0x39)
        result = c.call("snapshot.create", domain="vm1", xml=snapshot_xml("s2"),
                        checkpoint=True, export=(
                            '<domainblockexport type="nbd"><disk name="sda" checkpoint="cp1"/>'
                            '<disk name="sdb" snapshot="s2" exportname="b"/>'
                            "</domainblockexport>"))
        assert result["name"] == "s2"
        server = result["export"]["server"]
        assert server == c.call("export.server", domain="vm1")
        assert result["export"]["exports"] == [
            {"disk": "sda", "snapshot": "s2", "checkpoint": "cp1", "name": "sda-s2",
             "bitmap": "qemu:dirty-bitmap:cp1"},
            {"disk": "sdb", "snapshot": "s2", "checkpoint": None, "name": "b", "bitmap": None}]
        assert c.export_list("vm1") == result["export"]["exports"]
        vm.write("sda", 3 * k, k, 0x44)  # after the instant: neither in the view nor the set
        assert dirty_extents(server["socket"], "sda-s2", "qemu:dirty-bitmap:cp1") == [
            [3 * k, k], [9 * k, 2 * k]]
        with NbdReader(server["socket"], "sda-s2") as r:
            assert r.read(3 * k, k) == b"\x33" * k
        c.snapshot_delete("vm1", "s2")
        assert c.export_list("vm1") == [] and c.call("export.server", domain="vm1") is None

        before = (graph(vm), c.call("checkpoint.list", domain="vm1"),
                  sorted(scratch_dir(daemon).iterdir()))
        bad = [
            # Refused before anything is made.
            ('<domainblockexport type="nbd"><disk name="sda" snapshot="other"/>'
             "</domainblockexport>", InvalidArgument, "may only name the snapshot"),
            ('<domainblockexport type="nbd"><disk/></domainblockexport>', InvalidXml, "line 1"),
            # Refused by the exports, once the snapshot exists: rolled back.
            ('<domainblockexport type="nbd"><disk name="sda" checkpoint="nope"/>'
             "</domainblockexport>", NoSuchCheckpoint, "nope"),
            ('<domainblockexport type="nbd"><disk name="sdb"/></domainblockexport>',
             NoSuchDisk, "sdb"),
        ]
        for doc, error, text in bad:
            with pytest.raises(error, match=text):
                c.call("snapshot.create", domain="vm1", xml=snapshot_xml("s3", {"sda": None}),
                       checkpoint=True, export=doc)
            assert c.call("snapshot.list", domain="vm1") == []
            assert (graph(vm), c.call("checkpoint.list", domain="vm1"),
                    sorted(scratch_dir(daemon).iterdir())) == before, doc
            assert c.export_list("vm1") == [] and c.call("export.server", domain="vm1") is None
        # The change set since cp1 is whole after the rolled-back checkpoints.
        assert c.call("checkpoint.changes", domain="vm1", disk="sda", name="cp1")[
            "extents"] == [[3 * k, k], [9 * k, 2 * k]]
        # export.start itself still needs the snapshot named.
        with pytest.raises(InvalidXml, match="names no snapshot"):
            c.export_start("vm1", '<domainblockexport type="nbd"><disk name="sda"/>'
                                  "</domainblockexport>")
