"""Webhooks without processes: the signature, where a URL may point, the retry schedule."""

from __future__ import annotations

import asyncio
import json
import ssl
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest
import stripe

from cardvault.errors import InvalidRequestError
from cardvault.storage.base import DeliveryRecord, EventRecord, WebhookEndpointRecord
from cardvault.vault.accounts import Caller
from cardvault.vault.forwarding.http1 import request_head
from cardvault.vault.webhooks import WebhookEndpoints, sign
from cardvault.vault.webhooks import delivery as delivery_module
from cardvault.vault.webhooks.delivery import WebhookDelivery
from cardvault.vault.webhooks.endpoints import AddressRefused, resolve_public
from helpers import Pki
from unit.vault.scripted_tls import Script, Server, answering, serve

SECRET = "whsec_test_0123456789abcdefghijklmnopqrstuv"
CALLER = Caller("acct_1", "test", "secret", "key_1")


def test_sign_is_verified_by_the_official_stripe_library() -> None:
    payload = json.dumps({"id": "evt_1", "object": "event", "type": "payment_method.created"})
    header = sign(payload.encode(), SECRET, int(time.time()))
    event = stripe.Webhook.construct_event(payload, header, SECRET)
    assert event.id == "evt_1"


def test_sign_is_refused_for_a_tampered_body_or_another_secret_or_an_old_time() -> None:
    payload = b'{"id": "evt_1", "object": "event"}'
    now = int(time.time())
    header = sign(payload, SECRET, now)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event('{"id": "evt_2", "object": "event"}', header, SECRET)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload.decode(), header, SECRET + "x")
    old = sign(payload, SECRET, now - 3600)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.Webhook.construct_event(payload.decode(), old, SECRET)


def test_sign_matches_stripes_documented_scheme() -> None:
    # t=<timestamp>,v1=<hex HMAC-SHA256 of "<timestamp>.<payload>">, the secret's text
    # (whsec_ included) as the key: the value stripe-python computes for the same input.
    expected = stripe.WebhookSignature._compute_signature("1700000000.{}", SECRET)
    assert sign(b"{}", SECRET, 1_700_000_000) == f"t=1700000000,v1={expected}"


def test_resolve_public_refuses_loopback_unless_the_host_is_allowed() -> None:
    with pytest.raises(AddressRefused, match="not public"):
        asyncio.run(resolve_public("localhost", 443, ()))
    assert asyncio.run(resolve_public("localhost", 443, {"localhost"}))


def test_resolve_public_refuses_a_name_that_does_not_resolve() -> None:
    with pytest.raises(AddressRefused, match="does not resolve"):
        asyncio.run(resolve_public("nothing.invalid", 443, ()))


class _NoStore:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the store was asked {name}")


@pytest.mark.parametrize(
    "url",
    [
        "http://hooks.example.com/in",
        "https://127.0.0.1/in",
        "https://[::1]/in",
        "https://localhost/in",
        "https://hooks.example.com",
        "https://hooks.example.com/in?token=1",
    ],
)
def test_create_refuses_a_url_before_anything_is_stored(url: str) -> None:
    endpoints = WebhookEndpoints(_NoStore(), _NoStore(), _NoStore())  # type: ignore[arg-type]
    params = {"url": url, "enabled_events": ["*"]}
    with pytest.raises(InvalidRequestError) as raised:
        asyncio.run(endpoints.create(CALLER, params))
    assert raised.value.param == "url"


def test_create_refuses_an_unknown_event_type() -> None:
    endpoints = WebhookEndpoints(_NoStore(), _NoStore(), _NoStore(), allowed_hosts=["localhost"])  # type: ignore[arg-type]
    params = {"url": "https://localhost/in", "enabled_events": ["charge.succeeded"]}
    with pytest.raises(InvalidRequestError) as raised:
        asyncio.run(endpoints.create(CALLER, params))
    assert raised.value.param == "enabled_events"


class _Recorded:
    def __init__(self) -> None:
        self.stored: list[DeliveryRecord] = []

    async def record_delivery_attempt(self, record: DeliveryRecord) -> bool:
        self.stored.append(record)
        return True


def test_retries_back_off_exponentially_and_give_up_after_three_days() -> None:
    import ssl

    store = _Recorded()
    delivery = WebhookDelivery(
        store,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]
        retry_base=60,
        retry_max=3600,
        ssl_context=ssl.create_default_context(),
    )
    now = int(time.time())
    record = DeliveryRecord("whdel_1", "acct_1", False, "we_1", "evt_1", created=now)

    async def attempts(n: int) -> list[DeliveryRecord]:
        current = record
        for _ in range(n):
            await delivery._store(current, 500, "http_status")
            current = store.stored[-1]
        return store.stored

    stored = asyncio.run(attempts(8))
    delays = [(r.next_attempt or 0) - (r.last_attempt or 0) for r in stored]
    assert delays == [60_000, 120_000, 240_000, 480_000, 960_000, 1_920_000, 3_600_000, 3_600_000]
    assert all(r.state == "pending" for r in stored)

    # An event three days old is given up at its next failure: the dead-letter state.
    store.stored.clear()
    old = DeliveryRecord("whdel_2", "acct_1", False, "we_1", "evt_2", created=now - 3 * 86_400)
    asyncio.run(delivery._store(old, None, "timeout"))
    [dead] = store.stored
    assert (dead.state, dead.next_attempt, dead.attempts, dead.last_error) == (
        "dead",
        None,
        1,
        "timeout",
    )
    asyncio.run(delivery.close())


# -- delivery over the vault's outbound client, against a scripted TLS server ------------

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class _Endpoint(_Recorded):
    """A store holding one endpoint (at ``url``) and one event, keeping what is recorded."""

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url

    async def get_webhook_endpoint(
        self, account_id: str, livemode: bool, endpoint_id: str
    ) -> WebhookEndpointRecord:
        now = int(time.time())
        return WebhookEndpointRecord(
            endpoint_id, account_id, livemode, now, self.url, ["*"], "dk_1", b"sealed"
        )

    async def get_event(self, account_id: str, livemode: bool, event_id: str) -> EventRecord:
        now = int(time.time())
        return EventRecord(
            event_id, account_id, livemode, now, "payment_method.created", "pm_1", "dk_1", b""
        )


class _Events:
    """Renders an event as the API would, without opening anything."""

    async def render(self, record: EventRecord) -> dict[str, Any]:
        return {
            "id": record.id,
            "object": "event",
            "type": record.type,
            "created": record.created,
            "livemode": record.livemode,
            "data": {"object": {"id": record.object_id, "object": "payment_method"}},
        }


def _server_context(pki: Pki) -> ssl.SSLContext:
    cert, key = pki.cert("vault")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    return context


def _deliver(
    pki: Pki,
    script: Script,
    *,
    attempts: int = 1,
    allowed_hosts: Collection[str] = ("localhost",),
    timeout: float = 5.0,
    ca_file: Path | None = None,
) -> tuple[Server, list[DeliveryRecord]]:
    """``attempts`` deliveries of the event to the scripted server, one after another,
    on one :class:`WebhookDelivery`; what the server saw and the outcomes stored."""

    async def main() -> tuple[Server, list[DeliveryRecord]]:
        seen, server = await serve(_server_context(pki), script)
        store = _Endpoint(f"https://localhost:{seen.port}/hooks/in")
        delivery = WebhookDelivery(
            store,  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            _Events(),  # type: ignore[arg-type]
            allowed_hosts=allowed_hosts,
            timeout=timeout,
            ssl_context=ssl.create_default_context(cafile=str(ca_file or pki.ca_file)),
        )
        for n in range(attempts):
            record = DeliveryRecord(
                f"whdel_{n}", "acct_1", False, "we_1", "evt_1", created=int(time.time())
            )
            await delivery._attempt(record)
        await delivery.close()
        server.close()
        return seen, store.stored

    return asyncio.run(main())


@pytest.fixture
def opened_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    async def open_secret(*_: Any) -> str:
        return SECRET

    monkeypatch.setattr(delivery_module, "open_secret", open_secret)


def _outcome(record: DeliveryRecord) -> tuple[str, int | None, str | None]:
    return record.state, record.last_status, record.last_error


@pytest.mark.usefixtures("opened_secret")
def test_delivery_posts_the_signed_event_and_reuses_the_connection(pki: Pki) -> None:
    seen, stored = _deliver(pki, answering(OK), attempts=3)
    assert [_outcome(r) for r in stored] == [("succeeded", 200, None)] * 3
    assert (seen.connections, len(seen.heads)) == (1, 3)
    head = seen.heads[0].decode()
    assert head.startswith("POST /hooks/in HTTP/1.1\r\n")
    assert f"\r\nHost: localhost:{seen.port}\r\n" in head
    signature = next(
        line.split(": ", 1)[1] for line in head.split("\r\n") if line.startswith("Stripe-Signature")
    )
    event = stripe.Webhook.construct_event(seen.requests[0][1].decode(), signature, SECRET)
    assert event.id == "evt_1"


@pytest.mark.usefixtures("opened_secret")
def test_delivery_refuses_a_private_address_at_connect_time_without_connecting(
    pki: Pki,
) -> None:
    # localhost resolves to loopback: without the host allowed, no connection is made.
    seen, stored = _deliver(pki, answering(OK), allowed_hosts=())
    assert [_outcome(r) for r in stored] == [("pending", None, "address_refused")]
    assert seen.connections == 0


@pytest.mark.usefixtures("opened_secret")
def test_delivery_does_not_follow_a_redirect(pki: Pki) -> None:
    redirect = b"HTTP/1.1 307 Temporary Redirect\r\nLocation: https://localhost:1/x\r\n"
    seen, stored = _deliver(pki, answering(redirect + b"Content-Length: 0\r\n\r\n"))
    assert [_outcome(r) for r in stored] == [("pending", 307, "http_status")]
    assert len(seen.heads) == 1


@pytest.mark.parametrize(
    ("text", "outcome"),
    [
        # Announced over the limit: the status counts, the body is never read.
        (b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 10, "succeeded"),
        (b"HTTP/1.1 500 Oops\r\nConnection: close\r\n\r\n" + b"x" * 70_000, "pending"),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(b"1000\r\n" + b"x" * 4096 + b"\r\n" for _ in range(20)),
            "succeeded",
        ),
    ],
    ids=["content-length", "until-close", "chunked"],
)
@pytest.mark.usefixtures("opened_secret")
def test_delivery_stops_reading_an_answer_over_the_limit_and_counts_its_status(
    pki: Pki, text: bytes, outcome: str
) -> None:
    seen, stored = _deliver(pki, answering(text), attempts=2)
    status = int(text.split(b" ")[1])
    error = None if status == 200 else "http_status"
    assert [_outcome(r) for r in stored] == [(outcome, status, error)] * 2
    # The connection was closed after the answer over the limit: not reused.
    assert seen.connections == 2


@pytest.mark.usefixtures("opened_secret")
def test_delivery_with_a_head_over_the_limit_is_a_protocol_error(pki: Pki) -> None:
    _, stored = _deliver(pki, answering(b"HTTP/1.1 200 OK\r\nX-Big: " + b"x" * 200_000))
    assert [_outcome(r) for r in stored] == [("pending", None, "protocol_error")]


@pytest.mark.usefixtures("opened_secret")
def test_delivery_that_gets_no_answer_in_time_is_a_timeout_and_not_resent(pki: Pki) -> None:
    async def hang(_head: bytes, _body: bytes, _writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    seen, stored = _deliver(pki, hang, timeout=0.3)
    assert [_outcome(r) for r in stored] == [("pending", None, "timeout")]
    assert len(seen.heads) == 1


@pytest.mark.usefixtures("opened_secret")
def test_delivery_maps_a_broken_answer_and_an_unverified_server(pki: Pki) -> None:
    _, stored = _deliver(pki, answering(b"SSH-2.0-OpenSSH\r\n\r\n"))
    assert [_outcome(r) for r in stored] == [("pending", None, "protocol_error")]

    async def close(_head: bytes, _body: bytes, writer: asyncio.StreamWriter) -> None:
        writer.transport.abort()

    _, stored = _deliver(pki, close)
    assert [_outcome(r) for r in stored] == [("pending", None, "protocol_error")]
    # A certificate of another CA than the delivery trusts: nothing is written.
    seen, stored = _deliver(pki, answering(OK), ca_file=pki.rogue.cert_path)
    assert [_outcome(r) for r in stored] == [("pending", None, "connection_failed")]
    assert seen.heads == []


@pytest.mark.parametrize("path", ["/in put", "/in\r\nX-Injected: 1", "/in\x00"])
def test_request_head_refuses_a_target_that_cannot_be_written(path: str) -> None:
    with pytest.raises(ValueError, match="target"):
        request_head("POST", path, "localhost", [], 0)
