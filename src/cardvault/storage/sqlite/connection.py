"""Opening a SQLite store's file, and what every SQLite store runs on a connection.

Durability and erasure, for every store on SQLite:

* WAL with ``synchronous=FULL``: a commit is fsynced before the write returns.
* ``secure_delete=ON``: SQLite overwrites deleted content with zeros (the writer then
  scrubs the WAL, :mod:`cardvault.storage.sqlite.wal`).
* The file is created with mode 0600 before SQLite opens it (SQLite gives ``-wal`` and
  ``-shm`` the mode of the database), in a directory created with mode 0700.

What a full disk, an I/O error or a lock held too long means for a caller is
:func:`unavailable`'s: the writer raises those as
:class:`~cardvault.storage.StoreUnavailable`, never as ``sqlite3`` errors.
"""

from __future__ import annotations

import errno
import sqlite3
import time
from pathlib import Path
from typing import Any

from cardvault.storage._shared import (
    BUSY,
    CANNOT_OPEN,
    DISK_FULL,
    IO_ERROR,
    READ_ONLY,
    StoreUnavailable,
    store_unavailable,
)
from cardvault.storage.base import DuplicateError
from cardvault.storage.migrations import CURRENT_VERSION, Schema, plan

__all__ = [
    "BINDING_ERRORS",
    "BUSY_TIMEOUT_S",
    "apply_migrations",
    "connect",
    "insert",
    "translated",
    "unavailable",
]

#: How long a write waits for a lock held by another process before failing.
BUSY_TIMEOUT_S = 10.0

#: What binding a value raises when SQLite cannot hold it: text that does not encode to
#: UTF-8, an integer past 64 bits. The statement never ran.
BINDING_ERRORS = (UnicodeError, OverflowError)

_DUPLICATE_CODES = frozenset({"SQLITE_CONSTRAINT_PRIMARYKEY", "SQLITE_CONSTRAINT_UNIQUE"})

#: SQLite's primary result codes that mean "cannot take this now", and their reason.
_UNAVAILABLE_CODES = {
    sqlite3.SQLITE_FULL: DISK_FULL,
    sqlite3.SQLITE_IOERR: IO_ERROR,
    sqlite3.SQLITE_BUSY: BUSY,
    sqlite3.SQLITE_LOCKED: BUSY,
    sqlite3.SQLITE_CANTOPEN: CANNOT_OPEN,
    sqlite3.SQLITE_READONLY: READ_ONLY,
}

#: The same for an ``OSError`` met opening the file (creating it, its directory).
_UNAVAILABLE_ERRNOS = {
    errno.ENOSPC: DISK_FULL,
    errno.EDQUOT: DISK_FULL,
    errno.EIO: IO_ERROR,
    errno.EROFS: READ_ONLY,
}


def unavailable(exc: BaseException) -> StoreUnavailable | None:
    """The :class:`~cardvault.storage.StoreUnavailable` that ``exc`` means, or None when
    it is about the operation itself (a constraint, a bug).

    A ``sqlite3.Error`` by its primary result code: ``SQLITE_FULL`` (the disk, or
    ``max_page_count``) is ``disk_full`` (:class:`~cardvault.storage.StoreFull`);
    ``SQLITE_IOERR`` (any of its extended codes) ``io_error``; ``SQLITE_BUSY`` and
    ``SQLITE_LOCKED`` (reached only after the busy timeout) ``busy``;
    ``SQLITE_CANTOPEN`` ``cannot_open``; ``SQLITE_READONLY`` (a read-only file or file
    system) ``read_only``. An ``OSError`` by its errno: ``ENOSPC``/``EDQUOT``
    ``disk_full``, ``EIO`` ``io_error``, ``EROFS`` ``read_only``, any other
    ``cannot_open`` (it can only come from opening the file). The error that carries the
    code may be the cause of the one raised (the writer wraps a rolled-back
    transaction's error), so the chain of causes is followed.
    ``SQLITE_CORRUPT`` and ``SQLITE_NOTADB`` are not here: no waiting mends them.
    """
    if isinstance(exc, StoreUnavailable):
        return None
    seen: BaseException | None = exc
    for _ in range(8):  # a short chain; never a cycle
        if seen is None:
            break
        if isinstance(seen, sqlite3.Error):
            code = getattr(seen, "sqlite_errorcode", None)
            if isinstance(code, int):
                reason = _UNAVAILABLE_CODES.get(code & 0xFF)
                if reason is not None:
                    return store_unavailable(reason, exc)
        elif isinstance(seen, OSError):
            return store_unavailable(_UNAVAILABLE_ERRNOS.get(seen.errno or 0, CANNOT_OPEN), exc)
        seen = seen.__cause__
    return None


def translated(exc: BaseException) -> BaseException:
    """``exc`` as :class:`~cardvault.storage.StoreUnavailable` if it means that (its
    cause then), else ``exc`` itself."""
    error = unavailable(exc)
    return exc if error is None else error


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
