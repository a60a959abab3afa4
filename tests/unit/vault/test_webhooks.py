"""Webhooks without processes: the signature, where a URL may point, the retry schedule."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
import stripe

from cardvault.errors import InvalidRequestError
from cardvault.storage.base import DeliveryRecord
from cardvault.vault.accounts import Caller
from cardvault.vault.webhooks import WebhookEndpoints, sign
from cardvault.vault.webhooks.delivery import WebhookDelivery
from cardvault.vault.webhooks.endpoints import AddressRefused, resolve_public

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
