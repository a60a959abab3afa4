"""The import pass's batches (docs/migration.md, "Importing"): each one prepared (every
row checked, fingerprinted and sealed exactly as ``POST /v1/payment_methods`` would, or
refused with its reason and the number masked; the job moved past it), then stored (its
``import.batch`` audit record, then one transaction with its cursor,
:meth:`VaultStore.write_import_batch`).

**Pipelined.** While one batch is being stored, on a task of its own, the next one is
read and prepared (its rows sealed, its external ids looked up), so that the
database's work overlaps the vault's. The order of effects is the sequential one: the
service (:mod:`.service`) starts storing a batch only once the one before it is
stored, so a batch that fails is the last one recorded (then
``import.batch_not_stored``) and the batch prepared meanwhile is dropped unrecorded.
Duplicates by fingerprint count the batch still being stored too (the store may not
show it yet).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, replace
from typing import Any

from cardvault.audit.recorder import Recorder
from cardvault.cards import redact_card_numbers
from cardvault.errors import CardVaultError
from cardvault.storage.base import (
    ImportBatch,
    ImportJob,
    ImportLink,
    ImportRow,
    PaymentMethodRecord,
    VaultStore,
)
from cardvault.vault.accounts import Caller
from cardvault.vault.ids import time_ordered_id
from cardvault.vault.imports.reader import Row
from cardvault.vault.payment_methods import PaymentMethods

__all__ = ["ImportBatches", "Prepared", "Storing"]


def _mask(value: object) -> str:
    """A refused row's number for the report: its first six and last four digits at
    most (what PCI DSS lets be shown), never the number."""
    digits = "".join(c for c in str(value) if c.isdigit()) if isinstance(value, str | int) else ""
    if len(digits) >= 13:
        return digits[:6] + "*" * (len(digits) - 10) + digits[-4:]
    return "*" * len(digits)


class ImportBatches:
    """Prepares and stores an import's batches (module docstring)."""

    def __init__(self, store: VaultStore, payment_methods: PaymentMethods, audit: Recorder) -> None:
        self.store = store
        self.payment_methods = payment_methods
        self.audit = audit

    async def prepare(
        self, caller: Caller, job: ImportJob, rows: list[Row], storing: Storing | None
    ) -> Prepared:
        """One batch made ready (module docstring): every row checked, fingerprinted and
        sealed or refused, the job moved past it; nothing recorded or stored. Runs while
        the batch before it (``storing``) is being stored."""
        # Looked up while the rows are sealed. No row of the batch before can be among
        # them (the check pass refused a file naming an external id twice); a link
        # another import writes meanwhile fails this batch's write as a duplicate.
        links_lookup = asyncio.ensure_future(
            self.store.import_links(
                caller.account_id, caller.livemode, [r.external_id for r in rows]
            )
        )
        try:
            prepared = await self.payment_methods.prepare_imports(
                caller, [r.params for r in rows], [time_ordered_id("pm_") for _ in rows]
            )
        except BaseException:
            links_lookup.cancel()
            with contextlib.suppress(BaseException):
                await links_lookup
            raise
        links = {k.external_id: k for k in await links_lookup}
        records: list[PaymentMethodRecord] = []
        new_links: list[ImportLink] = []
        outcomes: list[ImportRow] = []
        refused: list[dict[str, Any]] = []
        reasons = dict(job.reasons)
        already = 0
        job_id, account_id, livemode = job.id, caller.account_id, caller.livemode
        for row, record in zip(rows, prepared, strict=True):
            if isinstance(record, CardVaultError):
                number = row.params.get("card", {}).get("number")
                detail = redact_card_numbers(record.message)[:300]
                if number not in (None, ""):
                    detail = f"{detail} (number {_mask(number)})"
                outcomes.append(
                    ImportRow(job_id, row.number, row.line, row.external_id, None, record.code,
                              detail)
                )  # fmt: skip
                reasons[record.code] = reasons.get(record.code, 0) + 1
                refused.append({"line": row.line, "reason": record.code, "detail": detail})
                continue
            link = links.get(row.external_id)
            if link is not None:
                if link.fingerprint == record.fingerprint:
                    already += 1
                    outcomes.append(
                        ImportRow(job_id, row.number, row.line, row.external_id, link.pm_id)
                    )
                else:
                    code = "external_id_taken"
                    detail = "the external id names another card in this account"
                    outcomes.append(
                        ImportRow(job_id, row.number, row.line, row.external_id, None, code, detail)
                    )
                    reasons[code] = reasons.get(code, 0) + 1
                    refused.append({"line": row.line, "reason": code, "detail": detail})
                continue
            records.append(record)
            new_links.append(
                ImportLink(account_id, livemode, row.external_id, record.id, record.fingerprint,
                           job_id)
            )  # fmt: skip
            outcomes.append(ImportRow(job_id, row.number, row.line, row.external_id, record.id))
        # Duplicates by fingerprint: cards the account had, or the file has before (in
        # this batch, or in the one still being stored, which the store may not show
        # yet).
        fingerprints = [r.fingerprint for r in records]
        present = await self.store.present_fingerprints(
            caller.account_id, caller.livemode, fingerprints
        )
        if storing is not None:
            present |= storing.fingerprints
        duplicates = 0
        for fingerprint in fingerprints:
            if fingerprint in present:
                duplicates += 1
            present.add(fingerprint)
        invalid = len(refused)
        moved = replace(
            job,
            cursor=rows[-1].number,
            imported=job.imported + len(records),
            duplicates=job.duplicates + duplicates,
            already=job.already + already,
            invalid=job.invalid + invalid,
            reasons=reasons,
            updated=int(time.time()),
        )
        # The rows as two numbers: as one text, "999001-1000000", a batch's range reads
        # as a card number (13 digits in groups, Luhn-valid) and the audit log refuses it.
        audited: dict[str, str | int | bool | None] = {
            "account": caller.account_id, "livemode": caller.livemode,
            "first_row": rows[0].number, "last_row": rows[-1].number,
            "imported": len(records), "invalid": invalid, "duplicates": duplicates,
            "already": already,
        }  # fmt: skip
        return Prepared(
            ImportBatch(records, new_links, outcomes, moved), audited, refused, set(fingerprints)
        )

    def start_storing(self, actor: str, prepared: Prepared) -> Storing:
        """Start storing a prepared batch: its ``import.batch`` audit record, then its
        transaction (module docstring)."""

        async def store() -> dict[str, Any]:
            job = prepared.batch.job
            # Audit before effect: one record for the batch, durable before its rows.
            await self.audit.record(
                "import.batch", actor=actor, object_id=job.id, detail=prepared.audited
            )
            try:
                await self.store.write_import_batch(prepared.batch)
            except Exception:
                await self.audit.record(
                    "import.batch_not_stored",
                    actor=actor,
                    object_id=job.id,
                    result="error",
                    detail={
                        "first_row": prepared.audited["first_row"],
                        "last_row": prepared.audited["last_row"],
                    },
                )
                raise
            return {
                "event": "batch",
                "job": job.id,
                "done": job.cursor,
                "total": job.total_rows,
                "imported": job.imported,
                "invalid": job.invalid,
                "refused": prepared.refused,
            }

        return Storing(asyncio.ensure_future(store()), prepared.fingerprints)


@dataclass(frozen=True)
class Prepared:
    """A batch ready to store (:meth:`ImportBatches.prepare`): what is written, its audit
    record's detail, its refused rows for the report and its new cards' fingerprints."""

    batch: ImportBatch
    audited: dict[str, str | int | bool | None]
    refused: list[dict[str, Any]]
    fingerprints: set[str]


class Storing:
    """A batch being stored: its audit record, then its transaction, on a task of its
    own so that the next batch is prepared meanwhile."""

    def __init__(self, task: asyncio.Future[dict[str, Any]], fingerprints: set[str]) -> None:
        self.task = task
        self.fingerprints = fingerprints

    async def done(self) -> dict[str, Any]:
        """The batch's event once it is stored; raises what storing it raised."""
        return await self.task

    async def outcome(self) -> dict[str, Any] | None:
        """The batch's event once it is stored, or None if storing it failed."""
        try:
            return await asyncio.shield(self.task)
        except Exception:
            return None

    async def settle(self) -> None:
        """Wait for the batch however it ends (its error was reported, or is moot)."""
        await self.outcome()
        if self.task.done() and not self.task.cancelled():
            self.task.exception()  # retrieved: no "never retrieved" warning
