"""Idempotency-Key semantics, driven through the real ASGI app in-process."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from cardvault.audit.recorder import Recorder
from cardvault.storage import SQLiteVaultStore
from cardvault.transport.asgi import build_app
from cardvault.vault.accounts import Accounts
from cardvault.vault.datakeys import DataKeyManager
from cardvault.vault.http import PublicAPI, routes
from cardvault.vault.idempotency import Idempotency
from cardvault.vault.payment_methods import PaymentMethods
from cardvault.vault.ratelimit import KeyLimits, RateLimiter

from .test_datakeys import FakeKeyService

FORM = {
    "type": "card",
    "card[number]": "4242424242424242",
    "card[exp_month]": "12",
    "card[exp_year]": "2034",
}


async def make(tmp_path: Path) -> tuple[PaymentMethods, str, httpx.AsyncClient]:
    store = SQLiteVaultStore(tmp_path / "v.db")
    await store.migrate()
    keys = DataKeyManager(store, FakeKeyService())  # type: ignore[arg-type]
    # One recorder for the accounts and the payment methods, as the vault has: a test
    # that gives it a log sees every record.
    audit = Recorder(None)
    accounts = Accounts(store, audit=audit)
    service = PaymentMethods(store, keys, audit=audit)
    account = await accounts.create_account("t")
    _, secret = await accounts.create_api_key(account.id, "secret", "test")
    limits = RateLimiter(1e6, 1e6)
    api = PublicAPI(
        accounts=accounts,
        payment_methods=service,
        idempotency=Idempotency(store, keys),
        payment_method_limits=KeyLimits(secret=limits, publishable=limits),
    )
    app = build_app(routes(api).with_api_key, service="test", security_txt=None)
    client = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="https://vault.test"
    )
    return service, secret, client


def test_a_concurrent_duplicate_in_flight_gets_409(tmp_path: Path) -> None:
    async def main() -> tuple[int, int, int, Any, Any]:
        service, secret, client = await make(tmp_path)
        release = asyncio.Event()
        real = service.create_payment_method

        async def slow(caller: Any, params: Any, claim: Any = None) -> Any:
            await release.wait()
            return await real(caller, params, claim)

        service.create_payment_method = slow  # type: ignore[method-assign]
        headers = {"authorization": f"Bearer {secret}", "idempotency-key": "k1"}
        first = asyncio.create_task(client.post("/v1/payment_methods", data=FORM, headers=headers))
        await asyncio.sleep(0.1)
        second = await client.post("/v1/payment_methods", data=FORM, headers=headers)
        release.set()
        done = await first
        third = await client.post("/v1/payment_methods", data=FORM, headers=headers)
        await client.aclose()
        await service.store.close()
        return (
            second.status_code,
            done.status_code,
            third.status_code,
            done.json(),
            (second.json(), third.json(), third.headers),
        )

    second, first, third, first_body, (second_body, third_body, third_headers) = asyncio.run(main())
    assert second == 409
    assert second_body["error"]["type"] == "idempotency_error"
    assert second_body["error"]["code"] == "idempotency_key_in_use"
    assert first == third == 200
    assert third_body["id"] == first_body["id"]
    assert third_headers["idempotent-replayed"] == "true"


def test_a_failed_request_does_not_burn_the_key(tmp_path: Path) -> None:
    async def main() -> tuple[int, int]:
        service, secret, client = await make(tmp_path)
        headers = {"authorization": f"Bearer {secret}", "idempotency-key": "k2"}
        bad = await client.post(
            "/v1/payment_methods", data={**FORM, "card[exp_month]": "13"}, headers=headers
        )
        good = await client.post(
            "/v1/payment_methods", data={**FORM, "card[exp_month]": "13"}, headers=headers
        )
        await client.aclose()
        await service.store.close()
        return bad.status_code, good.status_code

    # Stripe saves no result for a request that failed validation; the retry runs again.
    assert asyncio.run(main()) == (402, 402)


def test_the_stored_result_holds_no_card_data(tmp_path: Path) -> None:
    async def main() -> list[Any]:
        service, secret, client = await make(tmp_path)
        headers = {"authorization": f"Bearer {secret}", "idempotency-key": "k3"}
        await client.post(
            "/v1/payment_methods",
            data={**FORM, "billing_details[name]": "Jenny Rosen"},
            headers=headers,
        )
        rows = await asyncio.to_thread(_rows, tmp_path / "v.db")
        await client.aclose()
        await service.store.close()
        return rows

    rows = asyncio.run(main())
    assert len(rows) == 1
    text = repr(rows)
    assert "4242424242424242" not in text
    assert "Jenny" not in text
    assert "pm_" in text


def _rows(path: Path) -> list[Any]:
    import sqlite3

    with sqlite3.connect(path) as db:
        return db.execute("SELECT * FROM idempotency_keys").fetchall()


def test_expired_cvcs_are_destroyed_by_the_sweeper(tmp_path: Path) -> None:
    async def main() -> tuple[list[Any], int, list[Any]]:
        service, secret, client = await make(tmp_path)
        service.cvc_ttl = 0
        headers = {"authorization": f"Bearer {secret}"}
        r = await client.post(
            "/v1/payment_methods", data={**FORM, "card[cvc]": "123"}, headers=headers
        )
        assert r.status_code == 200
        before = await asyncio.to_thread(_cvcs, tmp_path / "v.db")
        destroyed = await service.sweep_expired_cvcs()
        after = await asyncio.to_thread(_cvcs, tmp_path / "v.db")
        await client.aclose()
        await service.store.close()
        return before, destroyed, after

    before, destroyed, after = asyncio.run(main())
    assert before[0][0] is not None  # the sealed CVC was there
    assert destroyed == 1
    assert after == [(None, None, None)]


def _cvcs(path: Path) -> list[Any]:
    import sqlite3

    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT cvc_ct, cvc_data_key_id, cvc_expires FROM payment_methods"
        ).fetchall()


def test_the_header_is_stored_as_a_mac_never_as_sent(tmp_path: Path) -> None:
    # Before: "Idempotency-Key: 5200828282828210" put the card number in vault.db in the
    # clear for a day.
    sent = ["5200828282828210", "5200 8282 8282 8210", "order-17"]

    async def main() -> tuple[list[int], list[int], list[str]]:
        service, secret, client = await make(tmp_path)
        first, again = [], []
        for key in sent:
            headers = {"authorization": f"Bearer {secret}", "idempotency-key": key}
            first.append(await client.post("/v1/payment_methods", data=FORM, headers=headers))
            again.append(await client.post("/v1/payment_methods", data=FORM, headers=headers))
        await client.aclose()
        await service.store.close()
        import sqlite3

        with sqlite3.connect(tmp_path / "v.db") as db:
            stored = [k for (k,) in db.execute("SELECT idempotency_key FROM idempotency_keys")]
        assert [r.json()["id"] for r in first] == [r.json()["id"] for r in again]
        return [r.status_code for r in first], [r.status_code for r in again], stored

    first, again, stored = asyncio.run(main())
    assert first == again == [200, 200, 200]
    assert len(set(stored)) == 3
    assert all(k.startswith("ik_") and len(k) == 19 for k in stored), stored
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("v.db*"))
    for key in sent:
        assert key.encode() not in raw
