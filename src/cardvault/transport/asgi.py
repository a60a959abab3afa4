"""The HTTP layer every cardvault listener shares.

:func:`build_app` turns a list of routes into an ASGI application that:

* renders every error, including unknown URLs, wrong methods and crashes, as Stripe's
  error object, without echoing anything the caller sent;
* wraps everything in :class:`SecurityHeaders`, the outermost layer, so that every
  HTTPS response, errors and redirects included, carries HSTS and the other headers;
* gives each request an id (``Request-Id`` response header, ``request_id`` on every log
  line) and writes one scrubbed access-log line per request;
* serves ``/.well-known/security.txt`` (and redirects the legacy ``/security.txt``).

:func:`redirect_app` is the whole of the plain-HTTP port: a permanent redirect to HTTPS.

:func:`raw_error_response` is the answer the transport writes itself, as bytes, when it
refuses a connection or a request before any application has it (see
:mod:`cardvault.transport.protocol`): the same error object and security headers.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from http import HTTPStatus
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Match, Route, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cardvault.errors import (
    APIError,
    CardVaultError,
    InvalidRequestError,
    MethodNotAllowed,
    RequestTooLarge,
    UrlNotFound,
)
from cardvault.logging import (
    bind_request_fields,
    bind_request_id,
    clear_request_context,
    get_logger,
    scrub_text,
)
from cardvault.transport.securitytxt import PATH as SECURITY_TXT_PATH

__all__ = [
    "HSTS",
    "SecurityHeaders",
    "build_app",
    "error_body",
    "error_response",
    "json_response",
    "raw_error_response",
    "redirect_app",
]

#: Two years, subdomains, preload: the values hstspreload.org requires for the list.
HSTS = "max-age=63072000; includeSubDomains; preload"
#: An API answers JSON and is never a document: it may load nothing and be framed by no one.
API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"

_STATIC_HEADERS: list[tuple[bytes, bytes]] = [
    (b"strict-transport-security", HSTS.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=(), payment=()"),
]
_DEFAULTS: list[tuple[bytes, bytes]] = [
    (b"cache-control", b"no-store"),
    (b"content-security-policy", API_CSP.encode()),
    (b"x-frame-options", b"DENY"),
]
#: Response headers the application's own are dropped for: ours replace them.
_REPLACED = frozenset({name for name, _ in _STATIC_HEADERS} | {b"server", b"request-id"})
_log = get_logger("cardvault.http")
_access = get_logger("cardvault.access")


def new_request_id() -> str:
    return "req_" + secrets.token_urlsafe(16)


#: The fallback for what orjson will not encode (see json_response).
_STDLIB_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """``body`` as compact UTF-8 JSON: what ``json.dumps(body, separators=(",", ":"),
    ensure_ascii=False)`` writes, by orjson, about ten times faster (a PaymentMethod took
    10.5 µs with the standard library and 0.8 µs with orjson); by the standard library
    for the rare value orjson refuses."""
    try:
        content = orjson.dumps(body, option=orjson.OPT_NON_STR_KEYS)
    except TypeError:
        # orjson refuses what the standard library writes: integers beyond 64 bits,
        # nesting deeper than 255. Such an answer is still an answer.
        content = _STDLIB_JSON.encode(body).encode("utf-8")
    return Response(
        content,
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, read from the ASGI channel, refused with
    :class:`RequestTooLarge` (413) as soon as it is known to exceed ``limit`` bytes: from
    ``Content-Length`` before anything is read, else once the chunks received pass it. So
    a large body is never held in memory (Starlette's ``Request.body`` reads it all),
    and a small one is read without Starlette's stream machinery. A client that goes
    away raises ``ClientDisconnect``, as Starlette does. Read a request's body once."""
    declared = request.headers.get("content-length")
    if (
        declared is not None
        and declared.isascii()
        and declared.isdigit()
        and (len(declared) > 18 or int(declared) > limit)
    ):
        raise RequestTooLarge()
    receive = request.receive
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        kind = message["type"]
        if kind == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    raise RequestTooLarge()
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        elif kind == "http.disconnect":
            raise ClientDisconnect()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def error_body(exc: CardVaultError) -> dict[str, Any]:
    """Stripe's error object for ``exc``, its message and ``param`` passed through the
    log scrubber. Messages are written from constants and name parameters, not values;
    this is the net under that rule, for the one message that forgets it (a caller's
    parameter *name* can be a card number too)."""
    body = exc.to_dict()
    error = body["error"]
    error["message"] = scrub_text(error["message"])
    if isinstance(error.get("param"), str):
        error["param"] = scrub_text(error["param"])
    return body


def error_response(exc: CardVaultError) -> Response:
    """Stripe's error object for ``exc`` (:func:`error_body`), with its HTTP status and
    headers."""
    return json_response(error_body(exc), status=exc.http_status, headers=exc.headers)


class SecurityHeaders:
    """Outermost ASGI middleware: security headers, request id, access log, last-resort 500.

    The application may set its own ``Cache-Control`` or ``Content-Security-Policy``
    (the card-entry frame needs a different CSP); everything in ``_STATIC_HEADERS`` is
    always set and replaces whatever the application said. No ``Server`` header is sent.
    """

    def __init__(self, app: ASGIApp, *, service: str) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        bind_request_id(request_id)  # (the previous request's fields are forgotten)
        client = scope.get("client")
        if client:
            bind_request_fields(origin=client[0])
        started = time.perf_counter()
        status = 0
        rid_header = (b"request-id", request_id.encode())

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = []
                have = set()
                for k, v in message.get("headers", ()):
                    name = k.lower()
                    if name not in _REPLACED:
                        headers.append((k, v))
                        have.add(name)
                headers += _STATIC_HEADERS
                # An app that sets its own policy has said who may frame it
                # (frame-ancestors); X-Frame-Options DENY would contradict it.
                if b"content-security-policy" in have:
                    have.add(b"x-frame-options")
                headers += [(k, v) for k, v in _DEFAULTS if k not in have]
                headers.append(rid_header)
                message["headers"] = headers
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:
            # Starlette re-raises after its handler has answered; log only what no
            # handler saw. An error of the tree (a 503 raised outside the routes, say)
            # is answered as itself; anything else is a bug, a 500.
            if status == 0:
                leaf = exc if isinstance(exc, CardVaultError) else APIError()
                _log.exception("unhandled error", service=self.service, code=leaf.code)
                await error_response(leaf)(scope, receive, send_with_headers)
        finally:
            _access.info(
                "request",
                service=self.service,
                method=scope.get("method"),
                path=scope.get("path"),
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
                client=(scope.get("client") or ("", 0))[0],
            )
            clear_request_context()


async def _cardvault_error(_request: Request, exc: Exception) -> Response:
    # Every error of the tree is answered as itself: a 503 (the database, the key
    # service, the audit log unavailable; the storage layer's StoreUnavailable is one)
    # with its code and Retry-After. Only what is not of the tree reaches _crash (500).
    assert isinstance(exc, CardVaultError)
    if isinstance(exc, APIError):
        _log.error("internal error", code=exc.code, cause=repr(exc.__cause__))
    return error_response(exc)


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    leaf: CardVaultError
    if exc.status_code == 404:
        leaf = UrlNotFound()
    elif exc.status_code == 405:
        leaf = MethodNotAllowed(headers=dict(exc.headers or {}))
    elif exc.status_code == 413:
        leaf = RequestTooLarge()
    elif 400 <= exc.status_code < 500:
        leaf = InvalidRequestError()
    else:
        leaf = APIError()
    return error_response(leaf)


async def _client_gone(_request: Request, _exc: Exception) -> Response:
    # The client closed the connection while its body was being read: nobody will read
    # an answer, and it is not a server error. The access line records status 400.
    return Response(status_code=400)


async def _crash(_request: Request, exc: Exception) -> Response:
    # The message says nothing; the log has the traceback, scrubbed of card data.
    _log.error("unhandled error", exc_info=exc)
    return error_response(APIError())


class IndexedRouter(Router):
    """Starlette's router, which tries every route in turn, with an index by path.

    For each path that a route names without parameters, the index keeps the routes
    that could match it at all: those whose pattern matches the path, and every route
    that is not a plain :class:`Route` (a mount could match anything). A request for
    an indexed path tries only those, in their original order, with Starlette's own
    rules (the first full match wins, else the first partial one, which answers 405);
    anything else takes the whole list. The answer is the same; the vault's payment
    API is just not the ninth route tried on every request.
    """

    def __init__(self, routes: Sequence[BaseRoute], **kwargs: Any) -> None:
        super().__init__(routes, **kwargs)
        self._index: dict[str, list[BaseRoute]] = {}
        for route in self.routes:
            if isinstance(route, Route) and not route.param_convertors:
                self._index[route.path] = [
                    r
                    for r in self.routes
                    if not isinstance(r, Route) or r.path_regex.match(route.path)
                ]

    async def app(self, scope: Scope, receive: Receive, send: Send) -> None:
        candidates = (
            self._index.get(scope["path"])
            if scope["type"] == "http" and not scope.get("root_path")
            else None
        )
        if candidates is None:
            await super().app(scope, receive, send)
            return
        scope.setdefault("router", self)
        partial: tuple[BaseRoute, Scope] | None = None
        for route in candidates:
            match, child_scope = route.matches(scope)
            if match is Match.FULL:
                scope["route"] = route
                scope.update(child_scope)
                await route.handle(scope, receive, send)
                return
            if match is Match.PARTIAL and partial is None:
                partial = (route, child_scope)
        if partial is not None:
            scope["route"] = partial[0]
            scope.update(partial[1])
            await partial[0].handle(scope, receive, send)
            return
        await super().app(scope, receive, send)


def build_app(
    routes: Sequence[BaseRoute],
    *,
    service: str,
    security_txt: str | None,
    on_startup: Iterable[Callable[[], Any]] = (),
    on_shutdown: Iterable[Callable[[], Any]] = (),
    lifespan: Any = None,
) -> ASGIApp:
    """An ASGI app serving ``routes`` with cardvault's error format and security headers."""
    extra: list[BaseRoute] = []
    if security_txt is not None:
        text = security_txt

        async def security_txt_endpoint(_request: Request) -> Response:
            return PlainTextResponse(
                text,
                media_type="text/plain; charset=utf-8",
                headers={"cache-control": "max-age=3600"},
            )

        async def legacy_security_txt(_request: Request) -> Response:
            return RedirectResponse(SECURITY_TXT_PATH, status_code=301)

        extra = [
            Route(SECURITY_TXT_PATH, security_txt_endpoint, methods=["GET"]),
            Route("/security.txt", legacy_security_txt, methods=["GET"]),
        ]
    app = Starlette(
        routes=[*routes, *extra],
        exception_handlers={
            CardVaultError: _cardvault_error,
            HTTPException: _http_error,
            ClientDisconnect: _client_gone,
            Exception: _crash,
        },
        lifespan=lifespan,
    )
    app.router = IndexedRouter(app.router.routes, redirect_slashes=False, lifespan=lifespan)
    return SecurityHeaders(app, service=service)


#: RFC 9110's reason phrases where Python's are the older ones.
_PHRASES = {413: "Content Too Large", 414: "URI Too Long"}


def raw_error_response(exc: CardVaultError, *, request_id: str, tls: bool = True) -> bytes:
    """A whole HTTP/1.1 answer for ``exc``, as bytes, for the transport to write on a
    connection it then closes: Stripe's error object; the headers every response carries
    (``_STATIC_HEADERS`` and ``_DEFAULTS``; on plain HTTP without HSTS, which browsers
    ignore there, RFC 6797 §7.2); ``Request-Id``; ``exc.headers`` (``Retry-After``); and
    ``Connection: close``. Nothing the client sent is in it."""
    body = orjson.dumps(error_body(exc))
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers.items()),
        *(h for h in _STATIC_HEADERS if tls or h[0] != b"strict-transport-security"),
        *_DEFAULTS,
        (b"request-id", request_id.encode()),
    ]
    status = exc.http_status
    phrase = _PHRASES.get(status) or HTTPStatus(status).phrase
    lines = [f"HTTP/1.1 {status} {phrase}".encode()]
    lines += [name + b": " + value for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


_HOST = re.compile(
    r"^(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?$|^\[[0-9A-Fa-f:.]+\]$"
)


def redirect_app(*, https_port: int, public_host: str) -> ASGIApp:
    """The whole plain-HTTP listener: every request gets ``301 Location: https://…``.

    The host is ``public_host``, the configured public name, never the request's
    ``Host`` header (which the client chooses: echoing it would let anyone make this
    listener send browsers elsewhere). The path is the request's, without its query;
    the port is ``https_port``. No body, no other content.
    """
    if not _HOST.match(public_host):
        if ":" in public_host and _HOST.match(f"[{public_host}]"):
            public_host = f"[{public_host}]"  # an IPv6 address, as a URL writes it
        else:
            raise ValueError("redirect_app: public_host must be a host name or IP address")
    port_part = "" if https_port == 443 else f":{https_port}"
    origin = f"https://{public_host}{port_part}"

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        raw_path = scope.get("raw_path") or scope.get("path", "/").encode()
        path = raw_path.decode("latin-1")
        if not path.startswith("/") or path.startswith("//"):
            path = "/" + path.lstrip("/")
        # The query string is dropped: a card number pasted into a URL should not be
        # bounced around again, and the redirect promises only the host and path.
        location = origin + path
        await send(
            {
                "type": "http.response.start",
                "status": 301,
                "headers": [
                    (b"location", location.encode("latin-1")),
                    (b"content-length", b"0"),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b""})

    return app
