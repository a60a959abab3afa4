"""Run ASGI applications on TLS listeners (uvicorn + httptools), several in one process.

uvicorn 0.54 does not give applications the ASGI TLS extension, so
:class:`TlsHttpProtocol` adds it: when a connection is made it reads the verified peer
certificate once and every request on that connection carries
``scope["extensions"]["tls"]`` with the ASGI spec's keys (``client_cert_chain``,
``client_cert_name``, ``tls_version``, ``cipher_suite`` …) plus ``client_identity``, the
``spiffe://cardvault/<identity>`` name of a verified client certificate (mutual TLS).

:class:`TlsHttpProtocol` also enforces the listener's :class:`~cardvault.config.ServerLimits`
before any application sees a request: the size of a request head (counted as its bytes
arrive, so a huge header is never held), the number of header fields, the URL's length,
the body's size, how long a request's head and body may take, how long a connection may
stay idle, and how many connections a listener and one client address may hold. A
refusal is answered by :func:`cardvault.transport.asgi.raw_error_response` (Stripe's error
object, the usual security headers, ``Connection: close``), logged once
(``request_refused`` / ``connection_refused`` with ``limit=`` and ``client=``), and the
connection is closed. docs/transport.md ("Limits") lists each limit and its answer.

Every HTTPS listener gets its context from :func:`cardvault.transport.tls.server_context`;
a plain listener exists only to redirect (:func:`cardvault.transport.asgi.redirect_app`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import httptools
import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cardvault.config import ServerLimits
from cardvault.errors import (
    CardVaultError,
    MalformedRequest,
    RequestHeaderFieldsTooLarge,
    RequestTimeout,
    RequestTooLarge,
    TooManyConnections,
    UriTooLong,
)
from cardvault.logging import get_logger
from cardvault.transport.asgi import new_request_id, raw_error_response
from cardvault.transport.identity import identity_from_peercert

__all__ = [
    "GC_THRESHOLDS",
    "RETRY_AFTER",
    "ConnectionGate",
    "Listener",
    "ServerLimits",
    "TlsHttpProtocol",
    "bind",
    "build_server",
    "run_until_stopped",
    "serve",
    "tune_gc_for_serving",
]

_log = get_logger("cardvault.server")
_TLS_VERSIONS = {"TLSv1.2": 0x0303, "TLSv1.3": 0x0304}

#: Seconds in the ``Retry-After`` of a 503 for a connection over a cap.
RETRY_AFTER = 1


def tls_extension(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> dict[str, Any]:
    """The ASGI TLS extension for one connection (computed once per connection)."""
    peer = ssl_object.getpeercert()
    der = ssl_object.getpeercert(binary_form=True)
    chain = [ssl.DER_cert_to_PEM_cert(der)] if der else []
    subject = ""
    if peer:
        subject = ",".join(
            f"{pair[0]}={pair[1]}" for rdn in peer.get("subject", ()) for pair in rdn
        )
    cipher = ssl_object.cipher()
    return {
        "server_cert": None,
        "client_cert_chain": chain,
        "client_cert_name": subject or None,
        "client_cert_error": None,
        "tls_version": _TLS_VERSIONS.get(ssl_object.version() or ""),
        "cipher_suite": None,
        "cipher_name": cipher[0] if cipher else None,
        "client_identity": identity_from_peercert(peer),
    }


class ConnectionGate:
    """One listener's open connections, counted in total and per client address."""

    def __init__(self, limits: ServerLimits) -> None:
        self.limits = limits
        self.open = 0
        self.by_client: dict[str, int] = {}

    def admit(self, client: str) -> str | None:
        """Count a new connection from ``client`` and return None, or return the name of
        the limit it would break (and count nothing)."""
        if self.open >= self.limits.max_connections:
            return "max_connections"
        per_client = self.limits.max_connections_per_client
        held = self.by_client.get(client, 0)
        if per_client and held >= per_client:
            return "max_connections_per_client"
        self.open += 1
        self.by_client[client] = held + 1
        return None

    def release(self, client: str) -> None:
        self.open -= 1
        held = self.by_client.pop(client, 1) - 1
        if held > 0:
            self.by_client[client] = held


class _Refusal(Exception):
    """Raised in a parser callback to stop parsing. httptools reports any exception
    raised in a callback as ``HttpParserCallbackError`` (the original only as its
    ``__context__``), so the protocol keeps what to answer in ``_pending`` instead."""


class TlsHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus the ASGI TLS extension and the listener's limits.

    A connection goes through these phases, each with its own clock:

    * idle: a new connection until its first request begins (``first_byte_timeout``),
      or a kept-alive one between requests (``keep_alive_timeout``). Expiry closes the
      connection without an answer: there is no request to answer, and a 408 sent
      to a client that is about to reuse the connection would be read as the answer to
      its next request.
    * head: from a request's first byte to the end of its header fields
      (``head_timeout``; ``max_head_bytes``, ``max_headers``, ``max_url_bytes``).
    * body: until the whole body has arrived (``request_timeout`` from the first byte;
      ``max_body_bytes``, declared or received).

    Bytes are counted in :meth:`data_received` while a head is incomplete, before the
    parser sees them: httptools accumulates a header's value in Python until the value
    is complete, so a 64 MiB header would otherwise be held whole before any callback
    could refuse it. A read that carries the end of a head and the start of a body is
    fed in two parts, so that body bytes never count as head bytes; the parsed parts
    (the URL, each header field) are counted again exactly as the parser hands them
    over. A head that starts inside the same read as the end of the previous request
    (pipelining) is counted from its parsed parts for the rest of that read; at most
    one read more than ``max_head_bytes`` is ever held for a head.
    """

    _tls_ext: dict[str, Any] | None = None

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: Any,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: ServerLimits | None = None,
        gate: ConnectionGate | None = None,
        listener: str = "",
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits if limits is not None else ServerLimits()
        # uvicorn arms its keep-alive timer with this (its Config takes whole seconds).
        self.timeout_keep_alive = self.limits.keep_alive_timeout  # type: ignore[assignment]
        self._gate = gate
        self._listener = listener
        self._admitted = False
        self._tls = False
        self._client_addr = ""
        self._refused = False
        self._pending: tuple[CardVaultError, str] | None = None
        # Per request.
        self._in_head = True  # waiting for a request head, or reading one
        self._message_open = False  # a request has begun and its body has not ended
        self._head_bytes = 0  # bytes received for the current head
        self._head_parsed = 0  # bytes of the URL and header fields the parser handed over
        self._header_count = 0
        self._body_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._request_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None

    # --- connection --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        self._tls = ssl_object is not None
        self._tls_ext = tls_extension(ssl_object) if ssl_object is not None else None
        self._client_addr = self.client[0] if self.client else ""
        if self._gate is not None:
            limit = self._gate.admit(self._client_addr)
            if limit is not None:
                retry = {"Retry-After": str(RETRY_AFTER)}
                self._refuse(TooManyConnections(headers=retry), limit)
                return
            self._admitted = True
        self.timeout_keep_alive_task = self.loop.call_later(
            self.limits.first_byte_timeout, self._first_byte_expired
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted and self._gate is not None:
            self._gate.release(self._client_addr)
            self._admitted = False
        self._cancel_request_timers()
        self._unset_keepalive_if_required()
        if self._close_timer is not None:
            self._close_timer.cancel()
            self._close_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # what a refused client still sends is dropped until the close
        view = memoryview(data)
        while view:
            if self._in_head:
                room = self.limits.max_head_bytes - self._head_bytes
                if room <= 0:
                    self._refuse(RequestHeaderFieldsTooLarge(), "max_head_bytes")
                    return
                # At most what the head may still take: if the head ends inside this
                # part, the rest of the read is fed below, as body or next request.
                piece, view = view[:room], view[room:]
                self._head_bytes += len(piece)
            else:
                piece, view = view, view[len(view) :]
            if not self._feed(piece):
                return

    def _feed(self, data: memoryview) -> bool:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # uvicorn's own handling (no WebSocket here: it logs and goes on).
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return False
        except httptools.HttpParserError:
            pending, self._pending = self._pending, None
            self._refuse(*(pending or (MalformedRequest(), "malformed")))
            return False
        return True

    # --- parser callbacks --------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._tls_ext is not None:
            self.scope["extensions"] = {"tls": self._tls_ext}  # type: ignore[dict-item]
        # A request has begun: the idle clock stops, the request's clocks start.
        self._unset_keepalive_if_required()
        self._cancel_request_timers()
        self._message_open = True
        self._head_parsed = 0
        self._header_count = 0
        self._body_bytes = 0
        self._head_timer = self.loop.call_later(
            self.limits.head_timeout, self._expired, "head_timeout"
        )
        self._request_timer = self.loop.call_later(
            self.limits.request_timeout, self._expired, "request_timeout"
        )

    def on_url(self, url: bytes) -> None:
        if len(self.url) + len(url) > self.limits.max_url_bytes:
            raise self._stop(UriTooLong(), "max_url_bytes")
        self._head_parsed += len(url)
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            raise self._stop(RequestHeaderFieldsTooLarge(), "max_headers")
        self._head_parsed += len(name) + len(value) + 4  # ": " and CRLF
        if self._head_parsed > self.limits.max_head_bytes:
            raise self._stop(RequestHeaderFieldsTooLarge(), "max_head_bytes")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._in_head = False
        self._head_bytes = 0
        for name, value in self.headers:
            if name == b"content-length":
                declared = value.strip()
                # (llhttp has already refused a Content-Length that is not digits.)
                if len(declared) > 18 or int(declared or b"0") > self.limits.max_body_bytes:
                    raise self._stop(RequestTooLarge(), "max_body_bytes")
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        if self._body_bytes > self.limits.max_body_bytes:
            raise self._stop(RequestTooLarge(), "max_body_bytes")
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._cancel_request_timers()
        self._message_open = False
        self._in_head = True
        self._head_bytes = 0
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._message_open:
            # The next request has begun already: its own clocks run, not the idle one.
            self._unset_keepalive_if_required()

    # --- refusals ----------------------------------------------------------------------

    def _stop(self, exc: CardVaultError, limit: str) -> _Refusal:
        self._pending = (exc, limit)
        return _Refusal(limit)

    def _expired(self, limit: str) -> None:
        self._refuse(RequestTimeout(), limit)

    def _first_byte_expired(self) -> None:
        self.timeout_keep_alive_task = None
        if self._refused or self.transport.is_closing():
            return
        _log.info(
            "connection_closed",
            limit="first_byte_timeout",
            client=self._client_addr,
            listener=self._listener,
        )
        self.transport.close()

    def _cancel_request_timers(self) -> None:
        for timer in (self._head_timer, self._request_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._request_timer = None

    def _refuse(self, exc: CardVaultError, limit: str) -> None:
        """Answer ``exc`` (when no response has started on the connection), log it once,
        and close the connection."""
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        self._cancel_request_timers()
        self._unset_keepalive_if_required()
        cycle = self.cycle
        # An answer may be written only where no other response is under way.
        answer = not self.pipeline and (
            cycle is None or cycle.response_complete or not cycle.response_started
        )
        if cycle is not None and not cycle.response_complete:
            # The application's receive() now sees a disconnect and its send() is
            # dropped, so nothing it writes can follow (or interleave with) the answer.
            cycle.disconnected = True
            cycle.message_event.set()
        request_id = new_request_id()
        _log.info(
            "connection_refused" if isinstance(exc, TooManyConnections) else "request_refused",
            limit=limit,
            client=self._client_addr,
            listener=self._listener,
            status=exc.http_status if answer else None,
            request_id=request_id if answer else None,
        )
        if answer:
            self.transport.write(raw_error_response(exc, request_id=request_id, tls=self._tls))
        self.flow.resume_reading()
        if self._tls or not self.transport.can_write_eof():
            # TLS: close() sends close_notify, then reads and drops what the client
            # still sends until its close_notify or close_timeout (the listener's
            # ssl_shutdown_timeout), so the answer is not lost to a TCP reset.
            self.transport.close()
        else:
            # Plain TCP: closing with unread data sends a reset, which can destroy the
            # answer in the client's buffers. Half-close, drop what still comes, and
            # close at the client's end of stream (eof_received) or after close_timeout.
            self.transport.write_eof()
            self._close_timer = self.loop.call_later(
                self.limits.close_timeout, self.transport.close
            )


@dataclass
class Listener:
    """One socket: an app, an address, either a TLS context or nothing (redirect), and
    the limits its connections get."""

    name: str
    app: Callable[..., Any]
    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None
    limits: ServerLimits = dataclasses.field(default_factory=ServerLimits)


class _Server(uvicorn.Server):
    """uvicorn's server, started on a socket cardvault bound, with the listener's limits.

    uvicorn's ``Server.startup`` calls ``loop.create_server(..., ssl=...)`` without
    ``ssl_handshake_timeout`` (asyncio's default is 60 s) or ``ssl_shutdown_timeout``
    (30 s), and builds each connection's protocol from the config alone. This is the
    same start-up for the one path cardvault uses (sockets it bound itself, see
    :func:`serve`), with the TLS timeouts from the limits and a protocol factory that
    hands every connection the listener's limits and its :class:`ConnectionGate`.
    (uvicorn's own ``limit_concurrency`` is not used: it answers a bare 503 without our
    headers, after reading the request.)
    """

    def __init__(self, config: uvicorn.Config, listener: Listener) -> None:
        super().__init__(config)
        self.listener = listener
        self.gate = ConnectionGate(listener.limits)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if sockets is None:
            raise TypeError("cardvault listeners serve sockets bound by transport.server.bind")
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(STARTUP_FAILURE)
        config = self.config
        limits = self.listener.limits

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            return TlsHttpProtocol(
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=_loop,
                limits=limits,
                gate=self.gate,
                listener=self.listener.name,
            )

        loop = asyncio.get_running_loop()
        tls: dict[str, Any] = {}
        if config.ssl is not None:
            tls = {
                "ssl_handshake_timeout": limits.tls_handshake_timeout,
                "ssl_shutdown_timeout": limits.close_timeout,
            }
        self.servers = []
        for sock in sockets:
            server = await loop.create_server(
                create_protocol, sock=sock, ssl=config.ssl, backlog=config.backlog, **tls
            )
            self.servers.append(server)
        self.started = True


def build_server(listener: Listener) -> uvicorn.Server:
    ctx = listener.ssl_context
    config = uvicorn.Config(
        listener.app,
        host=listener.host,
        port=listener.port,
        http=TlsHttpProtocol,
        loop="uvloop",
        lifespan="auto",
        ws="none",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        # The context is built by cardvault.transport.tls, never by uvicorn's defaults.
        ssl_context_factory=(lambda _config, _default: ctx) if ctx is not None else None,
    )
    return _Server(config, listener)


def bind(listener: Listener) -> socket.socket:
    """Bind the listener's socket now, so that a port in use is a clear error at once."""
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((listener.host, listener.port))
    except OSError as exc:
        sock.close()
        raise OSError(
            exc.errno,
            f"cannot listen on {listener.host}:{listener.port} for {listener.name}: "
            f"{exc.strerror} (is another process using the port?)",
        ) from exc
    sock.set_inheritable(True)
    return sock


async def serve(
    listeners: Sequence[Listener],
    *,
    ready: Callable[[], Any] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve every listener until SIGINT/SIGTERM (or ``stop`` is set), then shut down all.

    Every socket is bound before any server starts; a port in use raises ``OSError``
    naming it, and nothing is left listening.
    """
    sockets: list[socket.socket] = []
    try:
        for lst in listeners:
            sockets.append(bind(lst))
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    servers = [build_server(lst) for lst in listeners]
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # pragma: no cover
            pass

    # uvicorn's public serve() installs its own signal handlers per server; _serve() is
    # the same without them, so one handler here stops every listener together.
    tasks = [
        asyncio.create_task(server._serve(sockets=[sock]), name=f"listener:{lst.name}")
        for server, lst, sock in zip(servers, listeners, sockets, strict=True)
    ]
    try:
        while not all(s.started for s in servers):
            if any(t.done() for t in tasks):
                raise RuntimeError("a listener stopped during start-up")
            await asyncio.sleep(0.01)
        for lst in listeners:
            scheme = "https" if lst.ssl_context else "http"
            # The URL ends with "/": in the console format it ends the line, and a port
            # followed by the next line's date reads as a 13-digit run to a card scanner.
            _log.info("listening", listener=lst.name, url=f"{scheme}://{lst.host}:{lst.port}/")
        if ready is not None:
            ready()
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
    finally:
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        for sock in sockets:
            sock.close()
        for sig in handled:
            loop.remove_signal_handler(sig)


#: The cyclic garbage collector's thresholds while a service serves (CPython's default
#: is 700, 10, 10). See :func:`tune_gc_for_serving`.
GC_THRESHOLDS = (20_000, 20, 10)


def tune_gc_for_serving() -> None:
    """Set the cyclic garbage collector up for a long-running server: collect, move
    every object that exists now (modules, classes, functions, the application and its
    configuration) into the permanent generation with :func:`gc.freeze`, and raise the
    young generation's threshold to ``GC_THRESHOLDS``. :func:`run_until_stopped` calls
    it before the service's start-up, so that what start-up opens (database pools and
    their connections, files) stays in the collected generations: a pool replaces
    connections over time, and a frozen cycle that is dropped is never freed.

    Why: CPython starts a young-generation collection whenever 700 more container
    objects are alive than at the last one. 32 tokenizations in flight hold more than
    that, so the vault ran about 40 young collections a second that found nothing to
    free, and every few seconds a full collection that walked the whole heap, modules
    included, for about 90 ms with the event loop stopped. Frozen objects are never
    walked again, and requests in flight rarely reach the new threshold. Reference
    cycles are still collected, later and in larger batches: up to about 20,000
    container objects of cyclic garbage (and what they hold) may wait for a collection.
    On ``bench/tokenization.py`` the tokenization's p99 fell by half and its vault CPU by
    5-18% in three alternating pairs (see ``bench/README.md``).

    Card data and keys do not wait for the collector on the request path: they are
    wiped explicitly (``CardNumber.wipe`` in the handlers, ``Key.wipe``, and a dropped
    ``Key`` wipes itself as soon as nothing refers to it). The ``__del__`` of card data
    is a backstop, and for an object caught in a reference cycle it now runs later.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_until_stopped(
    listeners: Sequence[Listener],
    *,
    ready: Callable[[], Any] | None = None,
    startup: Callable[[], Coroutine[Any, Any, Any]] | None = None,
    shutdown: Callable[[], Coroutine[Any, Any, Any]] | None = None,
) -> None:
    """Serve ``listeners`` on a uvloop event loop until SIGINT/SIGTERM.

    ``startup`` runs on the same loop before any socket is bound (an error there stops
    start-up with nothing listening); ``shutdown`` runs after every listener closed.
    The garbage collector is tuned for serving before ``startup``
    (:func:`tune_gc_for_serving`).
    """
    import uvloop

    tune_gc_for_serving()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        if startup is not None:
            runner.run(startup())
        try:
            runner.run(serve(listeners, ready=ready))
        finally:
            if shutdown is not None:
                runner.run(shutdown())
