"""SQLite store in ``state_dir``: WAL journal, one transaction per state change.

The schema is versioned with ``PRAGMA user_version``; :data:`MIGRATIONS` holds
one script per version, applied in order inside a transaction at open, so a
store written by any older release opens in a newer one. A store newer than
this release is refused rather than guessed at.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

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
)
SCHEMA_VERSION = len(MIGRATIONS)


class StoreError(OperationFailed):
    """The store cannot be opened, read or written, or is from a newer release."""


@dataclass(frozen=True)
class DomainRecord:
    name: str
    qmp_socket: str
    origin: str
    defined_at: float


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
                "SELECT name, qmp_socket, origin, defined_at FROM domain ORDER BY name"
            ).fetchall()
        return [DomainRecord(**dict(r)) for r in rows]

    def put_domain(self, name: str, qmp_socket: str, origin: str) -> DomainRecord:
        """Insert or replace the domain's row."""
        record = DomainRecord(name, qmp_socket, origin, time.time())
        with self.transaction() as db:
            db.execute("DELETE FROM domain WHERE name = ? OR qmp_socket = ?", (name, qmp_socket))
            db.execute(
                "INSERT INTO domain (name, qmp_socket, origin, defined_at) VALUES (?, ?, ?, ?)",
                (record.name, record.qmp_socket, record.origin, record.defined_at),
            )
        return record

    def delete_domain(self, name: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM domain WHERE name = ?", (name,))
