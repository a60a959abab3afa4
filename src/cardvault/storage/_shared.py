"""Small helpers every store uses, on either backend."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

from cardvault.errors import ConfigurationError

__all__ = [
    "column_list",
    "copy_error",
    "insert_sql",
    "settle",
    "settle_on_their_loops",
    "store_location",
]


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
    batch do not share (and grow) one traceback."""
    try:
        copy = type(exc)(*exc.args)
    except Exception:
        return exc
    copy.__cause__ = exc
    return copy


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
