"""Bulk import's bookkeeping on PostgreSQL, mixed into
:class:`~cardvault.storage.postgres.vault.PostgresVaultStore`. A batch is one
transaction on one connection: the payment methods, links and row outcomes go in by
``COPY`` (binary, one round trip per table), then the job's row; a duplicate anywhere
rolls back all of it."""

from __future__ import annotations

from collections.abc import Sequence

from cardvault.storage import importrows, rows
from cardvault.storage._shared import insert_sql
from cardvault.storage.base import (
    DuplicateError,
    ImportBatch,
    ImportJob,
    ImportKeyRecord,
    ImportLink,
    ImportRow,
    UnstorableValue,
)
from cardvault.storage.postgres.pool import PostgresDatabase, numbered

__all__ = ["PostgresImports"]

_INSERT_KEY = numbered(insert_sql("import_keys", importrows.IMPORT_KEY_COLUMNS))
_PUT_JOB = (
    numbered(insert_sql("import_jobs", importrows.IMPORT_JOB_COLUMNS))
    + " ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in importrows.IMPORT_JOB_COLUMNS[1:])
)
_SELECT_JOB = numbered(importrows.SELECT_IMPORT_JOB)
_SELECT_ROWS = numbered(importrows.SELECT_IMPORT_ROWS)
# Both lookups probe the index once per value given (a LATERAL subquery with LIMIT 1
# is never flattened into a join). The plain ``col = ANY($3)`` form let PostgreSQL's
# generic plan for the prepared statement scan every row of the account and filter
# (its statistics of a table filling up are stale): a batch's lookup grew with the
# rows imported so far, from 5 ms to 450 ms within 20,000 rows (docs/migration.md).
_LINKS = (
    "SELECT k.* FROM unnest($3::text[]) AS wanted(external_id) CROSS JOIN LATERAL ("  # noqa: S608 (constants)
    + rows.select("import_links", importrows.IMPORT_LINK_COLUMNS)
    + " WHERE account_id = $1 AND livemode = $2 AND external_id = wanted.external_id"
    " LIMIT 1) AS k"
)
_FINGERPRINTS = (
    "SELECT p.fingerprint FROM unnest($3::text[]) AS wanted(fingerprint) CROSS JOIN LATERAL ("
    "SELECT fingerprint FROM payment_methods WHERE account_id = $1 AND livemode = $2"
    " AND fingerprint = wanted.fingerprint LIMIT 1) AS p"
)


class PostgresImports(PostgresDatabase):
    async def put_import_key(self, record: ImportKeyRecord) -> None:
        await self._insert(_INSERT_KEY, importrows.key_params(record), "an import key")

    async def get_import_key(self) -> ImportKeyRecord | None:
        pool = await self._get_pool()
        row = await pool.fetchrow(importrows.SELECT_IMPORT_KEY)
        return None if row is None else importrows.key_from_row(row)

    async def get_import_job(self, job_id: str) -> ImportJob | None:
        pool = await self._get_pool()
        row = await pool.fetchrow(_SELECT_JOB, job_id)
        return None if row is None else importrows.job_from_row(row)

    async def put_import_job(self, job: ImportJob) -> None:
        pool = await self._get_pool()
        await pool.execute(_PUT_JOB, *importrows.job_params(job))

    async def import_links(
        self, account_id: str, livemode: bool, external_ids: Sequence[str]
    ) -> list[ImportLink]:
        pool = await self._get_pool()
        # Each id once: the lookup answers a row per id given.
        wanted = sorted(set(external_ids))
        found = await pool.fetch(_LINKS, account_id, bool(livemode), wanted)
        return [importrows.link_from_row(r) for r in found]

    async def present_fingerprints(
        self, account_id: str, livemode: bool, fingerprints: Sequence[str]
    ) -> set[str]:
        pool = await self._get_pool()
        found = await pool.fetch(
            _FINGERPRINTS, account_id, bool(livemode), sorted(set(fingerprints))
        )
        return {str(r[0]) for r in found}

    async def write_import_batch(self, batch: ImportBatch) -> None:
        import asyncpg

        pool = await self._get_pool()
        try:
            async with pool.acquire() as conn, conn.transaction():
                for table, columns, records in (
                    (
                        "payment_methods",
                        rows.PAYMENT_METHOD_COLUMNS,
                        [rows.payment_method_params(p) for p in batch.payment_methods],
                    ),
                    (
                        "import_links",
                        importrows.IMPORT_LINK_COLUMNS,
                        [importrows.link_params(k) for k in batch.links],
                    ),
                    (
                        "import_rows",
                        importrows.IMPORT_ROW_COLUMNS,
                        [importrows.row_params(r) for r in batch.rows],
                    ),
                ):
                    if records:
                        await conn.copy_records_to_table(
                            table, records=records, columns=list(columns)
                        )
                await conn.execute(_PUT_JOB, *importrows.job_params(batch.job))
        except asyncpg.UniqueViolationError as exc:
            raise DuplicateError("a row of this import batch is taken") from exc
        except (asyncpg.DataError, UnicodeEncodeError) as exc:
            raise UnstorableValue("a row of this import batch cannot be stored") from exc

    async def import_rows(self, job_id: str, after: int, limit: int) -> list[ImportRow]:
        pool = await self._get_pool()
        found = await pool.fetch(_SELECT_ROWS, job_id, after, limit)
        return [importrows.row_from_row(r) for r in found]
