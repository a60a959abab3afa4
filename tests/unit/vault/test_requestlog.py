"""The vault's request log in memory (``cardvault logs tail``): what it keeps, its
filters, its cursors and the bounds of every parameter of a poll."""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest

from cardvault.errors import InvalidRequestError, ParameterUnknown
from cardvault.logging import add_line_tap, configure_logging, get_logger
from cardvault.vault.requestlog import MAX_LIMIT, LineFilter, RequestLog, parse_poll


def access(log: RequestLog, **fields: Any) -> None:
    line = {
        "logger": "cardvault.access",
        "service": "vault",
        "method": "GET",
        "path": "/v1/payment_methods",
        "status": 200,
        "request_id": "req_a",
        "duration_ms": 1.5,
        "timestamp": "2026-12-07T10:00:00.000000Z",
        **fields,
    }
    log.tap(line)


def read(log: RequestLog, **kw: Any) -> tuple[list[dict[str, Any]], str, bool]:
    args: dict[str, Any] = {
        "after": None,
        "since": 0,
        "wanted": LineFilter(),
        "limit": 100,
        "wait": 0,
        **kw,
    }
    return asyncio.run(log.read(**args))


def test_tap_keeps_only_the_public_listeners_access_lines_and_their_few_fields() -> None:
    log = RequestLog()
    access(log, client="10.0.0.1", key="key_secret_id")
    access(log, service="vault-admin")
    log.tap({"logger": "cardvault.vault", "service": "vault", "event": "something"})
    lines, _cursor, more = read(log)
    assert len(lines) == 1 and not more
    assert set(lines[0]) == {
        "timestamp",
        "method",
        "path",
        "status",
        "duration_ms",
        "request_id",
    }


def test_the_buffer_is_bounded_and_keeps_the_newest() -> None:
    log = RequestLog(size=3)
    for n in range(10):
        access(log, request_id=f"req_{n}")
    lines, _cursor, _more = read(log)
    assert [line["request_id"] for line in lines] == ["req_7", "req_8", "req_9"]


def test_a_cursor_goes_on_where_the_last_answer_ended_and_limit_says_has_more() -> None:
    log = RequestLog()
    for n in range(5):
        access(log, request_id=f"req_{n}")
    first, cursor, more = read(log, limit=2)
    assert [x["request_id"] for x in first] == ["req_0", "req_1"] and more
    after = int(cursor.split(".")[1])
    rest, cursor, more = read(log, after=after, since=None)
    assert [x["request_id"] for x in rest] == ["req_2", "req_3", "req_4"] and not more
    assert read(log, after=int(cursor.split(".")[1]), since=None)[0] == []


def test_a_poll_without_cursor_or_since_sees_only_what_comes_after_it() -> None:
    log = RequestLog()
    access(log)
    lines, cursor, _ = read(log, since=None)
    assert lines == [] and cursor == f"{log.id}.1"


def test_a_cursor_past_the_end_does_not_hide_what_comes() -> None:
    log = RequestLog()
    access(log, request_id="req_1")
    _lines, cursor, _ = read(log, after=10**9, since=None)
    access(log, request_id="req_2")
    lines, _, _ = read(log, after=int(cursor.split(".")[1]), since=None)
    assert [x["request_id"] for x in lines] == ["req_2"]


def test_a_waiting_poll_answers_with_the_line_that_arrives() -> None:
    log = RequestLog()

    async def main() -> list[dict[str, Any]]:
        waiting = asyncio.create_task(
            log.read(after=None, since=None, wanted=LineFilter(), limit=10, wait=30)
        )
        await asyncio.sleep(0)
        access(log, request_id="req_late")
        lines, _cursor, _more = await waiting
        return lines

    assert [x["request_id"] for x in asyncio.run(main())] == ["req_late"]


def test_a_waiting_poll_answers_at_once_when_the_vault_stops() -> None:
    log = RequestLog()

    async def main() -> list[dict[str, Any]]:
        waiting = asyncio.create_task(
            log.read(after=None, since=None, wanted=LineFilter(), limit=10, wait=30)
        )
        await asyncio.sleep(0)
        log.stopping.set()
        lines, _cursor, _more = await waiting
        return lines

    assert asyncio.run(main()) == []


@pytest.mark.parametrize(
    ("wanted", "expected"),
    [
        (LineFilter(status="2XX"), ["req_ok", "req_get"]),
        (LineFilter(status="4XX"), ["req_bad", "req_missing"]),
        (LineFilter(status="404"), ["req_missing"]),
        (LineFilter(method="DELETE"), ["req_bad"]),
        (LineFilter(path="/v1/payment_methods"), ["req_ok", "req_bad"]),
        (LineFilter(path="/v1/payment_methods*"), ["req_ok", "req_bad", "req_get"]),
        (LineFilter(request_id="req_get"), ["req_get"]),
        (LineFilter(status="2XX", method="GET"), ["req_get"]),
    ],
)
def test_filters(wanted: LineFilter, expected: list[str]) -> None:
    log = RequestLog()
    access(log, request_id="req_ok", method="POST", status=200)
    access(log, request_id="req_bad", method="DELETE", status=400)
    access(log, request_id="req_missing", path="/v1/nothing", status=404)
    access(log, request_id="req_get", path="/v1/payment_methods/pm_1", status=200)
    lines, _, _ = read(log, wanted=wanted)
    assert [x["request_id"] for x in lines] == expected


def test_filtered_lines_move_the_cursor_on() -> None:
    log = RequestLog()
    access(log, status=500)
    access(log, status=500)
    lines, cursor, _ = read(log, wanted=LineFilter(status="2XX"))
    assert lines == [] and cursor == f"{log.id}.2"


def q(**values: str | list[str]) -> dict[str, list[str]]:
    return {k: v if isinstance(v, list) else [v] for k, v in values.items()}


def test_parse_poll_reads_its_own_buffers_cursor_among_several() -> None:
    after, since, wanted, limit, wait = parse_poll(
        q(after="rl_other.5,rl_mine.42", since="1700000000000", status="2xx", method="post"),
        "rl_mine",
    )
    assert (after, since, limit, wait) == (42, 1_700_000_000_000, 100, 25.0)
    assert wanted == LineFilter(status="2XX", method="POST")


@pytest.mark.parametrize(
    ("query", "param"),
    [
        (q(limit="0"), "limit"),
        (q(limit=str(MAX_LIMIT + 1)), "limit"),
        (q(limit="nan"), "limit"),
        (q(limit="1" * 400), "limit"),
        (q(wait="31"), "wait"),
        (q(wait="-1"), "wait"),
        (q(wait="inf"), "wait"),
        (q(status="6XX"), "status"),
        (q(status="20"), "status"),
        (q(method="BREW"), "method"),
        (q(path="v1/no-slash"), "path"),
        (q(path="/" + "a" * 600), "path"),
        (q(path="/with space"), "path"),
        (q(request_id="4242424242424242"), "request_id"),
        (q(after="rl_a.1," * 17), "after"),
        (q(after="not-a-cursor"), "after"),
        (q(since="yesterday"), "since"),
        (q(limit=["1", "2"]), "limit"),
    ],
)
def test_parse_poll_refuses_hostile_values(query: dict[str, list[str]], param: str) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_poll(query, "rl_mine")
    assert caught.value.param == param
    assert "4242424242424242" not in caught.value.message


def test_parse_poll_refuses_an_unknown_parameter() -> None:
    with pytest.raises(ParameterUnknown):
        parse_poll(q(card_number="4242424242424242"), "rl_mine")


def test_the_lines_kept_are_the_scrubbed_ones() -> None:
    """Through the real logging chain: a card number in the path is redacted before
    the tap sees it."""
    log = RequestLog()
    configure_logging(profile="production", stream=io.StringIO())
    remove = add_line_tap(log.tap)
    try:
        get_logger("cardvault.access").info(
            "request",
            service="vault",
            method="GET",
            path="/v1/payment_methods/4242424242424242",
            status=404,
            card_number="4242424242424242",
        )
    finally:
        remove()
    lines, _, _ = read(log)
    assert len(lines) == 1
    assert "4242424242424242" not in repr(lines)
    assert lines[0]["path"].startswith("/v1/payment_methods/[REDACTED")
