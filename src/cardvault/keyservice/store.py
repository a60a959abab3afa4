"""The key service's own store: sealed KEKs, key settings, seal metadata, events.

The store never sees a plaintext key: KEKs arrive sealed under the root key. It is the
key zone's database alone; the vault's database holds nothing of it.

``KeyStore`` is the interface; ``SQLiteKeyStore`` (the default) and ``PostgresKeyStore``
implement it, and one contract suite (tests/contract) runs against both. Every method
is a single statement; compositions live in :mod:`cardvault.keyservice.service`.
Writes are durable when the method returns (SQLite ``synchronous=FULL``; PostgreSQL's
default synchronous commit).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cardvault.errors import ConfigurationError

__all__ = ["KeyStore", "PostgresKeyStore", "SQLiteKeyStore", "StoredKek", "open_key_store"]


@dataclass(frozen=True)
class StoredKek:
    name: str
    version: int
    sealed: bytes
    created: int


class KekExists(Exception):
    """A KEK with this name and version is already stored."""


class KeyStore(Protocol):
    async def migrate(self) -> None:
        """Create or upgrade the schema to the newest version. Idempotent."""

    async def get_meta(self, key: str) -> str | None:
        """The metadata value stored under ``key``, or None."""

    async def set_meta(self, key: str, value: str) -> None:
        """Store ``value`` under ``key``, replacing any previous value."""

    async def add_kek(self, kek: StoredKek) -> None:
        """Store a sealed KEK version. Raises :class:`KekExists` if it is stored already."""

    async def list_keks(self) -> list[StoredKek]:
        """Every stored KEK version, ordered by name then version."""

    async def set_min_decryption_version(self, name: str, version: int) -> None:
        """Persist a key's ``min_decryption_version``."""

    async def min_decryption_versions(self) -> dict[str, int]:
        """Every persisted ``min_decryption_version``, by key name."""

    async def append_event(self, actor: str, action: str, result: str, detail: str) -> None:
        """Append one event (unseal attempts, seal, rotation …). Never holds key material."""

    async def events(self) -> list[dict[str, Any]]:
        """Every event, oldest first."""

    async def close(self) -> None:
        """Release connections."""


_SCHEMA_V1 = [
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS keks (
        name TEXT NOT NULL, version INTEGER NOT NULL, sealed BYTEA NOT NULL,
        created BIGINT NOT NULL, PRIMARY KEY (name, version))""",
    """CREATE TABLE IF NOT EXISTS key_config (
        name TEXT PRIMARY KEY, min_decryption_version INTEGER NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS events (
        id INTEGER PRIMARY KEY, at BIGINT NOT NULL, actor TEXT NOT NULL,
        action TEXT NOT NULL, result TEXT NOT NULL, detail TEXT NOT NULL)""",
]
# Ordered list of migrations; the index + 1 is the schema version it produces.
_MIGRATIONS: list[list[str]] = [_SCHEMA_V1]


class SQLiteKeyStore:
    """The embedded default: one SQLite file, WAL, ``synchronous=FULL``, mode 0600."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        if new:
            path.chmod(0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA secure_delete=ON")
        self._lock = threading.Lock()

    def _run(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    async def _q(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        return await asyncio.to_thread(self._run, sql, params)

    async def migrate(self) -> None:
        def work() -> None:
            with self._lock:
                self._db.execute(
                    "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
                )
                row = self._db.execute("SELECT max(version) FROM schema_version").fetchone()
                current = row[0] or 0
                for number, statements in enumerate(_MIGRATIONS, start=1):
                    if number <= current:
                        continue
                    self._db.execute("BEGIN IMMEDIATE")
                    for stmt in statements:
                        self._db.execute(stmt.replace("BYTEA", "BLOB"))
                    self._db.execute("INSERT INTO schema_version VALUES (?)", (number,))
                    self._db.execute("COMMIT")

        await asyncio.to_thread(work)

    async def get_meta(self, key: str) -> str | None:
        rows = await self._q("SELECT value FROM meta WHERE key = ?", key)
        return str(rows[0][0]) if rows else None

    async def set_meta(self, key: str, value: str) -> None:
        await self._q(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            key,
            value,
        )

    async def add_kek(self, kek: StoredKek) -> None:
        try:
            await self._q(
                "INSERT INTO keks (name, version, sealed, created) VALUES (?, ?, ?, ?)",
                kek.name,
                kek.version,
                kek.sealed,
                kek.created,
            )
        except sqlite3.IntegrityError as exc:
            raise KekExists(f"{kek.name} v{kek.version}") from exc

    async def list_keks(self) -> list[StoredKek]:
        rows = await self._q(
            "SELECT name, version, sealed, created FROM keks ORDER BY name, version"
        )
        return [StoredKek(r[0], int(r[1]), bytes(r[2]), int(r[3])) for r in rows]

    async def set_min_decryption_version(self, name: str, version: int) -> None:
        await self._q(
            "INSERT INTO key_config (name, min_decryption_version) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET min_decryption_version = excluded.min_decryption_version",
            name,
            version,
        )

    async def min_decryption_versions(self) -> dict[str, int]:
        rows = await self._q("SELECT name, min_decryption_version FROM key_config")
        return {str(r[0]): int(r[1]) for r in rows}

    async def append_event(self, actor: str, action: str, result: str, detail: str) -> None:
        await self._q(
            "INSERT INTO events (at, actor, action, result, detail) VALUES (?, ?, ?, ?, ?)",
            int(time.time() * 1000),
            actor,
            action,
            result,
            detail,
        )

    async def events(self) -> list[dict[str, Any]]:
        rows = await self._q("SELECT at, actor, action, result, detail FROM events ORDER BY id")
        return [
            dict(zip(("at", "actor", "action", "result", "detail"), r, strict=True)) for r in rows
        ]

    async def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresKeyStore:
    """PostgreSQL, through asyncpg. Give the key service its own database and role."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._pool: Any = None

    async def _conn(self) -> Any:
        if self._pool is None:
            import asyncpg

            self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=4)
        return self._pool

    async def migrate(self) -> None:
        pool = await self._conn()
        async with pool.acquire() as conn, conn.transaction():
            # One migrator at a time, even with several key-service replicas starting.
            await conn.execute("SELECT pg_advisory_xact_lock(7301)")
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)"
            )
            current = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_version")
            for number, statements in enumerate(_MIGRATIONS, start=1):
                if number <= current:
                    continue
                for stmt in statements:
                    await conn.execute(
                        stmt.replace("id INTEGER PRIMARY KEY", "id BIGSERIAL PRIMARY KEY")
                    )
                await conn.execute("INSERT INTO schema_version VALUES ($1)", number)

    async def get_meta(self, key: str) -> str | None:
        pool = await self._conn()
        value = await pool.fetchval("SELECT value FROM meta WHERE key = $1", key)
        return None if value is None else str(value)

    async def set_meta(self, key: str, value: str) -> None:
        pool = await self._conn()
        await pool.execute(
            "INSERT INTO meta (key, value) VALUES ($1, $2) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            key,
            value,
        )

    async def add_kek(self, kek: StoredKek) -> None:
        import asyncpg

        pool = await self._conn()
        try:
            await pool.execute(
                "INSERT INTO keks (name, version, sealed, created) VALUES ($1, $2, $3, $4)",
                kek.name,
                kek.version,
                kek.sealed,
                kek.created,
            )
        except asyncpg.UniqueViolationError as exc:
            raise KekExists(f"{kek.name} v{kek.version}") from exc

    async def list_keks(self) -> list[StoredKek]:
        pool = await self._conn()
        rows = await pool.fetch(
            "SELECT name, version, sealed, created FROM keks ORDER BY name, version"
        )
        return [StoredKek(r[0], int(r[1]), bytes(r[2]), int(r[3])) for r in rows]

    async def set_min_decryption_version(self, name: str, version: int) -> None:
        pool = await self._conn()
        await pool.execute(
            "INSERT INTO key_config (name, min_decryption_version) VALUES ($1, $2) "
            "ON CONFLICT (name) DO UPDATE SET min_decryption_version = excluded.min_decryption_version",
            name,
            version,
        )

    async def min_decryption_versions(self) -> dict[str, int]:
        pool = await self._conn()
        rows = await pool.fetch("SELECT name, min_decryption_version FROM key_config")
        return {str(r[0]): int(r[1]) for r in rows}

    async def append_event(self, actor: str, action: str, result: str, detail: str) -> None:
        pool = await self._conn()
        await pool.execute(
            "INSERT INTO events (at, actor, action, result, detail) VALUES ($1, $2, $3, $4, $5)",
            int(time.time() * 1000),
            actor,
            action,
            result,
            detail,
        )

    async def events(self) -> list[dict[str, Any]]:
        pool = await self._conn()
        rows = await pool.fetch("SELECT at, actor, action, result, detail FROM events ORDER BY id")
        return [dict(r) for r in rows]

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


def open_key_store(url: str) -> KeyStore:
    """``sqlite:///abs/path.db`` or ``postgresql://user@host/db``."""
    if url.startswith("sqlite:///"):
        return SQLiteKeyStore(Path(url.removeprefix("sqlite://")))
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresKeyStore(url)
    raise ConfigurationError("setting store.url must start with sqlite:/// or postgresql://")
