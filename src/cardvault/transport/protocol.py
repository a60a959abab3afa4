"""The HTTP protocol every connection of a cardvault listener runs: uvicorn's httptools
protocol plus the ASGI TLS extension and the listener's limits.

uvicorn 0.54 does not give applications the ASGI TLS extension, so
:class:`TlsHttpProtocol` adds it: when a connection is made it reads the verified peer
certificate once (:func:`tls_extension`) and every request on that connection carries
``scope["extensions"]["tls"]`` with the ASGI spec's keys (``client_cert_chain``,
``client_cert_name``, ``tls_version``, ``cipher_suite`` …) plus ``client_identity``, the
``spiffe://cardvault/<identity>`` name of a verified client certificate (mutual TLS).

:class:`TlsHttpProtocol` also enforces the listener's :class:`~cardvault.config.ServerLimits`
before any application sees a request: the size of a request head (counted as its bytes
arrive, so a huge header is never held), the number of header fields, the URL's length,
the body's size, how long a request's head and body may take, how long a connection may
stay idle, and (with the listener's :class:`ConnectionGate`) how many connections a
listener and one client address may hold. A refusal is answered by
:func:`cardvault.transport.asgi.raw_error_response` (Stripe's error object, the usual
security headers, ``Connection: close``), logged once (``request_refused`` /
``connection_refused`` with ``limit=`` and ``client=``), and the connection is closed.
docs/transport.md ("Limits") lists each limit and its answer.

The TLS handshake and shutdown timeouts are not here: asyncio applies them to the
listening socket, which :mod:`cardvault.transport.server` starts with the limits.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import httptools
import uvicorn
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

__all__ = ["RETRY_AFTER", "ConnectionGate", "TlsHttpProtocol"]

# The name the transport has always logged under (cardvault.transport.server too), so
# that log configuration and filters by logger name see every listener's lines.
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
