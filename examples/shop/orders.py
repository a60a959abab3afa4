"""The shop's own database: orders, each naming its card only by a ``pm_…`` id.

SQLite, one file, mode 0600 in a directory of mode 0700 (SQLite gives its journal the
database file's mode). What a row holds: the payment method's id, the brand and last
four digits the vault reports for it (PCI DSS allows showing those), the amount, and the
acquirer's answer (approved or declined, its decline code and authorization id) as the
vault relayed it. Never a card number, an expiry or a CVC: the shop never has them.

Each row also holds the **order attempt** it pays for (``att_…``, made by the shop's
server when it renders the checkout), under a unique constraint: one attempt is one
order, however often its page, the customer or the network sends it. The attempt is
also the Idempotency-Key of the order's forward (:mod:`.payments`). A pending row is
*claimed* (``claimed_until``) by the request that forwards it, so that a second
submission waits for the first instead of forwarding beside it, and takes over only
once the first has given up or died.

Each call opens its own connection, so the store can be used from any thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "ATTEMPT_ID",
    "AttemptTaken",
    "Order",
    "OrderStore",
    "PaymentMethodUsed",
    "Status",
    "new_attempt",
]

Status = Literal["pending", "approved", "declined", "failed"]

#: An order attempt's id: ``att_`` and 128 random bits, made by the shop's server.
ATTEMPT_ID = re.compile(r"att_[0-9a-f]{32}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    id                 TEXT PRIMARY KEY,          -- ord_…
    created            INTEGER NOT NULL,          -- Unix time
    description        TEXT NOT NULL,
    amount             INTEGER NOT NULL,          -- in the currency's smallest unit
    currency           TEXT NOT NULL,
    payment_method     TEXT NOT NULL UNIQUE,      -- pm_…: the only reference to the card
    brand              TEXT,
    last4              TEXT,
    status             TEXT NOT NULL,             -- pending, approved, declined, failed
    decline_code       TEXT,
    authorization_id   TEXT,                      -- the acquirer's auth_…
    acquirer_status    INTEGER,                   -- the acquirer's HTTP status
    forwarding_request TEXT,                      -- the vault's fwdreq_…
    error              TEXT,                      -- an error code (failed, or pending: the last try's)
    attempt            TEXT,                      -- att_…: the order attempt (unique, below)
    claimed_until      INTEGER NOT NULL DEFAULT 0 -- pending: Unix time until which a request forwards it
)
"""
#: Added to databases made before attempts existed (their old rows have none).
_MIGRATIONS = {
    "attempt": "ALTER TABLE orders ADD COLUMN attempt TEXT",
    "claimed_until": "ALTER TABLE orders ADD COLUMN claimed_until INTEGER NOT NULL DEFAULT 0",
}
#: One order per attempt: a second INSERT for the same attempt fails, whoever sends it.
_ATTEMPT_INDEX = "CREATE UNIQUE INDEX IF NOT EXISTS orders_attempt ON orders (attempt)"
_COLUMNS = (
    "id, created, description, amount, currency, payment_method, brand, last4, status, "
    "decline_code, authorization_id, acquirer_status, forwarding_request, error, attempt"
)


def new_attempt() -> str:
    """A new order attempt's id."""
    return "att_" + secrets.token_hex(16)


class PaymentMethodUsed(Exception):
    """The payment method already paid for an order: each card entry pays once."""


class AttemptTaken(Exception):
    """The attempt has its order already (``order``): this submission is a repeat."""

    def __init__(self, order: Order) -> None:
        super().__init__(order.id)
        self.order = order


@dataclass(frozen=True)
class Order:
    id: str
    created: int
    description: str
    amount: int
    currency: str
    payment_method: str
    brand: str | None
    last4: str | None
    status: Status
    decline_code: str | None = None
    authorization_id: str | None = None
    acquirer_status: int | None = None
    forwarding_request: str | None = None
    error: str | None = None
    attempt: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {"object": "order", **dataclasses.asdict(self)}


class OrderStore:
    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Created 0600 before SQLite opens it, so it is never readable by others.
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(path, 0o600)
        with self._connect() as db:
            db.execute(_SCHEMA)
            have = {row[1] for row in db.execute("PRAGMA table_info(orders)")}
            for column, statement in _MIGRATIONS.items():
                if column not in have:
                    db.execute(statement)
            db.execute(_ATTEMPT_INDEX)

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
        try:
            db.execute("PRAGMA synchronous = FULL")
            yield db
        finally:
            db.close()

    def create(
        self,
        *,
        attempt: str,
        payment_method: str,
        description: str,
        amount: int,
        currency: str,
        brand: str | None,
        last4: str | None,
        claim_for: float,
    ) -> Order:
        """A pending order for ``attempt``, claimed by the caller for ``claim_for``
        seconds. Raises :class:`AttemptTaken` (with the attempt's order) if the attempt
        has one already, :class:`PaymentMethodUsed` if the payment method has."""
        order = Order(
            id="ord_" + secrets.token_hex(8),
            created=int(time.time()),
            description=description,
            amount=amount,
            currency=currency,
            payment_method=payment_method,
            brand=brand,
            last4=last4,
            status="pending",
            attempt=attempt,
        )
        try:
            with self._connect() as db:
                db.execute(
                    f"INSERT INTO orders ({_COLUMNS}, claimed_until) "  # noqa: S608 - constant
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (*dataclasses.astuple(order), int(time.time() + claim_for)),
                )
        except sqlite3.IntegrityError:
            # Which constraint: the attempt's order, if there is one, is the answer.
            first = self.by_attempt(attempt)
            if first is not None:
                raise AttemptTaken(first) from None
            raise PaymentMethodUsed() from None
        return order

    def claim(self, order_id: str, seconds: float) -> bool:
        """Claim a pending order for ``seconds``: true if no one else holds it (its
        claim was released or has run out), and it is now the caller's to forward."""
        now = int(time.time())
        with self._connect() as db:
            cursor = db.execute(
                "UPDATE orders SET claimed_until = ? "
                "WHERE id = ? AND status = 'pending' AND claimed_until <= ?",
                (int(now + seconds), order_id, now),
            )
        return cursor.rowcount == 1

    def release(self, order_id: str, *, error: str) -> Order:
        """The forward's outcome is not known (the vault could not be reached, or is
        busy with it): the order stays pending, with ``error``, free for the next
        submission of its attempt to forward again with the same Idempotency-Key."""
        with self._connect() as db:
            db.execute(
                "UPDATE orders SET claimed_until = 0, error = ? WHERE id = ? AND status = 'pending'",
                (error, order_id),
            )
        return self._must_get(order_id)

    def finish(
        self,
        order_id: str,
        *,
        status: Status,
        decline_code: str | None = None,
        authorization_id: str | None = None,
        acquirer_status: int | None = None,
        forwarding_request: str | None = None,
        error: str | None = None,
    ) -> Order:
        with self._connect() as db:
            db.execute(
                "UPDATE orders SET status = ?, decline_code = ?, authorization_id = ?, "
                "acquirer_status = ?, forwarding_request = ?, error = ?, claimed_until = 0 "
                "WHERE id = ?",
                (
                    status,
                    decline_code,
                    authorization_id,
                    acquirer_status,
                    forwarding_request,
                    error,
                    order_id,
                ),
            )
        return self._must_get(order_id)

    def _must_get(self, order_id: str) -> Order:
        found = self.get(order_id)
        if found is None:  # pragma: no cover - the row was just written
            raise LookupError(order_id)
        return found

    def get(self, order_id: str) -> Order | None:
        with self._connect() as db:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM orders WHERE id = ?",  # noqa: S608 - constant
                (order_id,),
            ).fetchone()
        return Order(*row) if row else None

    def by_attempt(self, attempt: str) -> Order | None:
        """The order of ``attempt``, if it has one."""
        with self._connect() as db:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM orders WHERE attempt = ?",  # noqa: S608 - constant
                (attempt,),
            ).fetchone()
        return Order(*row) if row else None

    def recent(self, limit: int = 100) -> list[Order]:
        with self._connect() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM orders ORDER BY created DESC, rowid DESC LIMIT ?",  # noqa: S608 - constant
                (limit,),
            ).fetchall()
        return [Order(*row) for row in rows]
