"""Every "try again later" is a 503 with its own code and a ``Retry-After``; a 500 is a bug.

The header is each class's default (``CardVaultError.retry_after``), so no raise site can
forget it; the HTTP layer answers every error of the tree as itself, wherever it was
raised, and only what is not of the tree as a 500.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cardvault import errors
from cardvault.errors import CardVaultError
from cardvault.storage import StoreFull, StoreUnavailable
from cardvault.storage._shared import CONNECTION_LOST, DISK_FULL, REASONS, store_unavailable
from cardvault.transport.asgi import SecurityHeaders, build_app, raw_error_response

#: Every 503 of the API, and its Retry-After in seconds (docs/reliability.md says why).
RETRY_AFTER = {
    "service_unavailable": 5,
    "keyservice_unavailable": 2,
    "keyservice_sealed": 30,
    "audit_unavailable": 5,
    "database_unavailable": 2,
    "storage_full": 30,
    "too_many_connections": 1,
}


def error_classes() -> list[type[CardVaultError]]:
    return [
        obj
        for obj in vars(errors).values()
        if isinstance(obj, type) and issubclass(obj, CardVaultError)
    ]


def test_every_503_of_the_tree_is_listed_with_its_retry_after() -> None:
    found = {cls.code: cls.retry_after for cls in error_classes() if cls.http_status == 503}
    assert found == RETRY_AFTER


@pytest.mark.parametrize(
    "cls", [c for c in error_classes() if c.http_status in (429, 503)], ids=lambda c: c.code
)
def test_every_try_again_later_carries_retry_after_by_default(cls: type[CardVaultError]) -> None:
    assert cls.retry_after is not None and cls.retry_after > 0
    assert cls().headers == {"Retry-After": str(cls.retry_after)}


@pytest.mark.parametrize(
    "cls", [c for c in error_classes() if c.http_status not in (429, 503)], ids=lambda c: c.code
)
def test_nothing_else_carries_retry_after(cls: type[CardVaultError]) -> None:
    assert cls.retry_after is None
    assert "Retry-After" not in cls().headers


@pytest.mark.parametrize("name", ["Retry-After", "retry-after", "RETRY-AFTER"])
def test_a_raise_sites_own_retry_after_wins(name: str) -> None:
    assert errors.RateLimitError(headers={name: "7"}).headers == {name: "7"}
    closing = errors.TooManyConnections(headers={name: "1", "Connection": "close"})
    assert closing.headers == {name: "1", "Connection": "close"}


def test_the_storage_exception_is_the_apis_503_with_a_reason() -> None:
    lost = store_unavailable(CONNECTION_LOST, ConnectionResetError())
    assert isinstance(lost, StoreUnavailable)
    assert isinstance(lost, errors.DatabaseUnavailable)
    assert not isinstance(lost, StoreFull)
    assert (lost.http_status, lost.code, lost.reason) == (
        503,
        "database_unavailable",
        "connection_lost",
    )
    assert lost.headers == {"Retry-After": "2"}
    assert isinstance(lost.__cause__, ConnectionResetError)
    full = store_unavailable(DISK_FULL, OSError(28, "No space left on device"))
    assert isinstance(full, StoreFull)
    assert isinstance(full, StoreUnavailable)
    assert isinstance(full, errors.StorageFull)
    assert (full.http_status, full.code, full.reason) == (503, "storage_full", "disk_full")
    assert full.headers == {"Retry-After": "30"}
    # The message says nothing of the inside, and never "nothing was stored".
    for error in (lost, full):
        assert "stored" not in error.message.lower()
        assert error.to_dict()["error"]["type"] == "api_error"
    with pytest.raises(ValueError):
        StoreUnavailable("a reason nobody defined")
    assert {"connection_lost", "cannot_connect", "disk_full", "io_error", "busy"} <= REASONS


def test_the_sdk_rebuilds_the_new_codes() -> None:
    assert errors.error_class_for("database_unavailable") is errors.DatabaseUnavailable
    assert errors.error_class_for("storage_full") is errors.StorageFull


# -- the HTTP layer -------------------------------------------------------------------------


def _raising(exc: BaseException) -> Any:
    async def endpoint(_request: Request) -> Response:
        raise exc

    return endpoint


def _get(app: Any, path: str) -> httpx.Response:
    async def main() -> httpx.Response:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app, raise_app_exceptions=False),
            base_url="https://vault.test",
        ) as client:
            return await client.get(path)

    return asyncio.run(main())


APP = build_app(
    [
        Route("/lost", _raising(store_unavailable(CONNECTION_LOST, ConnectionResetError()))),
        Route("/full", _raising(store_unavailable(DISK_FULL, OSError(28, "full")))),
        Route("/sealed", _raising(errors.KeyServiceSealed())),
        Route("/keyservice", _raising(errors.KeyServiceUnavailable())),
        Route("/audit", _raising(errors.AuditUnavailableError())),
        Route("/bug", _raising(RuntimeError("a bug"))),
        Route("/driver", _raising(ConnectionResetError("a bare driver error"))),
    ],
    service="test",
    security_txt=None,
)


@pytest.mark.parametrize(
    ("path", "code", "retry_after"),
    [
        ("/lost", "database_unavailable", "2"),
        ("/full", "storage_full", "30"),
        ("/sealed", "keyservice_sealed", "30"),
        ("/keyservice", "keyservice_unavailable", "2"),
        ("/audit", "audit_unavailable", "5"),
    ],
)
def test_a_try_again_later_is_answered_503_with_its_code_and_retry_after(
    path: str, code: str, retry_after: str
) -> None:
    r = _get(APP, path)
    assert r.status_code == 503
    assert r.headers["retry-after"] == retry_after
    assert r.json()["error"]["code"] == code
    assert r.json()["error"]["type"] == "api_error"
    assert "request-id" in r.headers


@pytest.mark.parametrize("path", ["/bug", "/driver"])
def test_anything_else_is_a_500_without_retry_after(path: str) -> None:
    r = _get(APP, path)
    assert r.status_code == 500
    assert "retry-after" not in r.headers
    assert r.json()["error"]["code"] == "api_error"
    assert "bug" not in r.text and "driver" not in r.text


def test_an_error_of_the_tree_raised_outside_the_routes_is_answered_as_itself() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise store_unavailable(DISK_FULL, OSError(28, "full"))

    r = _get(SecurityHeaders(app, service="test"), "/anything")
    assert r.status_code == 503
    assert r.headers["retry-after"] == "30"
    assert r.json()["error"]["code"] == "storage_full"

    async def buggy(scope: Any, receive: Any, send: Any) -> None:
        raise KeyError("a bug")

    r = _get(SecurityHeaders(buggy, service="test"), "/anything")
    assert r.status_code == 500
    assert "retry-after" not in r.headers


def test_the_transports_own_answer_carries_retry_after() -> None:
    raw = raw_error_response(errors.TooManyConnections(), request_id="req_1")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 Service Unavailable")
    assert b"\r\nretry-after: 1\r\n" in head + b"\r\n"
    assert json.loads(body)["error"]["code"] == "too_many_connections"
