"""The vault's outbound HTTPS client for forwarding: aiohttp, pooled, locked down.

Why aiohttp: on this hardware httpx's AsyncClient managed ~600 requests/s at 32
concurrent connections (httpx issue #3215) where aiohttp did ~13k; a forward must add
well under a millisecond.

Every request:

* goes to the allowlisted destination's own URL (never the caller's string);
* verifies the certificate and host name (the system store, or the destination's CA
  bundle), and the destination's public-key pins when it has any — checked right after
  the handshake, before a byte of the request (which holds the card) is written;
* follows no redirect, takes no proxy from the environment (``trust_env=False``), sends
  no cookies back (a dummy cookie jar);
* is bounded in time (the destination's timeout) and in response size;
* reports the address actually connected to and the duration.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
from yarl import URL

from cardvault.errors import ForwardingDestinationError
from cardvault.logging import get_logger
from cardvault.transport.pins import PinMismatch, check_peer_pins
from cardvault.transport.tls import client_context

__all__ = [
    "HOP_BY_HOP",
    "DestinationError",
    "DestinationUnreachable",
    "OutboundClient",
    "OutboundResponse",
    "PinMismatch",
]

_log = get_logger("cardvault.vault.outbound")

#: Headers that describe one hop, never forwarded in either direction.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


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

#: What aiohttp raises when the connection was never made or its TLS handshake failed:
#: the request was not written. A timeout, a reset or a closed connection (a reused one
#: included) may come after the request was written, and count as "may have received".
_NOT_CONNECTED = (aiohttp.ClientConnectorError, PinMismatch)


class _PinningConnector(aiohttp.TCPConnector):
    """A connector that checks public-key pins on every new TLS connection before use."""

    def __init__(self, *, pins: Sequence[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pins = tuple(pins)

    async def _wrap_create_connection(self, *args: Any, **kwargs: Any) -> Any:
        transport, protocol = await super()._wrap_create_connection(*args, **kwargs)
        if self._pins:
            try:
                check_peer_pins(transport.get_extra_info("ssl_object"), self._pins)
            except PinMismatch:
                transport.close()
                raise
        return transport, protocol


def _peer_ip(response: aiohttp.ClientResponse) -> str | None:
    """The address the request was sent to. A small response may be read to its end,
    and its connection handed back to the pool, before this runs; the protocol object
    still knows its transport then."""
    transport = None
    if response.connection is not None:
        transport = response.connection.transport
    if transport is None:
        protocol = getattr(response, "_protocol", None)
        transport = getattr(protocol, "transport", None)
    peername = transport.get_extra_info("peername") if transport is not None else None
    return str(peername[0]) if peername else None


@dataclass(frozen=True)
class OutboundResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    peer_ip: str | None
    duration_ms: int


class OutboundClient:
    """One pooled session per destination (its own trust settings and pins)."""

    def __init__(self) -> None:
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._lock = asyncio.Lock()
        #: Made once per destination rather than per request: its URL, parsed, and its
        #: timeout.
        self._urls: dict[str, URL] = {}
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    async def _session(
        self, name: str, ca_file: Path | None, pins: Sequence[str]
    ) -> aiohttp.ClientSession:
        session = self._sessions.get(name)
        if session is not None:
            return session
        async with self._lock:
            session = self._sessions.get(name)
            if session is None:
                ctx = client_context(ca_file)
                connector = _PinningConnector(pins=pins, ssl=ctx, limit=100, ttl_dns_cache=60)
                session = aiohttp.ClientSession(
                    connector=connector,
                    trust_env=False,
                    cookie_jar=aiohttp.DummyCookieJar(),
                    auto_decompress=False,
                    skip_auto_headers=("User-Agent",),
                )
                self._sessions[name] = session
            return session

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
        session = self._sessions.get(destination) or await self._session(destination, ca_file, pins)
        limit = self._timeouts.get(timeout)
        if limit is None:
            limit = self._timeouts[timeout] = aiohttp.ClientTimeout(total=timeout)
        target = self._urls.get(url)
        if target is None:
            target = self._urls[url] = URL(url)
        started = time.perf_counter()
        try:
            async with session.request(
                method,
                target,
                headers=headers,
                data=body,
                allow_redirects=False,
                timeout=limit,
                proxy=None,
            ) as response:
                peer = _peer_ip(response)
                if (
                    response.content_length is not None
                    and response.content_length > max_response_bytes
                ):
                    raise DestinationError()
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.content.iter_chunked(65536):
                    size += len(chunk)
                    if size > max_response_bytes:
                        raise DestinationError()
                    chunks.append(chunk)
                return OutboundResponse(
                    status=response.status,
                    headers=[(k.lower(), v) for k, v in response.headers.items()],
                    body=b"".join(chunks),
                    peer_ip=peer,
                    duration_ms=round((time.perf_counter() - started) * 1000),
                )
        except DestinationError:
            _log.warning("forward refused: response too large", destination=destination)
            raise
        except PinMismatch as exc:
            _log.error("forward refused: destination key pin mismatch", destination=destination)
            raise DestinationUnreachable() from exc
        except _NOT_CONNECTED as exc:
            _log.warning(
                "forward not sent: no connection", destination=destination, error=type(exc).__name__
            )
            raise DestinationUnreachable() from exc
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError) as exc:
            _log.warning("forward failed", destination=destination, error=type(exc).__name__)
            raise DestinationError() from exc
        except ValueError as exc:
            # The HTTP client refused to write the request (a header it will not send):
            # the caller's values are checked before this, so this is the net under them.
            _log.error("forward refused: the request could not be written", destination=destination)
            raise DestinationError() from exc

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()
