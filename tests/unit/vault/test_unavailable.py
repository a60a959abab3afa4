"""The vault's "try again later" answers, in process: its database full or gone, the key
service down, sealed, or answering its own 503s. Each is a 503 with its code and
``Retry-After``; none is a 500."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from cardvault.errors import KeyServiceSealed, KeyServiceUnavailable
from cardvault.storage import SQLiteVaultStore
from cardvault.vault.keyclient import KeyServiceClient

from .test_idempotency import FORM, make


def _cap(store: SQLiteVaultStore, pages: int | None) -> None:
    """Hold the store's database at its size (SQLite then answers SQLITE_FULL, as for a
    full disk), or let it grow again (``None``)."""
    conn = store._conn
    assert conn is not None
    if pages is None:
        conn.execute("PRAGMA max_page_count = 4294967294")
    else:
        (count,) = conn.execute("PRAGMA page_count").fetchone()
        conn.execute(f"PRAGMA max_page_count = {int(count) + pages}")


def test_a_create_on_a_full_database_is_503_storage_full_then_works(tmp_path: Path) -> None:
    async def main() -> list[httpx.Response]:
        service, secret, client = await make(tmp_path)
        auth = {"authorization": f"Bearer {secret}"}
        store = service.store
        assert isinstance(store, SQLiteVaultStore)
        answers = [await client.post("/v1/payment_methods", data=FORM, headers=auth)]
        _cap(store, 0)
        big = {**FORM, "metadata[order]": "x" * 450}
        for n in range(40):  # until the pages that were free are used up
            r = await client.post(
                "/v1/payment_methods", data={**big, "metadata[n]": str(n)}, headers=auth
            )
            if r.status_code != 200:
                break
        answers.append(r)
        _cap(store, None)
        answers.append(await client.post("/v1/payment_methods", data=FORM, headers=auth))
        await client.aclose()
        await store.close()
        return answers

    before, full, after = asyncio.run(main())
    assert before.status_code == 200
    assert full.status_code == 503, full.text
    assert full.json()["error"]["code"] == "storage_full"
    assert full.headers["retry-after"] == "30"
    assert after.status_code == 200


def test_reads_on_a_closed_database_are_503_database_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store's file cannot be opened (its directory is gone and a file stands in its
    # place): every request that needs the database is a 503, not a 500.
    from cardvault.storage.sqlite import writer

    monkeypatch.setattr(writer, "REOPEN_AFTER_S", 0.0)

    async def main() -> tuple[httpx.Response, httpx.Response]:
        service, secret, client = await make(tmp_path)
        auth = {"authorization": f"Bearer {secret}"}
        store = service.store
        assert isinstance(store, SQLiteVaultStore)
        # As if the process had just started on a state directory it cannot open.
        fresh = SQLiteVaultStore(tmp_path / "gone" / "v.db")
        (tmp_path / "gone").write_text("not a directory")
        monkeypatch.setattr(store, "_lookup", fresh._lookup)
        monkeypatch.setattr(store, "_read", fresh._read)
        monkeypatch.setattr(store, "_write", fresh._write)
        listed = await client.get("/v1/payment_methods", headers=auth)
        created = await client.post("/v1/payment_methods", data=FORM, headers=auth)
        await client.aclose()
        await fresh.close()
        await store.close()
        return listed, created

    listed, created = asyncio.run(main())
    for r in (listed, created):
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "database_unavailable"
        assert r.headers["retry-after"] == "2"


# -- the key service's answers, as the vault's client reads them ----------------------------


def _client(handler: Any) -> KeyServiceClient:
    client = KeyServiceClient.__new__(KeyServiceClient)
    client._http = httpx.AsyncClient(
        transport=httpx.MockTransport(handler), base_url="https://keyd.test"
    )
    client.calls = 0
    return client


def _answer(status: int, code: str | None) -> Any:
    def handler(_request: httpx.Request) -> httpx.Response:
        if code is None:
            return httpx.Response(status, text="")
        body = {"error": {"type": "api_error", "code": code, "message": "x"}}
        return httpx.Response(status, json=body, headers={"retry-after": "9"})

    return handler


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (503, "keyservice_sealed", KeyServiceSealed),
        # The key service's own "try again later" that is not the seal: its database,
        # its audit log, its connection cap. Never reported as sealed.
        (503, "database_unavailable", KeyServiceUnavailable),
        (503, "storage_full", KeyServiceUnavailable),
        (503, "audit_unavailable", KeyServiceUnavailable),
        (503, "too_many_connections", KeyServiceUnavailable),
        (503, None, KeyServiceUnavailable),
        (500, "api_error", KeyServiceUnavailable),
        (403, "identity_not_allowed", KeyServiceUnavailable),
    ],
)
def test_the_key_services_refusals_become_the_vaults_503s(
    status: int, code: str | None, expected: type[Exception]
) -> None:
    async def main() -> BaseException:
        client = _client(_answer(status, code))
        try:
            await client.datakey("pan")
        except Exception as exc:
            return exc
        finally:
            await client.close()
        raise AssertionError("no error")

    error = asyncio.run(main())
    assert type(error) is expected
    assert error.http_status == 503  # type: ignore[attr-defined]
    assert error.headers["Retry-After"] == str(expected.retry_after)  # type: ignore[attr-defined]


def test_a_key_service_that_cannot_be_reached_is_keyservice_unavailable() -> None:
    def refused(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    async def main() -> BaseException:
        client = _client(refused)
        try:
            await client.unwrap("pan", b"\x00" * 40)
        except Exception as exc:
            return exc
        finally:
            await client.close()
        raise AssertionError("no error")

    error = asyncio.run(main())
    assert isinstance(error, KeyServiceUnavailable)
    assert error.headers == {"Retry-After": "2"}
