"""The vault's outbound HTTPS client for forwarding: HTTP/1.1 on asyncio, pooled,
locked down.

Why not aiohttp any more: a forward's request through aiohttp's client cost the vault
about three times what the same request costs written directly on an asyncio
connection with httptools parsing the answer (``bench/outbound_clients.py``; figures
in docs/forwarding.md, "The outbound client"), and httpcore on its anyio backend cost
more still. The vault sends one kind of request (a POST with a body of known length to
an allowlisted URL) and reads one answer; what aiohttp adds for the general case
(cookies, redirects, proxies, decompression, streaming uploads, retries) is exactly
what a forward must not do. The answer is never parsed by hand: httptools does it
(:mod:`~cardvault.vault.forwarding.http1`).

Every request:

* goes to the allowlisted destination's own URL (never the caller's string);
* verifies the certificate and host name with the project's client context (the system
  store, or the destination's CA bundle), and the destination's public-key pins when it
  has any — checked right after the handshake, before a byte of the request (which
  holds the card) is written;
* follows no redirect (a 3xx is an answer like any other), takes no proxy (it connects
  to the destination itself, whatever the environment says), sends no cookie and asks
  for no compression;
* is bounded in time (the destination's timeout, over the whole attempt: connection,
  handshake, request and answer) and in response size (an answer over the limit is
  refused on its ``Content-Length``, or as soon as its body passes the limit);
* is sent once: never again on another connection, whatever happens (a forward is not
  idempotent). A pooled connection is reused only when its last answer ended cleanly
  with keep-alive, it has been idle less than :data:`_IDLE_SECONDS` and the peer has
  neither closed it nor written to it since;
* reports the address actually connected to and the duration.

Webhook deliveries (:mod:`cardvault.vault.webhooks.delivery`) go through the same
client, by :meth:`OutboundClient.exchange`: the exchange and the pool without the
forward's error mapping, on a client made with a ``resolve`` hook (the host's addresses
checked at connect time, each tried in turn; TLS still verifies the host name) and a
bound on the destinations it keeps pools for.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

from cardvault.errors import ForwardingDestinationError
from cardvault.logging import get_logger
from cardvault.transport.pins import PinMismatch, check_peer_pins
from cardvault.transport.tls import client_context
from cardvault.vault.forwarding.allowlist import UrlRefused, parse_url
from cardvault.vault.forwarding.http1 import (
    HOP_BY_HOP,
    Connection,
    ProtocolError,
    ResponseTooLarge,
    request_head,
)

__all__ = [
    "HOP_BY_HOP",
    "Answer",
    "DestinationError",
    "DestinationUnreachable",
    "NotConnected",
    "OutboundClient",
    "OutboundResponse",
    "PinMismatch",
    "Resolver",
]

_log = get_logger("cardvault.vault.outbound")

DestinationError = ForwardingDestinationError


class DestinationUnreachable(ForwardingDestinationError):
    """The destination cannot have received anything: no connection was made (refused,
    unreachable, the name not resolved), or its TLS handshake failed or its key pin did
    not match, before a byte of the request was written. Nothing left the vault, so the
    forward may be retried with the same Idempotency-Key (502, same code, with
    ``Retry-After``)."""

    consumes_idempotency_key: ClassVar[bool] = False
    default_message = (
        "The forwarding destination could not be reached (no connection, or its "
        "certificate failed verification): nothing was sent. Retry later."
    )

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message, headers={"Retry-After": str(_UNREACHABLE_RETRY_AFTER)})


#: Seconds a caller is told to wait before retrying a forward that was not sent.
_UNREACHABLE_RETRY_AFTER = 5

#: Connections per destination at most; a request beyond waits for one (within its
#: timeout).
_CONNECTIONS = 100

#: Seconds a pooled connection may stay idle and still carry a request. Below the 5 s
#: keep-alive of common servers (uvicorn, Node.js): a server closing an idle connection
#: at the moment the vault writes a card into it would make the forward's outcome
#: unknown (it may have been read), and the CVC would be lost with it.
_IDLE_SECONDS = 4.0


#: URLs whose parsed form a client keeps (a webhook client sees one per endpoint); past
#: it the cache starts again.
_TARGETS = 1024

#: ``(host, port)`` to the addresses a connection may be made to, in the order to try
#: them; raises what the caller maps (webhooks: ``AddressRefused``).
Resolver = Callable[[str, int], Awaitable[Sequence[str]]]


class NotConnected(Exception):
    """No connection was made (the cause says why): nothing was written."""


@dataclass(frozen=True)
class Answer:
    """One exchange's answer, its headers as received."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    peer_ip: str | None


@dataclass(frozen=True)
class OutboundResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    peer_ip: str | None
    duration_ms: int


@dataclass(frozen=True)
class _Target:
    """An allowlisted URL, parsed once: where to connect and what to write."""

    host: str
    port: int
    path: str
    host_header: str


class _Pool:
    """One destination's connections: its TLS context and pins, its idle connections
    (the most recent first out), and at most :data:`_CONNECTIONS` in use."""

    def __init__(self, ctx: ssl.SSLContext, pins: Sequence[str]) -> None:
        self.ctx = ctx
        self.pins = tuple(pins)
        self.idle: list[Connection] = []
        self.slots = asyncio.Semaphore(_CONNECTIONS)
        #: Dropped by its client: a connection handed back is closed, not kept.
        self.closed = False

    def reuse(self, now: float) -> Connection | None:
        """An idle connection that may carry a request, or None; the others closed."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.reusable and now - conn.idle_since < _IDLE_SECONDS:
                return conn
            conn.close()
        return None

    def keep(self, conn: Connection, now: float) -> None:
        """Put ``conn`` back; drop connections at the bottom that can no longer serve."""
        if self.closed:
            conn.close()
            return
        idle = self.idle
        while idle and not (idle[0].reusable and now - idle[0].idle_since < _IDLE_SECONDS):
            idle.pop(0).close()
        idle.append(conn)

    def close(self) -> None:
        self.closed = True
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class OutboundClient:
    """One pool of connections per destination (its own trust settings and pins).

    ``resolve``: the addresses to connect to, asked at every new connection (default:
    the event loop's resolver, through ``create_connection``). ``max_pools``: the most
    destinations kept, the least recently used dropped beyond it with its idle
    connections (default: no bound, for the allowlist's destinations)."""

    def __init__(self, *, resolve: Resolver | None = None, max_pools: int | None = None) -> None:
        self._pools: OrderedDict[Hashable, _Pool] = OrderedDict()
        self._targets: dict[str, _Target] = {}
        self._resolve = resolve
        self._max_pools = max_pools

    def _pool(
        self, key: Hashable, context: Callable[[], ssl.SSLContext], pins: Sequence[str]
    ) -> _Pool:
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(context(), pins)
            if self._max_pools is not None and len(self._pools) > self._max_pools:
                self._pools.popitem(last=False)[1].close()
        elif self._max_pools is not None:
            self._pools.move_to_end(key)
        return pool

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            # The destination's URL was checked when the allowlist was read (a webhook
            # endpoint's, by the same parser when it was created); parsed again, it
            # gives a host and a path that are safe to write as they are (a DNS name;
            # no space, no query, no percent), and request_head checks them again.
            try:
                parsed = parse_url(url)
            except UrlRefused as exc:
                raise ValueError("the destination's URL cannot be sent to") from exc
            host = parsed.host if parsed.port == 443 else f"{parsed.host}:{parsed.port}"
            target = _Target(parsed.host, parsed.port, parsed.path, host)
            if len(self._targets) >= _TARGETS:
                self._targets.clear()
            self._targets[url] = target
        return target

    async def _connect(self, pool: _Pool, target: _Target) -> Connection:
        """A new connection, verified and pinned, before anything is written on it.

        With a ``resolve`` hook, its addresses are tried in turn (its own exceptions
        pass through); TLS verifies the URL's host name whatever the address."""
        loop = asyncio.get_running_loop()
        addresses = (
            (target.host,)
            if self._resolve is None
            else await self._resolve(target.host, target.port)
        )
        error: OSError | None = None
        for address in addresses:
            try:
                transport, conn = await loop.create_connection(
                    Connection, address, target.port, ssl=pool.ctx, server_hostname=target.host
                )
                break
            except OSError as exc:  # refused, unreachable, not resolved, TLS failed
                error = exc
        else:
            raise NotConnected() from error
        if pool.pins:
            try:
                check_peer_pins(transport.get_extra_info("ssl_object"), pool.pins)
            except PinMismatch:
                conn.close()
                raise
        return conn

    async def _exchange(
        self, pool: _Pool, target: _Target, head: bytes, body: bytes, limit: int
    ) -> tuple[Connection, tuple[int, list[tuple[bytes, bytes]], bytes]]:
        async with pool.slots:
            loop = asyncio.get_running_loop()
            conn = pool.reuse(loop.time()) or await self._connect(pool, target)
            try:
                answer = await conn.exchange(head, body, limit)
            except BaseException:
                conn.close()
                raise
            if conn.reusable:
                pool.keep(conn, loop.time())
            else:
                conn.close()
            return conn, answer

    async def exchange(
        self,
        key: Hashable | None,
        *,
        context: Callable[[], ssl.SSLContext],
        url: str,
        method: str,
        headers: list[tuple[str, str]],
        body: bytes,
        timeout: float,
        max_response_bytes: int,
        pins: Sequence[str] = (),
    ) -> Answer:
        """One request on the pool ``key`` (None: the URL's host and port), made with
        ``context()`` and ``pins`` the first time; sent once, bounded by ``timeout`` over
        the whole attempt. The errors are raised as they come, for the caller to map:
        :class:`NotConnected` (nothing written), what ``resolve`` raises,
        ``PinMismatch``, ``TimeoutError``, ``OSError``,
        :class:`~cardvault.vault.forwarding.http1.ProtocolError`,
        :class:`~cardvault.vault.forwarding.http1.ResponseTooLarge`, and ``ValueError``
        for a request that cannot be written."""
        target = self._targets.get(url) or self._target(url)
        if key is None:
            key = (target.host, target.port)
        pool = self._pools.get(key)
        if pool is None or self._max_pools is not None:
            pool = self._pool(key, context, pins)
        head = request_head(method, target.path, target.host_header, headers, len(body))
        async with asyncio.timeout(timeout):
            conn, (status, raw_headers, content) = await self._exchange(
                pool, target, head, body, max_response_bytes
            )
        return Answer(status, raw_headers, content, conn.peer_ip)

    async def send(
        self,
        *,
        destination: str,
        url: str,
        method: str,
        headers: list[tuple[str, str]],
        body: bytes,
        timeout: float,
        max_response_bytes: int,
        ca_file: Path | None = None,
        pins: Sequence[str] = (),
    ) -> OutboundResponse:
        started = time.perf_counter()
        try:
            answer = await self.exchange(
                destination,
                context=partial(client_context, ca_file),
                url=url,
                method=method,
                headers=headers,
                body=body,
                timeout=timeout,
                max_response_bytes=max_response_bytes,
                pins=pins,
            )
        except ResponseTooLarge as exc:
            _log.warning("forward refused: response too large", destination=destination)
            raise DestinationError() from exc
        except PinMismatch as exc:
            _log.error("forward refused: destination key pin mismatch", destination=destination)
            raise DestinationUnreachable() from exc
        except NotConnected as exc:
            _log.warning(
                "forward not sent: no connection",
                destination=destination,
                error=type(exc.__cause__).__name__,
            )
            raise DestinationUnreachable() from exc
        except (TimeoutError, OSError, ProtocolError) as exc:
            # Once connected, anything may have been read: a timeout (of the handshake
            # too, as before), a reset, a closed connection, a broken answer.
            _log.warning("forward failed", destination=destination, error=type(exc).__name__)
            raise DestinationError() from exc
        except ValueError as exc:
            # The request could not be written (a header the client will not send): the
            # caller's values are checked before this, so this is the net under them.
            _log.error("forward refused: the request could not be written", destination=destination)
            raise DestinationError() from exc
        return OutboundResponse(
            status=answer.status,
            headers=[
                (name.decode("latin-1").lower(), value.decode("utf-8", errors="replace"))
                for name, value in answer.headers
            ],
            body=answer.body,
            peer_ip=answer.peer_ip,
            duration_ms=round((time.perf_counter() - started) * 1000),
        )

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
