"""``blockbackupd [--config PATH] [--show-config]``: the daemon's command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from . import __version__
from .config import DEFAULT_CONFIG_PATH, ConfigError, load_config
from .runtime import StartupError
from .store import StoreError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="blockbackupd",
        description="Pull-mode backup daemon for running QEMU VMs (runs in the foreground).",
    )
    parser.add_argument("--config", type=Path, default=None,
                        help=f"TOML configuration (default {DEFAULT_CONFIG_PATH} if it exists)")
    parser.add_argument("--show-config", action="store_true",
                        help="print the effective configuration and exit")
    parser.add_argument("--version", action="version", version=f"blockbackupd {__version__}")
    args = parser.parse_args(argv)

    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(f"blockbackupd: configuration error: {err}", file=sys.stderr)
        return 2
    if args.show_config:
        sys.stdout.write(config.to_toml())
        return 0

    logging.basicConfig(
        level=config.daemon.log_level.upper(), stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # qemu.qmp logs every QMP message at debug level and every failed connect
    # attempt as an error; the session logs connection trouble once per reason.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
    from .daemon import run  # after logging is set up; keeps --show-config light

    try:
        asyncio.run(run(config))
    except (StartupError, StoreError) as err:
        logging.getLogger("blockbackupd").error("cannot start: %s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
