"""The outbox on SQLite (events, webhook endpoints, deliveries), mixed into
:class:`~cardvault.storage.sqlite.vault.SQLiteVaultStore`. An event written with a
change (a payment method stored or deleted, a forward completed) is in the same
compound operation of the group-commit writer as the change, so in the same savepoint
and transaction: both or neither."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import TypeVar

from cardvault.storage import outboxrows as rows
from cardvault.storage.base import (
    DataKeyRecord,
    DeliveryRecord,
    EventRecord,
    WebhookEndpointRecord,
)
from cardvault.storage.rows import data_key_params
from cardvault.storage.sqlite.connection import insert
from cardvault.storage.sqlite.writer import SQLiteDatabase

__all__ = ["SQLiteOutbox", "with_event"]

R = TypeVar("R")


def with_event(
    fn: Callable[[sqlite3.Connection], R],
    event: EventRecord,
    when: Callable[[R], bool] | None = None,
) -> Callable[[sqlite3.Connection], R]:
    """``fn``, then ``event`` inserted (when ``when`` holds of its result, if given): for
    a compound operation (its savepoint makes the two one)."""
    params = rows.event_params(event)

    def op(conn: sqlite3.Connection) -> R:
        result = fn(conn)
        if when is None or when(result):
            insert(conn, rows.INSERT_EVENT, params, "an event")
        return result

    return op


class SQLiteOutbox(SQLiteDatabase):
    # -- events ----------------------------------------------------------------------------

    async def get_event(self, account_id: str, livemode: bool, event_id: str) -> EventRecord | None:
        def op(conn: sqlite3.Connection) -> EventRecord | None:
            row = conn.execute(rows.GET_EVENT, (event_id, account_id, bool(livemode))).fetchone()
            return None if row is None else rows.event_from_row(row)

        return await self._lookup(op)

    async def undispatched_events(self, *, limit: int) -> list[EventRecord]:
        def op(conn: sqlite3.Connection) -> list[EventRecord]:
            return [rows.event_from_row(r) for r in conn.execute(rows.UNDISPATCHED, (limit,))]

        return await self._read(op)

    async def dispatch_events(
        self, event_ids: Sequence[str], deliveries: Sequence[DeliveryRecord]
    ) -> None:
        params = [rows.delivery_params(d) for d in deliveries]
        marks = [(event_id,) for event_id in event_ids]

        def op(conn: sqlite3.Connection) -> None:
            for each in params:
                insert(conn, rows.INSERT_DELIVERY, each, "a delivery")
            conn.executemany(rows.MARK_DISPATCHED, marks)

        await self._write(op, compound=True)

    async def purge_events(self, before: int) -> int:
        def op(conn: sqlite3.Connection) -> int:
            conn.execute(rows.PURGE_DELIVERIES, (before,))
            return conn.execute(rows.PURGE_EVENTS, (before,)).rowcount

        return await self._write(op, compound=True)

    async def insert_events(
        self, events: Sequence[EventRecord], *, data_key: DataKeyRecord | None = None
    ) -> None:
        key = None if data_key is None else data_key_params(data_key)
        params = [rows.event_params(e) for e in events]

        def op(conn: sqlite3.Connection) -> None:
            if key is not None:
                insert(conn, rows.INSERT_DATA_KEY, key, "a data key")
            for each in params:
                insert(conn, rows.INSERT_EVENT, each, "an event")

        await self._write(op, compound=True)

    async def account_ids(self, *, after: str = "", limit: int) -> list[str]:
        def op(conn: sqlite3.Connection) -> list[str]:
            return [str(r[0]) for r in conn.execute(rows.ACCOUNT_IDS, (after, limit))]

        return await self._read(op)

    # -- webhook endpoints -------------------------------------------------------------------

    async def create_webhook_endpoint(self, record: WebhookEndpointRecord) -> None:
        params = rows.endpoint_params(record)
        await self._write(lambda c: insert(c, rows.INSERT_ENDPOINT, params, "a webhook endpoint"))

    async def get_webhook_endpoint(
        self, account_id: str, livemode: bool, endpoint_id: str
    ) -> WebhookEndpointRecord | None:
        def op(conn: sqlite3.Connection) -> WebhookEndpointRecord | None:
            row = conn.execute(
                rows.GET_ENDPOINT, (endpoint_id, account_id, bool(livemode))
            ).fetchone()
            return None if row is None else rows.endpoint_from_row(row)

        return await self._lookup(op)

    async def webhook_endpoints_for(
        self, account_id: str, livemode: bool
    ) -> list[WebhookEndpointRecord]:
        def op(conn: sqlite3.Connection) -> list[WebhookEndpointRecord]:
            found = conn.execute(rows.ENDPOINTS_FOR, (account_id, bool(livemode)))
            return [rows.endpoint_from_row(r) for r in found]

        return await self._read(op)

    async def delete_webhook_endpoint(
        self, account_id: str, livemode: bool, endpoint_id: str
    ) -> bool:
        def op(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(rows.DELETE_ENDPOINT, (endpoint_id, account_id, bool(livemode)))
            if cur.rowcount != 1:
                return False
            conn.execute(rows.DELETE_ENDPOINT_DELIVERIES, (endpoint_id,))
            return True

        return await self._write(op, compound=True)

    # -- deliveries ------------------------------------------------------------------------

    async def claim_deliveries(self, now: int, until: int, *, limit: int) -> list[DeliveryRecord]:
        def op(conn: sqlite3.Connection) -> list[DeliveryRecord]:
            # The writer runs this whole function in its transaction: nothing between.
            found = [
                rows.delivery_from_row(r) for r in conn.execute(rows.DUE_DELIVERIES, (now, limit))
            ]
            conn.executemany(rows.LEASE_DELIVERY, [(until, d.id) for d in found])
            return found

        return await self._write(op, compound=True)

    async def record_delivery_attempt(self, record: DeliveryRecord) -> bool:
        params = rows.attempt_params(record)
        return await self._write(lambda c: c.execute(rows.RECORD_ATTEMPT, params).rowcount == 1)

    async def list_deliveries(
        self, account_id: str, livemode: bool, endpoint_id: str, *, limit: int
    ) -> list[DeliveryRecord]:
        def op(conn: sqlite3.Connection) -> list[DeliveryRecord]:
            found = conn.execute(
                rows.LIST_DELIVERIES, (account_id, bool(livemode), endpoint_id, limit)
            )
            return [rows.delivery_from_row(r) for r in found]

        return await self._read(op)
