"""untrusted_text: any text a caller chose becomes text a record accepts, with no card
number, secret or key material left in it."""

from __future__ import annotations

import asyncio
import base64
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardvault.audit import AuditLog, verify_log
from cardvault.audit.text import MAX_TEXT, check_entry, untrusted_text
from cardvault.cards import holds_card_number, luhn_valid

from ._support import generated_card_number

#: Published test numbers (Stripe's documentation), one per brand and length.
PUBLISHED = ["4242424242424242", "5555555555554444", "378282246310005", "36227206271667"]


def _with_check_digit(body: str) -> str:
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


#: A Luhn-valid number of 13 to 19 digits that, like every card number, does not start
#: with 0 (ISO/IEC 7812; the finder may skip windows of a longer run that do).
_CARD_DIGITS = st.builds(
    lambda first, rest: _with_check_digit(first + rest),
    st.sampled_from("123456789"),
    st.text("0123456789", min_size=11, max_size=17),
)


@st.composite
def _grouped(draw: st.DrawFn) -> tuple[str, str]:
    """A card number, and the same grouped by single spaces or dashes."""
    digits = draw(_CARD_DIGITS)
    out = digits[0]
    for ch in digits[1:]:
        out += draw(st.sampled_from(["", "", " ", "-"])) + ch
    return digits, out


#: Filler with no digit of any script, so every digit in the text is a planted card's.
_FILLER = st.text(st.characters(exclude_categories=["Nd"]), max_size=20)
_SECRETISH = st.sampled_from(
    [
        "sk_live_",
        "sk_test_",
        "rk_live_",
        "cvshare1-",
        "-----BEGIN",
        "PRIVATE KEY",
        "private key",
        "\x00",
        "\n",
        "\x7f",
        "a" * 40,
        "0123456789abcdef" * 4,
        "Ab1" * 14,
        "4242 4242 4242 4242",
        "5555-5555-5555-4444",
        "378282246310005",
    ]
)
#: Anything: unrestricted text, and text built from the pieces the checks look for.
_ANY = st.one_of(
    st.text(max_size=600),
    st.lists(st.one_of(_SECRETISH, st.text(max_size=8), _CARD_DIGITS), max_size=30).map("".join),
    st.lists(st.one_of(st.sampled_from("0123456789 -_."), _SECRETISH), max_size=80).map("".join),
)


def _accepted_everywhere(text: str) -> None:
    """A record with ``text`` in every string field passes the record's checks."""
    check_entry(
        action="keyservice.auth.failed",
        actor=text or "anonymous",
        origin=text,
        object_id=text,
        result="refused",
        request_id=text,
        detail={"context": text},
    )


@settings(max_examples=1000)
@given(_ANY)
def test_any_text_becomes_text_a_record_accepts(value: str) -> None:
    text = untrusted_text(value)
    _accepted_everywhere(text)
    assert len(text) <= MAX_TEXT
    assert not holds_card_number(text)


@settings(max_examples=300)
@given(_ANY, st.integers(min_value=0, max_value=MAX_TEXT))
def test_the_result_is_never_longer_than_the_limit(value: str, limit: int) -> None:
    text = untrusted_text(value, limit=limit)
    assert len(text) <= limit
    _accepted_everywhere(text)


@settings(max_examples=500)
@given(st.lists(st.tuples(_FILLER, _grouped()), min_size=1, max_size=5), _FILLER)
def test_no_planted_card_number_survives_in_any_grouping(
    pieces: list[tuple[str, tuple[str, str]]], tail: str
) -> None:
    value = "".join(filler + grouped for filler, (_digits, grouped) in pieces) + tail
    assert len(value) < MAX_TEXT  # no cut: every card is whole in the input
    text = untrusted_text(value)
    assert not holds_card_number(text)
    # The filler has no digits: any ASCII digit left would be part of a planted card.
    assert not re.search(r"[0-9]", text), text
    for digits, _grouped_text in (p[1] for p in pieces):
        assert digits not in re.sub(r"[^0-9]", "", text)


@pytest.mark.parametrize("number", PUBLISHED)
@pytest.mark.parametrize(
    "shape",
    [
        lambda n: n,
        lambda n: " ".join(n[i : i + 4] for i in range(0, len(n), 4)),
        lambda n: "-".join(n[i : i + 4] for i in range(0, len(n), 4)),
        lambda n: f"/v1/keys/{n}/datakey",
        lambda n: f"acct_{n}",
        lambda n: f"{n[:6]}\n{n[6:]}",  # a newline between its digits
    ],
    ids=["plain", "spaced", "dashed", "in-path", "glued", "newline"],
)
def test_published_numbers_are_replaced_in_every_shape(number: str, shape: Any) -> None:
    value = shape(number)
    text = untrusted_text(value)
    assert "[card number]" in text
    assert not holds_card_number(text)
    assert number not in re.sub(r"[^0-9]", "", text)


def test_ordinary_text_is_kept_as_it_is() -> None:
    for value in (
        "/v1/keys/pan/datakey",
        "acct_1NxYz2AbCdEf",
        "spiffe://cardvault/vault",
        "shop",
        "/var/lib/cardvault/vault/audit.jsonl",
        "order 1234 of 2025-06-01",
        "",
    ):
        assert untrusted_text(value) == value


def test_secrets_and_key_material_are_replaced_whole() -> None:
    key = os.urandom(32)
    secret_key = "sk_live_" + base64.urlsafe_b64encode(key[:18]).decode()
    share = "cvshare1-0a1b2c3d-3-1-" + key[:16].hex() + "-ab12"
    pem = "-----BEGIN PRIVATE KEY-----MC4CAQAwBQYDK2VwBCIEI-----END PRIVATE KEY-----"
    for value, mark in (
        (f"/v1/keys/{secret_key}/datakey", "[secret]"),
        (f"x {share} y", "[secret]"),
        (pem, "[secret]"),
        (f"/v1/keys/{key.hex()}/unwrap", "[key material]"),
        (f"ctx {base64.b64encode(key).decode()} end", "[key material]"),
    ):
        text = untrusted_text(value)
        assert mark in text, text
        _accepted_everywhere(text)
    assert secret_key[8:] not in untrusted_text(secret_key)
    assert key.hex() not in untrusted_text(f"/{key.hex()}/")


def test_control_characters_become_question_marks() -> None:
    assert untrusted_text("a\x00b\nc\x1fd\x7f") == "a?b?c?d?"


def test_the_cut_comes_before_the_search() -> None:
    # Cutting a longer run of digits could leave a card number at the end: the cut is
    # made first, and what is left is searched.
    number = generated_card_number()
    value = "x" * 100 + number + "7"  # 17 digits, which may not be Luhn-valid as a whole
    text = untrusted_text(value, limit=116)
    assert not holds_card_number(text)
    assert number not in text


def test_limits_outside_the_record_are_refused() -> None:
    with pytest.raises(ValueError):
        untrusted_text("x", limit=MAX_TEXT + 1)
    with pytest.raises(TypeError):
        untrusted_text(b"x")  # type: ignore[arg-type]


def test_a_log_takes_any_untrusted_text_and_still_verifies(tmp_path: Path) -> None:
    values = [f"/v1/keys/{n}/datakey" for n in PUBLISHED] + [
        "\x00" * 600,
        "sk_test_abc",
        "[" * 1000,
        "\u202e\ufeff\udcff",
    ]

    async def main() -> None:
        log = await AuditLog.open(tmp_path)
        for value in values:
            await log.append(
                "keyservice.auth.failed", actor=untrusted_text(value) or "anonymous",
                origin=None, object_id=untrusted_text(value), result="refused",
                request_id=None, detail={"context": untrusted_text(value)},
            )  # fmt: skip
        await log.close()

    asyncio.run(main())
    assert verify_log(tmp_path / "audit.jsonl", tmp_path / "audit.pub").ok
    written = (tmp_path / "audit.jsonl").read_text()
    for number in PUBLISHED:
        assert number not in written
