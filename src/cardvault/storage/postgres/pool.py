"""The PostgreSQL database under every PostgreSQL store: an asyncpg pool, the migrations
runner, and the mapping of asyncpg's errors onto the storage layer's.

Every method of a store is one statement on a pooled connection in autocommit, with the
server's default synchronous commit, so a method returns after its commit reached the
server's disk. :meth:`PostgresDatabase.migrate` applies the store's
:class:`~cardvault.storage.migrations.Schema` in one transaction that holds the schema's
advisory lock, so replicas starting together are safe: the first migrates, the others
wait and then find nothing to do.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import re
import time
from typing import Any, ClassVar

from cardvault.storage.base import DuplicateError, UnstorableValue
from cardvault.storage.migrations import CURRENT_VERSION, Schema, plan

__all__ = ["PostgresDatabase", "count", "numbered"]

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
        self._pool: Any = None
        self._pool_lock = asyncio.Lock()

    def __repr__(self) -> str:
        # The DSN may hold a password.
        return f"{type(self).__name__}(<dsn>)"

    async def _get_pool(self) -> Any:
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    import asyncpg

                    self._pool = await asyncpg.create_pool(
                        self._dsn, min_size=self._min_size, max_size=self._max_size
                    )
        return self._pool

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
