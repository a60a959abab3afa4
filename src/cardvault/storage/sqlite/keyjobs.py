"""The vault's re-encryption bookkeeping on SQLite (:class:`~cardvault.storage.base.KeyJob`
and the data keys it moves), mixed into :class:`~cardvault.storage.sqlite.vault.SQLiteVaultStore`."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from cardvault.storage import rows
from cardvault.storage.base import DataKeyMove, DataKeyRecord, KeyJob
from cardvault.storage.sqlite.writer import SQLiteDatabase

__all__ = ["SQLiteKeyJobs"]

_COUNTS = "SELECT kek, kek_version, count(*) FROM data_keys GROUP BY kek, kek_version"
_BELOW = f"{rows.SELECT_DATA_KEY} WHERE kek = ? AND kek_version < ? AND id > ? ORDER BY id LIMIT ?"
_MOVE = "UPDATE data_keys SET wrapped = ?, kek_version = ? WHERE id = ? AND kek_version = ?"
_GET_JOB = "SELECT kek, run_id, target_version, cursor, moved, started, updated, finished FROM key_jobs WHERE kek = ?"
_PUT_JOB = "INSERT OR REPLACE INTO key_jobs (kek, run_id, target_version, cursor, moved, started, updated, finished) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"


class SQLiteKeyJobs(SQLiteDatabase):
    async def data_key_counts(self) -> dict[str, dict[int, int]]:
        def op(conn: sqlite3.Connection) -> dict[str, dict[int, int]]:
            counts: dict[str, dict[int, int]] = {}
            for kek, version, n in conn.execute(_COUNTS).fetchall():
                counts.setdefault(str(kek), {})[int(version)] = int(n)
            return counts

        return await self._read(op)

    async def data_keys_below(
        self, kek: str, version: int, after: str, limit: int
    ) -> list[DataKeyRecord]:
        def op(conn: sqlite3.Connection) -> list[DataKeyRecord]:
            found = conn.execute(_BELOW, (kek, version, after, limit)).fetchall()
            return [rows.data_key_from_row(r) for r in found]

        return await self._read(op)

    async def move_data_keys(self, moves: Sequence[DataKeyMove]) -> int:
        params = [(wrapped, new, key_id, old) for key_id, old, wrapped, new in moves]

        def op(conn: sqlite3.Connection) -> int:
            return sum(conn.execute(_MOVE, p).rowcount for p in params)

        return await self._write(op)

    async def get_key_job(self, kek: str) -> KeyJob | None:
        def op(conn: sqlite3.Connection) -> KeyJob | None:
            row = conn.execute(_GET_JOB, (kek,)).fetchone()
            return None if row is None else KeyJob(*row)

        return await self._lookup(op)

    async def put_key_job(self, job: KeyJob) -> None:
        params = (
            job.kek, job.run_id, job.target_version, job.cursor, job.moved,
            job.started, job.updated, job.finished,
        )  # fmt: skip

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(_PUT_JOB, params)

        await self._write(op)
