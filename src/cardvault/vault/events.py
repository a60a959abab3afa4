"""Events: Stripe's ``Event`` objects, written as a transactional outbox.

A service that changes something (a payment method stored or deleted, a forward
completed or failed) makes the event with :meth:`Events.make` and hands it to the
store's write of the change, which writes both in one transaction: no event without
its change, no change without its event (docs/reliability.md, "Events and webhooks").
The delivery of events to webhook endpoints (:mod:`cardvault.vault.webhooks`) reads
them from there.

An event's ``data.object`` is the object as the API renders it, so it may hold the
cardholder's name, which is sealed at rest like the card: the whole ``data`` is sealed
under a ``pan`` data key, bound to the event's account, mode and id. It never holds a
card number or a CVC (the rendered objects do not).

``GET /v1/events`` and ``GET /v1/events/{id}``: secret keys only, the caller's account
and mode only; kept ``[webhooks] event_retention_days`` (30), purged by the periodic
jobs.

``wait`` (a cardvault extension, for ``cardvault listen``): a list that would be empty
waits up to that many seconds (at most :data:`MAX_WAIT_SECONDS`) for an event to
arrive, re-checking the store every :data:`_WAIT_RECHECK_S`. The store is the only
channel: with several worker processes on PostgreSQL an event may be written by any of
them, so a notification inside one process would miss the others'.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from functools import partial
from typing import Any, Final

import orjson

from cardvault import crypto
from cardvault.errors import APIError, InvalidRequestError, ResourceMissing
from cardvault.logging import get_logger
from cardvault.storage.base import EventRecord, VaultStore
from cardvault.vault.accounts import Caller, require_secret
from cardvault.vault.datakeys import DataKeyManager
from cardvault.vault.ids import looks_like_id, time_ordered_id
from cardvault.vault.params import list_object, read_page

__all__ = ["API_VERSION", "EVENT_TYPES", "MAX_WAIT_SECONDS", "Events", "event_context"]

_log = get_logger("cardvault.vault")

#: The ``api_version`` events are rendered in: the version of Stripe's API whose
#: objects the vault's follow (that of the ``stripe`` library the tests pin).
API_VERSION: Final = "2026-10-28.endive"

#: Every type of event the vault writes. Stripe names an attached card
#: ``payment_method.attached``; the vault has no customers to attach to, so a stored
#: card is ``payment_method.created`` and a deleted one ``payment_method.deleted``.
#: ``key.rotated`` and ``audit.failed_closed`` are the card environment's own, written
#: to every account (:mod:`cardvault.vault.systemevents`).
EVENT_TYPES: Final = frozenset(
    {
        "payment_method.created",
        "payment_method.deleted",
        "forwarding.request.created",
        "forwarding.request.failed",
        "key.rotated",
        "audit.failed_closed",
    }
)

#: The longest ``type`` filter accepted, and its shape: lower-case words joined by dots,
#: perhaps ending in ``.*`` (``payment_method.*``). The OpenAPI document says the same.
_TYPE_MAX = 100
_TYPE_RE = re.compile(r"[a-z][a-z_]*(\.[a-z][a-z_]*)*(\.\*)?")

#: The longest ``wait`` a list of events may hold its answer for (seconds). A waiting
#: request holds a connection and re-checks the store, so the bound is short; a
#: listener asks again when it ends (Stripe's own long-polls are about as long).
MAX_WAIT_SECONDS: Final = 30
#: How often a waiting list re-checks the store: an event written by any process is
#: answered within this (plus the query), far inside ``cardvault listen``'s one second.
_WAIT_RECHECK_S: Final = 0.2


def event_context(account_id: str, mode: str, event_id: str) -> dict[str, str]:
    """The associated data an event's ``data`` is sealed under."""
    return {"account": account_id, "mode": mode, "object": event_id, "field": "event"}


def _mode(livemode: bool) -> str:
    return "live" if livemode else "test"


class Events:
    """Making events (sealed, for a store write), reading them back, and the API."""

    def __init__(self, store: VaultStore, keys: DataKeyManager) -> None:
        self.store = store
        self.keys = keys
        #: Set when the vault stops: waiting lists answer at once, so that no open
        #: ``wait`` holds the shutdown up (cardvault.vault.app.run sets it).
        self.stopping = asyncio.Event()

    async def make(
        self,
        account_id: str,
        livemode: bool,
        type: str,
        obj: dict[str, Any],
        *,
        event_id: str | None = None,
    ) -> EventRecord:
        """The event ``type`` of ``obj`` (as the API renders it), sealed, to be written
        with the change it describes. ``event_id``: one chosen by the caller (an event
        that must be written once whoever asks twice), else a new one."""
        if type not in EVENT_TYPES:
            raise ValueError(f"unknown event type {type!r}")
        event_id = event_id or time_ordered_id("evt_")
        dk_id, dk = await self.keys.for_encryption("pan")
        data = orjson.dumps({"object": obj})
        sealed = crypto.seal(dk, data, event_context(account_id, _mode(livemode), event_id))
        return EventRecord(
            id=event_id,
            account_id=account_id,
            livemode=livemode,
            created=int(time.time()),
            type=type,
            object_id=str(obj.get("id", "")),
            data_key_id=dk_id,
            data_ct=sealed,
        )

    async def render(self, record: EventRecord) -> dict[str, Any]:
        """Stripe's ``Event``: its ``data`` opened."""
        key = await self.keys.for_decryption(record.data_key_id, "pan")
        context = event_context(record.account_id, _mode(record.livemode), record.id)
        try:
            data = orjson.loads(crypto.open_(key, record.data_ct, context))
        except crypto.InvalidCiphertext as exc:
            _log.error("a stored event failed authentication", event_id=record.id)
            raise APIError() from exc
        return {
            "id": record.id,
            "object": "event",
            "api_version": API_VERSION,
            "created": record.created,
            "data": data,
            "livemode": record.livemode,
            "request": {"id": None, "idempotency_key": None},
            "type": record.type,
        }

    # -- the API ---------------------------------------------------------------------------

    async def retrieve(self, caller: Caller, event_id: str) -> dict[str, Any]:
        require_secret(caller)
        record = None
        if looks_like_id(event_id, "evt_"):
            record = await self.store.get_event(caller.account_id, caller.livemode, event_id)
        if record is None:
            if looks_like_id(event_id, "evt_"):
                raise ResourceMissing(f"No such event: '{event_id}'", param="id")
            raise ResourceMissing("No such event.", param="id")
        return await self.render(record)

    async def list_events(self, caller: Caller, query: dict[str, Any]) -> dict[str, Any]:
        require_secret(caller)
        wanted = query.get("type")
        if wanted in (None, ""):
            wanted = None
        elif (
            not isinstance(wanted, str) or len(wanted) > _TYPE_MAX or not _TYPE_RE.fullmatch(wanted)
        ):
            raise InvalidRequestError(
                "type must be an event type, or a prefix ending in '.*'.", param="type"
            )
        wait = _wait_seconds(query)
        fetch = partial(self.store.list_events, caller.account_id, caller.livemode, type=wanted)
        records, has_more = await read_page(query, "evt_", fetch, params={"type", "wait"})
        deadline = time.monotonic() + wait
        while not records and not self.stopping.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(_WAIT_RECHECK_S, left)):
                    await self.stopping.wait()
            records, has_more = await read_page(query, "evt_", fetch, params={"type", "wait"})
        return list_object("/v1/events", [await self.render(r) for r in records], has_more)


def _wait_seconds(query: dict[str, Any]) -> int:
    """``wait``: whole seconds from 0 to MAX_WAIT_SECONDS (absent: 0). It waits for newer
    events, so it goes with ``ending_before`` or no cursor, never ``starting_after``."""
    raw = query.get("wait")
    if raw is None or raw == "":
        return 0
    if not (isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= 2) or (
        int(raw) > MAX_WAIT_SECONDS
    ):
        raise InvalidRequestError(
            f"wait must be a whole number of seconds from 0 to {MAX_WAIT_SECONDS}.", param="wait"
        )
    if int(raw) and query.get("starting_after") not in (None, ""):
        raise InvalidRequestError(
            "wait waits for newer events: give it with ending_before or no cursor, "
            "not with starting_after.",
            param="wait",
        )
    return int(raw)
