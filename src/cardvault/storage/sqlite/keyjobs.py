"""The vault's re-encryption bookkeeping on SQLite (:class:`~cardvault.storage.base.KeyJob`
and the data keys it moves), mixed into :class:`~cardvault.storage.sqlite.vault.SQLiteVaultStore`."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from cardvault.storage import rows
from cardvault.storage.base import (
    CardReseal,
    DataKeyMove,
    DataKeyRecord,
    KeyJob,
    PaymentMethodRecord,
)
from cardvault.storage.sqlite.writer import SQLiteDatabase

__all__ = ["SQLiteKeyJobs"]

_COUNTS = "SELECT kek, kek_version, count(*) FROM data_keys GROUP BY kek, kek_version"
_BELOW = f"{rows.SELECT_DATA_KEY} WHERE kek = ? AND kek_version < ? AND id > ? ORDER BY id LIMIT ?"
_MOVE = "UPDATE data_keys SET wrapped = ?, kek_version = ? WHERE id = ? AND kek_version = ?"
_GET_JOB = "SELECT kek, run_id, target_version, cursor, moved, started, updated, finished, data_before, skipped FROM key_jobs WHERE kek = ?"
_PUT_JOB = "INSERT OR REPLACE INTO key_jobs (kek, run_id, target_version, cursor, moved, started, updated, finished, data_before, skipped) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
#: Per KEK: the payment methods whose data is sealed under an old data key, and how to
#: store it sealed anew (only where the row is still as it was read).
_OLD_KEYS = "SELECT id FROM data_keys WHERE kek = ? AND created < ?"
_SEALED_WHERE = {
    "pan": f"data_key_id IN ({_OLD_KEYS})",
    "cvc": f"cvc_ct IS NOT NULL AND cvc_data_key_id IN ({_OLD_KEYS})",
}
_RESEAL = {
    "pan": "UPDATE payment_methods SET data_key_id = ?, number_ct = ?, name_ct = ? "
    "WHERE id = ? AND data_key_id = ?",
    "cvc": "UPDATE payment_methods SET cvc_data_key_id = ?, cvc_ct = ? "
    "WHERE id = ? AND cvc_data_key_id = ? AND cvc_ct IS NOT NULL",
}


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

    async def cards_sealed_before(
        self, kek: str, before: int, after: str, limit: int
    ) -> list[PaymentMethodRecord]:
        sql = f"{rows.SELECT_PAYMENT_METHOD} WHERE {_SEALED_WHERE[kek]} AND id > ? ORDER BY id LIMIT ?"

        def op(conn: sqlite3.Connection) -> list[PaymentMethodRecord]:
            found = conn.execute(sql, (kek, before, after, limit)).fetchall()
            return [rows.payment_method_from_row(r) for r in found]

        return await self._read(op)

    async def count_cards_sealed_before(self, kek: str, before: int) -> int:
        sql = f"SELECT count(*) FROM payment_methods WHERE {_SEALED_WHERE[kek]}"  # noqa: S608

        def op(conn: sqlite3.Connection) -> int:
            return int(conn.execute(sql, (kek, before)).fetchone()[0])

        return await self._read(op)

    async def reseal_cards(self, kek: str, reseals: Sequence[CardReseal]) -> int:
        sql = _RESEAL[kek]
        params: list[tuple[object, ...]] = (
            [(new, ct, name, pm, old) for pm, old, new, ct, name in reseals]
            if kek == "pan"
            else [(new, ct, pm, old) for pm, old, new, ct, _ in reseals]
        )

        def op(conn: sqlite3.Connection) -> int:
            return sum(conn.execute(sql, p).rowcount for p in params)

        return await self._write(op)

    async def get_key_job(self, kek: str) -> KeyJob | None:
        def op(conn: sqlite3.Connection) -> KeyJob | None:
            row = conn.execute(_GET_JOB, (kek,)).fetchone()
            return None if row is None else KeyJob(*row)

        return await self._lookup(op)

    async def put_key_job(self, job: KeyJob) -> None:
        params = (
            job.kek, job.run_id, job.target_version, job.cursor, job.moved,
            job.started, job.updated, job.finished, job.data_before, job.skipped,
        )  # fmt: skip

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(_PUT_JOB, params)

        await self._write(op)
