"""The SQLite store: WAL, versioned schema, refusal of a newer store."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from blockbackupd.store import Store, StoreError
from blockbackupd.store.db import DB_NAME, MIGRATIONS, SCHEMA_VERSION


def test_new_store_is_migrated_and_in_wal(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    try:
        assert store.version == SCHEMA_VERSION
        mode = sqlite3.connect(tmp_path / DB_NAME).execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
    finally:
        store.close()


def test_domains_round_trip(tmp_path: Path) -> None:
    store = Store.open(tmp_path)
    store.put_domain("vm1", "/q1", "rpc")
    store.put_domain("vm0", "/q0", "config")
    store.close()
    store = Store.open(tmp_path)
    try:
        assert [(d.name, d.qmp_socket, d.origin) for d in store.domains()] == [
            ("vm0", "/q0", "config"), ("vm1", "/q1", "rpc")]
        store.delete_domain("vm0")
        assert [d.name for d in store.domains()] == ["vm1"]
    finally:
        store.close()


def test_store_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    with pytest.raises(StoreError, match="newer than this release"):
        Store.open(tmp_path)


def test_garbage_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / DB_NAME).write_bytes(b"not a database" * 100)
    with pytest.raises(StoreError):
        Store.open(tmp_path)


def test_a_store_of_the_previous_schema_keeps_its_domains(tmp_path: Path) -> None:
    """Schema 3 (before guest agent sockets) opens, migrates, and keeps every row."""
    db = sqlite3.connect(tmp_path / DB_NAME)
    db.executescript("".join(MIGRATIONS[:3]) + "PRAGMA user_version = 3;")
    db.execute("INSERT INTO domain VALUES ('vm1', '/q1', 'rpc', 1.0)")
    db.commit()
    db.close()
    store = Store.open(tmp_path)
    try:
        assert store.version == SCHEMA_VERSION
        assert [(d.name, d.qmp_socket, d.guest_agent_socket) for d in store.domains()] == [
            ("vm1", "/q1", None)]
        store.put_domain("vm1", "/q1", "rpc", "/a1.qga")
        assert [d.guest_agent_socket for d in store.domains()] == ["/a1.qga"]
    finally:
        store.close()
