"""Small helpers every store uses, on either backend, and :class:`StoreUnavailable`,
the one exception by which every store says "the database cannot be reached or cannot
take a write now"."""

from __future__ import annotations

import asyncio
import contextlib
import copy
from pathlib import Path
from typing import Any, Final

from cardvault.errors import ConfigurationError, DatabaseUnavailable, StorageFull

__all__ = [
    "BUSY",
    "CANNOT_CONNECT",
    "CANNOT_OPEN",
    "CONNECTION_LOST",
    "DISK_FULL",
    "INSUFFICIENT_RESOURCES",
    "IO_ERROR",
    "READ_ONLY",
    "REASONS",
    "SHUTDOWN",
    "TIMEOUT",
    "TOO_MANY_CONNECTIONS",
    "StoreFull",
    "StoreUnavailable",
    "column_list",
    "copy_error",
    "insert_sql",
    "settle",
    "settle_on_their_loops",
    "store_location",
    "store_unavailable",
]

# -- why a database is unavailable (StoreUnavailable.reason) ----------------------------

#: A connection broke while a statement was on it (PostgreSQL: the connection was
#: closed or reset, the server terminated the backend). Whatever that statement wrote
#: may or may not have been committed.
CONNECTION_LOST: Final = "connection_lost"
#: No connection could be made: refused, unreachable, the database or role missing.
CANNOT_CONNECT: Final = "cannot_connect"
#: The server is shutting down, starting up or recovering (PostgreSQL's class 57).
SHUTDOWN: Final = "shutdown"
#: The server has no connection slot left (``too_many_connections``).
TOO_MANY_CONNECTIONS: Final = "too_many_connections"
#: No connection within the pool's acquire timeout (every one busy, or connecting hung).
TIMEOUT: Final = "timeout"
#: Out of memory or another server limit (PostgreSQL's class 53, besides the two above).
INSUFFICIENT_RESOURCES: Final = "insufficient_resources"
#: The disk is full, or the database reached its size limit (SQLITE_FULL, ENOSPC,
#: PostgreSQL's ``disk_full``): raised as :class:`StoreFull`.
DISK_FULL: Final = "disk_full"
#: The operating system reported an I/O error (SQLITE_IOERR, EIO, PostgreSQL's class 58).
IO_ERROR: Final = "io_error"
#: The database cannot be written: a read-only file system or file, a standby server.
READ_ONLY: Final = "read_only"
#: Another process held the database's lock past the busy timeout (SQLITE_BUSY).
BUSY: Final = "busy"
#: The database file or its directory cannot be opened or created (SQLITE_CANTOPEN).
CANNOT_OPEN: Final = "cannot_open"

REASONS: Final = frozenset(
    {
        CONNECTION_LOST,
        CANNOT_CONNECT,
        SHUTDOWN,
        TOO_MANY_CONNECTIONS,
        TIMEOUT,
        INSUFFICIENT_RESOURCES,
        DISK_FULL,
        IO_ERROR,
        READ_ONLY,
        BUSY,
        CANNOT_OPEN,
    }
)


class StoreUnavailable(DatabaseUnavailable):
    """The database cannot be reached or cannot take a write now: try again later.

    Raised by every store, on either backend, instead of the driver's exception
    (asyncpg's, sqlite3's, an ``OSError``), which stays as ``__cause__`` for the logs.
    ``reason`` is one of :data:`REASONS`, for the logs and the operator.

    **Unavailable, not "not written".** Whether a write that was in flight took effect
    is unknown. On PostgreSQL a statement whose connection is lost may have been
    committed before its acknowledgement was lost (an ``INSERT`` that raised this may be
    stored); on SQLite an I/O error during ``COMMIT`` leaves the same doubt. A caller
    that must know has to look (a retry finds the row, or its idempotency claim); it must
    never treat this as a clean failure and do the write again under a new id. A read
    that raised it simply has no answer.

    It is an API error already (:class:`~cardvault.errors.DatabaseUnavailable`, 503
    ``database_unavailable`` with ``Retry-After``; :class:`StoreFull` is 503
    ``storage_full``), so wherever in a request it is raised the caller gets a 503 and
    never the 500 of a bug. Its message says nothing of the inside.
    """

    def __init__(self, reason: str, message: str | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown reason {reason!r}")
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # copy and pickle: a fresh instance with its own headers.
        return (type(self), (self.reason, self.message))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, reason={self.reason!r})"


class StoreFull(StoreUnavailable, StorageFull):
    """:class:`StoreUnavailable` because the disk (or the database's size limit) is full:
    503 ``storage_full``, with the longer ``Retry-After`` of
    :class:`~cardvault.errors.StorageFull` (space must be freed first)."""


def store_unavailable(reason: str, cause: BaseException | None = None) -> StoreUnavailable:
    """The exception for ``reason`` (:class:`StoreFull` for :data:`DISK_FULL`), with
    ``cause`` as its ``__cause__``; for ``raise store_unavailable(...) from exc`` the
    caller's ``from`` sets it again."""
    error = StoreFull(reason) if reason == DISK_FULL else StoreUnavailable(reason)
    error.__cause__ = cause
    return error


def store_location(url: str) -> Path | str:
    """Where a store's setting ``store.url`` points: the path of a SQLite file for
    ``sqlite:///absolute/path.db`` (or SQLAlchemy's ``sqlite:////absolute/path.db``),
    the DSN itself for ``postgresql://`` and ``postgres://``. Raises
    :class:`~cardvault.errors.ConfigurationError` for anything else, without repeating
    the URL (a PostgreSQL URL may carry a password)."""
    if url.startswith("sqlite:///"):
        # Always absolute.
        path = url.removeprefix("sqlite://").lstrip("/")
        if not path:
            raise ConfigurationError("setting store.url must name a database file")
        return Path("/" + path)
    if url.startswith(("postgresql://", "postgres://")):
        return url
    raise ConfigurationError("setting store.url must start with sqlite:/// or postgresql://")


def column_list(names: tuple[str, ...]) -> str:
    """A column list for SQL, built only from the constant column names of
    :mod:`cardvault.storage.rows`, never from input."""
    return ", ".join(names)


def insert_sql(table: str, columns: tuple[str, ...]) -> str:
    """``INSERT INTO table (columns) VALUES (?, …)``, in SQLite's placeholders
    (PostgreSQL's stores number them: ``cardvault.storage.postgres.pool.numbered``)."""
    marks = ", ".join("?" for _ in columns)
    # Built only from the constant table and column names of storage.rows, never from input.
    return f"INSERT INTO {table} ({column_list(columns)}) VALUES ({marks})"  # noqa: S608


def copy_error(exc: BaseException) -> BaseException:
    """A fresh exception per caller, so that concurrent callers whose writes shared a
    batch do not share (and grow) one traceback. (A :class:`StoreUnavailable` keeps its
    reason.)"""
    try:
        fresh = copy.copy(exc) if isinstance(exc, StoreUnavailable) else type(exc)(*exc.args)
    except Exception:
        return exc
    fresh.__cause__ = exc
    return fresh


def settle(future: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
    """Give a queued write's caller its outcome, unless the caller was cancelled."""
    if future.done():
        return
    if error is None:
        future.set_result(value)
    else:
        future.set_exception(error)


Outcome = tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Any, BaseException | None]


def settle_on_their_loops(outcomes: list[Outcome]) -> None:
    """Settle each future with its value or error, on its own event loop (the writer
    may be flushing on another): at once on the running loop, else through
    ``call_soon_threadsafe``."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    others: dict[asyncio.AbstractEventLoop, list[Outcome]] = {}
    for outcome in outcomes:
        if outcome[0] is running:
            _settle_all([outcome])
        else:
            others.setdefault(outcome[0], []).append(outcome)
    for loop, items in others.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
            loop.call_soon_threadsafe(_settle_all, items)


def _settle_all(outcomes: list[Outcome]) -> None:
    for _, future, value, error in outcomes:
        settle(future, value, error)
