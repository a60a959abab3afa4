"""Paying for an order: the shop asks the vault to forward the card to the acquirer.

The shop has a ``pm_…`` id from its checkout page, the **order attempt** (``att_…``)
the page was rendered with, and nothing else. It

1. looks the attempt up: if it has an order already, this is a repeat (a double click, a
   retried POST, the same page submitted again) and the answer is that order's outcome;
   nothing else happens (a pending one is waited for, or taken over: see below);
2. asks the vault for the payment method (``GET /v1/payment_methods/{id}`` with its
   secret key): the brand and last four digits to show, and proof that the id is one of
   its own account's;
3. records a pending order with the attempt, the id, the amount and those two facts. The
   attempt is unique in the orders table, so of two submissions racing here one
   inserts and the other finds the first's order (step 1);
4. asks the vault to forward the card to the acquirer (``POST /v1/forwarding/requests``):
   a JSON body with the amount, the order id and an empty ``card`` object, which the
   vault fills with the number, the expiry and the CVC on its way out
   (docs/forwarding.md). **The attempt is the Idempotency-Key** (``shop-att_…``), and
   the body is made from the order's row, so every retry of the forward is the same
   request under the same key, which the vault sends out at most once;
5. records the acquirer's answer as the vault relays it: the HTTP status, approved or
   declined, the decline code and the authorization id. Nothing else of the response
   is kept (the vault has masked it already; the shop does not need it).

When the forward's outcome is unknown, the card may have been charged: no answer from
the vault, a ``5xx`` (the vault failed, or the destination did not answer: the request
may have left), a ``409`` (the vault is still busy with the key) or a ``429``, or a
forward the vault reports with ``outcome: "unknown"``. The order stays **pending**, and
the next submission of the same attempt forwards again with the same key: the vault
answers the first result, or runs it once if nothing was sent. Asking the customer for
a new attempt there could charge twice; an order that stays unknown is reconciled with
the acquirer by its reference (the order id). A ``4xx`` from the vault is its refusal,
with nothing sent: the order failed and the page may start a new attempt. A pending
order is *claimed* by the request forwarding it; a second submission waits for it (up
to :data:`WAIT` seconds) and takes it over only when the claim was released or has run
out (:data:`CLAIM`: the first request died).
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from cardvault.client import CardVaultError, Client, TransportError

from .orders import ATTEMPT_ID, AttemptTaken, Order, OrderStore, new_attempt

__all__ = ["CART", "CLAIM", "WAIT", "Cart", "Item", "PaymentError", "Payments"]

_log = logging.getLogger("shop.payments")
PM_ID = re.compile(r"pm_[A-Za-z0-9]{1,64}")
_AUTH_ID = re.compile(r"[A-Za-z0-9_]{1,64}")
_DECLINE_CODE = re.compile(r"[a-z_]{1,64}")
_ERROR_CODE = re.compile(r"[a-z_]{1,64}")

#: How long a request may forward an order before another may take it over: more than
#: the SDK can spend on one forward (three tries of 30 s, and the pauses between).
CLAIM = 180.0
#: How long a repeated submission waits for the first one's answer before it answers
#: ``409 order_in_progress`` (the page then lets the customer ask again).
WAIT = 20.0
#: 4xx answers of the vault after which the forward's outcome is unknown (busy with the
#: same key, rate limited), as after any 5xx or no answer: the order stays pending and
#: is forwarded again under the same key. Every other 4xx is the vault's refusal, with
#: nothing sent.
_TRY_AGAIN = frozenset({409, 429})


@dataclass(frozen=True)
class Item:
    name: str
    amount: int  # cents


@dataclass(frozen=True)
class Cart:
    items: tuple[Item, ...]
    currency: str = "usd"

    @property
    def amount(self) -> int:
        return sum(item.amount for item in self.items)

    @property
    def description(self) -> str:
        return ", ".join(item.name for item in self.items)


#: What every customer buys. The server decides the amount; the page only shows it.
CART = Cart((Item("Field notebook, dot grid", 1800), Item("Fountain pen, fine nib", 4200)))


class PaymentError(Exception):
    """The payment could not be made. ``status`` is the HTTP status for the shop's page;
    ``message`` is safe to show a customer."""

    def __init__(self, status: int, code: str, message: str, order: Order | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.order = order


class Payments:
    def __init__(
        self,
        vault: Client,
        orders: OrderStore,
        forward_url: str,
        *,
        claim: float = CLAIM,
        wait: float = WAIT,
    ) -> None:
        self.vault = vault
        self.orders = orders
        self.forward_url = forward_url
        self.claim = claim
        self.wait = wait

    def checkout(self, payment_method: str, cart: Cart = CART, attempt: str | None = None) -> Order:
        """Pay for ``cart`` with ``payment_method`` as order attempt ``attempt``; the
        attempt's order: approved, declined or failed, or pending when the forward's
        outcome is unknown (``error`` says why; submit the same attempt again).

        A repeated attempt answers its first order whatever ``payment_method`` it
        brings. Without ``attempt`` (a script, say) the call is an attempt of its own.
        Raises :class:`PaymentError` when no order was made (then the attempt is still
        unused), or when the attempt's order is still being paid after :attr:`wait`.
        """
        if attempt is None:
            attempt = new_attempt()
        elif not isinstance(attempt, str) or not ATTEMPT_ID.fullmatch(attempt):
            raise PaymentError(400, "invalid_attempt", "That is not an order attempt of this shop.")
        if not isinstance(payment_method, str) or not PM_ID.fullmatch(payment_method):
            raise PaymentError(400, "invalid_payment_method", "That is not a payment method id.")
        first = self.orders.by_attempt(attempt)
        if first is not None:
            return self._repeat(first)
        try:
            pm = self.vault.payment_methods.retrieve(payment_method)
        except CardVaultError as exc:
            status = getattr(exc, "http_status_received", exc.http_status)
            if status >= 500 or status == 429:  # not a refusal: try again later
                _log.error("vault unavailable", extra={"code": exc.code})
                raise PaymentError(503, "vault_unavailable", "Payments are unavailable.") from None
            _log.warning("payment method refused", extra={"code": exc.code})
            raise PaymentError(
                400, "invalid_payment_method", "That payment method cannot be used."
            ) from None
        except TransportError as exc:
            _log.error("vault unreachable", extra={"detail": str(exc)})
            raise PaymentError(502, "vault_unreachable", "Payments are unavailable.") from None
        card = pm.get("card") or {}
        try:
            order = self.orders.create(
                attempt=attempt,
                payment_method=payment_method,
                description=cart.description,
                amount=cart.amount,
                currency=cart.currency,
                brand=_text(card.get("brand")),
                last4=_text(card.get("last4")),
                claim_for=self.claim,
            )
        except AttemptTaken as exc:  # a second submission won the race to step 3
            return self._repeat(exc.order)
        return self._forward(order)

    def _repeat(self, order: Order) -> Order:
        """A second submission of ``order``'s attempt: the first's outcome. A pending
        order is waited for; it is forwarded again (same key) only if no one holds it."""
        _log.info("order attempt repeated", extra={"order": order.id, "status": order.status})
        deadline = time.monotonic() + self.wait
        while order.status == "pending":
            if self.orders.claim(order.id, self.claim):
                return self._forward(order)
            if time.monotonic() >= deadline:
                raise PaymentError(
                    409,
                    "order_in_progress",
                    "This order is still being paid. Wait a moment and try again: "
                    "it will not be charged twice.",
                    order,
                )
            time.sleep(0.1)
            found = self.orders.get(order.id)
            if found is None:  # pragma: no cover - orders are never deleted
                raise LookupError(order.id)
            order = found
        return order

    def _forward(self, order: Order) -> Order:
        """Forward ``order`` (claimed by the caller) and record the outcome. Whatever
        goes wrong, the claim is given back: forwarding again is always safe, under the
        same key."""
        try:
            return self._send(order)
        except BaseException:
            self.orders.release(order.id, error="internal_error")
            raise

    def _send(self, order: Order) -> Order:
        body = {
            "amount": order.amount,
            "currency": order.currency,
            "reference": order.id,
            "card": {},
        }
        try:
            fwd = self.vault.forwarding.create(
                payment_method=order.payment_method,
                url=self.forward_url,
                replacements=["card_number", "card_expiry", "card_cvc"],
                request={
                    "headers": [{"name": "Content-Type", "value": "application/json"}],
                    "body": json.dumps(body),
                },
                # One key per order attempt: every retry is the same forward.
                idempotency_key=f"shop-{order.attempt or order.id}",
            )
        except TransportError as exc:
            _log.error("forwarding unconfirmed", extra={"order": order.id, "detail": str(exc)})
            return self.orders.release(order.id, error="vault_unreachable")
        except CardVaultError as exc:
            code = _text(exc.code, _ERROR_CODE) or "api_error"
            status = getattr(exc, "http_status_received", exc.http_status)
            if status >= 500 or status in _TRY_AGAIN:
                _log.error("forwarding unconfirmed", extra={"order": order.id, "code": code})
                return self.orders.release(order.id, error=code)
            _log.error("forwarding failed", extra={"order": order.id, "code": code})
            return self.orders.finish(order.id, status="failed", error=code)
        if fwd.get("outcome") == "unknown":  # sent, perhaps; the answer was lost
            _log.error("forwarding unconfirmed", extra={"order": order.id, "code": "unknown"})
            return self.orders.release(order.id, error="outcome_unknown")
        finished = self._record_answer(order, fwd)
        _log.info(
            "order paid" if finished.status == "approved" else "order not paid",
            extra={
                "order": finished.id,
                "status": finished.status,
                "decline_code": finished.decline_code,
                "amount": finished.amount,
                "payment_method": finished.payment_method,
                "forwarding_request": finished.forwarding_request,
            },
        )
        return finished

    def _record_answer(self, order: Order, fwd: dict[str, Any]) -> Order:
        details = fwd.get("response_details") or {}
        http_status = details.get("status")
        answer: dict[str, Any] = {}
        try:
            parsed = json.loads(details.get("body") or "")
            if isinstance(parsed, dict):
                answer = parsed
        except ValueError:
            pass
        approved = http_status == 200 and answer.get("status") == "approved"
        declined = answer.get("status") == "declined"
        decline_code = _text(answer.get("decline_code"), _DECLINE_CODE)
        if not declined and not approved:
            error = answer.get("error")
            decline_code = _text(error.get("code") if isinstance(error, dict) else None)
        return self.orders.finish(
            order.id,
            status="approved" if approved else ("declined" if declined else "failed"),
            decline_code=decline_code,
            authorization_id=_text(answer.get("id"), _AUTH_ID),
            acquirer_status=http_status if isinstance(http_status, int) else None,
            forwarding_request=_text(fwd.get("id"), _AUTH_ID),
            error=None if approved or declined else "acquirer_error",
        )


def _text(value: Any, pattern: re.Pattern[str] = _AUTH_ID) -> str | None:
    """A short identifier-like string from the vault or the acquirer, or None: whatever
    else arrives is not stored."""
    return value if isinstance(value, str) and pattern.fullmatch(value) else None
