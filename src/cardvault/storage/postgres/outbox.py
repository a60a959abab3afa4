"""The outbox on PostgreSQL (events, webhook endpoints, deliveries), mixed into
:class:`~cardvault.storage.postgres.vault.PostgresVaultStore`. An event written with a
change is in the change's transaction (:meth:`PostgresOutbox._with_event`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from cardvault.storage import outboxrows as rows
from cardvault.storage.base import (
    DataKeyRecord,
    DeliveryRecord,
    DuplicateError,
    EventRecord,
    UnstorableValue,
    WebhookEndpointRecord,
)
from cardvault.storage.postgres.pool import PostgresDatabase, count, numbered
from cardvault.storage.rows import data_key_params

__all__ = ["PostgresOutbox"]

R = TypeVar("R")

INSERT_EVENT = numbered(rows.INSERT_EVENT)
_INSERT_ENDPOINT = numbered(rows.INSERT_ENDPOINT)
_INSERT_DELIVERY = numbered(rows.INSERT_DELIVERY)
_GET_EVENT = numbered(rows.GET_EVENT)
_GET_ENDPOINT = numbered(rows.GET_ENDPOINT)
_ENDPOINTS_FOR = numbered(rows.ENDPOINTS_FOR)
_UNDISPATCHED = numbered(rows.UNDISPATCHED)
_MARK_DISPATCHED = numbered(rows.MARK_DISPATCHED)
_PURGE_EVENTS = numbered(rows.PURGE_EVENTS)
_PURGE_DELIVERIES = numbered(rows.PURGE_DELIVERIES)
_DELETE_ENDPOINT = numbered(rows.DELETE_ENDPOINT)
_DELETE_ENDPOINT_DELIVERIES = numbered(rows.DELETE_ENDPOINT_DELIVERIES)
_RECORD_ATTEMPT = numbered(rows.RECORD_ATTEMPT)
_LIST_DELIVERIES = numbered(rows.LIST_DELIVERIES)
_INSERT_DATA_KEY = numbered(rows.INSERT_DATA_KEY)
_ACCOUNT_IDS = numbered(rows.ACCOUNT_IDS)
#: Due deliveries leased in one statement; SKIP LOCKED lets two claimers share the work.
_DELIVERY_FIELDS = ", ".join(f"d.{c}" for c in rows.DELIVERY_COLUMNS)
_CLAIM_DELIVERIES = (
    "UPDATE webhook_deliveries d SET next_attempt = $1 FROM ("  # noqa: S608 (constants)
    "SELECT id FROM webhook_deliveries WHERE state = 'pending' AND next_attempt <= $2 "
    "ORDER BY next_attempt, id LIMIT $3 FOR UPDATE SKIP LOCKED) due "
    f"WHERE d.id = due.id RETURNING {_DELIVERY_FIELDS}"
)


class PostgresOutbox(PostgresDatabase):
    async def _with_event(
        self, sql: str, params: Sequence[Any], event: EventRecord, *, when_changed: bool
    ) -> int:
        """Run ``sql`` and insert ``event`` in one transaction (only when ``sql``
        changed a row, with ``when_changed``); the rows ``sql`` changed. A duplicate
        raises DuplicateError, a value that cannot be stored UnstorableValue: nothing
        written either way."""
        import asyncpg

        pool = await self._get_pool()
        try:
            async with pool.acquire() as conn, conn.transaction():
                changed = count(await conn.execute(sql, *params))
                if changed or not when_changed:
                    await conn.execute(INSERT_EVENT, *rows.event_params(event))
        except asyncpg.UniqueViolationError as exc:
            raise DuplicateError("a row with this id exists") from exc
        except asyncpg.DataError as exc:
            raise UnstorableValue("a row holds a value that cannot be stored") from exc
        return changed

    # -- events ----------------------------------------------------------------------------

    async def get_event(self, account_id: str, livemode: bool, event_id: str) -> EventRecord | None:
        pool = await self._get_pool()
        row = await pool.fetchrow(_GET_EVENT, event_id, account_id, bool(livemode))
        return None if row is None else rows.event_from_row(row)

    async def undispatched_events(self, *, limit: int) -> list[EventRecord]:
        pool = await self._get_pool()
        return [rows.event_from_row(r) for r in await pool.fetch(_UNDISPATCHED, limit)]

    async def dispatch_events(
        self, event_ids: Sequence[str], deliveries: Sequence[DeliveryRecord]
    ) -> None:
        pool = await self._get_pool()
        async with pool.acquire() as conn, conn.transaction():
            if deliveries:
                await conn.executemany(
                    _INSERT_DELIVERY, [rows.delivery_params(d) for d in deliveries]
                )
            await conn.executemany(_MARK_DISPATCHED, [(event_id,) for event_id in event_ids])

    async def purge_events(self, before: int) -> int:
        pool = await self._get_pool()
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(_PURGE_DELIVERIES, before)
            return count(await conn.execute(_PURGE_EVENTS, before))

    async def insert_events(
        self, events: Sequence[EventRecord], *, data_key: DataKeyRecord | None = None
    ) -> None:
        import asyncpg

        pool = await self._get_pool()
        try:
            async with pool.acquire() as conn, conn.transaction():
                if data_key is not None:
                    await conn.execute(_INSERT_DATA_KEY, *data_key_params(data_key))
                if events:
                    await conn.executemany(INSERT_EVENT, [rows.event_params(e) for e in events])
        except asyncpg.UniqueViolationError as exc:
            raise DuplicateError("a row with this id exists") from exc
        except asyncpg.DataError as exc:
            raise UnstorableValue("a row holds a value that cannot be stored") from exc

    async def account_ids(self, *, after: str = "", limit: int) -> list[str]:
        pool = await self._get_pool()
        return [str(r[0]) for r in await pool.fetch(_ACCOUNT_IDS, after, limit)]

    # -- webhook endpoints -------------------------------------------------------------------

    async def create_webhook_endpoint(self, record: WebhookEndpointRecord) -> None:
        await self._insert(_INSERT_ENDPOINT, rows.endpoint_params(record), "a webhook endpoint")

    async def get_webhook_endpoint(
        self, account_id: str, livemode: bool, endpoint_id: str
    ) -> WebhookEndpointRecord | None:
        pool = await self._get_pool()
        row = await pool.fetchrow(_GET_ENDPOINT, endpoint_id, account_id, bool(livemode))
        return None if row is None else rows.endpoint_from_row(row)

    async def webhook_endpoints_for(
        self, account_id: str, livemode: bool
    ) -> list[WebhookEndpointRecord]:
        pool = await self._get_pool()
        found = await pool.fetch(_ENDPOINTS_FOR, account_id, bool(livemode))
        return [rows.endpoint_from_row(r) for r in found]

    async def delete_webhook_endpoint(
        self, account_id: str, livemode: bool, endpoint_id: str
    ) -> bool:
        pool = await self._get_pool()
        async with pool.acquire() as conn, conn.transaction():
            status = await conn.execute(_DELETE_ENDPOINT, endpoint_id, account_id, bool(livemode))
            if count(status) != 1:
                return False
            await conn.execute(_DELETE_ENDPOINT_DELIVERIES, endpoint_id)
        return True

    # -- deliveries ------------------------------------------------------------------------

    async def claim_deliveries(self, now: int, until: int, *, limit: int) -> list[DeliveryRecord]:
        pool = await self._get_pool()
        found = await pool.fetch(_CLAIM_DELIVERIES, until, now, limit)
        claimed = [rows.delivery_from_row(r) for r in found]
        claimed.sort(key=lambda d: (d.created, d.id))
        return claimed

    async def record_delivery_attempt(self, record: DeliveryRecord) -> bool:
        pool = await self._get_pool()
        return count(await pool.execute(_RECORD_ATTEMPT, *rows.attempt_params(record))) == 1

    async def list_deliveries(
        self, account_id: str, livemode: bool, endpoint_id: str, *, limit: int
    ) -> list[DeliveryRecord]:
        pool = await self._get_pool()
        found = await pool.fetch(_LIST_DELIVERIES, account_id, bool(livemode), endpoint_id, limit)
        return [rows.delivery_from_row(r) for r in found]
