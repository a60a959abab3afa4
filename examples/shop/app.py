"""The shop's web application: a checkout page, ``POST /orders``, and the orders page.

Routes:

``GET /``
    The checkout: the cart, and the vault's card element (``cardvault.js`` from the
    vault, pinned by its SRI hash; the card fields are a frame on the vault's origin).
``POST /orders``
    ``{"payment_method": "pm_…"}`` from the checkout page: pays for the cart (see
    :mod:`.payments`) and answers the order as JSON. Same-origin JSON only.
``GET /orders``
    The orders: what was bought, the card's brand and last four, the acquirer's answer.
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

from .orders import Order, OrderStore, PaymentMethodUsed
from .payments import CART, Cart, PaymentError, Payments

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
    ) -> None:
        self.origin = origin
        self.vault_url = vault_url
        self.integrity = integrity
        self.publishable_key = publishable_key
        self.orders = orders
        self.payments = payments
        self.cart = cart
        self._checkout = _template("checkout.html")
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

    async def checkout(self, _request: Request) -> Response:
        e = html.escape
        rows = "\n".join(
            f"      <li><span>{e(item.name)}</span>"
            f"<span>{e(_money(item.amount, self.cart.currency))}</span></li>"
            for item in self.cart.items
        )
        total = _money(self.cart.amount, self.cart.currency)
        return self._page(
            self._checkout.substitute(
                vault=e(self.vault_url),
                integrity=e(self.integrity),
                pk=e(self.publishable_key),
                items=rows,
                total=e(total),
            )
        )

    async def list_orders(self, _request: Request) -> Response:
        orders = await run_in_threadpool(self.orders.recent)
        return self._page(self._orders.substitute(rows=_order_rows(orders)))

    async def static(self, request: Request) -> Response:
        found = self._static.get(request.path_params["name"])
        if found is None:
            return PlainTextResponse("Not found.", status_code=404)
        content, media = found
        return Response(content, media_type=media, headers={"cache-control": "max-age=300"})

    async def healthz(self, _request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    # -- the payment --------------------------------------------------------------------

    async def create_order(self, request: Request) -> Response:
        # Only this shop's own pages may order: a browser sends Origin (and
        # Sec-Fetch-Site) with every POST; another site's page is refused, and a form
        # post from elsewhere cannot send JSON without a CORS preflight, which fails.
        origin = request.headers.get("origin")
        if (origin is not None and origin != self.origin) or request.headers.get(
            "sec-fetch-site"
        ) in ("cross-site", "same-site"):
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
        pm = data.get("payment_method") if isinstance(data, dict) else None
        if not isinstance(pm, str):
            return _error(400, "invalid_payment_method", "Give a payment_method.")
        try:
            order = await run_in_threadpool(self.payments.checkout, pm, self.cart)
        except PaymentMethodUsed:
            return _error(
                409,
                "payment_method_used",
                "That card entry was used already; enter the card again.",
            )
        except PaymentError as exc:
            return _error(exc.status, exc.code, exc.message, exc.order)
        return JSONResponse({"order": _public(order)})

    def routes(self) -> list[Route]:
        return [
            Route("/", self.checkout, methods=["GET"]),
            Route("/orders", self.create_order, methods=["POST"]),
            Route("/orders", self.list_orders, methods=["GET"]),
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
        answer = o.status
        if o.decline_code:
            answer += f" ({o.decline_code})"
        elif o.error:
            answer += f" ({o.error})"
        rows.append(
            f'      <tr id="{e(o.id)}" data-status="{e(o.status)}">'
            f"<td>{e(o.id)}<br><small>{e(when)}</small></td>"
            f"<td>{e(o.description)}</td>"
            f'<td class="num">{e(_money(o.amount, o.currency))}</td>'
            f"<td>{e(card)}<br><small>{e(o.payment_method)}</small></td>"
            f'<td class="status {e(o.status)}">{e(answer)}</td>'
            f"<td><small>{e(o.authorization_id or '—')}</small></td></tr>"
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
