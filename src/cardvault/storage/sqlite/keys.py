"""The key service's store on SQLite: :class:`~cardvault.storage.base.KeyStore`'s queries.

Its own file (``keyd.db``), never the vault's, on the same writer as every SQLite store
(:mod:`cardvault.storage.sqlite.writer`): each method is one statement, a write durable
when it returns. The statements are those of :mod:`cardvault.storage.rows`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from cardvault.storage import rows
from cardvault.storage.base import KekExists, StoredKek
from cardvault.storage.migrations import KEY_SCHEMA, Schema
from cardvault.storage.sqlite.connection import insert
from cardvault.storage.sqlite.writer import SQLiteDatabase

__all__ = ["SQLiteKeyStore"]


def _execute(sql: str, params: tuple[Any, ...]) -> Callable[[sqlite3.Connection], None]:
    """A write of one statement, for the writer."""

    def op(conn: sqlite3.Connection) -> None:
        conn.execute(sql, params)

    return op


class SQLiteKeyStore(SQLiteDatabase):
    """The key service's store in one SQLite file (the embedded default). Its traffic is
    a few writes at initialization, rotation and unsealing, so one read connection."""

    schema: ClassVar[Schema] = KEY_SCHEMA

    def __init__(self, path: Path) -> None:
        super().__init__(path, readers=1)

    async def get_meta(self, key: str) -> str | None:
        def op(conn: sqlite3.Connection) -> str | None:
            row = conn.execute(rows.SELECT_META, (key,)).fetchone()
            return None if row is None else str(row[0])

        return await self._lookup(op)

    async def set_meta(self, key: str, value: str) -> None:
        await self._write(_execute(rows.UPSERT_META, (key, value)))

    async def add_kek(self, kek: StoredKek) -> None:
        params, what = rows.kek_params(kek), f"KEK {kek.name} v{kek.version}"
        await self._write(lambda conn: insert(conn, rows.INSERT_KEK, params, what, KekExists))

    async def list_keks(self) -> list[StoredKek]:
        def op(conn: sqlite3.Connection) -> list[StoredKek]:
            return [rows.kek_from_row(r) for r in conn.execute(rows.SELECT_KEKS).fetchall()]

        return await self._read(op)

    async def replace_seal(self, keks: Sequence[StoredKek], meta: dict[str, str]) -> None:
        def op(conn: sqlite3.Connection) -> None:
            stored = {(r[0], r[1]) for r in conn.execute("SELECT name, version FROM keks")}
            if stored != {(k.name, k.version) for k in keks}:
                raise ValueError("a reseal must replace every stored KEK version, no other")
            for kek in keks:
                conn.execute(rows.UPDATE_KEK_SEALED, (kek.sealed, kek.name, kek.version))
            for key, value in meta.items():
                conn.execute(rows.UPSERT_META, (key, value))

        # The old sealed forms are overwritten: scrub them from the WAL as erased data.
        await self._write(op, compound=True, erases=True)

    async def delete_kek(self, name: str, version: int) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            return conn.execute(rows.DELETE_KEK, (name, version)).rowcount > 0

        # Erases key material: the WAL is scrubbed as for card data.
        return await self._write(op, erases=True)

    async def set_min_decryption_version(self, name: str, version: int) -> None:
        await self._write(_execute(rows.UPSERT_MIN_DECRYPTION_VERSION, (name, version)))

    async def min_decryption_versions(self) -> dict[str, int]:
        def op(conn: sqlite3.Connection) -> dict[str, int]:
            found = conn.execute(rows.SELECT_MIN_DECRYPTION_VERSIONS).fetchall()
            return {str(name): int(version) for name, version in found}

        return await self._read(op)

    async def append_event(self, actor: str, action: str, result: str, detail: str) -> None:
        await self._write(
            _execute(rows.INSERT_EVENT, rows.event_params(actor, action, result, detail))
        )

    async def events(self) -> list[dict[str, Any]]:
        def op(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            return [rows.event_from_row(r) for r in conn.execute(rows.SELECT_EVENTS).fetchall()]

        return await self._read(op)
