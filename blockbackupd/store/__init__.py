"""The persistent record: SQLite in ``state_dir``."""

from .db import DomainRecord, Store, StoreError

__all__ = ["DomainRecord", "Store", "StoreError"]
