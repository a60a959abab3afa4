"""The SDK's resource helpers against a real TLS listener on loopback.

The listener is a small stand-in for the vault's API (uvicorn, a context from
``server_context``, nothing about TLS or HTTP mocked) that keeps payment methods in
memory and records every request exactly as it arrived: method, path, query, headers
and body. The tests look at what was sent, and at what the helpers make of the answers.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cardvault.client import Client
from cardvault.errors import InvalidRequestError, ResourceMissing
from cardvault.transport.asgi import build_app, error_response, json_response
from cardvault.transport.server import Listener
from cardvault.transport.tls import server_context
from helpers import Pki, ThreadedServers, free_port

VISA = "4242424242424242"  # a published test card
SRI = "sha384-" + "A" * 64


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeVault:
    url: str = ""
    seen: list[Seen] = field(default_factory=list)
    methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    sri: str = SRI
    lock: threading.Lock = field(default_factory=threading.Lock)

    def last(self) -> Seen:
        return self.seen[-1]


def fake_vault_app(vault: FakeVault) -> Any:
    async def record(request: Request) -> Any:
        raw = await request.body()
        body = json.loads(raw) if raw else None
        with vault.lock:
            vault.seen.append(
                Seen(
                    request.method,
                    request.url.path,
                    request.url.query,
                    {k.lower(): v for k, v in request.headers.items()},
                    body,
                )
            )
        return body

    async def payment_methods(request: Request) -> Response:
        body = await record(request)
        if request.method == "POST":
            with vault.lock:
                pm_id = f"pm_{len(vault.methods) + 1:04d}"
                pm = {
                    "id": pm_id,
                    "object": "payment_method",
                    "type": body["type"],
                    "card": {"brand": "visa", "last4": body["card"]["number"][-4:]},
                    "billing_details": body.get("billing_details", {}),
                    "metadata": body.get("metadata", {}),
                }
                vault.methods[pm_id] = pm
            return json_response(pm)
        # Newest first, as the vault lists them.
        ids = sorted(vault.methods, reverse=True)
        limit = int(request.query_params.get("limit", "10"))
        after = request.query_params.get("starting_after")
        if after:
            ids = ids[ids.index(after) + 1 :]
        page = ids[:limit]
        return json_response(
            {
                "object": "list",
                "url": "/v1/payment_methods",
                "has_more": len(ids) > limit,
                "data": [vault.methods[i] for i in page],
            }
        )

    async def payment_method(request: Request) -> Response:
        await record(request)
        pm_id = request.path_params["pm"]
        pm = vault.methods.get(pm_id)
        if pm is None:
            return error_response(ResourceMissing(f"No such payment method: '{pm_id}'"))
        if request.method == "DELETE":
            del vault.methods[pm_id]
            return json_response({"id": pm_id, "object": "payment_method", "deleted": True})
        return json_response(pm)

    async def forwarding(request: Request) -> Response:
        body = await record(request)
        if request.method == "POST":
            if body.get("payment_method") not in vault.methods:
                return error_response(InvalidRequestError("No such payment method."))
            return json_response(
                {
                    "id": "fwdreq_0001",
                    "object": "forwarding.request",
                    "payment_method": body["payment_method"],
                    "replacements": body["replacements"],
                    "response_details": {"status": 200, "body": '{"status": "approved"}'},
                }
            )
        return json_response({"object": "list", "has_more": False, "data": []})

    async def forwarding_one(request: Request) -> Response:
        await record(request)
        return json_response({"id": request.path_params["id"], "object": "forwarding.request"})

    async def sri(request: Request) -> Response:
        await record(request)
        return Response(vault.sri, media_type="text/plain")

    routes = [
        Route("/v1/payment_methods", payment_methods, methods=["GET", "POST"]),
        Route("/v1/payment_methods/{pm}", payment_method, methods=["GET", "DELETE"]),
        Route("/v1/forwarding/requests", forwarding, methods=["GET", "POST"]),
        Route("/v1/forwarding/requests/{id}", forwarding_one, methods=["GET"]),
        Route("/js/v1/cardvault.js.sri", sri, methods=["GET"]),
    ]
    return build_app(routes, service="fake-vault", security_txt=None)


@pytest.fixture(scope="module")
def fake(pki: Pki) -> Iterator[FakeVault]:
    vault = FakeVault()
    port = free_port()
    vault.url = f"https://localhost:{port}"
    ctx = server_context(*pki.cert("vault"))
    with ThreadedServers([Listener("fake-vault", fake_vault_app(vault), "127.0.0.1", port, ctx)]):
        yield vault


@pytest.fixture
def client(pki: Pki, fake: FakeVault) -> Iterator[Client]:
    fake.methods.clear()
    with Client("sk_test_resources", base_url=fake.url, ca_bundle=pki.ca_file, backoff=0) as c:
        yield c


def make_pm(client: Client, **extra: Any) -> dict[str, Any]:
    return client.payment_methods.create(
        card={"number": VISA, "exp_month": 12, "exp_year": 2031, "cvc": "123"}, **extra
    )


# --- payment methods ---------------------------------------------------------------------


def test_payment_methods_create_sends_the_card_as_json_with_the_key_and_an_idempotency_key(
    client: Client, fake: FakeVault
) -> None:
    pm = make_pm(client, billing_details={"name": "Jenny Rosen"}, metadata={"order": "6735"})
    assert pm["card"]["last4"] == "4242"
    sent = fake.last()
    assert (sent.method, sent.path) == ("POST", "/v1/payment_methods")
    assert sent.headers["content-type"] == "application/json"
    assert sent.headers["authorization"] == "Bearer sk_test_resources"
    assert sent.headers["idempotency-key"]
    # Numbers stay numbers in JSON; the card goes exactly as given.
    assert sent.body == {
        "type": "card",
        "card": {"number": VISA, "exp_month": 12, "exp_year": 2031, "cvc": "123"},
        "billing_details": {"name": "Jenny Rosen"},
        "metadata": {"order": "6735"},
    }


def test_payment_methods_create_sends_the_idempotency_key_it_is_given(
    client: Client, fake: FakeVault
) -> None:
    make_pm(client, idempotency_key="order-42")
    assert fake.last().headers["idempotency-key"] == "order-42"
    make_pm(client)
    assert fake.last().headers["idempotency-key"] != "order-42"


def test_payment_methods_retrieve_and_delete_use_the_id_in_the_path(
    client: Client, fake: FakeVault
) -> None:
    pm = make_pm(client)
    assert client.payment_methods.retrieve(pm["id"]) == pm
    assert (fake.last().method, fake.last().path) == ("GET", f"/v1/payment_methods/{pm['id']}")
    deleted = client.payment_methods.delete(pm["id"])
    assert deleted == {"id": pm["id"], "object": "payment_method", "deleted": True}
    assert (fake.last().method, fake.last().path) == ("DELETE", f"/v1/payment_methods/{pm['id']}")
    with pytest.raises(ResourceMissing):
        client.payment_methods.retrieve(pm["id"])


@pytest.mark.parametrize(
    "bad_id",
    [
        "../forwarding/requests",
        "pm_1/../../v1/forwarding/requests",
        "pm_1?limit=100",
        "pm_1#x",
        "https://evil.example/pm_1",
        "pm 1",
        "",
        VISA + "/x",
    ],
)
def test_ids_that_would_change_the_path_are_refused_before_anything_is_sent(
    client: Client, fake: FakeVault, bad_id: str
) -> None:
    before = len(fake.seen)
    for call in (client.payment_methods.retrieve, client.payment_methods.delete):
        with pytest.raises(ValueError, match="letters, digits and underscores") as info:
            call(bad_id)
        # The message never repeats what the caller passed (it could be a card number).
        assert bad_id == "" or bad_id not in str(info.value)
    with pytest.raises(ValueError, match="letters, digits and underscores"):
        client.forwarding.retrieve(bad_id)
    with pytest.raises(ValueError, match="letters, digits and underscores"):
        client.payment_methods.list(starting_after=bad_id)
    assert len(fake.seen) == before


def test_payment_methods_list_sends_the_page_parameters_as_the_query(
    client: Client, fake: FakeVault
) -> None:
    ids = [make_pm(client)["id"] for _ in range(3)]
    page = client.payment_methods.list(limit=2)
    assert fake.last().query == "limit=2"
    assert [pm["id"] for pm in page["data"]] == ids[::-1][:2]
    assert page["has_more"] is True
    page = client.payment_methods.list(limit=2, starting_after=page["data"][-1]["id"])
    assert fake.last().query == f"limit=2&starting_after={ids[1]}"
    assert [pm["id"] for pm in page["data"]] == [ids[0]]
    assert page["has_more"] is False
    client.payment_methods.list()
    assert fake.last().query == ""


def test_list_all_walks_every_page(client: Client, fake: FakeVault) -> None:
    ids = [make_pm(client)["id"] for _ in range(5)]
    before = len(fake.seen)
    assert [pm["id"] for pm in client.payment_methods.list_all(page_size=2)] == ids[::-1]
    assert len(fake.seen) - before == 3  # pages of 2, 2 and 1


# --- forwarding --------------------------------------------------------------------------


def test_forwarding_create_sends_stripes_shape_as_json(client: Client, fake: FakeVault) -> None:
    pm = make_pm(client)
    request = {
        "headers": [{"name": "Content-Type", "value": "application/json"}],
        "body": '{"amount": 1000, "currency": "usd", "card": {}}',
    }
    fwd = client.forwarding.create(
        payment_method=pm["id"],
        url="https://acquirer.example/v1/authorizations",
        replacements=["card_number", "card_expiry", "card_cvc"],
        request=request,
        idempotency_key="order-7",
    )
    assert fwd["response_details"]["status"] == 200
    sent = fake.last()
    assert (sent.method, sent.path) == ("POST", "/v1/forwarding/requests")
    assert sent.headers["idempotency-key"] == "order-7"
    assert sent.body == {
        "payment_method": pm["id"],
        "url": "https://acquirer.example/v1/authorizations",
        "replacements": ["card_number", "card_expiry", "card_cvc"],
        "request": request,
    }


def test_forwarding_create_refuses_replacements_given_as_one_string(
    client: Client, fake: FakeVault
) -> None:
    before = len(fake.seen)
    with pytest.raises(TypeError, match="list of names"):
        client.forwarding.create(
            payment_method="pm_0001",
            url="https://acquirer.example/v1/authorizations",
            replacements="card_cvc",
        )
    assert len(fake.seen) == before


def test_forwarding_errors_are_typed(client: Client) -> None:
    with pytest.raises(InvalidRequestError):
        client.forwarding.create(
            payment_method="pm_nothere",
            url="https://acquirer.example/v1/authorizations",
            replacements=["card_number"],
        )


def test_forwarding_retrieve_and_list(client: Client, fake: FakeVault) -> None:
    assert client.forwarding.retrieve("fwdreq_0001")["id"] == "fwdreq_0001"
    assert fake.last().path == "/v1/forwarding/requests/fwdreq_0001"
    assert client.forwarding.list(limit=5)["object"] == "list"
    assert (fake.last().path, fake.last().query) == ("/v1/forwarding/requests", "limit=5")


# --- the card element's integrity hash ---------------------------------------------------


def test_element_integrity_returns_the_vaults_sri_hash(client: Client, fake: FakeVault) -> None:
    assert client.element_integrity() == SRI
    assert fake.last().path == "/js/v1/cardvault.js.sri"


def test_element_integrity_refuses_an_answer_that_is_not_a_sha384_hash(
    client: Client, fake: FakeVault
) -> None:
    fake.sri = "<html>not a hash</html>"
    try:
        with pytest.raises(ValueError, match="not a sha384 integrity hash"):
            client.element_integrity()
    finally:
        fake.sri = SRI
