"""The outbound client of forwarding, against a scripted TLS server in the same process.

Each test says what the server answers and checks what the client made of it and what
the server received: verification and pins before a byte is written, no redirect
followed, no proxy taken, size and time bounds, the pool, and the one distinction the
forwarder relies on: :class:`DestinationUnreachable` only when nothing can have been
received, :class:`DestinationError` otherwise, and never a request sent twice.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop

from cardvault.transport.certs import init_ca
from cardvault.transport.pins import spki_sha256
from cardvault.vault.forwarding import outbound
from cardvault.vault.forwarding.http1 import ResponseTooLarge
from cardvault.vault.forwarding.outbound import (
    DestinationError,
    DestinationUnreachable,
    OutboundClient,
)
from unit.vault.scripted_tls import answering, serve

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 8\r\n\r\n{"ok":1}'


@dataclass
class Pki:
    ca: Path
    other_ca: Path
    server: ssl.SSLContext
    pin: str


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    ca = init_ca(base / "ca")
    other = init_ca(base / "other")
    cert = ca.issue("acquirer", dns=["localhost"], ips=["127.0.0.1"])
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(str(cert.cert_path), str(cert.key_path))
    pin = spki_sha256(ssl.PEM_cert_to_DER_cert(Path(cert.cert_path).read_text()))
    return Pki(Path(ca.cert_path), Path(other.cert_path), server, pin)


async def send(client: OutboundClient, port: int, ca: Path | None, **overrides: Any) -> Any:
    request: dict[str, Any] = {
        "destination": "acquirer",
        "url": f"https://localhost:{port}/v1/authorizations",
        "method": "POST",
        "headers": [("Content-Type", "application/json"), ("Authorization", "Bearer sk_x")],
        "body": b'{"card":{"number":"4242424242424242"}}',
        "timeout": 5.0,
        "max_response_bytes": 1000,
        "ca_file": ca,
    }
    request.update(overrides)
    return await client.send(**request)


def run(coro: Awaitable[Any]) -> Any:
    """On uvloop, as the vault runs."""
    return uvloop.run(coro)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def no_proxy_followed(monkeypatch: pytest.MonkeyPatch) -> None:
    # A proxy in the environment must change nothing: every test runs with one set.
    for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "HTTP_PROXY"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")


def test_send_posts_once_over_verified_tls_and_reads_the_answer(pki: Pki) -> None:
    async def main() -> None:
        seen, server = await serve(pki.server, answering(OK))
        client = OutboundClient()
        response = await send(client, seen.port, pki.ca)
        await client.close()
        server.close()
        assert response.status == 200
        assert response.body == b'{"ok":1}'
        assert ("content-type", "application/json") in response.headers
        assert response.peer_ip == "127.0.0.1"
        head, body = seen.requests[0]
        assert head.startswith(b"POST /v1/authorizations HTTP/1.1\r\n")
        assert f"\r\nHost: localhost:{seen.port}\r\n".encode() in head
        assert b"\r\nAuthorization: Bearer sk_x\r\n" in head
        assert b"Content-Length: 38\r\n" in head
        assert b"accept-encoding" not in head.lower()  # the answer is never compressed
        assert b"cookie" not in head.lower()
        assert body == b'{"card":{"number":"4242424242424242"}}'

    run(main())


def test_send_reuses_one_connection_per_destination(pki: Pki) -> None:
    async def main() -> None:
        seen, server = await serve(pki.server, answering(OK))
        client = OutboundClient()
        for _ in range(3):
            assert (await send(client, seen.port, pki.ca)).status == 200
        await client.close()
        server.close()
        assert (seen.connections, len(seen.requests)) == (1, 3)

    run(main())


def test_send_refuses_an_untrusted_certificate_before_writing(pki: Pki) -> None:
    async def main() -> None:
        seen, server = await serve(pki.server, answering(OK))
        client = OutboundClient()
        with pytest.raises(DestinationUnreachable) as caught:
            await send(client, seen.port, pki.other_ca)
        assert isinstance(caught.value.__cause__.__cause__, ssl.SSLCertVerificationError)  # type: ignore[union-attr]
        await client.close()
        server.close()
        assert seen.requests == []

    run(main())


def test_send_refuses_a_key_matching_no_pin_before_writing(pki: Pki) -> None:
    async def main() -> None:
        seen, server = await serve(pki.server, answering(OK))
        client = OutboundClient()
        other_pin = "A" * 43 + "="
        with pytest.raises(DestinationUnreachable):
            await send(client, seen.port, pki.ca, pins=(other_pin,))
        await asyncio.sleep(0.05)
        assert seen.requests == []
        pinned = OutboundClient()
        ok = await send(pinned, seen.port, pki.ca, destination="pinned", pins=(pki.pin,))
        assert ok.status == 200
        await client.close()
        await pinned.close()
        server.close()

    run(main())


def test_send_to_a_closed_port_is_unreachable() -> None:
    async def main() -> None:
        client = OutboundClient()
        with pytest.raises(DestinationUnreachable) as caught:
            await send(client, 9, None)
        assert caught.value.consumes_idempotency_key is False
        await client.close()

    run(main())


def test_send_returns_a_redirect_without_following_it(pki: Pki) -> None:
    redirect = b"HTTP/1.1 302 Found\r\nLocation: https://localhost:1/x\r\nContent-Length: 0\r\n\r\n"

    async def main() -> None:
        seen, server = await serve(pki.server, answering(redirect))
        client = OutboundClient()
        response = await send(client, seen.port, pki.ca)
        await client.close()
        server.close()
        assert response.status == 302
        assert len(seen.requests) == 1

    run(main())


@pytest.mark.parametrize(
    "text",
    [
        # Announced over the limit: refused on the headers, the body never sent.
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n" + b"x" * 10,
        # Chunked, growing past the limit.
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"100\r\n" + b"x" * 256 + b"\r\n" for _ in range(8)),
        # Until the connection closes, past the limit.
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 5000,
        # Headers without end.
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 200_000,
    ],
    ids=["content-length", "chunked", "until-close", "head"],
)
def test_send_refuses_an_answer_over_the_limit(pki: Pki, text: bytes) -> None:
    async def main() -> None:
        seen, server = await serve(pki.server, answering(text))
        client = OutboundClient()
        with pytest.raises(DestinationError) as caught:
            await send(client, seen.port, pki.ca)
        assert not isinstance(caught.value, DestinationUnreachable)
        assert isinstance(caught.value.__cause__, ResponseTooLarge)
        await client.close()
        server.close()

    run(main())


def test_send_reads_chunked_close_delimited_and_interim_answers(pki: Pki) -> None:
    answers = [
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK,
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end",
    ]

    async def script(_head: bytes, _body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(answers.pop(0))
        if not answers:
            writer.close()

    async def main() -> None:
        seen, server = await serve(pki.server, script)
        client = OutboundClient()
        first = await send(client, seen.port, pki.ca)
        second = await send(client, seen.port, pki.ca)
        third = await send(client, seen.port, pki.ca)
        await client.close()
        server.close()
        assert (first.status, first.body) == (200, b'{"ok":1}')
        assert (second.status, second.body) == (201, b"abcde")
        assert (third.status, third.body) == (200, b"until the end")

    run(main())


def test_a_connection_the_peer_closed_is_not_reused(pki: Pki) -> None:
    async def main() -> None:
        seen, server = await serve(pki.server, answering(OK))
        client = OutboundClient()
        await send(client, seen.port, pki.ca)
        seen.writers[0].close()  # the server closes the idle connection
        await asyncio.sleep(0.1)
        assert (await send(client, seen.port, pki.ca)).status == 200
        await client.close()
        server.close()
        assert (seen.connections, len(seen.requests)) == (2, 2)

    run(main())


def test_a_connection_idle_too_long_is_not_reused(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(outbound, "_IDLE_SECONDS", 0.05)

    async def main() -> None:
        seen, server = await serve(pki.server, answering(OK))
        client = OutboundClient()
        await send(client, seen.port, pki.ca)
        await asyncio.sleep(0.1)
        await send(client, seen.port, pki.ca)
        await client.close()
        server.close()
        assert seen.connections == 2

    run(main())


@pytest.mark.parametrize(
    "behaviour",
    ["close without answering", "half an answer", "not HTTP", "hang"],
)
def test_a_request_that_may_have_been_received_is_an_error_and_never_resent(
    pki: Pki, behaviour: str
) -> None:
    async def script(_head: bytes, _body: bytes, writer: asyncio.StreamWriter) -> None:
        if behaviour == "half an answer":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
            await writer.drain()
        elif behaviour == "not HTTP":
            writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
            await writer.drain()
        elif behaviour == "hang":
            await asyncio.sleep(10)
        writer.close()

    async def main() -> None:
        seen, server = await serve(pki.server, script)
        client = OutboundClient()
        with pytest.raises(DestinationError) as caught:
            await send(client, seen.port, pki.ca, timeout=0.5)
        assert not isinstance(caught.value, DestinationUnreachable)
        assert caught.value.consumes_idempotency_key is True
        await asyncio.sleep(0.1)
        await client.close()
        server.close()
        assert len(seen.requests) == 1

    run(main())


def test_a_reused_connection_closed_mid_request_is_not_resent(pki: Pki) -> None:
    """The server reads the second request on a kept-alive connection and closes it: the
    client does not try again on a new connection (aiohttp would not either, for POST)."""
    count = 0

    async def script(_head: bytes, _body: bytes, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        if count == 1:
            writer.write(OK)
        else:
            writer.transport.abort()

    async def main() -> None:
        seen, server = await serve(pki.server, script)
        client = OutboundClient()
        await send(client, seen.port, pki.ca)
        with pytest.raises(DestinationError) as caught:
            await send(client, seen.port, pki.ca)
        assert not isinstance(caught.value, DestinationUnreachable)
        await asyncio.sleep(0.1)
        await client.close()
        server.close()
        assert (seen.connections, len(seen.requests)) == (1, 2)

    run(main())


@pytest.mark.parametrize(
    "headers",
    [
        [("X-Note", "a\r\nX-Injected: 1")],
        [("X-Note", "a\x00b")],
        [("Bad Name", "x")],
        [("Host", "evil.example")],
        [("Transfer-Encoding", "chunked")],
    ],
)
def test_a_header_that_cannot_be_sent_is_refused_before_connecting(
    pki: Pki, headers: list[tuple[str, str]]
) -> None:
    async def main() -> None:
        seen, server = await serve(pki.server, answering(OK))
        client = OutboundClient()
        with pytest.raises(DestinationError) as caught:
            await send(client, seen.port, pki.ca, headers=headers)
        assert isinstance(caught.value.__cause__, ValueError)
        await client.close()
        server.close()
        assert seen.connections == 0

    run(main())


def test_a_bounded_client_drops_the_least_recently_used_pool_and_its_connections(
    pki: Pki,
) -> None:
    async def main() -> None:
        seen, server = await serve(pki.server, answering(OK))
        client = OutboundClient(max_pools=1)
        for destination in ("a", "a", "b", "a"):
            await send(client, seen.port, pki.ca, destination=destination)
        await client.close()
        server.close()
        # "a" reused its connection once; "b" evicted it, so "a" connected again.
        assert (seen.connections, len(seen.requests)) == (3, 4)

    run(main())


def test_a_resolve_hook_gives_the_addresses_tried_in_turn_and_tls_checks_the_name(
    pki: Pki,
) -> None:
    asked: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return ["127.0.0.2", "127.0.0.1"]  # nothing listens on the first

    async def main() -> None:
        seen, server = await serve(pki.server, answering(OK))
        client = OutboundClient(resolve=resolve)
        response = await send(client, seen.port, pki.ca)
        await client.close()
        server.close()
        assert response.peer_ip == "127.0.0.1"
        assert asked == [("localhost", seen.port)]
        assert f"\r\nHost: localhost:{seen.port}\r\n".encode() in seen.requests[0][0]

    run(main())
