"""The card element: ``cardvault.js`` and the card-entry frame, served by the vault.

A merchant's checkout page loads ``/js/v1/cardvault.js`` from the vault (pinned with its
Subresource Integrity hash) and mounts a card element: an iframe whose document comes
from the vault's own origin. The customer types the card into that frame; the frame
posts it straight to ``/v1/payment_methods`` on its own origin with the account's
publishable key, and hands the merchant's page only the resulting ``pm_…`` object (or an
error) through ``postMessage`` to the merchant's exact origin. The browser's same-origin
policy is what keeps the number away from the merchant: the page cannot read a
cross-origin frame's DOM, and the frame sends the number nowhere else.

Endpoints (each a method of :class:`CardElement`, registered in :mod:`cardvault.vault.http`):

``GET /js/v1/cardvault.js``
    The merchant-side library. Versioned path, cached for a year: ``v1`` never changes
    once published (a change is ``v2``), so the SRI hash merchants pin stays valid.
``GET /js/v1/cardvault.js.sri``
    That hash, ``sha384-…``, computed from the served bytes at start-up.
``GET /element/v1/card.html?key=pk_…&origin=https://shop.example``
    The frame. Rendered only when the key is a valid publishable key and ``origin`` is
    one of the account's ``allowed_origins``; its ``Content-Security-Policy`` lets it load
    only its own script and stylesheet, talk only to its own origin, and be framed only
    by that origin. Anything else gets a 403 page that nobody may frame.
``GET /element/v1/card.js``, ``/element/v1/card.css``
    The frame's own script and stylesheet.
"""

from __future__ import annotations

import base64
import hashlib
import html
import ipaddress
import re
from importlib import resources
from string import Template
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

from cardvault.errors import CardVaultError
from cardvault.logging import get_logger
from cardvault.vault.accounts import Accounts

__all__ = [
    "CARDVAULT_JS_PATH",
    "CARD_FRAME_CSS_PATH",
    "CARD_FRAME_JS_PATH",
    "CARD_FRAME_PATH",
    "CardElement",
    "frame_csp",
    "normalize_origin",
    "sri_hash",
]

CARDVAULT_JS_PATH = "/js/v1/cardvault.js"
CARD_FRAME_PATH = "/element/v1/card.html"
CARD_FRAME_JS_PATH = "/element/v1/card.js"
CARD_FRAME_CSS_PATH = "/element/v1/card.css"

_log = get_logger("cardvault.element")

#: ``v1`` is immutable once published, so browsers and CDNs may keep it for a year; the
#: merchant's SRI hash would break on any change anyway.
_IMMUTABLE = "public, max-age=31536000, immutable"
#: The frame's own assets are not pinned by merchants; a short cache lets fixes land.
_SHORT = "public, max-age=300"

#: A publishable key as the vault issues them. Checked before the key is looked up, so
#: that nothing else from the query string is ever rendered into the page.
_PUBLISHABLE_KEY = re.compile(r"^pk_(?:test|live)_[A-Za-z0-9]{1,100}$")
_DNS_NAME = re.compile(
    r"^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$"
)


def normalize_origin(text: str) -> str:
    """``text`` as a browser serializes an origin: ``https://host[:port]``.

    HTTPS only: the element refuses to work on a page that is not served over TLS. The
    host is lower-cased, the default port 443 dropped, a single trailing ``/`` allowed.
    Raises ``ValueError`` (with a message for people) for anything else: another scheme,
    a path, query, fragment or user name, a wildcard, or an IPv6 literal (which a
    Content-Security-Policy source expression cannot name).
    """
    if not isinstance(text, str) or not text or text != text.strip() or len(text) > 300:
        raise ValueError("an origin is https://host[:port]")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        raise ValueError("an origin is https://host[:port] (the port is not a number)") from exc
    if parts.scheme.lower() != "https":
        raise ValueError("an allowed origin must use https")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise ValueError("an origin has no user name or password")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "?" in text or "#" in text:
        raise ValueError("an origin has no path, query or fragment: https://host[:port]")
    host = (parts.hostname or "").lower()
    if host.startswith("[") or ":" in host:
        raise ValueError("IPv6 literals cannot be named in a Content-Security-Policy")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if not _DNS_NAME.match(host) or host.replace(".", "").isdigit():
            raise ValueError(
                "the host must be a DNS name (punycode for IDN) or an IPv4 address"
            ) from None
    if port == 0:
        raise ValueError("port 0 is not a port")
    return f"https://{host}" + ("" if port in (None, 443) else f":{port}")


def frame_csp(origin: str) -> str:
    """The frame's policy: nothing but its own script, stylesheet and API, framed only by
    ``origin``. ``form-action 'none'`` stops a form submission from putting the card
    number in a URL should the script fail; ``connect-src 'self'`` stops an injected
    script from sending it anywhere but the vault."""
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; form-action 'none'; base-uri 'none'; "
        f"frame-ancestors {origin}"
    )


def sri_hash(data: bytes) -> str:
    """The Subresource Integrity value for ``data`` (``sha384-`` and base64)."""
    return "sha384-" + base64.b64encode(hashlib.sha384(data).digest()).decode("ascii")


def _static(name: str) -> bytes:
    return resources.files("cardvault.vault").joinpath("static", name).read_bytes()


_REFUSED = (
    '<!doctype html><html lang="en"><head><meta charset="utf-8">'
    "<title>Card form unavailable</title></head><body>"
    "<p>This card form cannot be shown on this page.</p></body></html>"
)


def _refused(reason: str) -> Response:
    """The 403 page. It says nothing of why (the log does) and, with the default API
    policy and ``X-Frame-Options: DENY`` the transport layer adds, nobody may frame it."""
    _log.info("card frame refused", reason=reason)
    return Response(
        _REFUSED,
        status_code=403,
        media_type="text/html; charset=utf-8",
        headers={"cache-control": "no-store"},
    )


class CardElement:
    """The card element's handlers; :mod:`cardvault.vault.http` registers them at the
    paths above. The files are read once, here, so the bytes served are the bytes whose
    SRI hash is published.

    Needs the accounts (a frame is shown only for a valid publishable key and one of its
    account's allowed origins), nothing else."""

    def __init__(self, accounts: Accounts) -> None:
        self.accounts = accounts
        self.library = _static("cardvault.js")
        self.library_sri = sri_hash(self.library)
        self.frame_js = _static("element/card.js")
        self.frame_css = _static("element/card.css")
        self.frame_html = Template(_static("element/card.html").decode("utf-8"))
        _log.info("card element ready", path=CARDVAULT_JS_PATH, integrity=self.library_sri)

    async def cardvault_js(self, _request: Request) -> Response:
        # Merchants load this cross-origin with ``crossorigin="anonymous"`` (SRI needs a
        # CORS fetch); it is public and carries no credentials, so any origin may read it.
        return Response(
            self.library,
            media_type="text/javascript; charset=utf-8",
            headers={"cache-control": _IMMUTABLE, "access-control-allow-origin": "*"},
        )

    async def cardvault_js_sri(self, _request: Request) -> Response:
        return Response(
            self.library_sri,
            media_type="text/plain; charset=utf-8",
            headers={"cache-control": _SHORT, "access-control-allow-origin": "*"},
        )

    async def card_js(self, _request: Request) -> Response:
        return Response(
            self.frame_js,
            media_type="text/javascript; charset=utf-8",
            headers={"cache-control": _SHORT},
        )

    async def card_css(self, _request: Request) -> Response:
        return Response(
            self.frame_css, media_type="text/css; charset=utf-8", headers={"cache-control": _SHORT}
        )

    async def card_frame(self, request: Request) -> Response:
        # A browser says what it is loading; this document is only ever a frame. A
        # direct visit would otherwise show a card form with no merchant around it.
        dest = request.headers.get("sec-fetch-dest")
        if dest is not None and dest != "iframe":
            return _refused("not loaded as a frame")
        key = request.query_params.get("key", "")
        origin = request.query_params.get("origin", "")
        if not _PUBLISHABLE_KEY.match(key):
            return _refused("no publishable key")
        try:
            caller = await self.accounts.authenticate(key)
        except CardVaultError:
            return _refused("unknown or revoked key")
        if caller.kind != "publishable":
            return _refused("not a publishable key")
        account = await self.accounts.get_account(caller.account_id)
        # Exact comparison with the stored, normalized origins: the value is then safe
        # to place in the policy and the page, and anything else is refused.
        if account is None or origin not in account.allowed_origins:
            return _refused("origin not allowed for this account")
        body = self.frame_html.substitute(
            parent_origin=html.escape(origin, quote=True),
            key=html.escape(key, quote=True),
        )
        return Response(
            body,
            media_type="text/html; charset=utf-8",
            headers={"content-security-policy": frame_csp(origin), "cache-control": "no-store"},
        )
