"""What a daemon that died left in QEMU and on disk, removed at the next connect.

A daemon killed at any moment leaves its nodes (views, probes, filters,
scratch nodes), its non-persistent bitmaps, its objects (secrets), its
scratch files and perhaps the guest's vCPUs stopped for an instant it did
not finish. Everything it makes carries the daemon's prefix, and every
scratch file and held-I/O window is recorded in the store before it exists,
so the next connect finds all of it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from ..names import PREFIX, parse_checkpoint_bitmap
from ..qemu.blockops import Bitmaps, BlockOps
from ..qemu.graph import read_graph, relink
from ..store.db import Store
from . import scratch
from .domains import Domain
from .snapshot_types import HELD_IO_RECORD, SCRATCH_RECORD

log = logging.getLogger("blockbackupd.snapshots")


async def clean(domain: Domain, store: Store,
                remove_scratch: Callable[[str, list[str]], list[str]]) -> None:
    """Remove what a daemon that died left in this QEMU: snapshot filters
    (the disk's I/O path restored), their nodes, scratch files and
    non-persistent bitmaps, all named with our prefix, and the scratch
    files the store says were made, even those no node used yet.
    (The export service removed its exports just before.)"""
    session = domain.session
    ops = BlockOps(session)
    graph = await read_graph(session)
    ours = [n for n in graph.nodes if n.startswith(PREFIX)]
    files = [graph.image(n).file for n in ours if n.endswith("-scratch")]
    # Views, probes and sinks first: while a view reads through a filter,
    # the filter will not share write access with the device below it.
    for node in ours:
        if not node.endswith(("-filter", "-scratch")):
            await ops.delete_node(node)
    for node_name, named in (await Bitmaps(session).on_nodes()).items():
        for b in named.values():  # tails and other non-persistent bitmaps of ours
            # (not the checkpoints of raw disks: theirs live in QEMU's memory)
            if b["name"].startswith(PREFIX) and not b.get("persistent") \
                    and parse_checkpoint_bitmap(b["name"]) is None:
                await Bitmaps(session).remove(node_name, b["name"])
    # Filters, newest first (one on another cannot go before it), each
    # taken out of whatever surrounds it now.
    while True:
        graph = await read_graph(session)
        filters = [n for n, info in graph.nodes.items()
                   if n.startswith(PREFIX) and info["drv"] == "copy-before-write"]
        free = [f for f in filters if not any(u.node in filters
                                              for u in graph.parents(f))]
        if not free:
            break
        node = free[0]
        child = graph.child(node, "file")
        if child is not None and await relink(session, graph, node, child):
            log.warning("domain %s: restored an I/O path an earlier daemon left through "
                        "%s", domain.name, node)
        await ops.delete_node(node)
    remaining = await ops.node_names()
    for node in ours:
        if node.endswith("-scratch") and node in remaining:
            await ops.delete_node(node)
    files = remove_scratch(domain.name, files)
    records = store.intents(domain.name)
    for obj in await session.execute("qom-list", {"path": "/objects"}):
        if obj["name"].startswith(PREFIX):
            await ops.delete_object(obj["name"])
    if ours or files:
        log.warning("domain %s: removed %d node(s) and %d scratch file(s) left by an "
                    "earlier daemon", domain.name, len(ours), len(files))
    for record in records:
        if record.kind == HELD_IO_RECORD:
            # Last: the I/O paths are whole again before the guest runs.
            if await ops.run_status() == "paused":
                await ops.cont()
                log.warning("domain %s: resumed the guest a cut-short snapshot %s had "
                            "stopped", domain.name, record.payload.get("snapshot"))
            store.drop_intent(record.id)


def remove_scratch_files(store: Store, domain: str, files: list[str], live: set[int | None],
                         scratch_dirs: list[Path]) -> list[str]:
    """Remove ``files`` and the scratch files the store records for the
    domain that no live snapshot uses (an earlier daemon's, even those no
    node used yet), each only inside a scratch directory, and drop those
    records. Returns every file named."""
    stale = [r for r in store.intents(domain)
             if r.kind == SCRATCH_RECORD and r.id not in live]
    files = files + [r.payload["file"] for r in stale
                     if r.payload["file"] not in files and os.path.lexists(r.payload["file"])]
    for f in files:
        path = Path(f)
        if any(path.parent.resolve().is_relative_to(d.resolve())
               for d in scratch_dirs):
            scratch.remove(path)
    for record in stale:
        store.drop_intent(record.id)
    return files
