"""``bbctl``: the command line of blockbackupd (virsh-like: ``bbctl domain list``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .client import DEFAULT_SOCKET, Client
from .errors import ApplicationError, BlockbackupError


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *rows])


def _domain_list(c: Client, a: argparse.Namespace) -> Any:
    domains = c.domain_list()
    if a.json:
        return domains
    return _table([[d["name"], d["state"], d["qmp_socket"]] for d in domains],
                  ["NAME", "STATE", "QMP SOCKET"])


def _domain_define(c: Client, a: argparse.Namespace) -> Any:
    result = c.domain_define(a.name, a.qmp_socket)
    return result if a.json else f"domain {result['name']} defined"


def _domain_undefine(c: Client, a: argparse.Namespace) -> Any:
    c.domain_undefine(a.name, force=a.force or None)
    return {} if a.json else f"domain {a.name} undefined"


def _domain_xml(c: Client, a: argparse.Namespace) -> Any:
    xml = c.domain_get_xml(a.domain)
    return {"xml": xml} if a.json else xml.rstrip("\n")


def _daemon_info(c: Client, a: argparse.Namespace) -> Any:
    info = c.daemon_info()
    if a.json:
        return info
    return "\n".join(f"{k}: {v}" for k, v in info.items())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bbctl", description="Control blockbackupd.")
    parser.add_argument("--socket", default=DEFAULT_SOCKET,
                        help=f"daemon socket (default {DEFAULT_SOCKET}, "
                             "or $BLOCKBACKUPD_SOCKET)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    areas = parser.add_subparsers(dest="area", required=True, metavar="AREA")

    daemon = areas.add_parser("daemon", help="the daemon itself").add_subparsers(
        dest="verb", required=True, metavar="VERB")
    daemon.add_parser("info", help="version and counts").set_defaults(run=_daemon_info)

    domain = areas.add_parser("domain", help="defined domains").add_subparsers(
        dest="verb", required=True, metavar="VERB")
    domain.add_parser("list", help="list domains and their state").set_defaults(run=_domain_list)
    p = domain.add_parser("define", help="define a domain by its QMP socket")
    p.add_argument("name")
    p.add_argument("qmp_socket")
    p.set_defaults(run=_domain_define)
    p = domain.add_parser("undefine", help="forget a domain")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="also drop its checkpoint metadata")
    p.set_defaults(run=_domain_undefine)
    p = domain.add_parser("xml", help="the live domain document")
    p.add_argument("domain")
    p.set_defaults(run=_domain_xml)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with Client(args.socket) as client:
            out = args.run(client, args)
    except ApplicationError as err:
        print(f"bbctl: error: {err.message} [{err.kind}]", file=sys.stderr)
        return 1
    except BlockbackupError as err:
        print(f"bbctl: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2) if args.json else out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
