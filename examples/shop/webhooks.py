"""The vault's webhooks, received: ``POST /webhooks/cardvault``.

Each delivery is verified with the official ``stripe`` library, unchanged
(``stripe.Webhook.construct_event``: the ``Stripe-Signature`` header, an HMAC-SHA256 of
the raw body under the endpoint's ``whsec_`` secret, no older than five minutes), then
kept in the shop's database by the event's id, so that a delivery repeated by the vault
(delivery is at least once) is kept once. Only the event's id, type, time and object
id are kept: the shop has no use for more, and an event never holds a card number
anyway.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import stripe

__all__ = ["ReceivedEvent", "WebhookInbox", "WebhookRefused"]

_SCHEMA = """CREATE TABLE IF NOT EXISTS webhook_events (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    created INTEGER NOT NULL,
    object_id TEXT NOT NULL,
    received INTEGER NOT NULL
)"""


class WebhookRefused(Exception):
    """The delivery's signature does not verify, or its body is not an event."""


@dataclass(frozen=True)
class ReceivedEvent:
    id: str
    type: str
    created: int
    object_id: str
    received: int


class WebhookInbox:
    """Verified events from the vault, in the shop's database (``db_file``)."""

    def __init__(self, db_file: Path, secret: str) -> None:
        self.db_file = db_file
        self._secret = secret
        with self._connect() as conn:
            conn.execute(_SCHEMA)

    def __repr__(self) -> str:
        # The signing secret never reaches a repr or a log line.
        return f"WebhookInbox(db_file={str(self.db_file)!r})"

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.db_file, timeout=10)
        try:
            with conn:
                yield conn
        finally:
            conn.close()

    def receive(self, payload: bytes, signature: str | None) -> ReceivedEvent:
        """Verify one delivery and keep its event (once, however often it comes)."""
        try:
            event = stripe.Webhook.construct_event(payload.decode("utf-8"), signature, self._secret)
        except (stripe.SignatureVerificationError, ValueError, UnicodeDecodeError) as exc:
            raise WebhookRefused from exc
        try:
            received = ReceivedEvent(
                id=str(event.id),
                type=str(event.type),
                created=int(event.created),
                object_id=str(event.data.object.id),
                received=int(time.time()),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise WebhookRefused from exc
        with self._connect() as conn:
            conn.execute(
                "INSERT INTO webhook_events (id, type, created, object_id, received) "
                "VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
                (
                    received.id,
                    received.type,
                    received.created,
                    received.object_id,
                    received.received,
                ),
            )
        return received

    def recent(self, limit: int = 50) -> list[ReceivedEvent]:
        with self._connect() as conn:
            rows = conn.execute(
                "SELECT id, type, created, object_id, received FROM webhook_events "
                "ORDER BY created DESC, id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [ReceivedEvent(str(r[0]), str(r[1]), int(r[2]), str(r[3]), int(r[4])) for r in rows]
