"""The key service's HTTP API in process: what a caller chooses (the path, a key name, a
context, the body's shape) never turns a refusal into a 500 or keeps it out of the
audit log. The certificate identity is put into the ASGI scope as the TLS layer does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from cardvault.audit import AuditLog, verify_log
from cardvault.audit.recorder import Recorder
from cardvault.cards import holds_card_number
from cardvault.keyservice.http import MAX_CONTEXT, routes
from cardvault.keyservice.service import KeyService, initialize
from cardvault.storage import SQLiteKeyStore
from cardvault.transport.asgi import build_app
from cardvault.transport.certs import IDENTITY_PREFIX
from cardvault.transport.identity import identity_from_peercert

#: Published test numbers (Stripe's documentation).
PUBLISHED = ["36227206271667", "4242424242424242", "5555555555554444", "378282246310005"]
IDENTITY_HEADER = "x-test-identity"


def with_identity(app: Any) -> Any:
    """The app behind a stand-in for the TLS layer: the identity named in a test header
    becomes the connection's verified identity (no header: no client certificate)."""

    async def wrapped(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            name = headers.get(IDENTITY_HEADER.encode())
            peercert = (
                {"subjectAltName": (("URI", IDENTITY_PREFIX + name.decode()),)} if name else None
            )
            identity = identity_from_peercert(peercert)
            scope = {**scope, "extensions": {"tls": {"client_identity": identity}}}
        await app(scope, receive, send)

    return wrapped


Scenario = Callable[[httpx.AsyncClient], Awaitable[Any]]


def run(tmp_path: Path, scenario: Scenario) -> tuple[Any, list[dict[str, Any]], str]:
    """Run ``scenario`` against an unsealed key service with an audit log; returns its
    result, the log's records and the log's text (after the log is closed and verified)."""

    async def main() -> Any:
        store = SQLiteKeyStore(tmp_path / "keyd.db")
        shares = await initialize(store, shares=3, threshold=2)
        texts = [share.to_text() for share in shares]
        log = await AuditLog.open(tmp_path / "audit")
        service = KeyService(store, audit=Recorder(log))
        await service.start()
        for text in texts[:2]:
            await service.submit_share(text, actor="admin")
        assert not service.sealed
        app = build_app(
            routes(service, vault=["vault"], admin=["admin"]), service="test", security_txt=None
        )
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=with_identity(app)), base_url="https://keyd.test"
        )
        try:
            return await scenario(client)
        finally:
            await client.aclose()
            await log.close()
            await store.close()

    result = asyncio.run(main())
    path = tmp_path / "audit" / "audit.jsonl"
    verdict = verify_log(path, tmp_path / "audit" / "audit.pub")
    assert verdict.ok, str(verdict.problem)
    text = path.read_text()
    return result, [json.loads(line) for line in text.splitlines()], text


def as_(identity: str | None) -> dict[str, str]:
    return {IDENTITY_HEADER: identity} if identity else {}


def assert_no_card_number(text: str) -> None:
    """No text field of any record holds a card number (``prev`` and ``hash`` are hex
    digests, whose digit runs are not card data), and no published number is anywhere."""
    for line in text.splitlines():
        record = json.loads(line)
        if record["action"] == "audit.checkpoint":
            continue  # the log's own: a digest and a signature
        fields = [record[k] for k in ("actor", "origin", "object", "request_id")]
        fields += [str(v) for v in record["detail"].values()]
        assert not any(holds_card_number(f) for f in fields if f is not None), line
    for number in PUBLISHED:
        assert number not in text


# --- a refused request is always answered 401/403 and recorded ------------------------

REFUSED_PATHS = [
    "/v1/keys/36227206271667/datakey",
    "/v1/keys/4242%204242%204242%204242/unwrap",
    "/v1/keys/5555-5555-5555-4444/derive",
    "/v1/keys/acct_378282246310005/rotate",
    "/v1/keys/a%00b%0Ac/config",
    "/v1/keys/sk_live_abcdefghijklmnop/rewrap",
    "/v1/keys/cvshare1-0a1b-3-1-abcd-ef/datakey",
    "/v1/keys/" + "ab" * 32 + "/datakey",
    "/v1/keys/" + "x" * 3000 + "/datakey",
]


@pytest.mark.parametrize("path", REFUSED_PATHS)
@pytest.mark.parametrize("identity", ["shop", None])
def test_a_refused_request_is_answered_and_recorded_whatever_its_path(
    tmp_path: Path, path: str, identity: str | None
) -> None:
    async def scenario(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(path, headers=as_(identity), json={})

    response, records, text = run(tmp_path, scenario)
    assert response.status_code == (403 if identity else 401)
    refused = [r for r in records if r["action"] == "keyservice.auth.failed"]
    assert len(refused) == 1
    assert refused[0]["actor"] == (identity or "anonymous")
    assert refused[0]["result"] == "refused"
    assert refused[0]["object"].startswith("/v1/keys/")
    assert_no_card_number(text)
    assert "sk_live_" not in text and "cvshare1-" not in text


def test_the_refused_path_is_recorded_with_the_number_replaced(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post("/v1/keys/36227206271667/datakey", headers=as_("shop"))

    response, records, _text = run(tmp_path, scenario)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "identity_not_allowed"
    (refused,) = [r for r in records if r["action"] == "keyservice.auth.failed"]
    assert refused["object"] == "/v1/keys/[card number]/datakey"


# --- key names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v1/keys/36227206271667/datakey", 400, "parameter_invalid"),
        ("/v1/keys/PAN/datakey", 400, "parameter_invalid"),
        ("/v1/keys/pan%20x/unwrap", 400, "parameter_invalid"),
        ("/v1/keys/" + "p" * 65 + "/datakey", 400, "parameter_invalid"),
        ("/v1/keys/fingerprint/datakey", 404, "resource_missing"),
        ("/v1/keys/nosuchkey/datakey", 404, "resource_missing"),
        ("/v1/keys/pan/derive", 404, "resource_missing"),
    ],
)
def test_key_names_are_checked_after_the_identity(
    tmp_path: Path, path: str, status: int, code: str
) -> None:
    async def scenario(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        body = {"context": "acct_1"} if path.endswith("derive") else {}
        body = {"ciphertext": "AAAA"} if path.endswith("unwrap") else body
        vault = await client.post(path, headers=as_("vault"), json=body)
        # Authorization first: another identity never learns whether the name is valid.
        shop = await client.post(path, headers=as_("shop"), json=body)
        return vault, shop

    (vault, shop), records, text = run(tmp_path, scenario)
    assert (vault.status_code, vault.json()["error"]["code"]) == (status, code)
    if status == 400:
        assert vault.json()["error"]["param"] == "name"
    name = path.split("/")[3]
    assert name not in vault.text
    assert shop.status_code == 403
    # Neither answer issued, unwrapped or derived anything under that name.
    assert {r["action"] for r in records} & {
        "keyservice.datakey.issued",
        "keyservice.datakey.unwrapped",
        "keyservice.key.derived",
    } == set()
    assert_no_card_number(text)


def test_admin_endpoints_check_names_too(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient) -> list[int]:
        out = []
        for endpoint, body in (
            ("rotate", {}),
            ("rewrap", {"ciphertext": "AAAA"}),
            ("config", {"min_decryption_version": 1}),
        ):
            r = await client.post(
                f"/v1/keys/36227206271667/{endpoint}", headers=as_("admin"), json=body
            )
            out.append(r.status_code)
            assert "36227206271667" not in r.text
        return out

    statuses, _records, text = run(tmp_path, scenario)
    assert statuses == [400, 400, 400]
    assert_no_card_number(text)


# --- derive -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "context",
    ["36227206271667", "acct_4242424242424242", "5555 5555 5555 4444", "378282246310005"],
)
def test_a_context_holding_a_card_number_is_refused_and_recorded(
    tmp_path: Path, context: str
) -> None:
    async def scenario(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(
            "/v1/keys/fingerprint/derive", headers=as_("vault"), json={"context": context}
        )

    response, records, text = run(tmp_path, scenario)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("parameter_invalid", "context")
    assert context not in response.text
    (refused,) = [r for r in records if r["action"] == "keyservice.key.derived"]
    assert refused["result"] == "refused"
    assert refused["detail"]["reason"] == "card_number_in_context"
    assert "[card number]" in refused["detail"]["context"]
    assert_no_card_number(text)


def test_contexts_are_bounded(tmp_path: Path) -> None:
    async def scenario(client: httpx.AsyncClient) -> tuple[httpx.Response, httpx.Response]:
        ok = await client.post(
            "/v1/keys/fingerprint/derive",
            headers=as_("vault"),
            json={"context": "a" * MAX_CONTEXT},
        )
        long = await client.post(
            "/v1/keys/fingerprint/derive",
            headers=as_("vault"),
            json={"context": "a" * (MAX_CONTEXT + 1)},
        )
        return ok, long

    (ok, long), _records, _text = run(tmp_path, scenario)
    assert ok.status_code == 200
    assert long.status_code == 400
    assert long.json()["error"]["param"] == "context"


def test_legitimate_contexts_derive_and_are_recorded_as_sent(tmp_path: Path) -> None:
    # An account id (what the vault sends), and contexts the record could not hold as
    # they are (a 64-hex-digit run, a secret's prefix): those were a 500 before.
    contexts = ["acct_1NxYz2AbCdEf0123", "ab" * 32, "sk_test_x"]

    async def scenario(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await client.post(
                "/v1/keys/fingerprint/derive", headers=as_("vault"), json={"context": c}
            )
            for c in contexts
        ]

    responses, records, _text = run(tmp_path, scenario)
    assert [r.status_code for r in responses] == [200, 200, 200]
    derived = [r for r in records if r["action"] == "keyservice.key.derived"]
    assert [r["detail"]["context"] for r in derived] == [
        "acct_1NxYz2AbCdEf0123",
        "[key material]",
        "[secret]",
    ]


# --- bodies -----------------------------------------------------------------------------

DEEP_BODIES = {
    "brackets": b"[" * 15_000,
    "closed": b"[" * 5_000 + b"]" * 5_000,
    "in-value": b'{"ciphertext":' + b"[" * 15_000,
    "objects": b'{"a":' * 2_500 + b"1" + b"}" * 2_500,
    "utf-16": ("[" * 5_000).encode("utf-16-le"),
}


@pytest.mark.parametrize("body", DEEP_BODIES.values(), ids=DEEP_BODIES.keys())
def test_a_deeply_nested_body_is_a_400(tmp_path: Path, body: bytes) -> None:
    async def scenario(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(
            "/v1/keys/pan/unwrap",
            headers={**as_("vault"), "content-type": "application/json"},
            content=body,
        )

    response, _records, _text = run(tmp_path, scenario)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
