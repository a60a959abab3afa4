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
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
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
    "DestinationError",
    "DestinationUnreachable",
    "OutboundClient",
    "OutboundResponse",
    "PinMismatch",
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


class _NotConnected(Exception):
    """No connection was made (the cause says why): nothing was written."""


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
        idle = self.idle
        while idle and not (idle[0].reusable and now - idle[0].idle_since < _IDLE_SECONDS):
            idle.pop(0).close()
        idle.append(conn)

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class OutboundClient:
    """One pool of connections per destination (its own trust settings and pins)."""

    def __init__(self) -> None:
        self._pools: dict[str, _Pool] = {}
        self._targets: dict[str, _Target] = {}

    def _pool(self, name: str, ca_file: Path | None, pins: Sequence[str]) -> _Pool:
        pool = self._pools.get(name)
        if pool is None:
            pool = self._pools[name] = _Pool(client_context(ca_file), pins)
        return pool

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            # The destination's URL was checked when the allowlist was read; parsed
            # again by the same strict parser, it gives a host and a path that are safe
            # to write as they are (a DNS name; no space, no query, no percent).
            try:
                parsed = parse_url(url)
            except UrlRefused as exc:
                raise ValueError("the destination's URL cannot be sent to") from exc
            host = parsed.host if parsed.port == 443 else f"{parsed.host}:{parsed.port}"
            target = _Target(parsed.host, parsed.port, parsed.path, host)
            self._targets[url] = target
        return target

    async def _connect(self, pool: _Pool, target: _Target) -> Connection:
        """A new connection, verified and pinned, before anything is written on it."""
        loop = asyncio.get_running_loop()
        try:
            transport, conn = await loop.create_connection(
                Connection, target.host, target.port, ssl=pool.ctx, server_hostname=target.host
            )
        except OSError as exc:  # refused, unreachable, not resolved, TLS failed
            raise _NotConnected() from exc
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
            pool = self._pools.get(destination) or self._pool(destination, ca_file, pins)
            target = self._targets.get(url) or self._target(url)
            head = request_head(method, target.path, target.host_header, headers, len(body))
            async with asyncio.timeout(timeout):
                conn, (status, raw_headers, content) = await self._exchange(
                    pool, target, head, body, max_response_bytes
                )
        except ResponseTooLarge as exc:
            _log.warning("forward refused: response too large", destination=destination)
            raise DestinationError() from exc
        except PinMismatch as exc:
            _log.error("forward refused: destination key pin mismatch", destination=destination)
            raise DestinationUnreachable() from exc
        except _NotConnected as exc:
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
            status=status,
            headers=[
                (name.decode("latin-1").lower(), value.decode("utf-8", errors="replace"))
                for name, value in raw_headers
            ],
            body=content,
            peer_ip=conn.peer_ip,
            duration_ms=round((time.perf_counter() - started) * 1000),
        )

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
