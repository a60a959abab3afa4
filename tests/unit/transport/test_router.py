"""The application's routing answers every request as Starlette's own router does."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router

from cardvault.errors import InvalidRequestError
from cardvault.transport.asgi import Application


def _endpoint(name: str) -> Any:
    async def endpoint(request: Request) -> Response:
        return PlainTextResponse(f"{name} {sorted(request.path_params.items())}")

    return endpoint


def _routes() -> list[BaseRoute]:
    # Overlaps on purpose: a static path that a parameter route also matches, one path
    # named twice with other methods, and a mount that takes a whole prefix.
    return [
        Route("/healthz", _endpoint("healthz"), methods=["GET"]),
        Route("/v1/things/{id}", _endpoint("thing"), methods=["GET"]),
        Route("/v1/things/special", _endpoint("special"), methods=["GET", "POST"]),
        Route("/v1/things", _endpoint("things-get"), methods=["GET"]),
        Route("/v1/things", _endpoint("things-post"), methods=["POST"]),
        Mount("/static", routes=[Route("/a", _endpoint("static-a"))]),
        Route("/static/b", _endpoint("static-b"), methods=["GET"]),
        Route("/v1/noop", _endpoint("noop"), methods=["GET", "POST"]),
    ]


def _scope(method: str, path: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [],
    }


async def _call(app: Any, method: str, path: str) -> tuple[int, bytes, str | None]:
    """Status, body of a 200 and Allow of the answer (Starlette's router raises its
    404 and 405, which the application answers as errors)."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = _scope(method, path)
    if isinstance(app, Router):
        scope["app"] = app  # as inside a Starlette application: errors are raised
    try:
        await app(scope, receive, send)
    except HTTPException as exc:
        allow = (exc.headers or {}).get("Allow")
        return exc.status_code, b"", ", ".join(sorted(allow.split(", "))) if allow else None
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    allow = next((v.decode() for k, v in sent[0].get("headers", []) if k == b"allow"), None)
    return (
        status,
        body if status == 200 else b"",
        (", ".join(sorted(allow.split(", "))) if allow else None),
    )


def test_every_method_and_path_gets_the_answer_starlettes_router_gives() -> None:
    paths = [
        "/healthz",
        "/v1/things",
        "/v1/things/special",
        "/v1/things/42",
        "/v1/noop",
        "/static/a",
        "/static/b",
        "/nowhere",
        "/v1/things/",
    ]
    methods = ["GET", "POST", "HEAD", "DELETE", "PUT"]

    async def run() -> None:
        plain = Router(_routes(), redirect_slashes=False)
        app = Application(_routes())
        for method, path in itertools.product(methods, paths):
            expected = await _call(plain, method, path)
            assert await _call(app, method, path) == expected, (method, path)

    asyncio.run(run())


def test_a_static_path_also_matched_by_a_parameter_route_keeps_the_first_route() -> None:
    async def run() -> None:
        app = Application(_routes())
        # "/v1/things/{id}" comes first and matches "special" for GET, as in Starlette.
        assert (await _call(app, "GET", "/v1/things/special"))[1].startswith(b"thing ")
        assert (await _call(app, "POST", "/v1/things/special"))[1].startswith(b"special")

    asyncio.run(run())


def test_a_plain_route_is_dispatched_without_starlettes_router(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The direct table must keep working across Starlette upgrades: a route Starlette
    # builds differently falls back to the router silently, which this catches.
    app = Application(_routes())

    async def no_router(*_args: Any) -> None:
        raise AssertionError("went through Starlette's router")

    monkeypatch.setattr(app.router, "app", no_router)
    for method, path in [("GET", "/healthz"), ("POST", "/v1/things"), ("HEAD", "/v1/noop")]:
        assert asyncio.run(_call(app, method, path))[0] == 200


@pytest.mark.parametrize("path", ["/direct", "/with/{param}"])
def test_what_an_endpoint_raises_is_answered_in_stripes_format(path: str) -> None:
    async def refuse(_request: Request) -> Response:
        raise InvalidRequestError("No.", param="x")

    async def crash(_request: Request) -> Response:
        raise RuntimeError("a bug")

    app = Application(
        [
            Route(path, refuse, methods=["POST"]),
            Route(path.replace("direct", "crash").replace("with", "crash"), crash),
        ]
    )
    concrete = path.replace("{param}", "1")
    status, _body, _allow = asyncio.run(_call(app, "POST", concrete))
    assert status == 400
    crashed = concrete.replace("direct", "crash").replace("with", "crash")
    assert asyncio.run(_call(app, "GET", crashed))[0] == 500
