"""The log scrubber: no log line may hold a card number or a CVC, whoever wrote it."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random

import pytest
import structlog
from structlog.testing import capture_logs

from cardvault.cards.luhn import luhn_valid
from cardvault.logging import (
    REDACTED,
    bind_request_fields,
    bind_request_id,
    clear_request_context,
    configure_logging,
    get_logger,
    request_fields,
    scrub_card_data,
)

VISA = "4242424242424242"
AMEX = "378282246310005"


def random_pan(length: int, rng: random.Random) -> str:
    body = str(rng.randint(2, 6)) + "".join(str(rng.randint(0, 9)) for _ in range(length - 2))
    for check in "0123456789":
        if luhn_valid(body + check):
            return body + check
    raise AssertionError("unreachable")


def scrub(**fields: object) -> dict[str, object]:
    return dict(scrub_card_data(None, "info", dict(fields)))


@pytest.mark.parametrize(
    "text",
    [
        f"card {VISA} declined",
        "card 4242 4242 4242 4242 declined",
        "card 4242-4242-4242-4242 declined",
        f"amex:{AMEX}.",
        f"glued{VISA}text",
    ],
)
def test_scrubber_removes_card_numbers_in_strings(text: str) -> None:
    out = scrub(event=text)["event"]
    assert isinstance(out, str)
    digits = "".join(c for c in out if c.isdigit())
    assert "4242" not in digits and "8282" not in digits
    assert "[REDACTED CARD NUMBER]" in out


def test_scrubber_removes_card_numbers_in_number_fields_and_nested_values() -> None:
    out = scrub(event="x", amount=int(VISA), nested={"a": [f"n={AMEX}"]}, t=(VISA,))
    flat = json.dumps(out)
    assert VISA not in flat and AMEX not in flat


def test_scrubber_removes_cvc_fields_by_name_whatever_their_value() -> None:
    out = scrub(
        event="x", cvc="123", **{"card[cvc]": "4567"}, body={"card": {"cvc": "999", "number": "1"}}
    )
    assert out["cvc"] == REDACTED
    assert out["card[cvc]"] == REDACTED
    assert out["body"] == {"card": {"cvc": REDACTED, "number": REDACTED}}


def test_scrubber_keeps_ordinary_values() -> None:
    out = scrub(
        event="paid 1299 cents",
        order=12,
        last4="4242",
        ts="2026-11-29T00:00:00Z",
        not_luhn="4242424242424241",
    )
    assert out == {
        "event": "paid 1299 cents",
        "order": 12,
        "last4": "4242",
        "ts": "2026-11-29T00:00:00Z",
        "not_luhn": "4242424242424241",
    }


def test_scrubber_catches_random_generated_card_numbers_of_every_length() -> None:
    rng = random.Random(1234)
    for length in range(13, 20):
        for _ in range(50):
            pan = random_pan(length, rng)
            out = json.dumps(scrub(event=f"got {pan} ok", n=int(pan)))
            assert pan not in out


def run_configured(fmt: str, emit: object) -> str:
    stream = io.StringIO()
    configure_logging(
        profile="production" if fmt == "json" else "development", fmt=fmt, stream=stream
    )
    try:
        emit()  # type: ignore[operator]
    finally:
        clear_request_context()
    return stream.getvalue()


@pytest.mark.parametrize("fmt", ["json", "console"])
def test_configured_logging_scrubs_structlog_stdlib_and_tracebacks(fmt: str) -> None:
    def emit() -> None:
        log = get_logger("t")
        bind_request_id("req_abc")
        log.info("tokenized", card=VISA, cvc="123")
        logging.getLogger("uvicorn.error").warning("bad request line %s", f"/v1?n={VISA}")
        try:
            raise ValueError(f"cannot parse {VISA} / 4242 4242 4242 4242")
        except ValueError:
            log.exception("failed")

    text = run_configured(fmt, emit)
    assert "tokenized" in text and "failed" in text and "bad request line" in text
    assert "ValueError" in text  # the traceback is there, scrubbed
    assert VISA not in text
    assert "4242 4242 4242 4242" not in text
    assert "cvc" in text
    # The CVC's value is gone in whatever shape the renderer writes a field.
    for shape in ('"cvc": "123"', "cvc=123", "cvc='123'"):
        assert shape not in text
    assert text.count("req_abc") >= 2


def test_json_lines_carry_the_request_id() -> None:
    def emit() -> None:
        bind_request_id("req_xyz")
        get_logger("t").info("one")
        get_logger("t").info("two")

    lines = [json.loads(line) for line in run_configured("json", emit).splitlines()]
    assert [line["event"] for line in lines] == ["one", "two"]
    assert all(line["request_id"] == "req_xyz" for line in lines)
    assert all(line["level"] == "info" for line in lines)


def test_capture_logs_sees_the_scrubbed_event_when_scrubber_is_a_processor() -> None:
    # structlog.testing.capture_logs replaces the processor chain; this is how tests of
    # other modules assert on what they log. Here: the scrubber used as a processor.
    with capture_logs(processors=[scrub_card_data]) as logs:
        structlog.get_logger().info("x", pan=VISA, note=f"n {VISA}")
    assert logs[0]["pan"] == REDACTED
    assert VISA not in logs[0]["note"]


def test_request_fields_ride_on_every_line_until_the_request_ends() -> None:
    def emit() -> None:
        bind_request_id("req_one")
        bind_request_fields(origin="10.0.0.7", payment_method="pm_123")
        get_logger("t").info("inside", payment_method="pm_own")
        assert request_fields() == {
            "request_id": "req_one",
            "origin": "10.0.0.7",
            "payment_method": "pm_123",
        }
        clear_request_context()
        assert request_fields() == {}
        get_logger("t").info("after")
        # A new request starts from its id alone: nothing of the last one is left.
        bind_request_id("req_two")
        get_logger("t").info("next")

    inside, after, following = (
        json.loads(line) for line in run_configured("json", emit).splitlines()
    )
    assert inside["request_id"] == "req_one"
    assert inside["origin"] == "10.0.0.7"
    assert inside["payment_method"] == "pm_own"  # the line's own field wins
    assert "request_id" not in after and "origin" not in after
    assert following["request_id"] == "req_two"
    assert "origin" not in following and "payment_method" not in following


def test_request_fields_are_shared_with_the_requests_tasks_and_kept_from_others() -> None:
    async def request(name: str) -> dict[str, object]:
        bind_request_id(f"req_{name}")

        async def handler() -> None:
            await asyncio.sleep(0)
            bind_request_fields(key=f"key_{name}")

        await asyncio.gather(handler())  # a task of its own, as gather makes
        await asyncio.sleep(0)
        return dict(request_fields())

    async def main() -> list[dict[str, object]]:
        return list(await asyncio.gather(request("a"), request("b")))

    assert asyncio.run(main()) == [
        {"request_id": "req_a", "key": "key_a"},
        {"request_id": "req_b", "key": "key_b"},
    ]


def test_request_fields_hold_no_card_number_on_the_line() -> None:
    def emit() -> None:
        bind_request_id("req_pan")
        bind_request_fields(note=f"card {VISA}", cvc="123")
        get_logger("t").info("line")

    text = run_configured("json", emit)
    assert VISA not in text
    assert '"cvc": "123"' not in text and '"cvc":"123"' not in text
    assert json.loads(text)["request_id"] == "req_pan"
