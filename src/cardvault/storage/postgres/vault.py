"""The vault's store on PostgreSQL: :class:`~cardvault.storage.base.VaultStore`'s queries.

Every method is one statement on a pooled connection of
:class:`~cardvault.storage.postgres.pool.PostgresDatabase`, durable when it returns.
There is no group commit here: the pool's connections commit concurrently, and
PostgreSQL's WAL writer already flushes the commits that arrive together with one
fsync (FACTS: 4.4k rows/s on one connection, 18.7k on 32). ``commit_delay`` on the
server trades latency for larger groups if that is ever needed.

Payment methods are the exception: tokenizations arrive many at a time, so
:meth:`insert_payment_method` queues its row, and the rows queued in the same couple of
event-loop iterations go to the server as one multi-row ``INSERT`` (one round trip, one
commit). If that statement fails on a duplicate, the rows are inserted one by one, so
that each caller gets its own outcome.

Several replicas may share the database: :meth:`migrate` holds a transaction-scoped
advisory lock, and :meth:`claim_idempotency_key` relies on the primary key
(``INSERT … ON CONFLICT DO NOTHING``, then ``SELECT``). The periodic jobs are led by
one of them at a time (:meth:`lead_jobs`): a session-level advisory lock
(:data:`JOBS_LOCK`) held on a connection of its own, outside the pool, which the server
releases when that connection ends, however it ends.

A deleted row (and an erased CVC) stays in the table's heap as a dead tuple until
VACUUM reclaims the space; the database's storage is expected to be encrypted at rest.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, TypeVar

from cardvault.storage import outboxrows, rows
from cardvault.storage._shared import column_list, copy_error, insert_sql, settle
from cardvault.storage.base import (
    DONE,
    Account,
    ApiKey,
    DataKeyRecord,
    DuplicateError,
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
from cardvault.storage.postgres.imports import PostgresImports
from cardvault.storage.postgres.keyjobs import PostgresKeyJobs
from cardvault.storage.postgres.outbox import PostgresOutbox
from cardvault.storage.postgres.pool import (
    CONNECT_TIMEOUT_S,
    PostgresDatabase,
    count,
    numbered,
    unavailable,
)

__all__ = ["JOBS_LOCK", "PostgresVaultStore"]

#: The session-level advisory lock whose holder runs the vault's periodic jobs
#: (:meth:`PostgresVaultStore.lead_jobs`); the schema's migrations lock is 7302.
JOBS_LOCK = 7303
#: Seconds the leader's check that its lock connection still answers may take.
_JOBS_CHECK_TIMEOUT_S = 5.0

R = TypeVar("R")

_INSERT_ACCOUNT = numbered(insert_sql("accounts", rows.ACCOUNT_COLUMNS))
_INSERT_API_KEY = numbered(insert_sql("api_keys", rows.API_KEY_COLUMNS))
_INSERT_DATA_KEY = numbered(insert_sql("data_keys", rows.DATA_KEY_COLUMNS))
_INSERT_PM = numbered(insert_sql("payment_methods", rows.PAYMENT_METHOD_COLUMNS))
_INSERT_FWD = numbered(insert_sql("forwarding_requests", rows.FORWARDING_COLUMNS))
_INSERT_IDEMPOTENCY = numbered(
    insert_sql("idempotency_keys", rows.IDEMPOTENCY_COLUMNS)
    + " ON CONFLICT (account_id, mode, idempotency_key) DO NOTHING RETURNING 1"
)

_TAKE_OVER_IDEMPOTENCY = numbered(rows.TAKE_OVER_IDEMPOTENCY)
_COMPLETE_IDEMPOTENCY = numbered(rows.COMPLETE_IDEMPOTENCY)
_COMPLETE_HELD_IDEMPOTENCY = numbered(rows.COMPLETE_HELD_IDEMPOTENCY)
_RELEASE_IDEMPOTENCY = numbered(rows.RELEASE_IDEMPOTENCY)
_RELEASE_HELD_IDEMPOTENCY = numbered(rows.RELEASE_HELD_IDEMPOTENCY)
_STALE_IDEMPOTENCY_CLAIMS = numbered(rows.STALE_IDEMPOTENCY_CLAIMS)
_COMPLETE_FORWARD = numbered(rows.COMPLETE_FORWARD)
_DELETE_PENDING_FORWARD = numbered(rows.DELETE_PENDING_FORWARD)
_PENDING_FORWARDS = numbered(rows.PENDING_FORWARDS)
_RESTORE_CVC = numbered(rows.RESTORE_CVC)
#: Read and erase a CVC in one statement: the CTE reads the old values and the UPDATE
#: erases them; the row lock it takes means two takers cannot both get the CVC.
_TAKE_CVC = (
    "WITH old AS (SELECT id, cvc_ct, cvc_data_key_id, cvc_expires FROM payment_methods "
    "WHERE id = $1 AND account_id = $2 AND livemode = $3 AND cvc_ct IS NOT NULL FOR UPDATE) "
    "UPDATE payment_methods p SET cvc_ct = NULL, cvc_data_key_id = NULL, cvc_expires = NULL "
    "FROM old WHERE p.id = old.id "
    "RETURNING old.cvc_ct, old.cvc_data_key_id, old.cvc_expires"
)


def _taken(row: Any) -> TakenCvc | None:
    if row is None:
        return None
    return TakenCvc(bytes(row[0]), str(row[1]), None if row[2] is None else int(row[2]))


#: A payment method's row waiting for its multi-row insert, its event, and its caller.
_PendingPm = tuple[tuple[Any, ...], EventRecord | None, asyncio.Future[None]]

#: The most rows one multi-row insert carries (PostgreSQL binds at most 32767 values).
PM_BATCH = 512


@functools.lru_cache(maxsize=128)
def _multi_insert_sql(table: str, columns: tuple[str, ...], count: int) -> str:
    """The statement that inserts ``count`` rows (made once per size: 19 columns by a
    batch of rows is hundreds of placeholders, which cost a measurable part of a
    tokenization when they were written out for every batch)."""
    width = len(columns)
    values = ", ".join(
        "(" + ", ".join(f"${r * width + c + 1}" for c in range(width)) + ")" for r in range(count)
    )
    # Built only from the constant table and column names, never from input.
    return f"INSERT INTO {table} ({column_list(columns)}) VALUES {values}"  # noqa: S608


class _OneByOne(Exception):  # a signal, not an error
    """Insert the rows one by one."""


class PostgresVaultStore(
    VaultLists,
    OutboxLists,
    PostgresKeyJobs,
    PostgresImports,
    PostgresOutbox,
    PostgresDatabase,
):
    """The vault's store in PostgreSQL. ``min_size``/``max_size`` size the pool, which
    is opened on first use (in the running event loop) and closed by :meth:`close`."""

    schema: ClassVar[Schema] = VAULT_SCHEMA

    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 16) -> None:
        super().__init__(dsn, min_size=min_size, max_size=max_size)
        # Payment-method rows waiting for their multi-row insert (module docstring).
        self._pm_pending: list[_PendingPm] = []
        self._pm_flush: asyncio.Handle | None = None
        self._pm_flush_loop: asyncio.AbstractEventLoop | None = None
        self._pm_tasks: set[asyncio.Task[None]] = set()
        # The connection that holds (or tries for) JOBS_LOCK, and whether it holds it.
        self._jobs_conn: Any = None
        self._jobs_held = False

    # -- accounts and keys ---------------------------------------------------------------

    async def create_account(self, account: Account) -> None:
        await self._insert(_INSERT_ACCOUNT, rows.account_params(account), "an account")

    async def get_account(self, account_id: str) -> Account | None:
        pool = await self._get_pool()
        row = await pool.fetchrow(f"{rows.SELECT_ACCOUNT} WHERE id = $1", account_id)
        return None if row is None else rows.account_from_row(row)

    async def set_allowed_origins(self, account_id: str, origins: Sequence[str]) -> bool:
        pool = await self._get_pool()
        status = await pool.execute(
            "UPDATE accounts SET allowed_origins = $1 WHERE id = $2",
            rows.origins_param(origins),
            account_id,
        )
        return count(status) == 1

    async def create_api_key(self, key: ApiKey) -> None:
        await self._insert(_INSERT_API_KEY, rows.api_key_params(key), "an API key")

    async def find_api_key(self, key_hash: str) -> ApiKey | None:
        pool = await self._get_pool()
        row = await pool.fetchrow(f"{rows.SELECT_API_KEY} WHERE hash = $1", key_hash)
        return None if row is None else rows.api_key_from_row(row)

    async def list_api_keys(self, account_id: str) -> list[ApiKey]:
        pool = await self._get_pool()
        found = await pool.fetch(
            f"{rows.SELECT_API_KEY} WHERE account_id = $1 ORDER BY created, id", account_id
        )
        return [rows.api_key_from_row(r) for r in found]

    async def revoke_api_key(self, key_id: str, when: int) -> bool:
        pool = await self._get_pool()
        status = await pool.execute(
            "UPDATE api_keys SET revoked = $1 WHERE id = $2 AND revoked IS NULL", when, key_id
        )
        return count(status) == 1

    # -- data keys -----------------------------------------------------------------------

    async def insert_data_key(self, record: DataKeyRecord) -> None:
        await self._insert(_INSERT_DATA_KEY, rows.data_key_params(record), "a data key")

    async def get_data_key(self, data_key_id: str) -> DataKeyRecord | None:
        pool = await self._get_pool()
        row = await pool.fetchrow(f"{rows.SELECT_DATA_KEY} WHERE id = $1", data_key_id)
        return None if row is None else rows.data_key_from_row(row)

    # -- payment methods -----------------------------------------------------------------

    async def insert_payment_method(
        self, record: PaymentMethodRecord, *, event: EventRecord | None = None
    ) -> None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._pm_pending.append((rows.payment_method_params(record), event, future))
        if self._pm_flush is None or self._pm_flush_loop is not loop:
            # Two loop iterations later, so that requests already under way join in.
            self._pm_flush = loop.call_soon(self._pm_flush_next, loop)
            self._pm_flush_loop = loop
        await future

    def _pm_flush_next(self, loop: asyncio.AbstractEventLoop) -> None:
        self._pm_flush = loop.call_soon(self._pm_flush_start, loop)

    def _pm_flush_start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._pm_flush = None
        batch, self._pm_pending = self._pm_pending, []
        for start in range(0, len(batch), PM_BATCH):
            task = loop.create_task(self._insert_pms(batch[start : start + PM_BATCH]))
            self._pm_tasks.add(task)
            task.add_done_callback(self._pm_tasks.discard)

    async def _insert_pms(self, batch: list[_PendingPm]) -> None:
        import asyncpg

        outcomes: list[BaseException | None]
        try:
            if len(batch) == 1:
                raise _OneByOne
            pool = await self._get_pool()
            sql = _multi_insert_sql("payment_methods", rows.PAYMENT_METHOD_COLUMNS, len(batch))
            events = [outboxrows.event_params(e) for _, e, _ in batch if e is not None]
            # The rows and their events (the outbox) in one transaction.
            async with pool.acquire() as conn, conn.transaction():
                await conn.execute(sql, *(value for params, _, _ in batch for value in params))
                if events:
                    events_sql = _multi_insert_sql("events", outboxrows.EVENT_COLUMNS, len(events))
                    await conn.execute(events_sql, *(v for params in events for v in params))
            outcomes = [None] * len(batch)
        except (_OneByOne, asyncpg.UniqueViolationError, asyncpg.DataError):
            # Nothing of the statement was written (a duplicate, or a value that cannot
            # be stored); each row on its own, for its outcome: the bad row fails alone.
            results = await asyncio.gather(
                *(self._insert_pm(params, event) for params, event, _ in batch),
                return_exceptions=True,
            )
            outcomes = [r if isinstance(r, BaseException) else None for r in results]
        except Exception as exc:
            outcomes = [copy_error(exc) for _ in batch]
        for (_, _, future), error in zip(batch, outcomes, strict=True):
            settle(future, None, error)

    async def _insert_pm(self, params: tuple[Any, ...], event: EventRecord | None) -> None:
        """One payment method's row, with its event in the same transaction."""
        if event is None:
            await self._insert(_INSERT_PM, params, "a payment method")
        else:
            await self._with_event(_INSERT_PM, params, event, when_changed=False)

    async def get_payment_method(
        self, account_id: str, livemode: bool, pm_id: str
    ) -> PaymentMethodRecord | None:
        pool = await self._get_pool()
        row = await pool.fetchrow(
            f"{rows.SELECT_PAYMENT_METHOD} WHERE id = $1 AND account_id = $2 AND livemode = $3",
            pm_id,
            account_id,
            bool(livemode),
        )
        return None if row is None else rows.payment_method_from_row(row)

    async def _list(self, page: Page, from_row: Callable[[Any], R]) -> list[R]:  # VaultLists
        pool = await self._get_pool()
        records = [from_row(r) for r in await pool.fetch(numbered(page.sql), *page.params)]
        if page.reverse:
            records.reverse()
        return records

    async def delete_payment_method(
        self, account_id: str, livemode: bool, pm_id: str, *, event: EventRecord | None = None
    ) -> bool:
        sql = "DELETE FROM payment_methods WHERE id = $1 AND account_id = $2 AND livemode = $3"
        params = (pm_id, account_id, bool(livemode))
        if event is not None:
            return await self._with_event(sql, params, event, when_changed=True) == 1
        pool = await self._get_pool()
        return count(await pool.execute(sql, *params)) == 1

    async def destroy_cvc(self, account_id: str, livemode: bool, pm_id: str) -> bool:
        pool = await self._get_pool()
        status = await pool.execute(
            "UPDATE payment_methods SET cvc_ct = NULL, cvc_data_key_id = NULL, "
            "cvc_expires = NULL WHERE id = $1 AND account_id = $2 AND livemode = $3 "
            "AND cvc_ct IS NOT NULL",
            pm_id,
            account_id,
            bool(livemode),
        )
        return count(status) == 1

    async def destroy_expired_cvcs(self, now: int) -> int:
        pool = await self._get_pool()
        status = await pool.execute(
            "UPDATE payment_methods SET cvc_ct = NULL, cvc_data_key_id = NULL, "
            "cvc_expires = NULL WHERE cvc_expires IS NOT NULL AND cvc_expires <= $1",
            now,
        )
        return count(status)

    async def take_cvc(self, account_id: str, livemode: bool, pm_id: str) -> TakenCvc | None:
        pool = await self._get_pool()
        row = await pool.fetchrow(_TAKE_CVC, pm_id, account_id, bool(livemode))
        return _taken(row)

    async def restore_cvc(
        self, account_id: str, livemode: bool, pm_id: str, taken: TakenCvc
    ) -> bool:
        pool = await self._get_pool()
        status = await pool.execute(_RESTORE_CVC, *taken, pm_id, account_id, bool(livemode))
        return count(status) == 1

    # -- forwarding requests -------------------------------------------------------------

    async def insert_forwarding_request(
        self, record: ForwardingRequestRecord, *, after: asyncio.Future[Any] | None = None
    ) -> None:
        await _settled(after)
        await self._insert(_INSERT_FWD, rows.forwarding_params(record), "a forwarding request")

    async def take_cvc_for_forward(
        self, record: ForwardingRequestRecord, *, after: asyncio.Future[Any] | None = None
    ) -> TakenCvc | None:
        import asyncpg

        await _settled(after)
        pool = await self._get_pool()
        async with pool.acquire() as conn, conn.transaction():
            # The row lock the take holds keeps a concurrent taker out until the commit.
            taken = _taken(
                await conn.fetchrow(
                    _TAKE_CVC, record.payment_method, record.account_id, bool(record.livemode)
                )
            )
            if taken is None:
                return None
            try:
                await conn.execute(_INSERT_FWD, *rows.forwarding_params(record))
            except asyncpg.UniqueViolationError as exc:
                # Leaving the block rolls the take back too.
                raise DuplicateError("a forwarding request with this id exists") from exc
        return taken

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
        if event is not None:
            return await self._with_event(_COMPLETE_FORWARD, params, event, when_changed=True) == 1
        pool = await self._get_pool()
        return count(await pool.execute(_COMPLETE_FORWARD, *params)) == 1

    async def cancel_forwarding_request(
        self, account_id: str, livemode: bool, fwd_id: str, restore: TakenCvc | None
    ) -> bool:
        pool = await self._get_pool()
        async with pool.acquire() as conn, conn.transaction():
            pm_id = await conn.fetchval(
                _DELETE_PENDING_FORWARD + " RETURNING payment_method",
                fwd_id,
                account_id,
                bool(livemode),
            )
            if pm_id is None:
                return False
            if restore is not None:
                await conn.execute(_RESTORE_CVC, *restore, pm_id, account_id, bool(livemode))
        return True

    async def pending_forwarding_requests(
        self, created_before: int, *, limit: int
    ) -> list[ForwardingRequestRecord]:
        pool = await self._get_pool()
        found = await pool.fetch(_PENDING_FORWARDS, created_before, limit)
        return [rows.forwarding_from_row(r) for r in found]

    async def get_forwarding_request(
        self, account_id: str, livemode: bool, fwd_id: str
    ) -> ForwardingRequestRecord | None:
        pool = await self._get_pool()
        row = await pool.fetchrow(
            f"{rows.SELECT_FORWARDING} WHERE id = $1 AND account_id = $2 AND livemode = $3",
            fwd_id,
            account_id,
            bool(livemode),
        )
        return None if row is None else rows.forwarding_from_row(row)

    async def purge_forwarding_requests(self, before: int) -> int:
        pool = await self._get_pool()
        return count(
            await pool.execute("DELETE FROM forwarding_requests WHERE created < $1", before)
        )

    # -- idempotency ---------------------------------------------------------------------

    async def claim_idempotency_key(self, record: IdempotencyRecord) -> IdempotencyRecord | None:
        pool = await self._get_pool()
        while True:
            # If another replica's insert of the same key is in flight, ON CONFLICT waits
            # for it to commit, so the SELECT (a new snapshot) then sees that row.
            if await pool.fetchval(_INSERT_IDEMPOTENCY, *rows.idempotency_params(record)):
                return None
            row = await pool.fetchrow(
                f"{rows.SELECT_IDEMPOTENCY} "
                "WHERE account_id = $1 AND mode = $2 AND idempotency_key = $3",
                record.account_id,
                record.mode,
                record.key,
            )
            if row is not None:
                return rows.idempotency_from_row(row)
            # Released between the two statements: claim again.

    async def take_over_idempotency_key(
        self, record: IdempotencyRecord, expected_token: str
    ) -> bool:
        pool = await self._get_pool()
        params = rows.take_over_params(record, expected_token)
        return count(await pool.execute(_TAKE_OVER_IDEMPOTENCY, *params)) == 1

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
        pool = await self._get_pool()
        if token is None:
            status_tag = await pool.execute(
                _COMPLETE_IDEMPOTENCY, state, status, body, account_id, mode, key
            )
        else:
            status_tag = await pool.execute(
                _COMPLETE_HELD_IDEMPOTENCY, state, status, body, account_id, mode, key, token
            )
        return count(status_tag) == 1

    async def release_idempotency_key(
        self, account_id: str, mode: Mode, key: str, *, token: str | None = None
    ) -> bool:
        pool = await self._get_pool()
        if token is None:
            status = await pool.execute(_RELEASE_IDEMPOTENCY, account_id, mode, key)
        else:
            status = await pool.execute(_RELEASE_HELD_IDEMPOTENCY, account_id, mode, key, token)
        return count(status) == 1

    async def stale_idempotency_claims(
        self, now: int, owner: str, boot: str, *, limit: int
    ) -> list[IdempotencyRecord]:
        pool = await self._get_pool()
        found = await pool.fetch(_STALE_IDEMPOTENCY_CLAIMS, now, owner, boot, limit)
        return [rows.idempotency_from_row(r) for r in found]

    async def purge_idempotency_keys(self, before: int) -> int:
        pool = await self._get_pool()
        status = await pool.execute("DELETE FROM idempotency_keys WHERE created < $1", before)
        return count(status)

    # -- periodic jobs -------------------------------------------------------------------

    async def lead_jobs(self) -> bool:
        """Hold :data:`JOBS_LOCK` on a connection of this store's own (opened on the
        first call, named ``cardvault-jobs <pid>`` in ``pg_stat_activity``): True while
        it holds it. The leader checks that its connection still answers (a dropped
        connection has lost the lock, maybe to another process by now); the others try
        ``pg_try_advisory_lock`` again at each call. Errors of an unavailable database
        are :class:`~cardvault.storage.StoreUnavailable`, and the lead is given up with
        the connection."""
        try:
            conn = self._jobs_conn
            if conn is None or conn.is_closed():
                self._jobs_held = False
                conn = self._jobs_conn = await self._jobs_connect()
            if self._jobs_held:
                await conn.fetchval("SELECT 1", timeout=_JOBS_CHECK_TIMEOUT_S)
                return True
            held = await conn.fetchval(
                "SELECT pg_try_advisory_lock($1)", JOBS_LOCK, timeout=_JOBS_CHECK_TIMEOUT_S
            )
            self._jobs_held = bool(held)
            return self._jobs_held
        except Exception as exc:
            connected = self._jobs_conn is not None
            await self._jobs_drop()
            error = unavailable(exc, connected=connected, broken=True)
            if error is None:
                raise
            raise error from exc

    async def _jobs_connect(self) -> Any:
        import asyncpg

        return await asyncpg.connect(
            self._dsn,
            timeout=CONNECT_TIMEOUT_S,
            server_settings={"application_name": f"cardvault-jobs {os.getpid()}"},
        )

    async def _jobs_drop(self) -> None:
        """Close the lock's connection (the server then releases the lock)."""
        conn, self._jobs_conn, self._jobs_held = self._jobs_conn, None, False
        if conn is None:
            return
        try:
            await asyncio.wait_for(conn.close(), _JOBS_CHECK_TIMEOUT_S)
        except Exception:
            conn.terminate()

    # -- lifecycle -----------------------------------------------------------------------

    async def close(self) -> None:
        """Finish the queued inserts, give up the lead of the periodic jobs and close the
        pool. Idempotent."""
        await self._jobs_drop()
        if self._pm_flush is not None:
            self._pm_flush.cancel()
            self._pm_flush_start(asyncio.get_running_loop())
        if self._pm_tasks:
            await asyncio.gather(*self._pm_tasks, return_exceptions=True)
        await super().close()


async def _settled(after: asyncio.Future[Any] | None) -> None:
    """Wait for a write's ``after`` (see ``VaultStore.insert_forwarding_request``): a
    write to the server is not part of the audit log's flush, so it waits for it."""
    if after is not None:
        await asyncio.wait([after])
        precondition_met(after)
