"""The shop's own database: orders, each naming its card only by a ``pm_…`` id.

SQLite, one file, mode 0600 in a directory of mode 0700 (SQLite gives its journal the
database file's mode). What a row holds: the payment method's id, the brand and last
four digits the vault reports for it (PCI DSS allows showing those), the amount, and the
acquirer's answer (approved or declined, its decline code and authorization id) as the
vault relayed it. Never a card number, an expiry or a CVC: the shop never has them.

Each call opens its own connection, so the store can be used from any thread.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

__all__ = ["Order", "OrderStore", "PaymentMethodUsed", "Status"]

Status = Literal["pending", "approved", "declined", "failed"]

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
    error              TEXT                       -- an error code when status = failed
)
"""
_COLUMNS = (
    "id, created, description, amount, currency, payment_method, brand, last4, status, "
    "decline_code, authorization_id, acquirer_status, forwarding_request, error"
)


class PaymentMethodUsed(Exception):
    """The payment method already paid for an order: each card entry pays once."""


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
        payment_method: str,
        description: str,
        amount: int,
        currency: str,
        brand: str | None,
        last4: str | None,
    ) -> Order:
        """A pending order. Raises :class:`PaymentMethodUsed` if the payment method
        already has one."""
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
        )
        try:
            with self._connect() as db:
                db.execute(
                    f"INSERT INTO orders ({_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",  # noqa: S608 - constant
                    dataclasses.astuple(order),
                )
        except sqlite3.IntegrityError:
            raise PaymentMethodUsed() from None
        return order

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
                "acquirer_status = ?, forwarding_request = ?, error = ? WHERE id = ?",
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

    def recent(self, limit: int = 100) -> list[Order]:
        with self._connect() as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM orders ORDER BY created DESC, rowid DESC LIMIT ?",  # noqa: S608 - constant
                (limit,),
            ).fetchall()
        return [Order(*row) for row in rows]
