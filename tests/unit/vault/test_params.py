"""Request parameters: the form parser matches the standard library's, bracket notation,
JSON, and the errors (which name the parameter, never its value)."""

from __future__ import annotations

import json
from urllib.parse import parse_qsl, urlencode

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardvault.errors import InvalidRequestError, RequestTooLarge, UnsupportedMediaType
from cardvault.vault.params import (
    MAX_BODY_BYTES,
    Page,
    ParseLimits,
    parse_body,
    parse_form,
    parse_json,
    parse_page,
    parse_pairs,
)

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


# -- hostile input: every size a request chooses is bounded before work is done ---------


@pytest.mark.parametrize(
    "body",
    [
        b"foo[100000000]=x",
        b"card[5105105105105100]=1",
        b"expand[1]=x",
        b"expand[0]=a&expand[2]=b",
        b"a[0][99999999][b]=1",
    ],
)
def test_a_list_index_past_the_end_is_refused_not_padded(body: bytes) -> None:
    # Before: foo[100000000]=x built a list of a hundred million items (935 MB, 3 s),
    # and a card-number-sized index grew the vault until the OOM killer ended it.
    with pytest.raises(InvalidRequestError, match="without gaps") as info:
        parse_body(body, FORM)
    assert "5105105105105100" not in str(info.value)


def test_list_indices_that_count_up_are_read_and_may_repeat_the_last() -> None:
    body = b"expand[0]=a&expand[1]=b&expand[1]=c&h[0][n]=x&h[0][v]=y&h[1][n]=z"
    assert parse_body(body, FORM) == {
        "expand": ["a", "c"],
        "h": [{"n": "x", "v": "y"}, {"n": "z"}],
    }


def test_a_list_is_capped_at_max_list_items() -> None:
    limits = ParseLimits(max_list_items=3)
    assert parse_form([("a[]", "1"), ("a[]", "2"), ("a[]", "3")], limits) == {"a": ["1", "2", "3"]}
    with pytest.raises(InvalidRequestError, match="at most 3 items"):
        parse_form([("a[]", "1"), ("a[]", "2"), ("a[]", "3"), ("a[]", "4")], limits)


@pytest.mark.parametrize("index", ["٣", "３", "1_0", " 1", "+1", "0x1"])
def test_an_index_is_ascii_digits_only(index: str) -> None:
    # a[٣] alone names a hash's key; after a[0] the name must be an index.
    assert parse_form([(f"a[{index}]", "x")]) == {"a": {index: "x"}}
    with pytest.raises(InvalidRequestError, match=r"malformed|without gaps"):
        parse_form([("a[0]", "x"), (f"a[{index}]", "y")])


def test_too_many_query_fields_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="at most 1000 parameters"):
        parse_form([(f"m[k{i}]", "v") for i in range(1001)])


@pytest.mark.parametrize(
    "name", ["4242424242424242", "4242 4242 4242 4242", '{"card"', "1a", "", "a b"]
)
def test_a_first_name_that_is_not_a_word_is_malformed_and_not_echoed(name: str) -> None:
    with pytest.raises(InvalidRequestError, match="malformed") as info:
        parse_form([(name, "x")])
    assert info.value.param is None
    if name:
        assert name not in info.value.message


def test_json_sent_as_a_form_is_told_to_say_json() -> None:
    body = b'{"card":{"number":"4242424242424242"}}'
    with pytest.raises(InvalidRequestError, match="looks like JSON") as info:
        parse_body(body, FORM)
    assert "4242" not in str(info.value.to_dict())


@pytest.mark.parametrize(
    "body",
    [
        b'{"metadata": {"k": "\\ud800"}}',
        b'{"billing_details": {"name": "\\udfff x"}}',
        b'{"a": NaN}',
        b'{"a": 1e999}',
        b"[" * 30_000,
        b'{"a":' * 30_000,
    ],
)
def test_json_that_no_store_can_hold_or_that_nests_deep_is_400(body: bytes) -> None:
    with pytest.raises(InvalidRequestError):
        parse_body(body, "application/json")


def test_json_is_held_to_the_form_limits() -> None:
    assert parse_json(b'{"request": {"headers": [{"name": "A"}]}}') == {
        "request": {"headers": [{"name": "A"}]}
    }
    with pytest.raises(InvalidRequestError, match="nested too deeply"):
        parse_json(b'{"a": {"b": {"c": {"d": {"e": 1}}}}}')
    with pytest.raises(InvalidRequestError, match="at most 100 items"):
        parse_json(b'{"a": [' + b",".join([b"1"] * 101) + b"]}")
    many = b"{" + b",".join(b'"k%d": 1' % i for i in range(1001)) + b"}"
    with pytest.raises(InvalidRequestError, match="at most 1000 parameters"):
        parse_json(many)


@given(st.text(max_size=30))
def test_every_parsed_string_can_be_stored(text: str) -> None:
    body = json.dumps({"metadata": {"k": text}}).encode()
    try:
        parsed = parse_body(body, "application/json")
    except InvalidRequestError:
        return
    parsed["metadata"]["k"].encode("utf-8")


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"starting_after": {"a": "b"}}, "starting_after"),
        ({"starting_after": ["x"]}, "starting_after"),
        ({"ending_before": [{"x": "1"}]}, "ending_before"),
        ({"starting_after": "4242424242424242"}, "starting_after"),
        ({"starting_after": "pm_x'--"}, "starting_after"),
        ({"limit": "٣"}, "limit"),
        ({"limit": {"a": "1"}}, "limit"),
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "1e3"}, "limit"),
    ],
)
def test_page_parameters_of_the_wrong_shape_are_400(query: dict[str, object], param: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_page(query, "pm_")
    assert info.value.param == param
    assert "4242424242424242" not in info.value.message


def test_page_parameters() -> None:
    assert parse_page({}, "pm_") == Page(10, None, None)
    # An empty cursor is no cursor (before, both empty reached the store and raised).
    assert parse_page({"starting_after": "", "ending_before": ""}, "pm_") == Page(10, None, None)
    assert parse_page({"limit": "3", "starting_after": "pm_abc"}, "pm_") == Page(3, "pm_abc", None)
    with pytest.raises(InvalidRequestError, match="not both"):
        parse_page({"starting_after": "pm_a", "ending_before": "pm_b"}, "pm_")
