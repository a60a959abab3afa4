"""The vault's store on SQLite: :class:`~cardvault.storage.base.VaultStore`'s queries.

Each method is one operation for the group-commit writer of
:mod:`cardvault.storage.sqlite.writer` (which holds the connections, the batching, the
checkpoints and the scrubbing): writes through ``_write``, durable when they return;
lookups by primary key through ``_lookup``; pages of a list through ``_read`` (the list
methods themselves are :class:`~cardvault.storage.pages.VaultLists`, shared with
PostgreSQL). Operations that erase card data (a delete, a CVC's erasure, a purge) ask
for the WAL to be scrubbed.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

from cardvault.storage import rows
from cardvault.storage._shared import insert_sql
from cardvault.storage.base import (
    DONE,
    Account,
    ApiKey,
    DataKeyRecord,
    EventRecord,
    ForwardingRequestRecord,
    IdempotencyRecord,
    Mode,
    PaymentMethodRecord,
    TakenCvc,
    precondition_met,
)
from cardvault.storage.migrations import VAULT_SCHEMA, Schema
from cardvault.storage.outboxrows import OutboxLists
from cardvault.storage.pages import Page, VaultLists
from cardvault.storage.sqlite.connection import insert
from cardvault.storage.sqlite.imports import SQLiteImports
from cardvault.storage.sqlite.keyjobs import SQLiteKeyJobs
from cardvault.storage.sqlite.outbox import SQLiteOutbox, with_event
from cardvault.storage.sqlite.writer import Insert, SQLiteDatabase

__all__ = ["SQLiteVaultStore"]

R = TypeVar("R")

_INSERT_ACCOUNT = insert_sql("accounts", rows.ACCOUNT_COLUMNS)
_INSERT_API_KEY = insert_sql("api_keys", rows.API_KEY_COLUMNS)
_INSERT_DATA_KEY = insert_sql("data_keys", rows.DATA_KEY_COLUMNS)
_INSERT_PM = insert_sql("payment_methods", rows.PAYMENT_METHOD_COLUMNS)


class _NotYet(Exception):
    """A write's ``after`` was not settled when its transaction ran: nothing written."""


_INSERT_FWD = insert_sql("forwarding_requests", rows.FORWARDING_COLUMNS)
_INSERT_IDEMPOTENCY = (
    insert_sql("idempotency_keys", rows.IDEMPOTENCY_COLUMNS)
    + " ON CONFLICT (account_id, mode, idempotency_key) DO NOTHING"
)


class SQLiteVaultStore(
    VaultLists, OutboxLists, SQLiteKeyJobs, SQLiteImports, SQLiteOutbox, SQLiteDatabase
):
    """The vault's store in one SQLite file (the embedded default).

    ``group_commit`` (default on) lets concurrent writes share a transaction, at most
    ``max_batch`` of them; ``readers`` is the number of read connections. Nothing is
    opened until the first call; :meth:`close` finishes the queued writes, checkpoints
    and closes every connection.
    """

    schema: ClassVar[Schema] = VAULT_SCHEMA

    # -- accounts and keys ---------------------------------------------------------------

    async def create_account(self, account: Account) -> None:
        params = rows.account_params(account)
        await self._write(lambda c: insert(c, _INSERT_ACCOUNT, params, "an account"))

    async def get_account(self, account_id: str) -> Account | None:
        def op(conn: sqlite3.Connection) -> Account | None:
            row = conn.execute(f"{rows.SELECT_ACCOUNT} WHERE id = ?", (account_id,)).fetchone()
            return None if row is None else rows.account_from_row(row)

        return await self._lookup(op)

    async def set_allowed_origins(self, account_id: str, origins: Sequence[str]) -> bool:
        encoded = rows.origins_param(origins)

        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE accounts SET allowed_origins = ? WHERE id = ?", (encoded, account_id)
            )
            return cur.rowcount == 1

        return await self._write(op)

    async def create_api_key(self, key: ApiKey) -> None:
        params = rows.api_key_params(key)
        await self._write(lambda c: insert(c, _INSERT_API_KEY, params, "an API key"))

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        def op(conn: sqlite3.Connection) -> ApiKey | None:
            row = conn.execute(f"{rows.SELECT_API_KEY} WHERE hash = ?", (key_hash,)).fetchone()
            return None if row is None else rows.api_key_from_row(row)

        return await self._lookup(op)

    async def list_api_keys(self, account_id: str) -> list[ApiKey]:
        def op(conn: sqlite3.Connection) -> list[ApiKey]:
            found = conn.execute(
                f"{rows.SELECT_API_KEY} WHERE account_id = ? ORDER BY created, id", (account_id,)
            ).fetchall()
            return [rows.api_key_from_row(r) for r in found]

        return await self._read(op)

    async def revoke_api_key(self, key_id: str, when: int) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL",
                (when, key_id),
            )
            return cur.rowcount == 1

        return await self._write(op)

    # -- data keys -----------------------------------------------------------------------

    async def insert_data_key(self, record: DataKeyRecord) -> None:
        params = rows.data_key_params(record)
        await self._write(lambda c: insert(c, _INSERT_DATA_KEY, params, "a data key"))

    async def get_data_key(self, data_key_id: str) -> DataKeyRecord | None:
        def op(conn: sqlite3.Connection) -> DataKeyRecord | None:
            row = conn.execute(f"{rows.SELECT_DATA_KEY} WHERE id = ?", (data_key_id,)).fetchone()
            return None if row is None else rows.data_key_from_row(row)

        return await self._lookup(op)

    # -- payment methods -----------------------------------------------------------------

    async def insert_payment_method(
        self, record: PaymentMethodRecord, *, event: EventRecord | None = None
    ) -> None:
        params = rows.payment_method_params(record)
        if event is not None:
            # With its event: one compound operation (a savepoint), not a mergeable insert.
            op = with_event(lambda c: insert(c, _INSERT_PM, params, "a payment method"), event)
            await self._write(op, compound=True)
            return
        await self._write(
            lambda c: insert(c, _INSERT_PM, params, "a payment method"),
            insert=Insert(
                "payment_methods", rows.PAYMENT_METHOD_COLUMNS, params, "a payment method"
            ),
        )

    async def get_payment_method(
        self, account_id: str, livemode: bool, pm_id: str
    ) -> PaymentMethodRecord | None:
        def op(conn: sqlite3.Connection) -> PaymentMethodRecord | None:
            row = conn.execute(
                f"{rows.SELECT_PAYMENT_METHOD} WHERE id = ? AND account_id = ? AND livemode = ?",
                (pm_id, account_id, bool(livemode)),
            ).fetchone()
            return None if row is None else rows.payment_method_from_row(row)

        return await self._lookup(op)

    async def _list(self, page: Page, from_row: Callable[[Any], R]) -> list[R]:  # VaultLists
        def op(conn: sqlite3.Connection) -> list[R]:
            return [from_row(r) for r in conn.execute(page.sql, page.params).fetchall()]

        records = await self._read(op)
        if page.reverse:
            records.reverse()
        return records

    async def delete_payment_method(
        self, account_id: str, livemode: bool, pm_id: str, *, event: EventRecord | None = None
    ) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "DELETE FROM payment_methods WHERE id = ? AND account_id = ? AND livemode = ?",
                (pm_id, account_id, bool(livemode)),
            )
            return cur.rowcount == 1

        if event is not None:
            return await self._write(with_event(op, event, bool), erases=True, compound=True)
        return await self._write(op, erases=True)

    async def destroy_cvc(self, account_id: str, livemode: bool, pm_id: str) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE payment_methods SET cvc_ct = NULL, cvc_data_key_id = NULL, "
                "cvc_expires = NULL WHERE id = ? AND account_id = ? AND livemode = ? "
                "AND cvc_ct IS NOT NULL",
                (pm_id, account_id, bool(livemode)),
            )
            return cur.rowcount == 1

        return await self._write(op, erases=True)

    async def destroy_expired_cvcs(self, now: int) -> int:
        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE payment_methods SET cvc_ct = NULL, cvc_data_key_id = NULL, "
                "cvc_expires = NULL WHERE cvc_expires IS NOT NULL AND cvc_expires <= ?",
                (now,),
            )
            return cur.rowcount

        return await self._write(op, erases=True)

    async def take_cvc(self, account_id: str, livemode: bool, pm_id: str) -> TakenCvc | None:
        def op(conn: sqlite3.Connection) -> TakenCvc | None:
            # The only writing connection runs this whole function inside its
            # transaction, so no other write can come between the read and the erase.
            return _take_cvc(conn, account_id, livemode, pm_id)

        return await self._write(op, erases=True, compound=True)

    async def restore_cvc(
        self, account_id: str, livemode: bool, pm_id: str, taken: TakenCvc
    ) -> bool:
        params = (*taken, pm_id, account_id, bool(livemode))
        return await self._write(lambda c: c.execute(rows.RESTORE_CVC, params).rowcount == 1)

    # -- forwarding requests -------------------------------------------------------------

    async def insert_forwarding_request(
        self, record: ForwardingRequestRecord, *, after: asyncio.Future[Any] | None = None
    ) -> None:
        params = rows.forwarding_params(record)
        await self._write_after(
            after, lambda c: insert(c, _INSERT_FWD, params, "a forwarding request")
        )

    async def take_cvc_for_forward(
        self, record: ForwardingRequestRecord, *, after: asyncio.Future[Any] | None = None
    ) -> TakenCvc | None:
        params = rows.forwarding_params(record)
        scope = (record.account_id, record.livemode, record.payment_method)

        def op(conn: sqlite3.Connection) -> TakenCvc | None:
            taken = _take_cvc(conn, *scope)
            if taken is not None:
                # A duplicate id fails the whole operation (its savepoint): the CVC stays.
                insert(conn, _INSERT_FWD, params, "a forwarding request")
            return taken

        return await self._write_after(after, op, erases=True, compound=True)

    async def _write_after(
        self,
        after: asyncio.Future[Any] | None,
        fn: Callable[[sqlite3.Connection], R],
        *,
        erases: bool = False,
        compound: bool = False,
    ) -> R:
        """``fn`` written once ``after`` has succeeded (see
        :meth:`VaultStore.insert_forwarding_request`).

        The operation is queued at once, to run in the first transaction after ``after``
        is settled (:meth:`SQLiteDatabase._write`): the audit log's flush, queued in the
        same loop iteration, runs before the store's in the same pass of the loop, so
        both are made durable in that pass, the audit record first. The operation checks
        how ``after`` settled and writes nothing when it failed."""
        if after is None:
            return await self._write(fn, erases=erases, compound=compound)

        def gated(conn: sqlite3.Connection) -> R:
            if not precondition_met(after):
                raise _NotYet()  # never: the writer waits for it
            return fn(conn)

        try:
            return await self._write(gated, erases=erases, compound=compound, after=after)
        except _NotYet:
            pass
        await asyncio.wait([after])
        precondition_met(after)
        return await self._write(fn, erases=erases, compound=compound)

    async def complete_forwarding_request(
        self,
        account_id: str,
        livemode: bool,
        fwd_id: str,
        outcome: str,
        request_context: dict[str, object] | None = None,
        response_details: dict[str, object] | None = None,
        *,
        event: EventRecord | None = None,
    ) -> bool:
        params = rows.forward_outcome_params(
            account_id, livemode, fwd_id, outcome, request_context, response_details
        )

        def op(conn: sqlite3.Connection) -> bool:
            return conn.execute(rows.COMPLETE_FORWARD, params).rowcount == 1

        if event is not None:
            return await self._write(with_event(op, event, bool), compound=True)
        return await self._write(op)

    async def cancel_forwarding_request(
        self, account_id: str, livemode: bool, fwd_id: str, restore: TakenCvc | None
    ) -> bool:
        scope = (fwd_id, account_id, bool(livemode))

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT payment_method FROM forwarding_requests "
                "WHERE id = ? AND account_id = ? AND livemode = ? AND outcome = 'pending'",
                scope,
            ).fetchone()
            if row is None:
                return False
            conn.execute(rows.DELETE_PENDING_FORWARD, scope)
            if restore is not None:
                conn.execute(rows.RESTORE_CVC, (*restore, str(row[0]), account_id, bool(livemode)))
            return True

        return await self._write(op, compound=True)

    async def pending_forwarding_requests(
        self, created_before: int, *, limit: int
    ) -> list[ForwardingRequestRecord]:
        def op(conn: sqlite3.Connection) -> list[ForwardingRequestRecord]:
            found = conn.execute(rows.PENDING_FORWARDS, (created_before, limit)).fetchall()
            return [rows.forwarding_from_row(r) for r in found]

        return await self._read(op)

    async def get_forwarding_request(
        self, account_id: str, livemode: bool, fwd_id: str
    ) -> ForwardingRequestRecord | None:
        def op(conn: sqlite3.Connection) -> ForwardingRequestRecord | None:
            row = conn.execute(
                f"{rows.SELECT_FORWARDING} WHERE id = ? AND account_id = ? AND livemode = ?",
                (fwd_id, account_id, bool(livemode)),
            ).fetchone()
            return None if row is None else rows.forwarding_from_row(row)

        return await self._lookup(op)

    async def purge_forwarding_requests(self, before: int) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM forwarding_requests WHERE created < ?", (before,)
            ).rowcount

        return await self._write(op, erases=True)

    # -- idempotency ---------------------------------------------------------------------

    async def claim_idempotency_key(self, record: IdempotencyRecord) -> IdempotencyRecord | None:
        params = rows.idempotency_params(record)
        pk = (record.account_id, record.mode, record.key)

        def op(conn: sqlite3.Connection) -> IdempotencyRecord | None:
            # Atomic: the writer holds the database's write lock for the whole batch.
            if conn.execute(_INSERT_IDEMPOTENCY, params).rowcount == 1:
                return None
            row = conn.execute(
                f"{rows.SELECT_IDEMPOTENCY} WHERE account_id = ? AND mode = ? AND idempotency_key = ?",
                pk,
            ).fetchone()
            return rows.idempotency_from_row(row)

        return await self._write(op)

    async def take_over_idempotency_key(
        self, record: IdempotencyRecord, expected_token: str
    ) -> bool:
        params = rows.take_over_params(record, expected_token)
        return await self._write(
            lambda c: c.execute(rows.TAKE_OVER_IDEMPOTENCY, params).rowcount == 1
        )

    async def complete_idempotency_key(
        self,
        account_id: str,
        mode: Mode,
        key: str,
        status: int,
        body: str,
        *,
        token: str | None = None,
        state: str = DONE,
    ) -> bool:
        sql = rows.COMPLETE_IDEMPOTENCY
        params: tuple[Any, ...] = (state, status, body, account_id, mode, key)
        if token is not None:
            sql, params = rows.COMPLETE_HELD_IDEMPOTENCY, (*params, token)
        return await self._write(lambda c: c.execute(sql, params).rowcount == 1)

    async def release_idempotency_key(
        self, account_id: str, mode: Mode, key: str, *, token: str | None = None
    ) -> bool:
        sql = rows.RELEASE_IDEMPOTENCY
        params: tuple[Any, ...] = (account_id, mode, key)
        if token is not None:
            sql, params = rows.RELEASE_HELD_IDEMPOTENCY, (*params, token)
        return await self._write(lambda c: c.execute(sql, params).rowcount == 1)

    async def stale_idempotency_claims(
        self, now: int, owner: str, boot: str, *, limit: int
    ) -> list[IdempotencyRecord]:
        def op(conn: sqlite3.Connection) -> list[IdempotencyRecord]:
            found = conn.execute(rows.STALE_IDEMPOTENCY_CLAIMS, (now, owner, boot, limit))
            return [rows.idempotency_from_row(r) for r in found.fetchall()]

        return await self._read(op)

    async def purge_idempotency_keys(self, before: int) -> int:
        def op(conn: sqlite3.Connection) -> int:
            return conn.execute(
                "DELETE FROM idempotency_keys WHERE created < ?", (before,)
            ).rowcount

        return await self._write(op)

    # -- periodic jobs -------------------------------------------------------------------

    async def lead_jobs(self) -> bool:
        """Always True: a SQLite database is served by one vault process (its
        group-commit writer is in that process), so there is no one else to lead."""
        return True


def _take_cvc(
    conn: sqlite3.Connection, account_id: str, livemode: bool, pm_id: str
) -> TakenCvc | None:
    """Read and erase a CVC, inside the writer's transaction (nothing can come between)."""
    row = conn.execute(
        "SELECT cvc_ct, cvc_data_key_id, cvc_expires FROM payment_methods "
        "WHERE id = ? AND account_id = ? AND livemode = ? AND cvc_ct IS NOT NULL",
        (pm_id, account_id, bool(livemode)),
    ).fetchone()
    if row is None:
        return None
    conn.execute(
        "UPDATE payment_methods SET cvc_ct = NULL, cvc_data_key_id = NULL, cvc_expires = NULL "
        "WHERE id = ?",
        (pm_id,),
    )
    return TakenCvc(bytes(row[0]), str(row[1]), None if row[2] is None else int(row[2]))
