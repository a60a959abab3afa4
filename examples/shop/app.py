"""The shop's web application: a checkout page, ``POST /orders``, and the orders page.

Routes:

``GET /``
    The checkout: the cart, and the vault's card element (``cardvault.js`` from the
    vault, pinned by its SRI hash; the card fields are a frame on the vault's origin).
    The page carries an **order attempt** (``att_…``), which the server makes here and
    keeps in a cookie (``__Host-attempt``), so that a reload shows the same attempt:
    while it is unpaid the same form, once approved the receipt (no Pay button), after
    a decline or a failure a new attempt.
``POST /orders``
    ``{"attempt": "att_…", "payment_method": "pm_…"}`` from the checkout page: pays for
    the cart (see :mod:`.payments`) and answers the order as JSON. One attempt is one
    order: sending it again answers the same order. Same-origin JSON only.
``POST /checkout/new``
    "Start a new order" on the receipt: a new attempt in the cookie, and back to ``/``.
``GET /orders``
    The orders: what was bought, the card's brand and last four, the acquirer's answer;
    and the events the vault sent (its webhooks).
``POST /webhooks/cardvault``
    The vault's webhooks, verified with the official ``stripe`` library
    (:mod:`.webhooks`); 404 when the shop has no webhook secret.
``GET /static/…``, ``GET /healthz``

Every response carries HSTS and the usual security headers; each page has its own
Content-Security-Policy that names the vault for the script and the frame and nothing
else from elsewhere.
"""

from __future__ import annotations

import html
import json
import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from string import Template
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .orders import ATTEMPT_ID, Order, OrderStore, PaymentMethodUsed, new_attempt
from .payments import CART, Cart, PaymentError, Payments
from .webhooks import ReceivedEvent, WebhookInbox, WebhookRefused

__all__ = ["HSTS", "SecurityHeaders", "ShopApp", "build_shop_app"]

_HERE = Path(__file__).parent
_log = logging.getLogger("shop.http")
_access = logging.getLogger("shop.access")

#: Two years, subdomains, preload: what hstspreload.org asks for. The shop speaks HTTPS
#: only, so a browser that once saw it never tries plain HTTP again.
HSTS = "max-age=63072000; includeSubDomains; preload"
_STATIC_HEADERS: list[tuple[bytes, bytes]] = [
    (b"strict-transport-security", HSTS.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), payment=()"),
    (b"x-frame-options", b"DENY"),
]
#: Anything that does not set its own policy (JSON, errors) may load nothing at all.
_DEFAULT_CSP = b"default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
_MAX_BODY = 4096
#: An event holds a forwarding request's answer, which may be up to a megabyte.
_MAX_WEBHOOK_BODY = 2 * 1024 * 1024
#: The checkout's order attempt, kept across reloads. ``__Host-``: HTTPS, this host
#: only, path ``/``. HttpOnly: the page reads the attempt from its own markup.
ATTEMPT_COOKIE = "__Host-attempt"

_BRANDS = {
    "amex": "American Express",
    "diners": "Diners Club",
    "discover": "Discover",
    "jcb": "JCB",
    "mastercard": "Mastercard",
    "unionpay": "UnionPay",
    "visa": "Visa",
}


class SecurityHeaders:
    """Outermost middleware: security headers on every response, no ``Server`` header,
    one access-log line per request (method, path without query, status, time)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"server"]
                have = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in _STATIC_HEADERS if k not in have]
                if b"content-security-policy" not in have:
                    headers.append((b"content-security-policy", _DEFAULT_CSP))
                if b"cache-control" not in have:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            _access.info(
                "request",
                extra={
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - start) * 1000, 1),
                },
            )


def _money(amount: int, currency: str) -> str:
    symbol = {"usd": "$", "eur": "€", "gbp": "£"}.get(currency, currency.upper() + " ")
    return f"{symbol}{amount / 100:,.2f}"


def _brand(brand: str | None) -> str:
    return _BRANDS.get(brand or "", (brand or "card").title())


def _template(name: str) -> Template:
    return Template((_HERE / "templates" / name).read_text())


class ShopApp:
    """The routes and what they share: the vault's URL and SRI hash, the keys' public half,
    the order store and the payments."""

    def __init__(
        self,
        *,
        origin: str,
        vault_url: str,
        integrity: str,
        publishable_key: str,
        orders: OrderStore,
        payments: Payments,
        cart: Cart = CART,
        inbox: WebhookInbox | None = None,
    ) -> None:
        self.origin = origin
        self.vault_url = vault_url
        self.integrity = integrity
        self.publishable_key = publishable_key
        self.orders = orders
        self.payments = payments
        self.cart = cart
        self.inbox = inbox
        self._checkout = _template("checkout.html")
        self._receipt = _template("receipt.html")
        self._orders = _template("orders.html")
        self._static = {
            "checkout.js": (
                (_HERE / "static" / "checkout.js").read_bytes(),
                "text/javascript; charset=utf-8",
            ),
            "shop.css": ((_HERE / "static" / "shop.css").read_bytes(), "text/css; charset=utf-8"),
        }
        # The vault is named for the script and the frame; everything else is this origin.
        self.page_csp = (
            f"default-src 'none'; script-src 'self' {vault_url}; frame-src {vault_url}; "
            "style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; "
            "form-action 'self'; frame-ancestors 'none'"
        )

    # -- pages ------------------------------------------------------------------------

    def _page(self, body: str) -> Response:
        return Response(
            body,
            media_type="text/html; charset=utf-8",
            headers={"content-security-policy": self.page_csp},
        )

    async def checkout(self, request: Request) -> Response:
        # The attempt this browser is on, if any: the same until it is declined or
        # failed, so that a reload cannot start a second order for the same cart.
        attempt = request.cookies.get(ATTEMPT_COOKIE, "")
        order = None
        if ATTEMPT_ID.fullmatch(attempt):
            order = await run_in_threadpool(self.orders.by_attempt, attempt)
        else:
            attempt = ""
        if order is not None and order.status == "approved":
            return self._page(self._receipt.substitute(self._cart_values(), **_receipt(order)))
        if not attempt or (order is not None and order.status in ("declined", "failed")):
            attempt = new_attempt()
        response = self._page(
            self._checkout.substitute(
                self._cart_values(),
                vault=html.escape(self.vault_url),
                integrity=html.escape(self.integrity),
                pk=html.escape(self.publishable_key),
                attempt=attempt,
            )
        )
        _set_attempt(response, attempt)
        return response

    def _cart_values(self) -> dict[str, str]:
        e = html.escape
        rows = "\n".join(
            f"      <li><span>{e(item.name)}</span>"
            f"<span>{e(_money(item.amount, self.cart.currency))}</span></li>"
            for item in self.cart.items
        )
        return {"items": rows, "total": e(_money(self.cart.amount, self.cart.currency))}

    async def new_checkout(self, request: Request) -> Response:
        """The receipt's "Start a new order": a new attempt, then the checkout. A POST
        (a form on the receipt), so that no link, prefetch or reload starts an order."""
        if not self._same_origin(request):
            return _error(403, "forbidden_origin", "Orders come from this shop's own pages.")
        response = Response(status_code=303, headers={"location": "/"})
        _set_attempt(response, new_attempt())
        return response

    async def list_orders(self, _request: Request) -> Response:
        orders = await run_in_threadpool(self.orders.recent)
        events = [] if self.inbox is None else await run_in_threadpool(self.inbox.recent)
        return self._page(
            self._orders.substitute(rows=_order_rows(orders), events=_event_rows(events))
        )

    async def receive_webhook(self, request: Request) -> Response:
        """One delivery of the vault's webhooks: verified, kept once, then 200. A
        signature that does not verify is 400 (the vault retries, and gives up after
        three days)."""
        if self.inbox is None:
            return PlainTextResponse("Not found.", status_code=404)
        body = await request.body()
        if len(body) > _MAX_WEBHOOK_BODY:
            return _error(413, "request_too_large", "The request is too large.")
        try:
            event = await run_in_threadpool(
                self.inbox.receive, body, request.headers.get("stripe-signature")
            )
        except WebhookRefused:
            _log.warning("webhook refused: its signature does not verify")
            return _error(400, "signature_invalid", "The signature does not verify.")
        _log.info("webhook received", extra={"event": event.id, "type": event.type})
        return JSONResponse({"received": True})

    async def static(self, request: Request) -> Response:
        found = self._static.get(request.path_params["name"])
        if found is None:
            return PlainTextResponse("Not found.", status_code=404)
        content, media = found
        return Response(content, media_type=media, headers={"cache-control": "max-age=300"})

    async def healthz(self, _request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    # -- the payment --------------------------------------------------------------------

    def _same_origin(self, request: Request) -> bool:
        # Only this shop's own pages may order: a browser sends Origin (and
        # Sec-Fetch-Site) with every POST; another site's page is refused, and a form
        # post from elsewhere cannot send JSON without a CORS preflight, which fails.
        # Under Referrer-Policy: no-referrer a browser sends "Origin: null" with a form
        # post, even to its own origin; Sec-Fetch-Site then says where it came from.
        origin = request.headers.get("origin")
        site = request.headers.get("sec-fetch-site")
        if site in ("cross-site", "same-site"):
            return False
        return origin in (None, self.origin) or (origin == "null" and site == "same-origin")

    async def create_order(self, request: Request) -> Response:
        if not self._same_origin(request):
            return _error(403, "forbidden_origin", "Orders come from this shop's own pages.")
        media = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if media != "application/json":
            return _error(415, "unsupported_media_type", "Send JSON.")
        body = await request.body()
        if len(body) > _MAX_BODY:
            return _error(413, "request_too_large", "The request is too large.")
        try:
            data = json.loads(body)
        except ValueError:
            return _error(400, "invalid_json", "The request body is not JSON.")
        if not isinstance(data, dict):
            return _error(400, "invalid_payment_method", "Give a payment_method.")
        pm = data.get("payment_method")
        if not isinstance(pm, str):
            return _error(400, "invalid_payment_method", "Give a payment_method.")
        attempt = data.get("attempt")
        if attempt is not None and not isinstance(attempt, str):
            return _error(400, "invalid_attempt", "That is not an order attempt of this shop.")
        try:
            order = await run_in_threadpool(self.payments.checkout, pm, self.cart, attempt)
        except PaymentMethodUsed:
            return _error(
                409,
                "payment_method_used",
                "That card entry was used already; enter the card again.",
            )
        except PaymentError as exc:
            return _error(exc.status, exc.code, exc.message, exc.order)
        status, answer = _order_answer(order)
        response = JSONResponse(answer, status_code=status)
        if "next_attempt" in answer and request.cookies.get(ATTEMPT_COOKIE) == attempt:
            # The page on this attempt goes on with the next one, and so does a reload.
            _set_attempt(response, answer["next_attempt"])
        return response

    def routes(self) -> list[Route]:
        return [
            Route("/", self.checkout, methods=["GET"]),
            Route("/orders", self.create_order, methods=["POST"]),
            Route("/checkout/new", self.new_checkout, methods=["POST"]),
            Route("/orders", self.list_orders, methods=["GET"]),
            Route("/webhooks/cardvault", self.receive_webhook, methods=["POST"]),
            Route("/static/{name}", self.static, methods=["GET"]),
            Route("/healthz", self.healthz, methods=["GET"]),
        ]


def _public(order: Order) -> dict[str, Any]:
    """What the customer's page is told about an order (all of it is shown on /orders)."""
    return {
        **order.to_dict(),
        "brand_name": _brand(order.brand),
        "amount_text": _money(order.amount, order.currency),
    }


def _set_attempt(response: Response, attempt: str) -> None:
    response.set_cookie(
        ATTEMPT_COOKIE, attempt, path="/", secure=True, httponly=True, samesite="strict"
    )


def _order_answer(order: Order) -> tuple[int, dict[str, Any]]:
    """The answer to every submission of ``order``'s attempt, the first and any repeat.

    ``200`` with the order when the acquirer answered (approved, declined, or its
    error); ``502`` when the vault refused the forward (a 4xx: nothing was sent);
    ``503`` when the outcome is unknown (the order is pending: send the same attempt
    again, which is never charged twice). After a decline or a failure, ``next_attempt`` is
    the attempt for trying again (with another card, say).
    """
    body: dict[str, Any] = {"order": _public(order)}
    status = 200
    if order.status == "pending":
        status = 503
        body["error"] = {
            "code": order.error or "payment_unconfirmed",
            "message": "The payment could not be confirmed. Try again: "
            "this order will not be charged twice.",
        }
    elif order.status == "failed" and order.forwarding_request is None:
        status = 502
        body["error"] = {
            "code": order.error or "api_error",
            "message": "The payment could not be made.",
        }
    if order.status in ("declined", "failed"):
        body["next_attempt"] = new_attempt()
    return status, body


def _receipt(order: Order) -> dict[str, str]:
    e = html.escape
    return {
        "order": e(order.id),
        "paid": e(_money(order.amount, order.currency)),
        "card": e(f"{_brand(order.brand)} ending in {order.last4 or '????'}"),
    }


def _error(status: int, code: str, message: str, order: Order | None = None) -> Response:
    body: dict[str, Any] = {"error": {"code": code, "message": message}}
    if order is not None:
        body["order"] = _public(order)
    return JSONResponse(body, status_code=status)


def _order_rows(orders: list[Order]) -> str:
    if not orders:
        return '      <tr><td colspan="6" class="empty">No orders yet.</td></tr>'
    e = html.escape
    rows = []
    for o in orders:
        when = datetime.fromtimestamp(o.created, UTC).strftime("%Y-%m-%d %H:%M UTC")
        card = f"{_brand(o.brand)} •••• {o.last4}" if o.last4 else _brand(o.brand)
        answer: str = o.status
        if o.decline_code:
            answer += f" ({o.decline_code})"
        elif o.error:
            answer += f" ({o.error})"
        rows.append(
            f'      <tr id="{e(o.id)}" data-status="{e(o.status)}">'
            f'<td data-label="Order">{e(o.id)}<br><small>{e(when)}</small></td>'
            f'<td data-label="Items">{e(o.description)}</td>'
            f'<td data-label="Amount" class="num">{e(_money(o.amount, o.currency))}</td>'
            f'<td data-label="Card">{e(card)}<br><small>{e(o.payment_method)}</small></td>'
            f'<td data-label="Answer" class="status {e(o.status)}">{e(answer)}</td>'
            f'<td data-label="Authorization"><small>{e(o.authorization_id or "—")}</small></td>'
            "</tr>"
        )
    return "\n".join(rows)


def _event_rows(events: list[ReceivedEvent]) -> str:
    if not events:
        return '      <tr><td colspan="3" class="empty">No events yet.</td></tr>'
    e = html.escape
    rows = []
    for ev in events:
        when = datetime.fromtimestamp(ev.created, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        rows.append(
            f'      <tr id="{e(ev.id)}" data-type="{e(ev.type)}">'
            f'<td data-label="Event">{e(ev.id)}<br><small>{e(when)}</small></td>'
            f'<td data-label="Type">{e(ev.type)}</td>'
            f'<td data-label="Object"><small>{e(ev.object_id)}</small></td>'
            "</tr>"
        )
    return "\n".join(rows)


async def _not_found(_request: Request, _exc: Exception) -> Response:
    return PlainTextResponse("Not found.", status_code=404)


async def _crash(_request: Request, exc: Exception) -> Response:
    _log.error("unhandled error", extra={"error": type(exc).__name__})
    return _error(500, "internal_error", "Something went wrong on our side.")


def build_shop_app(shop: ShopApp) -> ASGIApp:
    app = Starlette(
        routes=shop.routes(),
        exception_handlers={404: _not_found, Exception: _crash},
    )
    return SecurityHeaders(app)
