"""Bulk import's bookkeeping on SQLite, mixed into
:class:`~cardvault.storage.sqlite.vault.SQLiteVaultStore`. A batch is one compound
operation of the group-commit writer: it runs inside its own savepoint, so it is
written whole or not at all even when it shares a transaction with other writes."""

from __future__ import annotations

import sqlite3
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
)
from cardvault.storage.sqlite.connection import insert
from cardvault.storage.sqlite.writer import SQLiteDatabase

__all__ = ["SQLiteImports"]

_INSERT_KEY = insert_sql("import_keys", importrows.IMPORT_KEY_COLUMNS)
_PUT_JOB = "INSERT OR REPLACE" + insert_sql("import_jobs", importrows.IMPORT_JOB_COLUMNS)[6:]
_INSERT_PM = insert_sql("payment_methods", rows.PAYMENT_METHOD_COLUMNS)
_INSERT_LINK = insert_sql("import_links", importrows.IMPORT_LINK_COLUMNS)
_INSERT_ROW = insert_sql("import_rows", importrows.IMPORT_ROW_COLUMNS)
_FINGERPRINTS = (
    "SELECT DISTINCT fingerprint FROM payment_methods "
    "WHERE account_id = ? AND livemode = ? AND fingerprint IN"
)
#: SQLite binds at most 32766 values per statement; lookups go in chunks below that.
_CHUNK = 500


class SQLiteImports(SQLiteDatabase):
    async def put_import_key(self, record: ImportKeyRecord) -> None:
        params = importrows.key_params(record)
        await self._write(lambda c: insert(c, _INSERT_KEY, params, "an import key"))

    async def get_import_key(self) -> ImportKeyRecord | None:
        def op(conn: sqlite3.Connection) -> ImportKeyRecord | None:
            row = conn.execute(importrows.SELECT_IMPORT_KEY).fetchone()
            return None if row is None else importrows.key_from_row(row)

        return await self._lookup(op)

    async def get_import_job(self, job_id: str) -> ImportJob | None:
        def op(conn: sqlite3.Connection) -> ImportJob | None:
            row = conn.execute(importrows.SELECT_IMPORT_JOB, (job_id,)).fetchone()
            return None if row is None else importrows.job_from_row(row)

        return await self._lookup(op)

    async def put_import_job(self, job: ImportJob) -> None:
        params = importrows.job_params(job)
        await self._write(lambda c: c.execute(_PUT_JOB, params))

    async def import_links(
        self, account_id: str, livemode: bool, external_ids: Sequence[str]
    ) -> list[ImportLink]:
        ids = list(external_ids)

        def op(conn: sqlite3.Connection) -> list[ImportLink]:
            found: list[ImportLink] = []
            for start in range(0, len(ids), _CHUNK):
                chunk = ids[start : start + _CHUNK]
                sql = (
                    f"{rows.select('import_links', importrows.IMPORT_LINK_COLUMNS)} WHERE "
                    f"account_id = ? AND livemode = ? AND external_id IN ({','.join('?' * len(chunk))})"
                )
                for r in conn.execute(sql, (account_id, bool(livemode), *chunk)).fetchall():
                    found.append(importrows.link_from_row(r))
            return found

        return await self._read(op)

    async def present_fingerprints(
        self, account_id: str, livemode: bool, fingerprints: Sequence[str]
    ) -> set[str]:
        wanted = sorted(set(fingerprints))

        def op(conn: sqlite3.Connection) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(wanted), _CHUNK):
                chunk = wanted[start : start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                sql = f"{_FINGERPRINTS} ({marks})"
                found.update(
                    str(r[0]) for r in conn.execute(sql, (account_id, bool(livemode), *chunk))
                )
            return found

        return await self._read(op)

    async def write_import_batch(self, batch: ImportBatch) -> None:
        pms = [rows.payment_method_params(p) for p in batch.payment_methods]
        links = [importrows.link_params(k) for k in batch.links]
        outcomes = [importrows.row_params(r) for r in batch.rows]
        job = importrows.job_params(batch.job)

        def op(conn: sqlite3.Connection) -> None:
            try:
                conn.executemany(_INSERT_PM, pms)
                conn.executemany(_INSERT_LINK, links)
                conn.executemany(_INSERT_ROW, outcomes)
            except sqlite3.IntegrityError as exc:
                raise DuplicateError("a row of this import batch is taken") from exc
            conn.execute(_PUT_JOB, job)

        # compound: the writer runs it in a savepoint, undone as a whole on any error.
        await self._write(op, compound=True)

    async def import_rows(self, job_id: str, after: int, limit: int) -> list[ImportRow]:
        def op(conn: sqlite3.Connection) -> list[ImportRow]:
            found = conn.execute(importrows.SELECT_IMPORT_ROWS, (job_id, after, limit)).fetchall()
            return [importrows.row_from_row(r) for r in found]

        return await self._read(op)
