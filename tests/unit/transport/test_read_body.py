"""read_body: the whole body in order, refused past the limit without holding it all."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.requests import ClientDisconnect, Request

from cardvault.errors import RequestTooLarge
from cardvault.transport.asgi import read_body


def _request(messages: list[dict[str, Any]], headers: dict[str, str] | None = None) -> Any:
    """A request whose channel hands out ``messages``; ``received`` counts the reads."""
    pending = list(messages)
    state = {"received": 0}

    async def receive() -> dict[str, Any]:
        state["received"] += 1
        return pending.pop(0)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "headers": [(k.encode(), v.encode()) for k, v in (headers or {}).items()],
    }
    return Request(scope, receive), state


def _chunks(*parts: bytes) -> list[dict[str, Any]]:
    return [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
        for i, part in enumerate(parts)
    ]


def test_chunks_are_joined_in_order_and_a_body_at_the_limit_is_read() -> None:
    request, _ = _request(_chunks(b"type=card", b"", b"&card[exp_month]=12", b"!"))
    assert asyncio.run(read_body(request, 29)) == b"type=card&card[exp_month]=12!"
    request, _ = _request(_chunks(b"one chunk"))
    assert asyncio.run(read_body(request, 9)) == b"one chunk"
    request, _ = _request(_chunks(b""))
    assert asyncio.run(read_body(request, 0)) == b""


def test_a_body_past_the_limit_is_refused_before_the_rest_is_read() -> None:
    request, state = _request(_chunks(b"a" * 10, b"b" * 10, b"c" * 10, b"d" * 10))
    with pytest.raises(RequestTooLarge):
        asyncio.run(read_body(request, 25))
    assert state["received"] == 3  # the chunk that passed the limit was the last read


def test_a_declared_length_past_the_limit_is_refused_without_reading() -> None:
    request, state = _request(_chunks(b"x" * 100), {"content-length": "100"})
    with pytest.raises(RequestTooLarge) as info:
        asyncio.run(read_body(request, 99))
    assert state["received"] == 0
    assert info.value.http_status == 413
    assert info.value.code == "request_too_large"


def test_a_false_declared_length_does_not_lift_the_limit() -> None:
    request, _ = _request(_chunks(b"x" * 50, b"y" * 50), {"content-length": "10"})
    with pytest.raises(RequestTooLarge):
        asyncio.run(read_body(request, 60))


def test_a_client_that_leaves_raises_client_disconnect() -> None:
    request, _ = _request([*_chunks(b"partial")[:0], {"type": "http.disconnect"}])
    with pytest.raises(ClientDisconnect):
        asyncio.run(read_body(request, 100))


@pytest.mark.parametrize("declared", ["²", "1²", "-5", "0x10", " 7", "1e9", ""])
def test_a_content_length_that_is_not_ascii_digits_is_ignored_and_the_read_still_limited(
    declared: str,
) -> None:
    request, _ = _request(_chunks(b"ok"), {"content-length": declared})
    assert asyncio.run(read_body(request, 10)) == b"ok"
    request, _ = _request(_chunks(b"x" * 11), {"content-length": declared})
    with pytest.raises(RequestTooLarge):
        asyncio.run(read_body(request, 10))


def test_a_content_length_of_many_digits_is_too_large_without_parsing_it() -> None:
    # More digits than Python parses by default (4300) must not raise anything else.
    for declared in ("9" * 19, "1" + "0" * 5000):
        request, state = _request(_chunks(b"x"), {"content-length": declared})
        with pytest.raises(RequestTooLarge):
            asyncio.run(read_body(request, 64 * 1024))
        assert state["received"] == 0


def test_a_client_gone_mid_body_is_not_an_unhandled_error() -> None:
    from starlette.responses import Response
    from starlette.routing import Route
    from structlog.testing import capture_logs

    from cardvault.transport.asgi import build_app

    async def endpoint(request: Request) -> Response:
        await read_body(request, 1024)
        return Response("read")

    app = build_app([Route("/", endpoint, methods=["POST"])], service="t", security_txt=None)
    messages: list[dict[str, Any]] = [
        {"type": "http.request", "body": b"type=card", "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "headers": [],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 443),
        "scheme": "https",
    }
    with capture_logs() as logs:
        asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    assert not [entry for entry in logs if entry["log_level"] in ("error", "critical")], logs
    assert sent[0]["type"] == "http.response.start"
    assert sent[0]["status"] == 400
