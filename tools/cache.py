"""Where the tests' cached builds live (the Linux guest, the private QEMU)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(env: str, default: Path) -> Path:
    """``$env``, else ``default`` (or, for a user who cannot write there,
    ``$XDG_CACHE_HOME/<default's name>``)."""
    chosen = os.environ.get(env)
    if chosen:
        return Path(chosen)
    if os.geteuid() == 0 or os.access(default if default.exists() else default.parent, os.W_OK):
        return default
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / default.name
