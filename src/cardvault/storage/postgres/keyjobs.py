"""The vault's re-encryption bookkeeping on PostgreSQL (:class:`~cardvault.storage.base.KeyJob`
and the data keys it moves), mixed into :class:`~cardvault.storage.postgres.vault.PostgresVaultStore`."""

from __future__ import annotations

from collections.abc import Sequence

from cardvault.storage import rows
from cardvault.storage.base import DataKeyMove, DataKeyRecord, KeyJob
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
_GET_JOB = "SELECT kek, run_id, target_version, cursor, moved, started, updated, finished FROM key_jobs WHERE kek = $1"
_PUT_JOB = (
    "INSERT INTO key_jobs (kek, run_id, target_version, cursor, moved, started, updated, finished) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
    "ON CONFLICT (kek) DO UPDATE SET run_id = $2, target_version = $3, cursor = $4, "
    "moved = $5, started = $6, updated = $7, finished = $8"
)


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

    async def get_key_job(self, kek: str) -> KeyJob | None:
        pool = await self._get_pool()
        row = await pool.fetchrow(_GET_JOB, kek)
        return None if row is None else KeyJob(*row)

    async def put_key_job(self, job: KeyJob) -> None:
        pool = await self._get_pool()
        await pool.execute(
            _PUT_JOB, job.kek, job.run_id, job.target_version, job.cursor, job.moved,
            job.started, job.updated, job.finished,
        )  # fmt: skip
