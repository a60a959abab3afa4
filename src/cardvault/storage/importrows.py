"""Bulk import's rows (:class:`~cardvault.storage.base.ImportJob`, ``ImportRow``,
``ImportLink``, ``ImportKeyRecord``): their columns and the conversions both ways,
written once for both backends like :mod:`cardvault.storage.rows`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from cardvault.storage.base import ImportJob, ImportKeyRecord, ImportLink, ImportRow
from cardvault.storage.rows import select

__all__ = [
    "IMPORT_JOB_COLUMNS",
    "IMPORT_KEY_COLUMNS",
    "IMPORT_LINK_COLUMNS",
    "IMPORT_ROW_COLUMNS",
    "SELECT_IMPORT_JOB",
    "SELECT_IMPORT_KEY",
    "SELECT_IMPORT_ROWS",
    "job_from_row",
    "job_params",
    "key_from_row",
    "key_params",
    "link_from_row",
    "link_params",
    "row_from_row",
    "row_params",
]

IMPORT_KEY_COLUMNS = (
    "fingerprint",
    "public_key",
    "secret_key",
    "data_key_id",
    "sealed_passphrase",
    "created",
)
IMPORT_JOB_COLUMNS = (
    "id",
    "account_id",
    "livemode",
    "file_sha256",
    "format",
    "total_rows",
    "cursor",
    "imported",
    "duplicates",
    "already",
    "invalid",
    "reasons",
    "started",
    "updated",
    "finished",
)
IMPORT_ROW_COLUMNS = (
    "job_id",
    "row_number",
    "line",
    "external_id",
    "pm_id",
    "reason",
    "detail",
)
IMPORT_LINK_COLUMNS = ("account_id", "livemode", "external_id", "pm_id", "fingerprint", "job_id")

SELECT_IMPORT_KEY = (
    select("import_keys", IMPORT_KEY_COLUMNS) + " ORDER BY created DESC, fingerprint DESC LIMIT 1"
)
SELECT_IMPORT_JOB = select("import_jobs", IMPORT_JOB_COLUMNS) + " WHERE id = ?"
SELECT_IMPORT_ROWS = (
    select("import_rows", IMPORT_ROW_COLUMNS)
    + " WHERE job_id = ? AND row_number > ? ORDER BY row_number LIMIT ?"
)


def key_params(k: ImportKeyRecord) -> tuple[Any, ...]:
    return (
        k.fingerprint,
        k.public_key,
        k.secret_key,
        k.data_key_id,
        k.sealed_passphrase,
        k.created,
    )


def key_from_row(r: Sequence[Any]) -> ImportKeyRecord:
    return ImportKeyRecord(str(r[0]), str(r[1]), str(r[2]), str(r[3]), bytes(r[4]), int(r[5]))


def job_params(j: ImportJob) -> tuple[Any, ...]:
    return (
        j.id, j.account_id, bool(j.livemode), j.file_sha256, j.format, j.total_rows, j.cursor,
        j.imported, j.duplicates, j.already, j.invalid,
        orjson.dumps(j.reasons, option=orjson.OPT_SORT_KEYS).decode(),
        j.started, j.updated, j.finished,
    )  # fmt: skip


def job_from_row(r: Sequence[Any]) -> ImportJob:
    return ImportJob(
        id=str(r[0]),
        account_id=str(r[1]),
        livemode=bool(r[2]),
        file_sha256=str(r[3]),
        format=str(r[4]),
        total_rows=int(r[5]),
        cursor=int(r[6]),
        imported=int(r[7]),
        duplicates=int(r[8]),
        already=int(r[9]),
        invalid=int(r[10]),
        reasons={str(k): int(v) for k, v in orjson.loads(r[11]).items()},
        started=int(r[12]),
        updated=int(r[13]),
        finished=None if r[14] is None else int(r[14]),
    )


def row_params(r: ImportRow) -> tuple[Any, ...]:
    return (r.job_id, r.row_number, r.line, r.external_id, r.pm_id, r.reason, r.detail)


def row_from_row(r: Sequence[Any]) -> ImportRow:
    return ImportRow(
        str(r[0]),
        int(r[1]),
        int(r[2]),
        str(r[3]),
        None if r[4] is None else str(r[4]),
        None if r[5] is None else str(r[5]),
        None if r[6] is None else str(r[6]),
    )


def link_params(k: ImportLink) -> tuple[Any, ...]:
    return (k.account_id, bool(k.livemode), k.external_id, k.pm_id, k.fingerprint, k.job_id)


def link_from_row(r: Sequence[Any]) -> ImportLink:
    return ImportLink(str(r[0]), bool(r[1]), str(r[2]), str(r[3]), str(r[4]), str(r[5]))
