"""One HTTP/1.1 connection of the outbound client: the request written, the answer
parsed by httptools.

This module writes a request (a request line and headers the vault composed from an
allowlisted URL and checked values) and reads one answer at a time; it never parses
HTTP by hand: every byte the destination sends goes through httptools (llhttp, the
parser of Node.js and of uvicorn, in its strict mode). What it adds is the bookkeeping
the forward needs: the answer's size bounded while it arrives, interim (1xx) answers
skipped, and whether the connection may carry another request.

:class:`Connection` is an ``asyncio.Protocol``; :mod:`~cardvault.vault.forwarding.
outbound` opens it (TLS verified, pins checked) and keeps it in its pool.
"""

from __future__ import annotations

import asyncio
import re
from typing import cast

import httptools

__all__ = [
    "HOP_BY_HOP",
    "Connection",
    "ProtocolError",
    "ResponseTooLarge",
    "request_head",
]

#: Headers that describe one hop, never forwarded in either direction; the client
#: writes ``Host`` and ``Content-Length`` itself.
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

#: The bytes of an answer's status line and headers the client holds at most. The
#: parser keeps a header being received in memory until it ends, so this bounds what a
#: destination can make the vault hold before the body's own limit applies.
MAX_HEAD_BYTES = 64 * 1024

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: A header value may hold no control character but tab (CR, LF and NUL included).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
#: A request target (origin form) and a host: printable ASCII, no space.
_TARGET = re.compile(r"/[\x21-\x7e]*")
_HOST = re.compile(r"[\x21-\x7e]+")


class ResponseTooLarge(Exception):
    """The answer is over its limit: refused before the rest of it is read. ``status``:
    the answer's status when its head was read (None when the head itself was too
    large)."""

    def __init__(self, status: int | None = None) -> None:
        super().__init__()
        self.status = status


class ProtocolError(Exception):
    """The destination broke HTTP/1.1, closed the connection before its answer ended,
    or sent bytes no request asked for."""


def request_head(
    method: str, path: str, host: str, headers: list[tuple[str, str]], length: int
) -> bytes:
    """The request line and headers of a request with a body of ``length`` bytes.

    ``path`` and ``host`` come from a strictly parsed URL (an allowlisted destination's
    or a webhook endpoint's); they and the headers are checked again here, as the net
    under the callers' checks: a path or host with a space or a control character, a
    header name that is not a token or one the client writes itself, or a value with a
    control character, raises ``ValueError`` and nothing is written."""
    if not _TOKEN.fullmatch(method) or method in ("HEAD", "CONNECT"):
        raise ValueError("the method cannot be sent")
    if not _TARGET.fullmatch(path) or not _HOST.fullmatch(host):
        raise ValueError("the request target cannot be sent")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    for name, value in headers:
        if not _TOKEN.fullmatch(name) or name.lower() in HOP_BY_HOP:
            raise ValueError("a header name cannot be sent")
        if _CONTROL.search(value):
            raise ValueError("a header value cannot be sent")
        lines.append(f"{name}: {value}")
    lines.append(f"Content-Length: {length}\r\n\r\n")
    return "\r\n".join(lines).encode("utf-8")


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection, one exchange at a time.

    :meth:`exchange` writes a request and waits for its answer. A connection may carry
    the next request only when its last answer ended, said keep-alive, and nothing
    came after it (:attr:`reusable`); the peer closing it, or sending anything while it
    is idle, makes it unusable at once, so the pool never writes a request into a
    connection it knows is closed.
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer_ip: str | None = None
        #: The event loop's time when the last answer ended (for the pool's idle limit).
        self.idle_since = 0.0
        self._open = False
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._status = 0
        self._headers: list[tuple[bytes, bytes]] = []
        self._chunks: list[bytes] = []
        self._size = 0
        self._limit = 0
        self._head_bytes = 0
        self._in_body = False
        self._until_close = False
        self._complete = False
        self._keep_alive = False

    # -- what the client calls ----------------------------------------------------------

    @property
    def reusable(self) -> bool:
        return (
            self._open
            and self._complete
            and self._keep_alive
            and self.transport is not None
            and not self.transport.is_closing()
        )

    async def exchange(
        self, head: bytes, body: bytes, limit: int
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """Write the request, wait for the whole answer: its status, its headers as
        received and its body (at most ``limit`` bytes, or :class:`ResponseTooLarge`).
        Any other failure raises ``OSError`` or :class:`ProtocolError`; the caller
        closes the connection after any exception (cancellation included)."""
        if not self._open or self.transport is None or self._waiter is not None:
            raise ProtocolError("the connection is not ready for a request")
        loop = asyncio.get_running_loop()
        self._waiter = waiter = loop.create_future()
        self._error = None
        self._status, self._headers, self._chunks = 0, [], []
        self._size, self._limit, self._head_bytes = 0, limit, 0
        self._in_body = self._until_close = self._complete = self._keep_alive = False
        self.transport.write(head + body)
        try:
            await waiter
        finally:
            self._waiter = None
        self.idle_since = loop.time()
        return self._status, self._headers, b"".join(self._chunks)

    def close(self) -> None:
        self._open = False
        if self.transport is not None:
            self.transport.abort()

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not subclasses of asyncio's, only alike.
        self.transport = cast(asyncio.Transport, transport)
        self._open = True
        peername = transport.get_extra_info("peername")
        self.peer_ip = str(peername[0]) if peername else None

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            # Nothing was asked: a server that talks out of turn is not trusted with
            # another request.
            self._fail(ProtocolError("bytes arrived that no request asked for"))
            return
        if not self._in_body:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES + self._limit:
                self._fail(ResponseTooLarge())
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("the destination switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(self._error or ProtocolError(f"invalid HTTP answer: {exc}"))

    def eof_received(self) -> bool:
        if self._in_body and self._until_close and not self._complete:
            # An answer without a length ends when the connection does.
            self._complete = True
            self._keep_alive = False
            self._open = False
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)
        else:
            self._fail(ProtocolError("the destination closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or ProtocolError("the connection was closed"))

    # -- httptools' callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._complete:
            raise ProtocolError("a second answer to one request")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._status = status = self._parser.get_status_code()
        if status < 200:
            return  # an interim answer (100 Continue, 103 Early Hints): skipped
        self._in_body = True
        length = None
        chunked = False
        for name, value in self._headers:
            lowered = name.lower()
            if lowered == b"content-length":
                length = value
            elif lowered == b"transfer-encoding":
                chunked = True
        if length is not None and length.strip().isdigit() and int(length) > self._limit:
            # Refused on its announced length, before a byte of the body is read.
            self._error = error = ResponseTooLarge(status)
            raise error
        no_body = status in (204, 304)
        self._until_close = length is None and not chunked and not no_body

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self._limit:
            self._error = error = ResponseTooLarge(self._status)
            raise error
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        if self._status < 200:
            self._headers = []
            return
        self._complete = True
        # Asked here: once this callback returns, the parser has reset for the next one.
        self._keep_alive = self._parser.should_keep_alive()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- failure --------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> None:
        """The connection is unusable: the waiting exchange, if any, raises ``exc``."""
        self._open = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()
