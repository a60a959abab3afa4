"""The PostgreSQL database under every PostgreSQL store: an asyncpg pool, the migrations
runner, and the mapping of asyncpg's errors onto the storage layer's.

Every method of a store is one statement on a pooled connection in autocommit, with the
server's default synchronous commit, so a method returns after its commit reached the
server's disk. :meth:`PostgresDatabase.migrate` applies the store's
:class:`~cardvault.storage.migrations.Schema` in one transaction that holds the schema's
advisory lock, so replicas starting together are safe: the first migrates, the others
wait and then find nothing to do.

**An unavailable database is one exception.** A store's queries reach the server only
through :class:`Pool` (what :meth:`PostgresDatabase._get_pool` returns): asyncpg's pool
with the same methods (``execute``, ``fetch``, ``fetchrow``, ``fetchval``, ``acquire``),
which turns every error that means "the database cannot be reached or cannot take a
write now" into :class:`~cardvault.storage.StoreUnavailable` (:func:`unavailable` says
which errors, and the reason of each), the asyncpg exception kept as its cause. Opening
the pool is translated the same way. Errors about the statement itself (a duplicate, a
value the server refuses, a bug in the SQL) pass through untouched, so a store's query
methods stay single statements that know nothing of outages. A lost connection is not
"not written": the server may have committed the statement before the connection
broke, and :class:`~cardvault.storage.StoreUnavailable` says so.

The pool recovers by itself: a connection the server closed is replaced at its next
acquire, so once the server is back the next call works.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import itertools
import re
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

import structlog

from cardvault.storage._shared import (
    CANNOT_CONNECT,
    CONNECTION_LOST,
    DISK_FULL,
    INSUFFICIENT_RESOURCES,
    IO_ERROR,
    READ_ONLY,
    SHUTDOWN,
    TIMEOUT,
    TOO_MANY_CONNECTIONS,
    StoreUnavailable,
    store_unavailable,
)
from cardvault.storage.base import DuplicateError, UnstorableValue
from cardvault.storage.migrations import CURRENT_VERSION, Schema, plan

__all__ = [
    "ACQUIRE_TIMEOUT_S",
    "CONNECT_TIMEOUT_S",
    "Pool",
    "PostgresDatabase",
    "count",
    "numbered",
    "unavailable",
]

#: How long opening one connection may take (asyncpg's default is 60 s): a server that
#: does not answer is unavailable after this, not a request that hangs for a minute.
CONNECT_TIMEOUT_S = 5.0

#: How long a query waits for a pooled connection when none is idle (every one busy,
#: or the server slow to accept a new one) before it is :data:`TIMEOUT` unavailable.
ACQUIRE_TIMEOUT_S = 10.0

_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})

_log = structlog.get_logger("cardvault.storage")


def unavailable(
    exc: BaseException, *, connected: bool, broken: bool = False
) -> StoreUnavailable | None:
    """The :class:`~cardvault.storage.StoreUnavailable` that ``exc``, raised by asyncpg
    or the network, means; None when it is about the statement (or a bug) instead.
    ``connected``: whether the statement had a connection (a failure before that is
    :data:`CANNOT_CONNECT` whatever its kind: no connection, nothing sent). ``broken``:
    the connection turned out closed after the error (whatever the error said, the
    connection was lost under the statement).

    =========================================================  =========================
    asyncpg / Python                                           reason
    =========================================================  =========================
    ``DiskFullError`` (53100)                                  ``disk_full`` (StoreFull)
    ``TooManyConnectionsError`` (53300)                        ``too_many_connections``
    other ``InsufficientResourcesError`` (53: out of memory …) ``insufficient_resources``
    ``AdminShutdownError`` (``pg_terminate_backend``),         ``shutdown``
    ``CrashShutdownError``, ``CannotConnectNowError`` (57P0x)
    ``IdleSessionTimeoutError`` (57P05),                       ``connection_lost``
    ``PostgresConnectionError`` (08: ``ConnectionDoesNotExistError`` …)
    ``PostgresIOError``, ``PostgresSystemError`` (58)          ``io_error``
    ``ReadOnlySQLTransactionError`` (25006: a standby)         ``read_only``
    ``InterfaceError`` on a closed connection / pool           ``connection_lost`` /
                                                               ``shutdown``
    ``TimeoutError`` (acquire or connect)                      ``timeout``
    ``OSError`` (refused, reset, unreachable …)                ``connection_lost`` or
                                                               ``cannot_connect``
    anything else on a connection that is then closed          ``connection_lost``
    (asyncpg's ``InternalClientError`` "cannot switch to
    state …" when the server's FATAL message of a terminated
    backend arrived between two statements)
    =========================================================  =========================

    Anything else raised before a connection was had (an unknown database or role, a
    refused password) is ``cannot_connect``: a store that cannot connect is unavailable,
    and the log says why.
    """
    import asyncpg

    if isinstance(exc, StoreUnavailable) or not isinstance(exc, Exception):
        return None
    reason: str | None = None
    if isinstance(exc, asyncpg.DiskFullError):
        reason = DISK_FULL
    elif isinstance(exc, asyncpg.TooManyConnectionsError):
        reason = TOO_MANY_CONNECTIONS
    elif isinstance(exc, asyncpg.InsufficientResourcesError):
        reason = INSUFFICIENT_RESOURCES
    elif isinstance(
        exc,
        (asyncpg.AdminShutdownError, asyncpg.CrashShutdownError, asyncpg.CannotConnectNowError),
    ):
        reason = SHUTDOWN
    elif isinstance(exc, (asyncpg.IdleSessionTimeoutError, asyncpg.PostgresConnectionError)):
        reason = CONNECTION_LOST if connected else CANNOT_CONNECT
    elif isinstance(exc, (asyncpg.PostgresIOError, asyncpg.PostgresSystemError)):
        reason = IO_ERROR
    elif isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
        reason = READ_ONLY
    elif isinstance(exc, asyncpg.InterfaceError):
        text = str(exc)
        if "pool is clos" in text:  # "pool is closing", "pool is closed"
            reason = SHUTDOWN
        elif "connection is closed" in text or "connection was closed" in text:
            reason = CONNECTION_LOST if connected else CANNOT_CONNECT
    elif isinstance(exc, TimeoutError):
        reason = TIMEOUT
    elif isinstance(exc, OSError):
        if exc.errno in _NO_SPACE:
            reason = DISK_FULL
        else:
            reason = CONNECTION_LOST if connected else CANNOT_CONNECT
    if reason is None:
        if not connected and isinstance(exc, asyncpg.PostgresError):
            reason = CANNOT_CONNECT
        elif connected and broken:
            reason = CONNECTION_LOST
    return None if reason is None else store_unavailable(reason, exc)


def _closed(conn: Any) -> bool:
    """Whether a pooled connection is closed; False once it is back in the pool (the
    proxy then refuses every call)."""
    try:
        return bool(conn.is_closed())
    except Exception:
        return False


class Pool:
    """asyncpg's pool as the stores use it: the same query methods, each on a pooled
    connection, and every error that means an unavailable database raised as
    :class:`~cardvault.storage.StoreUnavailable` (:func:`unavailable`). A query waits
    for a connection at most ``acquire_timeout`` seconds when none is idle (the common
    case, an idle connection, costs no timer).

    A statement that was answered is not failed afterwards: when giving its connection
    back fails (asyncpg resets the connection, which fails when the server has just
    ended it), the answer stands, since the statement ran, and asyncpg drops that
    connection. The same holds for a block under :meth:`acquire` that finished."""

    __slots__ = ("_acquire_timeout", "_pool")

    def __init__(self, pool: Any, *, acquire_timeout: float = ACQUIRE_TIMEOUT_S) -> None:
        self._pool = pool
        self._acquire_timeout = acquire_timeout

    @property
    def raw(self) -> Any:
        """asyncpg's own pool (closing it, or what this class does not offer)."""
        return self._pool

    async def _connection(self) -> Any:
        # An idle connection is handed out at once: no timer (asyncpg's acquire timeout
        # wraps the wait in a task of its own, a measurable cost on every query).
        timeout = None if self._pool.get_idle_size() else self._acquire_timeout
        try:
            return await self._pool.acquire(timeout=timeout)
        except Exception as exc:
            error = unavailable(exc, connected=False)
            if error is None:
                raise
            raise error from exc

    async def _release(self, conn: Any) -> bool:
        """Give ``conn`` back to the pool; whether it was still sound. A connection
        that cannot be reset is closed by asyncpg, and the pool opens another."""
        was_closed = _closed(conn)
        try:
            await self._pool.release(conn)
        except Exception as exc:
            _log.warning("postgres_connection_dropped", error=type(exc).__name__)
            return False
        return not was_closed

    def _failed(self, exc: Exception, conn: Any, sound: bool) -> StoreUnavailable | None:
        return unavailable(exc, connected=True, broken=not sound or _closed(conn))

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[Any]:
        """A pooled connection for several statements (a transaction); an error that
        means an unavailable database, raised while taking the connection or inside the
        block, leaves it as :class:`~cardvault.storage.StoreUnavailable`."""
        conn = await self._connection()
        try:
            yield conn
        except Exception as exc:
            error = self._failed(exc, conn, await self._release(conn))
            if error is None:
                raise
            raise error from exc
        except BaseException:
            await self._release(conn)
            raise
        await self._release(conn)

    async def _run(self, method: str, query: str, args: tuple[Any, ...]) -> Any:
        conn = await self._connection()
        try:
            result = await getattr(conn, method)(query, *args)
        except Exception as exc:
            error = self._failed(exc, conn, await self._release(conn))
            if error is None:
                raise
            raise error from exc
        except BaseException:
            await self._release(conn)
            raise
        await self._release(conn)
        return result

    async def execute(self, query: str, *args: Any) -> str:
        """The statement's command tag (``INSERT 0 1``)."""
        status: str = await self._run("execute", query, args)
        return status

    async def fetch(self, query: str, *args: Any) -> list[Any]:
        rows: list[Any] = await self._run("fetch", query, args)
        return rows

    async def fetchrow(self, query: str, *args: Any) -> Any:
        return await self._run("fetchrow", query, args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        return await self._run("fetchval", query, args)

    async def close(self) -> None:
        await self._pool.close()


#: The columns of ``schema_version`` in the schema the connection works in.
_VERSION_COLUMNS = (
    "SELECT column_name FROM information_schema.columns "
    "WHERE table_schema = current_schema() AND table_name = 'schema_version'"
)


@functools.lru_cache(maxsize=256)
def numbered(sql: str) -> str:
    """``sql`` with SQLite's ``?`` placeholders numbered for PostgreSQL (``$1``, ``$2`` …).
    For the storage layer's own statements only: none has a ``?`` inside a literal."""
    numbers = itertools.count(1)
    return re.sub(r"\?", lambda _: f"${next(numbers)}", sql)


def count(status: str) -> int:
    """The row count of a command tag such as ``UPDATE 3``."""
    return int(status.rsplit(" ", 1)[-1])


class PostgresDatabase:
    """A store's PostgreSQL database. ``min_size``/``max_size`` size the pool, which is
    opened on first use (in the running event loop) and closed by :meth:`close`. A
    subclass names its ``schema`` and adds its queries."""

    schema: ClassVar[Schema]

    def __init__(self, dsn: str, *, min_size: int, max_size: int) -> None:
        self._dsn = dsn
        self._min_size = min_size
        self._max_size = max_size
        self._pool: Pool | None = None
        self._pool_lock = asyncio.Lock()
        #: Seconds a query waits for a pooled connection when none is idle.
        self.acquire_timeout = ACQUIRE_TIMEOUT_S

    def __repr__(self) -> str:
        # The DSN may hold a password.
        return f"{type(self).__name__}(<dsn>)"

    async def _get_pool(self) -> Pool:
        """The pool, opened on first use; a server that cannot be reached then raises
        :class:`~cardvault.storage.StoreUnavailable`, and the next call tries again."""
        pool = self._pool
        if pool is None:
            async with self._pool_lock:
                pool = self._pool
                if pool is None:
                    import asyncpg

                    try:
                        raw = await asyncpg.create_pool(
                            self._dsn,
                            min_size=self._min_size,
                            max_size=self._max_size,
                            timeout=CONNECT_TIMEOUT_S,
                        )
                    except Exception as exc:
                        error = unavailable(exc, connected=False)
                        if error is None:
                            raise
                        raise error from exc
                    pool = self._pool = Pool(raw, acquire_timeout=self.acquire_timeout)
        return pool

    async def _insert(
        self,
        sql: str,
        params: tuple[Any, ...],
        what: str,
        duplicate: type[DuplicateError] = DuplicateError,
    ) -> None:
        """Run one insert; a primary key or unique value already taken raises
        ``duplicate``, a value the server cannot hold :class:`UnstorableValue`."""
        import asyncpg

        pool = await self._get_pool()
        try:
            await pool.execute(sql, *params)
        except asyncpg.UniqueViolationError as exc:
            raise duplicate(f"{what} with this id or unique value exists") from exc
        except asyncpg.DataError as exc:
            # A value could not be encoded (a lone surrogate, an integer past 64 bits)
            # or the server refused it as data: the statement did not commit.
            raise UnstorableValue(f"{what} holds a value that cannot be stored") from exc

    async def migrate(self) -> None:
        """Create or upgrade the schema to the newest version (module docstring)."""
        pool = await self._get_pool()
        async with pool.acquire() as conn, conn.transaction():
            # Replicas starting together queue here; the later ones find nothing to do.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", self.schema.lock)
            columns = {str(r[0]) for r in await conn.fetch(_VERSION_COLUMNS)}
            current = int(await conn.fetchval(CURRENT_VERSION)) if columns else 0
            for sql, params in plan(self.schema, "postgresql", columns, current, int(time.time())):
                await conn.execute(sql, *params)

    async def close(self) -> None:
        """Close the pool. Idempotent."""
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()
