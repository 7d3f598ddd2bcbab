"""The VM manager's side of the tests: what libvirt or qemu-server does to a
running VM's disks, done over the test's own QMP monitor with QEMU's real
commands, and the checks that follow every such operation."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

from tests.conftest import bbctl
from tests.test_checkpoints import K, runs  # noqa: F401 - runs: for the tests here too
from tools.daemon import Daemon
from tools.vm import Vm


def write(vm: Vm, disk: str, *clusters: int) -> None:
    """Guest writes of whole clusters (each pattern tells them apart)."""
    for c in clusters:
        vm.write(disk, c * K, K, 0x30 + c % 128)


def root_node(vm: Vm, disk: str) -> str:
    """The node at the top of the device's I/O path, as query-block says."""
    return vm.top_nodes()[disk]


def image_node(vm: Vm, disk: str) -> str:
    """The disk's top image node below any filter (what libvirt keeps track of)."""
    node = root_node(vm, disk)
    nodes = {n["node-name"]: n for n in vm.qmp("query-named-block-nodes", flat=True)}
    graph = vm.qmp("x-debug-query-block-graph")
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    files = {names[e["parent"]]: names[e["child"]] for e in graph["edges"] if e["name"] == "file"}
    while nodes[node]["drv"] in ("copy-before-write", "throttle"):
        node = files[node]
    return node


def recording_bitmaps(vm: Vm, node: str) -> list[str]:
    return [b["name"] for n in vm.qmp("query-named-block-nodes", flat=True)
            if n["node-name"] == node for b in n.get("dirty-bitmaps", [])
            if "name" in b and b["recording"] and b.get("persistent")]


def overlay(vm: Vm, disk: str, name: str, *, copy_bitmaps: bool, on: str | None = None) -> Path:
    """An external snapshot: a new qcow2 on top of ``on`` (default: the disk's
    top image), in one transaction with, when ``copy_bitmaps``, an empty
    recording bitmap for each recording bitmap of that image (what libvirt does).
    The file names its backing, so qemu-img reads the whole chain."""
    node = on or image_node(vm, disk)
    info = next(n for n in vm.qmp("query-named-block-nodes", flat=True)
                if n["node-name"] == node)
    below = info["image"]["filename"] if info["drv"] == "qcow2" else \
        vm.image(disk).as_posix()
    path = vm.workdir / f"{vm.name}-{disk}-{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", below, "-F", "qcow2",
                    str(path)], check=True)
    vm.qmp("blockdev-add", driver="file", filename=str(path), **{"node-name": f"{name}-file"})
    vm.qmp("blockdev-add", driver="qcow2", file=f"{name}-file", backing=None,
           **{"node-name": name})
    actions: list[dict[str, Any]] = [
        {"type": "blockdev-snapshot", "data": {"node": node, "overlay": name}}]
    if copy_bitmaps:
        actions += [{"type": "block-dirty-bitmap-add",
                     "data": {"node": name, "name": b, "persistent": True}}
                    for b in recording_bitmaps(vm, image_node(vm, disk))]
    vm.qmp("transaction", actions=actions)
    return path


def wait_job(vm: Vm, job: str, *, ready: bool, timeout: float = 60.0) -> None:
    """Until the job is ready (mirror, active commit) or gone (finished)."""
    deadline = time.monotonic() + timeout
    while True:
        jobs = {j["device"]: j for j in vm.qmp("query-block-jobs")}
        if ready and jobs.get(job, {}).get("ready"):
            return
        if not ready and job not in jobs:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"block job {job}: {jobs.get(job)}")
        time.sleep(0.05)


def active_commit(vm: Vm, disk: str) -> None:
    """Commit the disk's top image into its backing image and pivot back.

    Addressed at the device's root node, as query-block names it: QEMU
    refuses a job on a node that has a parent ("Need a root block node"),
    and under a live snapshot the image has one, our filter."""
    top = image_node(vm, disk)
    graph = vm.qmp("x-debug-query-block-graph")
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    base = next(names[e["child"]] for e in graph["edges"]
                if names[e["parent"]] == top and e["name"] == "backing")
    # One image at a time (QEMU's default base is the bottom of the chain).
    vm.qmp("block-commit", **{"job-id": "commit", "device": root_node(vm, disk),
                              "base-node": base})
    wait_job(vm, "commit", ready=True)
    vm.qmp("job-complete", id="commit")
    wait_job(vm, "commit", ready=False)
    # Like libvirt, the manager then deletes the nodes it added for the overlay.
    vm.qmp("blockdev-del", **{"node-name": top})
    vm.qmp("blockdev-del", **{"node-name": f"{top}-file"})


def stream(vm: Vm, disk: str, speed: int = 0) -> list[str]:
    """Pull the images between the top and the disk's bottom image into the
    top (block-stream with a base node, at ``speed`` bytes/s, 0: as fast as it
    goes); the manager then deletes the nodes of the images that left the
    chain. Returns those nodes."""
    top = image_node(vm, disk)
    graph = vm.qmp("x-debug-query-block-graph")
    names = {n["id"]: n["name"] for n in graph["nodes"]}
    backing = {names[e["parent"]]: names[e["child"]] for e in graph["edges"]
               if e["name"] == "backing"}
    chain = [top]
    while chain[-1] in backing:
        chain.append(backing[chain[-1]])
    vm.qmp("block-stream", **{"job-id": "stream", "device": top, "base-node": chain[-1],
                              **({"speed": speed} if speed else {})})
    wait_job(vm, "stream", ready=False)
    for node in chain[1:-1]:
        vm.qmp("blockdev-del", **{"node-name": node})
        vm.qmp("blockdev-del", **{"node-name": f"{node}-file"})
    return chain[1:-1]


def mirror(vm: Vm, disk: str, name: str) -> Path:
    """Copy the disk to a new image and pivot the device onto it."""
    size = vm.disks[disk]
    path = vm.workdir / f"{vm.name}-{disk}-{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                   check=True)
    vm.qmp("blockdev-add", driver="file", filename=str(path), **{"node-name": f"{name}-file"})
    vm.qmp("blockdev-add", driver="qcow2", file=f"{name}-file", **{"node-name": name})
    vm.qmp("blockdev-mirror", **{"job-id": "mirror", "device": root_node(vm, disk),
                                 "target": name, "sync": "full"})
    wait_job(vm, "mirror", ready=True)
    vm.qmp("job-complete", id="mirror")
    wait_job(vm, "mirror", ready=False)
    return path


def top_file(vm: Vm, disk: str) -> str:
    node = image_node(vm, disk)
    return str(next(n for n in vm.qmp("query-named-block-nodes", flat=True)
                    if n["node-name"] == node)["image"]["filename"])


def backup(daemon: Daemon, dest: Path, *args: str) -> dict[str, Any]:
    r = bbctl(daemon, "--json", "backup", "vm1", "--dest", str(dest), *args)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    record: dict[str, Any] = json.loads(r.stdout)
    record["stderr"] = r.stderr
    return record


def disk_level(record: dict[str, Any], disk: str) -> str:
    return str(record["disks"][disk]["level"])


def assert_restore_equals_live(daemon: Daemon, vm: Vm, dest: Path, disk: str,
                               at: str | None = None) -> None:
    """The disk restored from the backups equals the live disk, flattened
    (the guest is stopped for the comparison so QEMU's caches are on disk)."""
    running = vm.status() == "running"
    if running:
        vm.qmp("stop")
    try:
        assert_restore_equals(daemon, dest, disk, top_file(vm, disk), at)
    finally:
        if running:
            vm.qmp("cont")


def assert_restore_equals(daemon: Daemon, dest: Path, disk: str, image: str,
                          at: str | None = None) -> None:
    """``bbctl restore`` of the disk equals ``image`` read with its backing chain
    (whoever runs the guest holds it still meanwhile)."""
    out = dest.parent / f"restored-{disk}.raw"
    out.unlink(missing_ok=True)
    r = bbctl(daemon, "restore", str(dest), "--disk", disk, "--output", str(out),
              "--format", "raw", *(["--at", at] if at else []))
    assert r.returncode == 0, r.stderr
    cmp = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", str(out), image],
                         capture_output=True, text=True)
    out.unlink()
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


def our_nodes(vm: Vm) -> set[str]:
    return {n for n in vm.node_names() if n.startswith("bb-")}
