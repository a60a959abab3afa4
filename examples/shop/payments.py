"""Paying for an order: the shop asks the vault to forward the card to the acquirer.

The shop has a ``pm_…`` id from its checkout page and nothing else. It

1. asks the vault for that payment method (``GET /v1/payment_methods/{id}`` with its
   secret key): the brand and last four digits to show, and proof that the id is one of
   its own account's;
2. records a pending order with the id, the amount and those two facts;
3. asks the vault to forward the card to the acquirer (``POST /v1/forwarding/requests``):
   a JSON body with the amount and an empty ``card`` object, which the vault fills with
   the number, the expiry and the CVC on its way out (docs/forwarding.md). The order id
   is the idempotency key, so a retry never charges twice;
4. records the acquirer's answer as the vault relays it: the HTTP status, approved or
   declined, the decline code and the authorization id. Nothing else of the response
   is kept (the vault has masked it already; the shop does not need it).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from cardvault.client import CardVaultError, Client, TransportError

from .orders import Order, OrderStore

__all__ = ["CART", "Cart", "Item", "PaymentError", "Payments"]

_log = logging.getLogger("shop.payments")
PM_ID = re.compile(r"pm_[A-Za-z0-9]{1,64}")
_AUTH_ID = re.compile(r"[A-Za-z0-9_]{1,64}")
_DECLINE_CODE = re.compile(r"[a-z_]{1,64}")


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
    def __init__(self, vault: Client, orders: OrderStore, forward_url: str) -> None:
        self.vault = vault
        self.orders = orders
        self.forward_url = forward_url

    def checkout(self, payment_method: str, cart: Cart = CART) -> Order:
        """Pay for ``cart`` with ``payment_method``; the finished order (approved or
        declined). Raises :class:`PaymentError` (with the failed order, once one exists)."""
        if not isinstance(payment_method, str) or not PM_ID.fullmatch(payment_method):
            raise PaymentError(400, "invalid_payment_method", "That is not a payment method id.")
        try:
            pm = self.vault.payment_methods.retrieve(payment_method)
        except CardVaultError as exc:
            _log.warning("payment method refused", extra={"code": exc.code})
            raise PaymentError(
                400, "invalid_payment_method", "That payment method cannot be used."
            ) from None
        except TransportError as exc:
            _log.error("vault unreachable", extra={"detail": str(exc)})
            raise PaymentError(502, "vault_unreachable", "Payments are unavailable.") from None
        card = pm.get("card") or {}
        order = self.orders.create(
            payment_method=payment_method,
            description=cart.description,
            amount=cart.amount,
            currency=cart.currency,
            brand=_text(card.get("brand")),
            last4=_text(card.get("last4")),
        )
        body = {
            "amount": cart.amount,
            "currency": cart.currency,
            "reference": order.id,
            "card": {},
        }
        try:
            fwd = self.vault.forwarding.create(
                payment_method=payment_method,
                url=self.forward_url,
                replacements=["card_number", "card_expiry", "card_cvc"],
                request={
                    "headers": [{"name": "Content-Type", "value": "application/json"}],
                    "body": json.dumps(body),
                },
                idempotency_key=f"shop-{order.id}",
            )
        except (CardVaultError, TransportError) as exc:
            code = exc.code if isinstance(exc, CardVaultError) else "vault_unreachable"
            failed = self.orders.finish(order.id, status="failed", error=code)
            _log.error("forwarding failed", extra={"order": order.id, "code": code})
            raise PaymentError(502, code, "The payment could not be made.", failed) from None
        finished = self._record_answer(order, fwd)
        _log.info(
            "order paid" if finished.status == "approved" else "order not paid",
            extra={
                "order": finished.id,
                "status": finished.status,
                "decline_code": finished.decline_code,
                "amount": finished.amount,
                "payment_method": payment_method,
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
