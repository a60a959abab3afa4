"""The outbox's rows (events, webhook endpoints, deliveries): columns, conversions and
statements, written once for both backends in SQLite's ``?`` placeholders (PostgreSQL
numbers them). Table and column names are constants; SQL is built from them only."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from cardvault.storage._shared import insert_sql
from cardvault.storage.base import DeliveryRecord, EventRecord, WebhookEndpointRecord
from cardvault.storage.pages import Page, page_query
from cardvault.storage.rows import DATA_KEY_COLUMNS, select

R = TypeVar("R")

EVENT_COLUMNS = (
    "id",
    "account_id",
    "livemode",
    "created",
    "type",
    "object_id",
    "data_key_id",
    "data_ct",
    "dispatched",
)
ENDPOINT_COLUMNS = (
    "id",
    "account_id",
    "livemode",
    "created",
    "url",
    "enabled_events",
    "description",
    "metadata",
    "data_key_id",
    "secret_ct",
)
DELIVERY_COLUMNS = (
    "id",
    "account_id",
    "livemode",
    "endpoint_id",
    "event_id",
    "created",
    "state",
    "attempts",
    "next_attempt",
    "last_attempt",
    "last_status",
    "last_error",
)

SELECT_EVENT = select("events", EVENT_COLUMNS)
SELECT_ENDPOINT = select("webhook_endpoints", ENDPOINT_COLUMNS)
SELECT_DELIVERY = select("webhook_deliveries", DELIVERY_COLUMNS)
INSERT_EVENT = insert_sql("events", EVENT_COLUMNS)
INSERT_ENDPOINT = insert_sql("webhook_endpoints", ENDPOINT_COLUMNS)
INSERT_DELIVERY = insert_sql("webhook_deliveries", DELIVERY_COLUMNS)
INSERT_DATA_KEY = insert_sql("data_keys", DATA_KEY_COLUMNS)
#: The accounts a system event goes to (key.rotated, audit.failed_closed), a page at a time.
ACCOUNT_IDS = "SELECT id FROM accounts WHERE id > ? ORDER BY id LIMIT ?"

GET_EVENT = f"{SELECT_EVENT} WHERE id = ? AND account_id = ? AND livemode = ?"
GET_ENDPOINT = f"{SELECT_ENDPOINT} WHERE id = ? AND account_id = ? AND livemode = ?"
ENDPOINTS_FOR = f"{SELECT_ENDPOINT} WHERE account_id = ? AND livemode = ? ORDER BY created, id"
UNDISPATCHED = f"{SELECT_EVENT} WHERE dispatched = FALSE ORDER BY created, id LIMIT ?"
MARK_DISPATCHED = "UPDATE events SET dispatched = TRUE WHERE id = ?"
PURGE_EVENTS = "DELETE FROM events WHERE created < ?"
PURGE_DELIVERIES = "DELETE FROM webhook_deliveries WHERE created < ?"
DELETE_ENDPOINT = "DELETE FROM webhook_endpoints WHERE id = ? AND account_id = ? AND livemode = ?"
DELETE_ENDPOINT_DELIVERIES = "DELETE FROM webhook_deliveries WHERE endpoint_id = ?"
DUE_DELIVERIES = (
    f"{SELECT_DELIVERY} WHERE state = 'pending' AND next_attempt <= ? "
    "ORDER BY next_attempt, id LIMIT ?"
)
LEASE_DELIVERY = "UPDATE webhook_deliveries SET next_attempt = ? WHERE id = ? AND state = 'pending'"
RECORD_ATTEMPT = (
    "UPDATE webhook_deliveries SET state = ?, attempts = ?, next_attempt = ?, "
    "last_attempt = ?, last_status = ?, last_error = ? WHERE id = ? AND state = 'pending'"
)
LIST_DELIVERIES = (
    f"{SELECT_DELIVERY} WHERE account_id = ? AND livemode = ? AND endpoint_id = ? "
    "ORDER BY created DESC, id DESC LIMIT ?"
)


def event_params(record: EventRecord) -> tuple[Any, ...]:
    return (
        record.id,
        record.account_id,
        bool(record.livemode),
        record.created,
        record.type,
        record.object_id,
        record.data_key_id,
        record.data_ct,
        bool(record.dispatched),
    )


def event_from_row(row: Any) -> EventRecord:
    return EventRecord(
        id=str(row[0]),
        account_id=str(row[1]),
        livemode=bool(row[2]),
        created=int(row[3]),
        type=str(row[4]),
        object_id=str(row[5]),
        data_key_id=str(row[6]),
        data_ct=bytes(row[7]),
        dispatched=bool(row[8]),
    )


def endpoint_params(record: WebhookEndpointRecord) -> tuple[Any, ...]:
    return (
        record.id,
        record.account_id,
        bool(record.livemode),
        record.created,
        record.url,
        json.dumps(record.enabled_events),
        record.description,
        json.dumps(record.metadata, sort_keys=True),
        record.data_key_id,
        record.secret_ct,
    )


def endpoint_from_row(row: Any) -> WebhookEndpointRecord:
    return WebhookEndpointRecord(
        id=str(row[0]),
        account_id=str(row[1]),
        livemode=bool(row[2]),
        created=int(row[3]),
        url=str(row[4]),
        enabled_events=list(json.loads(row[5])),
        description=None if row[6] is None else str(row[6]),
        metadata=dict(json.loads(row[7])),
        data_key_id=str(row[8]),
        secret_ct=bytes(row[9]),
    )


def delivery_params(record: DeliveryRecord) -> tuple[Any, ...]:
    return (
        record.id,
        record.account_id,
        bool(record.livemode),
        record.endpoint_id,
        record.event_id,
        record.created,
        record.state,
        record.attempts,
        record.next_attempt,
        record.last_attempt,
        record.last_status,
        record.last_error,
    )


def attempt_params(record: DeliveryRecord) -> tuple[Any, ...]:
    """The parameters of :data:`RECORD_ATTEMPT`."""
    return (
        record.state,
        record.attempts,
        record.next_attempt,
        record.last_attempt,
        record.last_status,
        record.last_error,
        record.id,
    )


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def delivery_from_row(row: Any) -> DeliveryRecord:
    return DeliveryRecord(
        id=str(row[0]),
        account_id=str(row[1]),
        livemode=bool(row[2]),
        endpoint_id=str(row[3]),
        event_id=str(row[4]),
        created=int(row[5]),
        state=str(row[6]),
        attempts=int(row[7]),
        next_attempt=_optional_int(row[8]),
        last_attempt=_optional_int(row[9]),
        last_status=_optional_int(row[10]),
        last_error=None if row[11] is None else str(row[11]),
    )


def events_page(
    account_id: str,
    livemode: bool,
    limit: int,
    starting_after: str | None,
    ending_before: str | None,
    type: str | None,
) -> Page:
    """One page of events (:func:`~cardvault.storage.pages.page_query`), of one type or
    of a prefix's types (``payment_method.*``) when ``type`` is given. The type filter
    is a comparison of text (``substr``), never ``LIKE``: ``_`` is a wildcard there."""
    if type is None:
        return page_query(
            "events", SELECT_EVENT, account_id, livemode, limit, starting_after, ending_before
        )
    if type.endswith(".*"):
        prefix = type[:-1]
        clause, value = f"substr(type, 1, {len(prefix)}) = ?", prefix
    else:
        clause, value = "type = ?", type
    # The filter goes first in the WHERE of page_query's statement: its parameter first.
    page = page_query(
        "events",
        f"{SELECT_EVENT} WHERE {clause} AND",
        account_id,
        livemode,
        limit,
        starting_after,
        ending_before,
    )
    return Page(page.sql.replace(" AND WHERE ", " AND ", 1), (value, *page.params), page.reverse)


class OutboxLists:
    """``list_events`` and ``list_webhook_endpoints`` of
    :class:`~cardvault.storage.base.VaultStore`, for a backend that runs a page (as
    :class:`~cardvault.storage.pages.VaultLists` does for its lists)."""

    async def _list(self, page: Page, from_row: Callable[[Any], R]) -> list[R]:
        """The records of ``page``, in its order (reversed when it says so)."""
        raise NotImplementedError

    async def list_events(
        self,
        account_id: str,
        livemode: bool,
        *,
        limit: int,
        starting_after: str | None = None,
        ending_before: str | None = None,
        type: str | None = None,
    ) -> list[EventRecord]:
        page = events_page(account_id, livemode, limit, starting_after, ending_before, type)
        return await self._list(page, event_from_row)

    async def list_webhook_endpoints(
        self,
        account_id: str,
        livemode: bool,
        *,
        limit: int,
        starting_after: str | None = None,
        ending_before: str | None = None,
    ) -> list[WebhookEndpointRecord]:
        page = page_query(
            "webhook_endpoints", SELECT_ENDPOINT,
            account_id, livemode, limit, starting_after, ending_before,
        )  # fmt: skip
        return await self._list(page, endpoint_from_row)
