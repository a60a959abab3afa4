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

import binascii
import functools
import inspect
import json
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from http import HTTPStatus
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router
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
    bind_request_id,
    clear_request_context,
    get_logger,
    scrub_text,
)
from cardvault.transport.securitytxt import PATH as SECURITY_TXT_PATH

__all__ = [
    "HSTS",
    "Application",
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
#: The headers of _DEFAULTS an application may set itself: a response that sets one
#: has the defaults merged with its own, the longer way.
_DEFAULT_NAMES = frozenset(name for name, _ in _DEFAULTS)
#: What a response that sets none of _DEFAULT_NAMES gets after its own headers.
_ADDED = (*_STATIC_HEADERS, *_DEFAULTS)
_log = get_logger("cardvault.http")
_access = get_logger("cardvault.access")


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def new_request_id() -> str:
    """``req_`` and 16 random bytes in URL-safe base64: what ``"req_" +
    secrets.token_urlsafe(16)`` makes, without its three calls."""
    text = binascii.b2a_base64(os.urandom(16), newline=False).translate(_URLSAFE)
    return "req_" + text.rstrip(b"=").decode("ascii")


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
    if headers is None and status >= 200 and status not in (204, 304):
        return _JSONResponse(content, status)
    return Response(
        content,
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


class _JSONResponse(Response):
    """A JSON body without headers of its own: what ``Response(content,
    media_type="application/json")`` makes (``Content-Length`` then ``Content-Type``),
    without its general rendering of content and headers."""

    media_type = "application/json"

    def __init__(self, content: bytes, status: int) -> None:
        self.status_code = status
        self.background = None
        self.body = content
        self.raw_headers = [
            (b"content-length", str(len(content)).encode("latin-1")),
            (b"content-type", b"application/json"),
        ]


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
        client = scope.get("client")
        # (The previous request's fields are forgotten.)
        bind_request_id(request_id, origin=client[0] if client else None)
        started = time.perf_counter()
        status = 0
        rid_header = (b"request-id", request_id.encode())

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = _with_security_headers(message.get("headers", ()), rid_header)
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception as exc:
            # The application answers and logs what its routes raise, and raises only
            # what came too late for an answer (logged there); log only what no one
            # answered. An error of the tree (a 503 raised outside the routes, say) is
            # answered as itself; anything else is a bug, a 500.
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


def _with_security_headers(
    own: Iterable[tuple[bytes, bytes]], rid_header: tuple[bytes, bytes]
) -> list[tuple[bytes, bytes]]:
    """A response's headers: the application's own, less those ``_STATIC_HEADERS``
    replace, then ``_STATIC_HEADERS``, the ``_DEFAULTS`` the application did not set,
    and ``Request-Id``."""
    headers = []
    custom = False
    for k, v in own:
        name = k.lower()
        if name not in _REPLACED:
            headers.append((k, v))
            if name in _DEFAULT_NAMES:
                custom = True
    if not custom:
        headers += _ADDED
    else:
        have = {k.lower() for k, _ in headers}
        headers += _STATIC_HEADERS
        # An app that sets its own policy has said who may frame it
        # (frame-ancestors); X-Frame-Options DENY would contradict it.
        if b"content-security-policy" in have:
            have.add(b"x-frame-options")
        headers += [(k, v) for k, v in _DEFAULTS if k not in have]
    headers.append(rid_header)
    return headers


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


#: How an exception that a route raised is answered, by the first of its classes (in
#: its method resolution order) found here; anything else is a bug (_crash, 500).
_HANDLERS: dict[type[BaseException], Callable[[Request, Exception], Awaitable[Response]]] = {
    CardVaultError: _cardvault_error,
    HTTPException: _http_error,
    ClientDisconnect: _client_gone,
}


async def _answer(request: Request, exc: Exception) -> Response:
    for cls in type(exc).__mro__:
        handler = _HANDLERS.get(cls)
        if handler is not None:
            response = await handler(request, exc)
            # An exception instance raised again later must not carry this traceback.
            exc.__traceback__ = None
            return response
    return await _crash(request, exc)


Endpoint = Callable[[Request], Awaitable[Response]]


def _plain_endpoint(route: BaseRoute) -> Endpoint | None:
    """The endpoint of a route that Starlette runs as ``response = await
    endpoint(Request(scope, receive, send)); await response(...)`` (a plain
    :class:`Route` of an ``async`` function or method, without middleware), or None."""
    if type(route) is not Route or route.param_convertors:
        return None
    # Route wraps a function or method endpoint in request_response(), and anything
    # else (middleware, a body limit, an ASGI class) around or instead of it.
    if getattr(route.app, "__qualname__", "") != "request_response.<locals>.app":
        return None
    endpoint = route.endpoint
    while isinstance(endpoint, functools.partial):
        endpoint = endpoint.func
    if not inspect.iscoroutinefunction(endpoint):
        return None
    return route.endpoint


def _direct_routes(routes: Sequence[BaseRoute]) -> dict[str, dict[str, tuple[Route, Endpoint]]]:
    """For each path that a route names without parameters, the route and endpoint
    Starlette's router would run for each method, where that is known without a
    request: the first route in order that matches the path and the method fully, when
    no route before it that could match the path is another kind (a mount of a prefix
    of the path, a host), and it is a plain endpoint (:func:`_plain_endpoint`). Methods not listed here, 405s
    and 404s included, go through Starlette's router."""
    table: dict[str, dict[str, tuple[Route, Endpoint]]] = {}
    for route in routes:
        if not isinstance(route, Route) or route.param_convertors or route.path in table:
            continue
        path = route.path
        # A mount whose prefix the path does not start with cannot match it; any other
        # kind of route (a host) might.
        candidates = [
            r
            for r in routes
            if not isinstance(r, Route | Mount) or r.path_regex.match(path) is not None
        ]
        methods = set().union(*(r.methods or () for r in candidates if isinstance(r, Route)))
        by_method: dict[str, tuple[Route, Endpoint]] = {}
        for method in methods:
            for candidate in candidates:
                if not isinstance(candidate, Route):
                    break
                if candidate.methods is None or method in candidate.methods:
                    endpoint = _plain_endpoint(candidate)
                    if endpoint is not None:
                        by_method[method] = (candidate, endpoint)
                    break
        table[path] = by_method
    return table


class Application:
    """The application inside :class:`SecurityHeaders`: the routes, with every error
    answered in Stripe's format.

    What Starlette's application does for cardvault, in one layer: Starlette puts
    three around each request (its ServerErrorMiddleware, its ExceptionMiddleware, and
    per route a request wrapper with an exception handler of its own), two of which
    wrap ``send`` and one makes a second request object, and its router tries the
    routes in turn. Here a request for a path a route names without parameters finds
    its endpoint by two dictionary lookups (path, then method: :func:`_direct_routes`),
    the endpoint is called with one request object, and what it raises is answered
    here: an error of the tree as itself (:class:`~cardvault.errors.CardVaultError`),
    Starlette's 404/405/413 as ours, a client gone mid-body as a bare 400, anything
    else as a logged 500. Every other request (a path with parameters, a method no
    route has for the path, an unknown path, the lifespan) goes to Starlette's router,
    whose answer is the same as before, and its errors are answered the same way.
    """

    def __init__(self, routes: Sequence[BaseRoute], *, lifespan: Any = None) -> None:
        self.router = Router(list(routes), redirect_slashes=False, lifespan=lifespan)
        self._direct = _direct_routes(self.router.routes)

    @property
    def routes(self) -> list[BaseRoute]:
        return self.router.routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["app"] = self
        if scope["type"] != "http":
            await self.router(scope, receive, send)
            return
        by_method = None if scope.get("root_path") else self._direct.get(scope["path"])
        target = by_method.get(scope["method"]) if by_method else None
        if target is None:
            await self._routed(scope, receive, send)
            return
        route, endpoint = target
        scope["router"] = self.router
        scope["route"] = route
        scope["endpoint"] = route.endpoint
        scope["path_params"] = {}
        request = Request(scope, receive, send)
        try:
            response = await endpoint(request)
        except Exception as exc:
            response = await _answer(request, exc)
        try:
            await response(scope, receive, send)
        except Exception as exc:
            _log.error("unhandled error", exc_info=exc)
            raise

    async def _routed(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A request through Starlette's router, its errors answered as above."""
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.router.app(scope, receive, tracked)
        except Exception as exc:
            if started:
                # Too late for an answer: logged, and the connection is cut.
                _log.error("unhandled error", exc_info=exc)
                raise
            response = await _answer(Request(scope, receive, send), exc)
            await response(scope, receive, tracked)


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
    return SecurityHeaders(Application([*routes, *extra], lifespan=lifespan), service=service)


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
