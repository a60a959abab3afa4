"""The key service's store on PostgreSQL: :class:`~cardvault.storage.base.KeyStore`'s
queries, through :class:`~cardvault.storage.postgres.pool.PostgresDatabase`.

Give the key service its own database and role, never the vault's (docs/deploy.md).
Each method is one statement, durable when it returns; the statements are those of
:mod:`cardvault.storage.rows`, numbered for PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from cardvault.storage import rows
from cardvault.storage.base import KekExists, StoredKek
from cardvault.storage.migrations import KEY_SCHEMA, Schema
from cardvault.storage.postgres.pool import PostgresDatabase, numbered

__all__ = ["PostgresKeyStore"]

_SELECT_META = numbered(rows.SELECT_META)
_UPSERT_META = numbered(rows.UPSERT_META)
_UPDATE_KEK_SEALED = numbered(rows.UPDATE_KEK_SEALED)
_INSERT_KEK = numbered(rows.INSERT_KEK)
_UPSERT_MIN_DECRYPTION_VERSION = numbered(rows.UPSERT_MIN_DECRYPTION_VERSION)
_INSERT_EVENT = numbered(rows.INSERT_EVENT)
_DELETE_KEK = numbered(rows.DELETE_KEK)


class PostgresKeyStore(PostgresDatabase):
    """The key service's store in PostgreSQL (a small pool: its traffic is a few writes
    at initialization, rotation and unsealing)."""

    schema: ClassVar[Schema] = KEY_SCHEMA

    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 4) -> None:
        super().__init__(dsn, min_size=min_size, max_size=max_size)

    async def get_meta(self, key: str) -> str | None:
        pool = await self._get_pool()
        value = await pool.fetchval(_SELECT_META, key)
        return None if value is None else str(value)

    async def set_meta(self, key: str, value: str) -> None:
        pool = await self._get_pool()
        await pool.execute(_UPSERT_META, key, value)

    async def add_kek(self, kek: StoredKek) -> None:
        what = f"KEK {kek.name} v{kek.version}"
        await self._insert(_INSERT_KEK, rows.kek_params(kek), what, KekExists)

    async def list_keks(self) -> list[StoredKek]:
        pool = await self._get_pool()
        return [rows.kek_from_row(r) for r in await pool.fetch(rows.SELECT_KEKS)]

    async def replace_seal(self, keks: Sequence[StoredKek], meta: dict[str, str]) -> None:
        pool = await self._get_pool()
        async with pool.acquire() as conn, conn.transaction():
            found = await conn.fetch("SELECT name, version FROM keks FOR UPDATE")
            if {(r[0], r[1]) for r in found} != {(k.name, k.version) for k in keks}:
                raise ValueError("a reseal must replace every stored KEK version, no other")
            for kek in keks:
                await conn.execute(_UPDATE_KEK_SEALED, kek.sealed, kek.name, kek.version)
            for key, value in meta.items():
                await conn.execute(_UPSERT_META, key, value)

    async def delete_kek(self, name: str, version: int) -> bool:
        pool = await self._get_pool()
        status = await pool.execute(_DELETE_KEK, name, version)
        return str(status).endswith(" 1")

    async def set_min_decryption_version(self, name: str, version: int) -> None:
        pool = await self._get_pool()
        await pool.execute(_UPSERT_MIN_DECRYPTION_VERSION, name, version)

    async def min_decryption_versions(self) -> dict[str, int]:
        pool = await self._get_pool()
        found = await pool.fetch(rows.SELECT_MIN_DECRYPTION_VERSIONS)
        return {str(name): int(version) for name, version in found}

    async def append_event(self, actor: str, action: str, result: str, detail: str) -> None:
        pool = await self._get_pool()
        await pool.execute(_INSERT_EVENT, *rows.event_params(actor, action, result, detail))

    async def events(self) -> list[dict[str, Any]]:
        pool = await self._get_pool()
        return [rows.event_from_row(r) for r in await pool.fetch(rows.SELECT_EVENTS)]
