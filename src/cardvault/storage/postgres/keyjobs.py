"""The vault's re-encryption bookkeeping on PostgreSQL (:class:`~cardvault.storage.base.KeyJob`
and the data keys it moves), mixed into :class:`~cardvault.storage.postgres.vault.PostgresVaultStore`."""

from __future__ import annotations

from collections.abc import Sequence

from cardvault.storage import rows
from cardvault.storage.base import (
    CardReseal,
    DataKeyMove,
    DataKeyRecord,
    KeyJob,
    PaymentMethodRecord,
)
from cardvault.storage.postgres.pool import PostgresDatabase

__all__ = ["PostgresKeyJobs"]

_COUNTS = "SELECT kek, kek_version, count(*) FROM data_keys GROUP BY kek, kek_version"
_BELOW = (
    f"{rows.SELECT_DATA_KEY} WHERE kek = $1 AND kek_version < $2 AND id > $3 ORDER BY id LIMIT $4"
)
# One statement, one row write per key: its wrapped key and version change together.
_MOVE = """UPDATE data_keys AS d SET wrapped = m.wrapped, kek_version = m.new
    FROM unnest($1::text[], $2::int[], $3::bytea[], $4::int[]) AS m(id, old, wrapped, new)
    WHERE d.id = m.id AND d.kek_version = m.old"""
_GET_JOB = "SELECT kek, run_id, target_version, cursor, moved, started, updated, finished, data_before, skipped FROM key_jobs WHERE kek = $1"
_PUT_JOB = (
    "INSERT INTO key_jobs (kek, run_id, target_version, cursor, moved, started, updated, finished, data_before, skipped) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
    "ON CONFLICT (kek) DO UPDATE SET run_id = $2, target_version = $3, cursor = $4, "
    "moved = $5, started = $6, updated = $7, finished = $8, data_before = $9, skipped = $10"
)
#: Per KEK: the payment methods whose data is sealed under an old data key, and how to
#: store it sealed anew (one statement; only where the row is still as it was read).
_OLD_KEYS = "SELECT id FROM data_keys WHERE kek = $1 AND created < $2"
_SEALED_WHERE = {
    "pan": f"data_key_id IN ({_OLD_KEYS})",
    "cvc": f"cvc_ct IS NOT NULL AND cvc_data_key_id IN ({_OLD_KEYS})",
}
_RESEAL = {
    "pan": """UPDATE payment_methods AS p
        SET data_key_id = m.new, number_ct = m.ct, name_ct = m.name
        FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::bytea[])
            AS m(id, old, new, ct, name)
        WHERE p.id = m.id AND p.data_key_id = m.old""",
    "cvc": """UPDATE payment_methods AS p
        SET cvc_data_key_id = m.new, cvc_ct = m.ct
        FROM unnest($1::text[], $2::text[], $3::text[], $4::bytea[], $5::bytea[])
            AS m(id, old, new, ct, name)
        WHERE p.id = m.id AND p.cvc_data_key_id = m.old AND p.cvc_ct IS NOT NULL""",
}


class PostgresKeyJobs(PostgresDatabase):
    async def data_key_counts(self) -> dict[str, dict[int, int]]:
        pool = await self._get_pool()
        counts: dict[str, dict[int, int]] = {}
        for kek, version, n in await pool.fetch(_COUNTS):
            counts.setdefault(str(kek), {})[int(version)] = int(n)
        return counts

    async def data_keys_below(
        self, kek: str, version: int, after: str, limit: int
    ) -> list[DataKeyRecord]:
        pool = await self._get_pool()
        found = await pool.fetch(_BELOW, kek, version, after, limit)
        return [rows.data_key_from_row(r) for r in found]

    async def move_data_keys(self, moves: Sequence[DataKeyMove]) -> int:
        if not moves:
            return 0
        pool = await self._get_pool()
        status = await pool.execute(
            _MOVE,
            [m[0] for m in moves],
            [m[1] for m in moves],
            [m[2] for m in moves],
            [m[3] for m in moves],
        )
        return int(str(status).rsplit(" ", 1)[-1])

    async def cards_sealed_before(
        self, kek: str, before: int, after: str, limit: int
    ) -> list[PaymentMethodRecord]:
        pool = await self._get_pool()
        sql = f"{rows.SELECT_PAYMENT_METHOD} WHERE {_SEALED_WHERE[kek]} AND id > $3 ORDER BY id LIMIT $4"
        found = await pool.fetch(sql, kek, before, after, limit)
        return [rows.payment_method_from_row(r) for r in found]

    async def count_cards_sealed_before(self, kek: str, before: int) -> int:
        pool = await self._get_pool()
        sql = f"SELECT count(*) FROM payment_methods WHERE {_SEALED_WHERE[kek]}"  # noqa: S608
        return int(await pool.fetchval(sql, kek, before))

    async def reseal_cards(self, kek: str, reseals: Sequence[CardReseal]) -> int:
        if not reseals:
            return 0
        pool = await self._get_pool()
        columns = list(zip(*reseals, strict=True))
        status = await pool.execute(_RESEAL[kek], *(list(c) for c in columns))
        return int(str(status).rsplit(" ", 1)[-1])

    async def get_key_job(self, kek: str) -> KeyJob | None:
        pool = await self._get_pool()
        row = await pool.fetchrow(_GET_JOB, kek)
        return None if row is None else KeyJob(*row)

    async def put_key_job(self, job: KeyJob) -> None:
        pool = await self._get_pool()
        await pool.execute(
            _PUT_JOB, job.kek, job.run_id, job.target_version, job.cursor, job.moved,
            job.started, job.updated, job.finished, job.data_before, job.skipped,
        )  # fmt: skip
