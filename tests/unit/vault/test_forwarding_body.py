"""The caller's JSON ``request[body]`` of a forward is parsed without recursing."""

from __future__ import annotations

import pytest

from cardvault.errors import InvalidRequestError
from cardvault.vault.forwarding.placement import json_body as _json_body


def test_a_deeply_nested_body_is_400_not_a_recursion_error() -> None:
    # Before: json.loads recursed, and a body 100,000 brackets deep raised
    # RecursionError (a 500) on its way to a JSON placement.
    for body in ("[" * 100_000, '{"a":' * 20_000 + "1" + "}" * 20_000, "[" * 65 + "]" * 65):
        with pytest.raises(InvalidRequestError) as info:
            _json_body(body)
        assert info.value.param == "request[body]"


def test_a_body_of_ordinary_depth_is_read() -> None:
    assert _json_body("") == {}
    assert _json_body('{"amount": 6000, "card": {"number": null}}') == {
        "amount": 6000,
        "card": {"number": None},
    }
    assert _json_body("[" * 64 + "]" * 64) is not None
    with pytest.raises(InvalidRequestError, match="must be JSON"):
        _json_body("{not json")
