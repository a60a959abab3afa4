"""Opening a SQLite store's file, and what every SQLite store runs on a connection.

Durability and erasure, for every store on SQLite:

* WAL with ``synchronous=FULL``: a commit is fsynced before the write returns.
* ``secure_delete=ON``: SQLite overwrites deleted content with zeros (the writer then
  scrubs the WAL, :mod:`cardvault.storage.sqlite.wal`).
* The file is created with mode 0600 before SQLite opens it (SQLite gives ``-wal`` and
  ``-shm`` the mode of the database), in a directory created with mode 0700.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path
from typing import Any

from cardvault.storage.base import DuplicateError
from cardvault.storage.migrations import CURRENT_VERSION, Schema, plan

__all__ = [
    "BINDING_ERRORS",
    "BUSY_TIMEOUT_S",
    "apply_migrations",
    "connect",
    "insert",
]

#: How long a write waits for a lock held by another process before failing.
BUSY_TIMEOUT_S = 10.0

#: What binding a value raises when SQLite cannot hold it: text that does not encode to
#: UTF-8, an integer past 64 bits. The statement never ran.
BINDING_ERRORS = (UnicodeError, OverflowError)

_DUPLICATE_CODES = frozenset({"SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"})


def _enable_wal(conn: sqlite3.Connection) -> None:
    # Switching to WAL needs an exclusive lock and does not wait in SQLite's busy
    # handler, so two processes opening a new file at once retry here.
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            break
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorname != "SQLITE_BUSY" or time.monotonic() > deadline:
                raise
            time.sleep(0.005)
    if str(mode).lower() != "wal":
        raise sqlite3.OperationalError("the database cannot use write-ahead logging")


def connect(path: Path, *, writer: bool, query_only: bool | None = None) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are begun by hand), usable from any
    thread. The writing connection turns WAL on; the others are read-only unless
    ``query_only`` is False (the checkpointer's)."""
    conn = sqlite3.connect(
        path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
    )
    try:
        if writer:
            _enable_wal(conn)
        conn.execute("PRAGMA synchronous=FULL")
        # Deleted card data is overwritten with zeros, not left in free space.
        conn.execute("PRAGMA secure_delete=ON")
        conn.execute("PRAGMA foreign_keys=ON")
        if (not writer) if query_only is None else query_only:
            conn.execute("PRAGMA query_only=ON")
    except BaseException:
        conn.close()
        raise
    return conn


def insert(
    conn: sqlite3.Connection,
    sql: str,
    params: tuple[Any, ...],
    what: str,
    duplicate: type[DuplicateError] = DuplicateError,
) -> None:
    """Run one insert; a primary key or unique value already taken raises ``duplicate``."""
    try:
        conn.execute(sql, params)
    except sqlite3.IntegrityError as exc:
        if exc.sqlite_errorname in _DUPLICATE_CODES:
            raise duplicate(f"{what} with this id or unique value exists") from exc
        raise


def apply_migrations(conn: sqlite3.Connection, schema: Schema) -> None:
    """Bring the database to ``schema.latest``. Run it inside the writer's
    ``BEGIN IMMEDIATE``: that holds the database's write lock, so another process
    migrating at the same time waits and then finds nothing to do."""
    columns = {str(row[1]) for row in conn.execute("PRAGMA table_info(schema_version)")}
    current = int(conn.execute(CURRENT_VERSION).fetchone()[0]) if columns else 0
    for sql, params in plan(schema, "sqlite", columns, current, int(time.time())):
        conn.execute(sql, params)
