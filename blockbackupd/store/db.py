"""SQLite store in ``state_dir``: WAL journal, one transaction per state change.

The schema is versioned with ``PRAGMA user_version``; :data:`MIGRATIONS` holds
one script per version, applied in order inside a transaction at open, so a
store written by any older release opens in a newer one. A store newer than
this release is refused rather than guessed at.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import OperationFailed

log = logging.getLogger("blockbackupd.store")

DB_NAME = "blockbackupd.db"

#: MIGRATIONS[i] brings a store from version i to version i + 1.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE domain (
        name        TEXT PRIMARY KEY,
        qmp_socket  TEXT NOT NULL UNIQUE,
        origin      TEXT NOT NULL CHECK (origin IN ('config', 'rpc')),
        defined_at  REAL NOT NULL
    );
    """,
    # 2: checkpoints, the bitmap each keeps per disk, and intent records that
    # let a restart finish or forget a multi-step change cut short.
    """
    CREATE TABLE checkpoint (
        domain   TEXT NOT NULL,
        name     TEXT NOT NULL,
        seq      INTEGER NOT NULL,
        created  REAL NOT NULL,
        PRIMARY KEY (domain, name)
    );
    CREATE TABLE checkpoint_disk (
        domain       TEXT NOT NULL,
        checkpoint   TEXT NOT NULL,
        disk         TEXT NOT NULL,
        bitmap       TEXT NOT NULL,
        image        TEXT NOT NULL,
        granularity  INTEGER NOT NULL,
        broken       TEXT,
        PRIMARY KEY (domain, checkpoint, disk),
        FOREIGN KEY (domain, checkpoint) REFERENCES checkpoint (domain, name) ON DELETE CASCADE
    );
    CREATE TABLE intent (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        domain   TEXT NOT NULL,
        kind     TEXT NOT NULL,
        payload  TEXT NOT NULL,
        created  REAL NOT NULL
    );
    """,
    # 3: the images of the disk's chain that held each segment's bitmap when
    # last checked (JSON list, top first), so an image that leaves the chain
    # with part of a change set is noticed.
    """
    ALTER TABLE checkpoint_disk ADD COLUMN span TEXT;
    """,
    # 4: the host side of the domain's guest agent channel (NULL: none), for quiesce.
    """
    ALTER TABLE domain ADD COLUMN guest_agent_socket TEXT;
    """,
    # 5: the images of each disk as the domain's QEMU last had them open (JSON:
    # disk -> {size, chain: [{file, format}, ...] top first}), so that a
    # stopped domain's disks can still be backed up.
    """
    ALTER TABLE domain ADD COLUMN images TEXT;
    """,
    # 6: instant recoveries: an image whose backing chain is a backup point,
    # whose data the daemon moves into it in the QEMU that runs it.
    """
    CREATE TABLE recovery (
        file     TEXT PRIMARY KEY,
        payload  TEXT NOT NULL,
        created  REAL NOT NULL
    );
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(OperationFailed):
    """The store cannot be opened, read or written, or is from a newer release."""


@dataclass(frozen=True)
class CheckpointDiskRecord:
    disk: str
    bitmap: str
    image: str
    granularity: int
    broken: str | None = None
    #: The image files that held the bitmap when last checked, top first
    #: (empty: not checked yet).
    span: tuple[str, ...] = ()


@dataclass(frozen=True)
class CheckpointRecord:
    domain: str
    name: str
    seq: int
    created: float
    disks: tuple[CheckpointDiskRecord, ...]

    @property
    def broken(self) -> str | None:
        """Why the checkpoint cannot be trusted (its first broken disk), or None."""
        for d in self.disks:
            if d.broken is not None:
                return f"disk {d.disk}: {d.broken}"
        return None

    @property
    def state(self) -> str:
        """``valid`` or ``broken``, as the contract names them."""
        return "broken" if self.broken else "valid"

    def disk(self, name: str) -> CheckpointDiskRecord | None:
        return next((d for d in self.disks if d.disk == name), None)


@dataclass(frozen=True)
class IntentRecord:
    id: int
    domain: str
    kind: str
    payload: dict[str, Any]


@dataclass(frozen=True)
class DomainRecord:
    name: str
    qmp_socket: str
    origin: str
    defined_at: float
    guest_agent_socket: str | None = None
    #: disk -> {"size": bytes, "chain": [{"file", "format"}, ...] top first}:
    #: the images its QEMU last had open (or the definition named).
    images: dict[str, Any] = field(default_factory=dict)


class Store:
    """Access to the daemon's SQLite database. Not shared between processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE).
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        try:
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = FULL")
            self._db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except BaseException:
            self._db.close()
            raise

    @classmethod
    def open(cls, state_dir: Path) -> Store:
        """Open (creating if needed) the store in state_dir.

        :raise StoreError: when the database is unreadable or newer than this release.
        """
        try:
            return cls(state_dir / DB_NAME)
        except sqlite3.Error as err:
            raise StoreError(f"{state_dir / DB_NAME}: {err}") from err

    def close(self) -> None:
        self._db.close()

    @property
    def version(self) -> int:
        return int(self._db.execute("PRAGMA user_version").fetchone()[0])

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One transaction; sqlite errors become :class:`StoreError`."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        except sqlite3.Error as err:
            raise StoreError(f"store {self.path}: {err}") from err

    def _migrate(self) -> None:
        current = self.version
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {current} is newer than this release "
                f"understands ({SCHEMA_VERSION})"
            )
        for version in range(current, SCHEMA_VERSION):
            # One script per step, committed together with its version number.
            script = (f"BEGIN IMMEDIATE;\n{MIGRATIONS[version]}\n"
                      f"PRAGMA user_version = {version + 1};\nCOMMIT;")
            try:
                self._db.executescript(script)
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            log.info("store %s: migrated schema to version %d", self.path, version + 1)

    # -- domains ------------------------------------------------------------

    def domains(self) -> list[DomainRecord]:
        with self.transaction() as db:
            rows = db.execute(
                "SELECT name, qmp_socket, origin, defined_at, guest_agent_socket, images "
                "FROM domain ORDER BY name"
            ).fetchall()
        return [DomainRecord(**{**dict(r), "images": json.loads(r["images"] or "{}")})
                for r in rows]

    def put_domain(self, name: str, qmp_socket: str, origin: str,
                   guest_agent_socket: str | None = None) -> DomainRecord:
        """Insert or replace the domain's row."""
        with self.transaction() as db:
            # The images the daemon saw stay with the name (a new socket for
            # the same VM is still the same VM's disks).
            old = db.execute("SELECT images FROM domain WHERE name = ?", (name,)).fetchone()
            images = old["images"] if old is not None else None
            record = DomainRecord(name, qmp_socket, origin, time.time(), guest_agent_socket,
                                  json.loads(images or "{}"))
            db.execute("DELETE FROM domain WHERE name = ? OR qmp_socket = ?", (name, qmp_socket))
            db.execute(
                "INSERT INTO domain (name, qmp_socket, origin, defined_at, guest_agent_socket, "
                "images) VALUES (?, ?, ?, ?, ?, ?)",
                (record.name, record.qmp_socket, record.origin, record.defined_at,
                 record.guest_agent_socket, images),
            )
        return record

    def set_images(self, name: str, images: dict[str, Any]) -> None:
        """Record the images of the domain's disks (see migration 5)."""
        with self.transaction() as db:
            db.execute("UPDATE domain SET images = ? WHERE name = ?",
                       (json.dumps(images, sort_keys=True), name))

    def delete_domain(self, name: str) -> None:
        """Forget a domain and its checkpoint metadata (bitmaps in images stay)."""
        with self.transaction() as db:
            db.execute("DELETE FROM checkpoint WHERE domain = ?", (name,))
            db.execute("DELETE FROM intent WHERE domain = ?", (name,))
            db.execute("DELETE FROM domain WHERE name = ?", (name,))

    # -- checkpoints -----------------------------------------------------------

    def checkpoints(self, domain: str) -> list[CheckpointRecord]:
        """The domain's checkpoints, oldest first."""
        with self.transaction() as db:
            rows = db.execute("SELECT name, seq, created FROM checkpoint WHERE domain = ? "
                              "ORDER BY seq", (domain,)).fetchall()
            disks = db.execute("SELECT checkpoint, disk, bitmap, image, granularity, broken, "
                               "span FROM checkpoint_disk WHERE domain = ? ORDER BY disk",
                               (domain,)).fetchall()
        by_cp: dict[str, list[CheckpointDiskRecord]] = {}
        for d in disks:
            by_cp.setdefault(d["checkpoint"], []).append(CheckpointDiskRecord(
                d["disk"], d["bitmap"], d["image"], d["granularity"], d["broken"],
                tuple(json.loads(d["span"])) if d["span"] else ()))
        return [CheckpointRecord(domain, r["name"], r["seq"], r["created"],
                                 tuple(by_cp.get(r["name"], ()))) for r in rows]

    def add_checkpoint(self, domain: str, name: str, created: float,
                       disks: list[CheckpointDiskRecord], intent: int | None = None,
                       before: str | None = None) -> None:
        """Record a checkpoint as the newest (or just before checkpoint ``before``)
        and drop the intent that announced it, in one transaction."""
        with self.transaction() as db:
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM checkpoint WHERE domain = ?",
                             (domain,)).fetchone()[0]
            if before is not None:  # redefined out of order: make room
                seq = db.execute("SELECT seq FROM checkpoint WHERE domain = ? AND name = ?",
                                 (domain, before)).fetchone()[0]
                db.execute("UPDATE checkpoint SET seq = seq + 1 WHERE domain = ? AND seq >= ?",
                           (domain, seq))
            db.execute("INSERT INTO checkpoint (domain, name, seq, created) VALUES (?, ?, ?, ?)",
                       (domain, name, seq, created))
            db.executemany(
                "INSERT INTO checkpoint_disk (domain, checkpoint, disk, bitmap, image, "
                "granularity, broken, span) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(domain, name, d.disk, d.bitmap, d.image, d.granularity, d.broken,
                  json.dumps(list(d.span)) if d.span else None) for d in disks])
            if intent is not None:
                db.execute("DELETE FROM intent WHERE id = ?", (intent,))

    def delete_checkpoint(self, domain: str, name: str, intent: int | None = None) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM checkpoint WHERE domain = ? AND name = ?", (domain, name))
            if intent is not None:
                db.execute("DELETE FROM intent WHERE id = ?", (intent,))

    def mark_broken(self, domain: str, checkpoint: str, disk: str, reason: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE checkpoint_disk SET broken = ? WHERE domain = ? AND "
                       "checkpoint = ? AND disk = ? AND broken IS NULL",
                       (reason, domain, checkpoint, disk))

    def set_span(self, domain: str, checkpoint: str, disk: str, span: tuple[str, ...]) -> None:
        with self.transaction() as db:
            db.execute("UPDATE checkpoint_disk SET span = ? WHERE domain = ? AND "
                       "checkpoint = ? AND disk = ?",
                       (json.dumps(list(span)), domain, checkpoint, disk))

    # -- instant recoveries --------------------------------------------------------

    def recoveries(self) -> list[tuple[str, dict[str, Any], float]]:
        """(file, payload, created) of every recovery, oldest first."""
        with self.transaction() as db:
            rows = db.execute("SELECT file, payload, created FROM recovery "
                              "ORDER BY created, file").fetchall()
        return [(r["file"], json.loads(r["payload"]), r["created"]) for r in rows]

    def put_recovery(self, file: str, payload: dict[str, Any]) -> None:
        with self.transaction() as db:
            old = db.execute("SELECT created FROM recovery WHERE file = ?", (file,)).fetchone()
            db.execute("INSERT OR REPLACE INTO recovery (file, payload, created) "
                       "VALUES (?, ?, ?)", (file, json.dumps(payload),
                                            old["created"] if old is not None else time.time()))

    def drop_recovery(self, file: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM recovery WHERE file = ?", (file,))

    # -- intents ----------------------------------------------------------------

    def add_intent(self, domain: str, kind: str, payload: dict[str, Any]) -> int:
        """Record, before acting, what a multi-step change is about to do."""
        with self.transaction() as db:
            cur = db.execute("INSERT INTO intent (domain, kind, payload, created) "
                             "VALUES (?, ?, ?, ?)",
                             (domain, kind, json.dumps(payload), time.time()))
            return int(cur.lastrowid or 0)

    def update_intent(self, intent: int, payload: dict[str, Any]) -> None:
        with self.transaction() as db:
            db.execute("UPDATE intent SET payload = ? WHERE id = ?", (json.dumps(payload), intent))

    def intents(self, domain: str) -> list[IntentRecord]:
        with self.transaction() as db:
            rows = db.execute("SELECT id, domain, kind, payload FROM intent WHERE domain = ? "
                              "ORDER BY id", (domain,)).fetchall()
        return [IntentRecord(r["id"], r["domain"], r["kind"], json.loads(r["payload"]))
                for r in rows]

    def drop_intent(self, intent: int) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM intent WHERE id = ?", (intent,))
