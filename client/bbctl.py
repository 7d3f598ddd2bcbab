"""``bbctl``: the command line of blockbackupd, shaped like virsh.

``bbctl [--connect URI | --socket PATH] [--json] AREA VERB ...`` covers every RPC method:
``daemon info``, ``domain list|define|undefine|xml``,
``snapshot create|renew|delete|list|info|xml``,
``checkpoint list|info|xml|delete|changes|redefine``,
``export start|stop|list|server`` and ``events``. Human output by default,
``--json`` for scripts; errors go to stderr with the contract's kind and a
non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

from .client import DEFAULT_SOCKET, Client, writable_disks
from .errors import ApplicationError, BackupError, BlockbackupError, ConnectionLost

# Start-up is most of a control command's time (``bbctl domain list``), so
# this module imports only what every command needs: the backup application
# (libnbd, blake3, tqdm, threads), pathlib and subprocess are imported inside
# the commands that use them, and the asyncio client lives in its own module.

# typing is for the type checker only: importing it costs bbctl's every start ~2 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TypeAlias

    #: A command returns what --json prints and what a person reads.
    Result: TypeAlias = tuple[Any, str]
    Command: TypeAlias = Callable[[Any, argparse.Namespace], Result]
    #: Adds a parser's arguments or sub-commands.
    Completer: TypeAlias = Callable[[argparse.ArgumentParser], None]


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in [header, *rows])


def _fields(info: dict[str, Any]) -> str:
    return "\n".join(f"{k}: {json.dumps(v) if isinstance(v, (list, dict)) else v}"
                     for k, v in info.items())


def escape(text: str) -> str:
    """``text`` as XML character data (xml.sax.saxutils.escape, without
    importing it: it imports urllib.request)."""
    return text.replace("&", "&amp;").replace(">", "&gt;").replace("<", "&lt;")


def quoteattr(text: str) -> str:
    """``text`` as a quoted XML attribute value (xml.sax.saxutils.quoteattr)."""
    text = escape(text).replace("\n", "&#10;").replace("\r", "&#13;").replace("\t", "&#9;")
    if '"' not in text:
        return f'"{text}"'
    if "'" not in text:
        return f"'{text}'"
    return '"{}"'.format(text.replace('"', "&quot;"))


def _read_xml(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8") as f:
        return f.read()


# -- daemon and domains ----------------------------------------------------------

def _daemon_info(c: Client, a: argparse.Namespace) -> Result:
    info = c.daemon_info()
    text = _fields({k: v for k, v in info.items() if k != "per_domain"})
    rows = [[d["name"], d["state"], str(d["snapshots"]), str(d["exports"]),
             str(d["checkpoints"]), str(d.get("persistent_bitmaps", "?")),
             _size(d["bitmap_memory"]) if "bitmap_memory" in d else "?",
             "-" if d["last_error"] is None else
             time.strftime("%Y-%m-%d %H:%M:%S ", time.localtime(d["last_error"]["time"]))
             + d["last_error"]["message"]]
            for d in info.get("per_domain", [])]
    if rows:
        text += "\n\n" + _table(rows, ["DOMAIN", "STATE", "SNAPSHOTS", "EXPORTS",
                                        "CHECKPOINTS", "BITMAPS", "BITMAP MEM", "LAST ERROR"])
    for d in info.get("per_domain", []):
        for warning in d.get("warnings", []):
            text += f"\nwarning: {d['name']}: {warning}"
    return info, text


def _size(n: int) -> str:
    """Bytes in the largest binary unit that keeps a number of at least 1."""
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n}B" if unit == "B" else f"{value:.1f}{unit}"


def _domain_list(c: Client, a: argparse.Namespace) -> Result:
    domains = c.domain_list()
    return domains, _table([[d["name"], d["state"], d["qmp_socket"],
                             d.get("guest_agent_socket", "-"),
                             f"images held by storage process {d['storage_process']['pid']}"
                             if "storage_process" in d else ""] for d in domains],
                           ["NAME", "STATE", "QMP SOCKET", "GUEST AGENT", ""])


def _domain_define(c: Client, a: argparse.Namespace) -> Result:
    disks = None
    if a.disk:
        disks = []
        for spec in a.disk:
            name, sep, rest = spec.partition("=")
            if not sep or not name or not rest:
                raise BackupError(f"--disk {spec!r}: expected NAME=FILE[,format=qcow2|raw]")
            file, _, option = rest.partition(",format=")
            disks.append({"name": name, "file": file, **({"format": option} if option else {})})
    result = c.domain_define(a.name, a.qmp_socket, a.guest_agent_socket, disks)
    return result, f"domain {result['name']} defined"


def _domain_undefine(c: Client, a: argparse.Namespace) -> Result:
    return c.domain_undefine(a.name, force=a.force or None), f"domain {a.name} undefined"


def _domain_xml(c: Client, a: argparse.Namespace) -> Result:
    xml = c.domain_get_xml(a.domain)
    return {"xml": xml}, xml.rstrip("\n")


# -- snapshots -------------------------------------------------------------------

def _snapshot_document(a: argparse.Namespace) -> str | None:
    """The XML from --xml, or one built from --name and --disk NAME[=SCRATCH]."""
    if a.xml is not None:
        return _read_xml(a.xml)
    if a.name is None and not a.disk:
        return None
    parts = ["<domainblocksnapshot>"]
    if a.name is not None:
        parts.append(f"<name>{escape(a.name)}</name>")
    for spec in a.disk:
        disk, _, scratch = spec.partition("=")
        source = f"<source file={quoteattr(scratch)}/>" if scratch else ""
        parts.append(f"<disk name={quoteattr(disk)} type='file'>{source}</disk>")
    return "".join(parts + ["</domainblocksnapshot>"])


def _snapshot_create(c: Client, a: argparse.Namespace) -> Result:
    export = None
    if a.export_xml is not None:
        export = _read_xml(a.export_xml)
    elif a.export or a.export_checkpoint:
        # Without --disk, the domain's writable disks now: what the snapshot takes.
        disks = [d.partition("=")[0] for d in a.disk] or \
            list(writable_disks(c.domain_get_xml(a.domain), a.domain))
        extra = (f" checkpoint={quoteattr(a.export_checkpoint)}" if a.export_checkpoint
                 else "")
        export = "<domainblockexport type='nbd'>" + "".join(
            f"<disk name={quoteattr(d)}{extra}/>" for d in disks) + "</domainblockexport>"
        if a.xml is None and not a.disk:
            a.disk = disks  # the snapshot takes exactly the disks exported
    result = c.snapshot_create(a.domain, _snapshot_document(a), checkpoint=a.checkpoint or None,
                               quiesce=a.quiesce or None, export=export, lease=a.lease)
    what = "snapshot and checkpoint" if a.checkpoint else "snapshot"
    text = f"{what} {result['name']} created" + (" (quiesced)" if a.quiesce else "")
    if "export" in result:
        text += (f"\n{_describe_server(result['export']['server'])}\n"
                 f"{_export_rows(result['export']['exports'])}")
    return result, text


def _snapshot_renew(c: Client, a: argparse.Namespace) -> Result:
    result = c.snapshot_renew(a.domain, a.name)
    return result, (f"snapshot {a.name} renewed for {result['lease']:g} s, until "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(result['expires']))}")


def _snapshot_delete(c: Client, a: argparse.Namespace) -> Result:
    return c.snapshot_delete(a.domain, a.name), f"snapshot {a.name} deleted"


def _snapshot_list(c: Client, a: argparse.Namespace) -> Result:
    names = c.snapshot_list(a.domain)
    return names, "\n".join(names)


def _snapshot_info(c: Client, a: argparse.Namespace) -> Result:
    info = c.snapshot_lookup(a.domain, a.name)
    return info, _fields(info)


def _snapshot_xml(c: Client, a: argparse.Namespace) -> Result:
    xml = c.snapshot_get_xml(a.domain, a.name)
    return {"xml": xml}, xml.rstrip("\n")


# -- checkpoints -----------------------------------------------------------------

def _checkpoint_list(c: Client, a: argparse.Namespace) -> Result:
    names = c.call("checkpoint.list", domain=a.domain)
    return names, "\n".join(names)


def _checkpoint_info(c: Client, a: argparse.Namespace) -> Result:
    info = c.call("checkpoint.lookup", domain=a.domain, name=a.name)
    return info, _fields(info)


def _checkpoint_xml(c: Client, a: argparse.Namespace) -> Result:
    xml = c.call("checkpoint.get_xml", domain=a.domain, name=a.name)
    return {"xml": xml}, xml.rstrip("\n")


def _checkpoint_delete(c: Client, a: argparse.Namespace) -> Result:
    return c.call("checkpoint.delete", domain=a.domain, name=a.name), \
        f"checkpoint {a.name} deleted"


def _checkpoint_changes(c: Client, a: argparse.Namespace) -> Result:
    params = {"until": a.until} if a.until else {}
    result = c.call("checkpoint.changes", domain=a.domain, disk=a.disk, name=a.name, **params)
    rows = [[str(off), str(length)] for off, length in result["extents"]]
    return result, _table(rows, ["OFFSET", "LENGTH"]) + f"\n{result['bytes']} bytes changed"


def _checkpoint_redefine(c: Client, a: argparse.Namespace) -> Result:
    result = c.call("checkpoint.redefine", domain=a.domain, xml=_read_xml(a.xml))
    return result, f"checkpoint {result['name']} redefined"


# -- exports ---------------------------------------------------------------------

def _export_document(a: argparse.Namespace) -> str:
    """The XML from --xml, or one built from --snapshot and --disk NAME."""
    if a.xml is not None:
        return _read_xml(a.xml)
    if not a.snapshot or not a.disk:
        raise SystemExit("bbctl: error: give --xml, or --snapshot and at least one --disk")
    extra = f" checkpoint={quoteattr(a.checkpoint)}" if getattr(a, "checkpoint", None) else ""
    disks = "".join(f"<disk name={quoteattr(d)} snapshot={quoteattr(a.snapshot)}{extra}/>"
                    for d in a.disk)
    return f"<domainblockexport type='nbd'>{disks}</domainblockexport>"


def _export_rows(exports: list[dict[str, Any]]) -> str:
    return _table([[e["name"], e["disk"], e["snapshot"], e["checkpoint"] or "-",
                    e["bitmap"] or "-"] for e in exports],
                  ["EXPORT", "DISK", "SNAPSHOT", "CHECKPOINT", "META CONTEXT"])


def _describe_server(server: dict[str, Any] | None) -> str:
    if server is None:
        return "no NBD server"
    if server["transport"] == "unix":
        return f"nbd+unix:///?socket={server['socket']}"
    return f"nbd{'s' if server['tls'] else ''}://{server['host']}:{server['port']}/"


def _export_start(c: Client, a: argparse.Namespace) -> Result:
    result = c.export_start(a.domain, _export_document(a))
    return result, f"{_describe_server(result['server'])}\n{_export_rows(result['exports'])}"


def _export_stop(c: Client, a: argparse.Namespace) -> Result:
    return c.export_stop(a.domain, _export_document(a)), "exports stopped"


def _export_list(c: Client, a: argparse.Namespace) -> Result:
    exports = c.export_list(a.domain)
    return exports, _export_rows(exports)


def _export_server(c: Client, a: argparse.Namespace) -> Result:
    server = c.export_server(a.domain)
    return server, _describe_server(server)


# -- events ----------------------------------------------------------------------

def _events(c: Client, a: argparse.Namespace) -> Result:
    """Print events as they come, until interrupted or --count is reached."""
    c.events_subscribe(a.domain or None)
    print(f"watching events of {', '.join(a.domain) or 'every domain'} (Ctrl-C to stop)",
          file=sys.stderr, flush=True)
    seen = 0
    while a.count is None or seen < a.count:
        event = c.next_event(timeout=None)
        seen += 1
        if a.json:
            print(json.dumps(event), flush=True)
        else:
            rest = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("domain", "type"))
            print(f"{event['domain']} {event['type']} {rest}".rstrip(), flush=True)
    return None, ""


# -- the backup application ---------------------------------------------------------

class _Quiet:
    """The progress bar's stand-in when stderr is no terminal (cron, scripts):
    tqdm's import alone costs about 40 ms of a backup's start-up."""

    def __enter__(self) -> _Quiet:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def write(self, text: str, file: Any = None) -> None:
        print(text, file=file or sys.stderr)

    def update(self, n: int) -> None:
        pass


def _backup(c: Client, a: argparse.Namespace) -> Result:
    from pathlib import Path

    from .backup import backup

    if sys.stderr.isatty():
        from tqdm import tqdm
        bar: Any = tqdm(unit="B", unit_scale=True, desc=f"backup {a.domain}")
    else:
        bar = _Quiet()
    with bar:
        record = backup(c, a.domain, Path(a.dest), a.level, a.disk,
                        say=lambda text: bar.write(f"bbctl: {text}", file=sys.stderr),
                        progress=bar.update, quiesce=a.quiesce, lease=a.lease)
    read = sum(d["bytes_read"] for d in record["disks"].values())
    consistency = "quiesced" if record["quiesced"] else "crash-consistent"
    return record, (f"backup {record['id']} ({record['level']}, {consistency}): "
                    f"{read} bytes read")


def _list(c: Client | None, a: argparse.Namespace) -> Result:
    from pathlib import Path

    from .backup import Manifest, disk_level, record_level, restorable

    manifest = Manifest.load(Path(a.dest), None)
    backups = manifest.backups
    for b in backups:  # manifests before per-disk levels: said by the backing file
        b["restore"] = restorable(Path(a.dest), manifest, b)
        b["disks"] = {d: {"level": disk_level(e), **e} for d, e in b["disks"].items()}
    rows = []
    for b in backups:
        level = record_level(b)
        disks = ",".join(d if level != "mixed" else f"{d}:{e['level']}"
                         for d, e in b["disks"].items())
        rows.append([b["id"], level,
                     time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b["time"])),
                     "yes" if b.get("quiesced") else "no", disks,
                     str(sum(d["bytes_written"] for d in b["disks"].values())),
                     ",".join(b["restore"]) or "-"])
    return backups, _table(rows, ["ID", "LEVEL", "TIME", "QUIESCED", "DISKS", "BYTES",
                                  "RESTORE"])


def _restore(c: Client | None, a: argparse.Namespace) -> Result:
    from pathlib import Path

    from .backup import restore

    if a.instant:
        from .recovery import instant_restore

        if a.format != "qcow2":
            raise BackupError("--instant makes a qcow2 backed by the backup: restore onto raw "
                              "files, block devices and RBD images without it (a copy)")
        with Client(a.socket) as client:
            made = instant_restore(client, Path(a.dest), a.disk, a.at, Path(a.output), a.speed)
        return made, (f"{made['output']} ready in {made['seconds']} s, backed by "
                      f"{made['backing']}: start the VM on it and define it in the daemon; "
                      "the daemon moves the backup into it while the VM runs (under "
                      "libvirt, run `virsh blockpull DOMAIN TARGET`: the daemon follows "
                      f"it); `bbctl recovery wait {made['output']}` waits for the end")
    if a.speed is not None:
        raise BackupError("--speed limits an instant restore's stream (with --instant)")
    restore(Path(a.dest), a.disk, a.at, Path(a.output), a.format)
    return {"output": a.output}, f"restored {a.disk} to {a.output}"


def _recovery_list(c: Client, a: argparse.Namespace) -> Result:
    items = c.call("recovery.list")
    return items, _table([[r["file"], r["state"], _recovery_progress(r),
                           f"{r.get('domain', '-')}/{r.get('disk', '-')}"] for r in items],
                         ["IMAGE", "STATE", "PROGRESS", "DOMAIN/DISK"])


def _recovery_progress(r: dict[str, Any]) -> str:
    p = r.get("progress")
    if not p or not p.get("total"):
        return "-"
    return f"{100 * p['done'] // p['total']}% of {_size(p['total'])}"


def _recovery_info(c: Client, a: argparse.Namespace) -> Result:
    info = c.call("recovery.lookup", file=_absolute(a.file))
    return info, _fields(info)


def _recovery_delete(c: Client, a: argparse.Namespace) -> Result:
    c.call("recovery.delete", file=_absolute(a.file))
    return {}, f"recovery into {a.file} forgotten (the image keeps its backing file)"


def _recovery_wait(c: Client, a: argparse.Namespace) -> Result:
    from pathlib import Path

    from .recovery import wait

    file = _absolute(a.file)
    if sys.stderr.isatty():
        from tqdm import tqdm
        bar: Any = tqdm(unit="B", unit_scale=True, desc=f"recovery {Path(file).name}")
    else:
        bar = _Quiet()

    def progress(done: int, total: int) -> None:
        if total and hasattr(bar, "total"):  # tqdm's
            bar.total = total
            bar.update(max(0, done - bar.n))

    with bar:
        info = wait(c, file, progress)
    return info, f"{file} stands alone: recovered from {info['backing'][0]}"


def _absolute(path: str) -> str:
    return os.path.abspath(path)


def _prune(c: Client | None, a: argparse.Namespace) -> Result:
    from pathlib import Path

    from .prune import prune

    def say(text: str) -> None:
        print(f"bbctl: {text}", file=sys.stderr, flush=True)

    try:  # the daemon knows which backups unfinished instant recoveries read
        with Client(a.socket, timeout=30.0) as client:
            recovering = {r["file"]: r["backing"] for r in client.call("recovery.list")
                          if r["state"] != "done"}
    except (ConnectionLost, OSError, ApplicationError) as err:
        say(f"warning: cannot ask the daemon about instant recoveries ({_message(err)}); "
            "pruning as if none read this directory")
        recovering = {}
    result = prune(Path(a.dest), a.keep, say=say, recovering=recovering)
    if not result["dropped"]:
        return result, f"nothing to prune: {len(result['kept'])} backup(s), --keep {a.keep}"
    return result, (f"pruned {len(result['dropped'])} backup(s), kept {len(result['kept'])}; "
                    f"{result['freed']} bytes freed")


def _verify(c: Client | None, a: argparse.Namespace) -> Result:
    from pathlib import Path

    from .backup import verify

    bad = verify(Path(a.dest), a.at)
    if bad:
        raise BackupError("mismatch: " + ", ".join(bad))
    return {"ok": True}, "all files match the manifest"


class _Status:
    """The mount's progress on a terminal: its step and the seconds so far, on one
    line of stderr rewritten in place (the appliance's start takes seconds)."""

    def __init__(self) -> None:
        self.shown = False

    def __call__(self, step: str, seconds: float) -> None:
        print(f"\r\033[Kbbctl: {step} ({seconds:.0f} s)", end="", file=sys.stderr, flush=True)
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            print("\r\033[K", end="", file=sys.stderr, flush=True)


def _mount(c: Client | None, a: argparse.Namespace) -> Result:
    from pathlib import Path

    from .mount import mount

    status = _Status() if sys.stderr.isatty() else None
    try:
        result = mount(Path(a.dest), a.disk, a.at, Path(a.mountpoint), progress=status,
                       timeout=a.timeout)
    finally:
        if status is not None:
            status.clear()
    rows = [[f["path"], f["source"], f["type"], f["note"] or "-"]
            for f in result["filesystems"]]
    return result, (f"mounted {a.disk} at {result['backup']} read-only on "
                    f"{result['mountpoint']} in {result['seconds']} s (pid {result['pid']}; "
                    f"bbctl umount {result['mountpoint']} ends it)\n"
                    + _table(rows, ["PATH", "SOURCE", "TYPE", "NOTE"]))


def _umount(c: Client | None, a: argparse.Namespace) -> Result:
    from pathlib import Path

    from .mount import umount

    result = umount(Path(a.mountpoint))
    return result, f"unmounted {result['mountpoint']}"


def _enable_tracking(c: Client | None, a: argparse.Namespace) -> Result:
    from pathlib import Path

    from .tracking import enable_tracking

    made = enable_tracking(Path(a.volume), Path(a.output))
    text = (f"made {made['output']}: a qcow2 holding the checkpoints of {made['data_file']}, "
            "which keeps the data (raw)\n\nrun the VM on it instead of the raw volume; in "
            f"libvirt (10.10 or newer):\n\n{made['libvirt']}\n\non a QEMU command line:\n\n  "
            + " \\\n  ".join([*(f"{a} {b}" for a, b in zip(made["qemu"][::2], made["qemu"][1::2],
                                                              strict=True)),
                               "-device virtio-blk-pci,drive=disk0,id=vda"]))
    return made, text


#: Commands that work on files alone, without the daemon.
_OFFLINE = {"list", "restore", "verify", "prune", "disk", "mount", "umount"}


# -- the parser ------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose arguments are added when it is first used.

    ``complete`` adds them (an area's verbs, a command's options) when the
    parser parses or formats its usage or help, so a command builds its own
    parsers only (``bbctl domain list``: the top level's, the domain area's
    and its verbs'): building all of them took longer than the daemon's
    answer to ``domain list``.
    """

    def __init__(self, *args: Any, complete: Completer | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._complete_with = complete

    def _complete(self) -> None:
        if self._complete_with is not None:
            complete, self._complete_with = self._complete_with, None
            complete(self)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        self._complete()
        return super().parse_known_args(args, namespace)

    def format_usage(self) -> str:
        self._complete()
        return super().format_usage()

    def format_help(self) -> str:
        self._complete()
        return super().format_help()


def _verbs(area: argparse.ArgumentParser) -> Any:
    return area.add_subparsers(dest="verb", required=True, metavar="VERB")


def _verb(group: Any, name: str, run: Command, help: str,
          *positional: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = group.add_parser(name, help=help, description=help)
    for arg in positional:
        p.add_argument(arg)
    p.set_defaults(run=run)
    return p


def _disk_area(area: argparse.ArgumentParser) -> None:
    p = _verb(_verbs(area), "enable-tracking", _enable_tracking,
              "make a raw volume able to keep checkpoints across QEMU restarts: a qcow2 "
              "metadata image beside it, whose data file it is (the VM stopped)", "volume")
    p.add_argument("--output", required=True, metavar="META.qcow2",
                   help="the metadata image to make (must not exist)")


def _daemon_area(area: argparse.ArgumentParser) -> None:
    _verb(_verbs(area), "info", _daemon_info, "version and counts")


def _domain_area(area: argparse.ArgumentParser) -> None:
    domain = _verbs(area)
    _verb(domain, "list", _domain_list, "list domains and their state")
    p = _verb(domain, "define", _domain_define, "define a domain by its QMP socket",
              "name", "qmp_socket")
    p.add_argument("--guest-agent-socket", metavar="PATH",
                   help="the host side of its guest agent channel, to quiesce")
    p.add_argument("--disk", action="append", metavar="NAME=FILE[,format=F]",
                   help="an image of a disk, for backups while the domain has not run "
                        "under this daemon yet (it records them itself at every start)")
    p = _verb(domain, "undefine", _domain_undefine, "forget a domain", "name")
    p.add_argument("--force", action="store_true", help="also drop its checkpoint metadata")
    _verb(domain, "xml", _domain_xml, "the live domain document", "domain")


def _snapshot_area(area: argparse.ArgumentParser) -> None:
    snapshot = _verbs(area)
    p = _verb(snapshot, "create", _snapshot_create,
              "take a snapshot of the domain's disks (all writable ones by default)", "domain")
    p.add_argument("--xml", help="a <domainblocksnapshot> document (file, or - for stdin)")
    p.add_argument("--name", help="snapshot name (default: a UUID)")
    p.add_argument("--disk", action="append", default=[], metavar="NAME[=SCRATCH]",
                   help="a disk to include, optionally with its scratch file; repeatable")
    p.add_argument("--checkpoint", action="store_true",
                   help="also create a checkpoint of the same name at the same instant")
    p.add_argument("--quiesce", action="store_true",
                   help="freeze the guest's filesystems through its agent around the instant")
    p.add_argument("--export", action="store_true",
                   help="also export its disks over NBD, in the same request")
    p.add_argument("--export-checkpoint", metavar="CHECKPOINT",
                   help="export, carrying the changes since this checkpoint")
    p.add_argument("--export-xml", metavar="XML",
                   help="export as this <domainblockexport> says (file or -); its disks "
                        "may omit snapshot")
    p.add_argument("--lease", type=int, metavar="SECONDS",
                   help="delete it when this long passes without a 'snapshot renew'")
    _verb(snapshot, "renew", _snapshot_renew, "start a snapshot's lease again",
          "domain", "name")
    _verb(snapshot, "delete", _snapshot_delete, "delete a snapshot and its exports",
          "domain", "name")
    _verb(snapshot, "list", _snapshot_list, "list snapshots, oldest first", "domain")
    _verb(snapshot, "info", _snapshot_info, "state, disks, scratch usage", "domain", "name")
    _verb(snapshot, "xml", _snapshot_xml, "the snapshot document", "domain", "name")


def _checkpoint_area(area: argparse.ArgumentParser) -> None:
    checkpoint = _verbs(area)
    _verb(checkpoint, "list", _checkpoint_list, "list checkpoints, oldest first", "domain")
    _verb(checkpoint, "info", _checkpoint_info, "state, parent, disks", "domain", "name")
    _verb(checkpoint, "xml", _checkpoint_xml, "the checkpoint document", "domain", "name")
    _verb(checkpoint, "delete", _checkpoint_delete,
          "delete a checkpoint (every other change set stays exact)", "domain", "name")
    p = _verb(checkpoint, "changes", _checkpoint_changes,
              "extents changed on a disk since a checkpoint", "domain", "name")
    p.add_argument("--disk", required=True, help="the disk")
    p.add_argument("--until", help="a later checkpoint or a snapshot (default: now)")
    p = _verb(checkpoint, "redefine", _checkpoint_redefine,
              "record a checkpoint whose bitmaps exist in the images", "domain")
    p.add_argument("--xml", required=True, help="a <domaincheckpoint> document (file or -)")


def _export_area(area: argparse.ArgumentParser) -> None:
    export = _verbs(area)
    for name, run, help in (("start", _export_start, "export disks of a snapshot over NBD"),
                            ("stop", _export_stop, "stop exports")):
        p = _verb(export, name, run, help, "domain")
        p.add_argument("--xml", help="a <domainblockexport> document (file or -)")
        p.add_argument("--snapshot", help="the snapshot (instead of --xml)")
        p.add_argument("--disk", action="append", default=[], help="a disk; repeatable")
        if name == "start":
            p.add_argument("--checkpoint", help="also carry the changes since this checkpoint")
    _verb(export, "list", _export_list, "the domain's exports", "domain")
    _verb(export, "server", _export_server, "where the domain's NBD server listens", "domain")


def _backup_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("domain")
    p.add_argument("--dest", required=True, help="the backup directory of this domain")
    p.add_argument("--level", choices=["full", "inc", "auto"], default="auto")
    p.add_argument("--disk", action="append", default=[], help="only this disk; repeatable")
    p.add_argument("--quiesce", nargs="?", const="yes", default="auto",
                   choices=["auto", "yes", "no"],
                   help="freeze the guest's filesystems through its agent around the instant: "
                        "--quiesce (or =yes) fails the backup if that cannot be done; auto "
                        "(the default) quiesces when the domain has a guest agent and falls "
                        "back to crash-consistent with a warning; no never does")
    p.add_argument("--lease", type=_lease, default=60, metavar="SECONDS",
                   help="the VM's host deletes the backup's snapshot when this long passes "
                        "without word from this bbctl (renewed every quarter of it), and "
                        "the backup fails when its connections are silent this long "
                        "(default: 60)")
    p.set_defaults(run=_backup)


def _lease(text: str) -> int:
    seconds = int(text)
    if not 1 <= seconds <= 86_400:
        raise argparse.ArgumentTypeError("a lease is 1 to 86400 seconds")
    return seconds


def _list_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("dest")
    p.set_defaults(run=_list)


def _recovery_area(area: argparse.ArgumentParser) -> None:
    recovery = _verbs(area)
    _verb(recovery, "list", _recovery_list, "instant recoveries and how far each is")
    _verb(recovery, "info", _recovery_info, "one recovery", "file")
    _verb(recovery, "wait", _recovery_wait, "wait until the image stands alone", "file")
    _verb(recovery, "delete", _recovery_delete,
          "forget a recovery (a running move is cancelled)", "file")


def _restore_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("dest")
    p.add_argument("--disk", required=True)
    p.add_argument("--at", help="backup id (default: the latest)")
    p.add_argument("--output", required=True)
    p.add_argument("--format", choices=["qcow2", "raw"], default="qcow2")
    p.add_argument("--instant", action="store_true",
                   help="make OUTPUT a qcow2 backed by the backup at once; a VM started on "
                        "it runs while the daemon moves the backup into it")
    p.add_argument("--speed", type=int, metavar="BYTES",
                   help="with --instant: the most bytes per second the move may read")
    p.set_defaults(run=_restore)


def _mount_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("dest")
    p.add_argument("--disk", required=True)
    p.add_argument("--at", help="backup id (default: the latest)")
    p.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                   help="give up if the filesystems are not mounted by then (default 600)")
    p.add_argument("mountpoint", help="an empty directory")
    p.set_defaults(run=_mount)


def _umount_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("mountpoint")
    p.set_defaults(run=_umount)


def _prune_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("dest")
    p.add_argument("--keep", type=int, required=True, metavar="N",
                   help="how many restore points to keep (at least 1)")
    p.set_defaults(run=_prune)


def _verify_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("dest")
    p.add_argument("--at", help="backup id (default: all)")
    p.set_defaults(run=_verify)


def _events_command(p: argparse.ArgumentParser) -> None:
    p.add_argument("--domain", action="append", default=[], help="only this domain; repeatable")
    p.add_argument("--count", type=int, help="stop after this many events")
    p.set_defaults(run=_events)


_PRUNE = "keep the N newest backups of a directory, merging the older ones into a synthetic full"

#: The top level's areas and commands: name, help, description, what completes the parser.
_AREAS: list[tuple[str, str, str | None, Completer]] = [
    ("daemon", "the daemon itself", None, _daemon_area),
    ("domain", "defined domains", None, _domain_area),
    ("snapshot", "point-in-time views of disks", None, _snapshot_area),
    ("checkpoint", "change tracking between points in time", None, _checkpoint_area),
    ("export", "NBD exports of snapshots", None, _export_area),
    ("disk", "a raw volume's persistent change tracking (offline)", None, _disk_area),
    ("backup", "back up a domain's disks into a directory",
     "take a snapshot with a checkpoint, pull it over NBD into qcow2 files (incrementals "
     "chained by backing file)", _backup_command),
    ("list", "the backups in a directory", "one line per backup, oldest first", _list_command),
    ("restore", "rebuild a disk as it was at a backup",
     "rebuild a disk as it was at a backup (default latest)", _restore_command),
    ("mount", "mount the filesystems of a backup point read-only",
     "mount every partition and LVM volume of a disk at a backup (default latest), "
     "read-only, each in a directory under MOUNTPOINT; libguestfs's appliance reads "
     "them, never the host's kernel", _mount_command),
    ("umount", "end a bbctl mount", "unmount a bbctl mount and stop its appliance",
     _umount_command),
    ("prune", _PRUNE, _PRUNE, _prune_command),
    ("verify", "check every file against the manifest",
     "re-read every backup file (up to --at) and compare it with the manifest's checksum",
     _verify_command),
    ("recovery", "instant recoveries the daemon is moving into their images", None,
     _recovery_area),
    ("events", "print events as they happen",
     "print events as they happen (Ctrl-C to stop)", _events_command),
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bbctl", description="Control blockbackupd.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("-c", "--connect", dest="socket", metavar="URI",
                       default=os.environ.get("BLOCKBACKUPD_CONNECT") or DEFAULT_SOCKET,
                       help="the daemon to control: a socket path, unix:///path, "
                            "ssh://[user@]host[:port][/socket][?keyfile=..&known_hosts=.."
                            "&no_verify=1&no_tty=1&helper=..] or tls://host:port[?pki=DIR] "
                            "(default $BLOCKBACKUPD_CONNECT, else the local socket)")
    where.add_argument("--socket", dest="socket", metavar="PATH",
                       help=f"the local daemon socket (default {DEFAULT_SOCKET}, "
                            "or $BLOCKBACKUPD_SOCKET)")
    parser.add_argument("--json", action="store_true", help="print JSON for scripts")
    areas = parser.add_subparsers(dest="area", required=True, metavar="AREA")
    for name, help, description, complete in _AREAS:
        areas.add_parser(name, help=help, description=description, complete=complete)
    return parser


def _message(err: BaseException) -> str:
    """One line saying what failed, for ``bbctl: error: ...``."""
    import subprocess  # only the backup commands run programs; not imported at start-up

    if isinstance(err, subprocess.CalledProcessError):
        detail = err.stderr.decode(errors="replace").strip() if err.stderr else ""
        text = f"{' '.join(map(str, err.cmd[:2]))} failed: {detail or f'exit {err.returncode}'}"
    elif isinstance(err, ApplicationError):
        text = f"{err.message} [{err.kind}]"
    elif isinstance(err, TimeoutError):
        text = f"the daemon did not answer in time ({err})"
    elif isinstance(err, ConnectionLost):
        local = "://" not in str(err) or "unix://" in str(err)
        text = (f"{err} (is blockbackupd running?)" if local else str(err)) \
            if "cannot connect" in str(err) else f"lost the daemon: {err}"
    elif isinstance(err, (BackupError, BlockbackupError, OSError)):
        text = str(err)
    else:  # a bug or a library's own error: still one line, never a traceback
        text = f"unexpected {type(err).__name__}: {err}"
    notes = getattr(err, "__notes__", None)
    if notes:
        text += "; " + "; ".join(notes)
    return " ".join(text.split())


def _fail(err: BaseException) -> int:
    try:
        print(f"bbctl: error: {_message(err)}", file=sys.stderr, flush=True)
    except Exception:  # even stderr is gone: the status still says it
        pass
    return 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.area in _OFFLINE:
            data, text = args.run(None, args)
        else:
            # A backup's connection counts as cut after its lease's length of silence.
            with Client(args.socket, timeout=None if args.area == "events" else 300.0,
                        silence=getattr(args, "lease", None)) as client:
                data, text = args.run(client, args)
    except KeyboardInterrupt:
        return 130
    except Exception as err:  # every failure, expected or not: one line
        return _fail(err)
    if args.area == "events":
        return 0
    try:
        print(json.dumps(data, indent=2) if args.json else text, flush=True)
    except BrokenPipeError:
        # The reader of our output went away (``bbctl list | head``): keep
        # the interpreter's last flush from complaining about it.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as err:
        return _fail(err)
    return 0


if __name__ == "__main__":
    sys.exit(main())
