"""The indexed router answers every request as Starlette's own router does."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Mount, Route, Router

from cardvault.transport.asgi import IndexedRouter


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


async def _call(app: Router, method: str, path: str) -> tuple[int, bytes, str | None]:
    scope = {
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
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    try:
        await app(scope, receive, send)
    except Exception as exc:  # Starlette raises HTTPException for 404/405
        return getattr(exc, "status_code", 500), b"", type(exc).__name__
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    allow = next((v.decode() for k, v in sent[0].get("headers", []) if k == b"allow"), None)
    return sent[0]["status"], body, allow


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
        indexed = IndexedRouter(_routes(), redirect_slashes=False)
        for method, path in itertools.product(methods, paths):
            expected = await _call(plain, method, path)
            assert await _call(indexed, method, path) == expected, (method, path)

    asyncio.run(run())


def test_a_static_path_also_matched_by_a_parameter_route_keeps_the_first_route() -> None:
    async def run() -> None:
        indexed = IndexedRouter(_routes(), redirect_slashes=False)
        # "/v1/things/{id}" comes first and matches "special" for GET, as in Starlette.
        assert (await _call(indexed, "GET", "/v1/things/special"))[1].startswith(b"thing ")
        assert (await _call(indexed, "POST", "/v1/things/special"))[1].startswith(b"special")

    asyncio.run(run())
