"""``make bench``: every benchmark in one run, then one table.

Columns: figure, ours, peer, ours/peer, target. Times are medians of
repeated runs in seconds unless the unit says otherwise; peers run in the
same process on the same machine, one after the other.
"""

from __future__ import annotations

import sys
import time

from bench import control, full_pull, incremental, memory
from bench.common import Row


def table(rows: list[Row]) -> str:
    lines = ["| figure | ours | peer | ours/peer | target |", "|---|--:|--:|--:|---|"]
    for r in rows:
        unit = "" if r.unit == "x" else f" {r.unit}"
        ours = f"{r.ours:.3f}{unit}" if r.unit in ("s", "x") else f"{r.ours:.1f}{unit}"
        peer = "" if r.peer is None else (
            f"{r.peer:.3f}{unit}" if r.unit == "s" else f"{r.peer:.1f}{unit}")
        if r.peer_name:
            peer += f" ({r.peer_name})"
        ratio = "" if r.ratio is None else f"{r.ratio:.2f}"
        if r.ratios:
            ratio += f" ({min(r.ratios):.2f}-{max(r.ratios):.2f})"
        lines.append(f"| {r.figure} | {ours} | {peer} | {ratio} | {r.target} |")
    return "\n".join(lines)


def main() -> int:
    start = time.monotonic()
    rows: list[Row] = []
    for name, run in (("full pull", full_pull.run), ("incremental and sparse", incremental.run),
                      ("control path and restart", control.run), ("memory", memory.run)):
        print(f"== {name}", flush=True)
        rows += run()
    print(f"\nmake bench: {time.monotonic() - start:.0f} s on this machine\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
