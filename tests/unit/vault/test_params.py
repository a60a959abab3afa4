"""Request parameters: the form parser matches the standard library's, bracket notation,
JSON, and the errors (which name the parameter, never its value)."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardvault.errors import InvalidRequestError, RequestTooLarge, UnsupportedMediaType
from cardvault.vault.params import MAX_BODY_BYTES, parse_body, parse_pairs

FORM = "application/x-www-form-urlencoded"

# Characters that matter to form decoding, plus some that do not.
_FORM_TEXT = st.lists(
    st.sampled_from([*"&=%+[]ab09AF ;é€\u00ff", "%2", "%41", "%e2%82%ac", "%ff"]),
    max_size=40,
).map("".join)


@settings(max_examples=400)
@given(_FORM_TEXT)
def test_parse_pairs_is_parse_qsl(text: str) -> None:
    assert parse_pairs(text) == parse_qsl(text, keep_blank_values=True, max_num_fields=1000)


def test_parse_pairs_decodes_like_parse_qsl() -> None:
    text = "a=1&&b&c=&d=x+y%20z&e=%E2%82%AC&f=%ff&g=%zz&h==&i=a=b&%5B=%5D"
    assert parse_pairs(text) == parse_qsl(text, keep_blank_values=True)
    assert parse_pairs(text)[1:3] == [("b", ""), ("c", "")]


def test_more_than_1000_fields_are_refused() -> None:
    assert len(parse_pairs("&".join(["a=1"] * 1000))) == 1000
    with pytest.raises(ValueError, match="fields"):
        parse_pairs("&".join(["a=1"] * 1001))
    with pytest.raises(InvalidRequestError, match="could not be parsed"):
        parse_body("&".join(["a=1"] * 1001).encode(), FORM)


def test_bracket_notation_nests() -> None:
    body = urlencode(
        {
            "type": "card",
            "card[number]": "4242424242424242",
            "card[exp_month]": "12",
            "metadata[order]": "6735",
            "expand[]": "x",
            "request[headers][0][name]": "Accept",
            "request[headers][0][value]": "application/json",
        }
    ).encode()
    assert parse_body(body, f"{FORM}; charset=utf-8") == {
        "type": "card",
        "card": {"number": "4242424242424242", "exp_month": "12"},
        "metadata": {"order": "6735"},
        "expand": ["x"],
        "request": {"headers": [{"name": "Accept", "value": "application/json"}]},
    }


def test_the_same_names_parse_the_same_way_twice() -> None:
    # Parsed names are cached; a cached name must give the same result.
    body = b"card[number]=4242424242424242&card[cvc]=123"
    assert parse_body(body, FORM) == parse_body(body, FORM)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"a[b[c]]=1", "malformed"),
        (b"[a]=1", "malformed"),
        (b"a[b][c][d][e]=1", "nested too deeply"),
        (b"a=1&a[b]=2", "given twice"),
        (b"a[b]=1&a=2", "given twice"),
        (b"a[]=1&a[x]=2", "malformed"),
    ],
)
def test_malformed_names_are_refused_without_echoing_values(body: bytes, message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message) as info:
        parse_body(body, FORM)
    assert "=1" not in str(info.value) and "=2" not in str(info.value)


def test_json_bodies_and_the_other_refusals() -> None:
    assert parse_body(b'{"type": "card", "card": {"number": "4242"}}', "application/json") == {
        "type": "card",
        "card": {"number": "4242"},
    }
    assert parse_body(b"", FORM) == {}
    with pytest.raises(InvalidRequestError, match="must be an object"):
        parse_body(b"[1]", "application/json")
    with pytest.raises(InvalidRequestError, match="JSON body could not be parsed"):
        parse_body(b"{", "application/json")
    with pytest.raises(InvalidRequestError, match="form body could not be parsed"):
        parse_body(b"a=\xff", FORM)
    with pytest.raises(UnsupportedMediaType):
        parse_body(b"a=1", "text/plain")
    with pytest.raises(RequestTooLarge):
        parse_body(b"a" * (MAX_BODY_BYTES + 1), FORM)
