"""Where the tests' cached builds live (the Linux guest, the private QEMU)."""

from __future__ import annotations

import hashlib
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


def sha256_file(path: Path) -> str:
    """A downloaded package's SHA256, to check it against apt's index."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
