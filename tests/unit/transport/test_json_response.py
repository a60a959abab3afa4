"""json_response writes what the standard library's json would, byte for byte."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cardvault.transport.asgi import json_response

_TEXT = st.text(st.characters(codec="utf-8"), max_size=30)
_SCALARS = st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | _TEXT
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(_TEXT, inner, max_size=6),
    max_leaves=20,
)


def _stdlib(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(_TEXT, _VALUES, max_size=8))
def test_the_body_is_the_standard_librarys_compact_utf8_json(value: dict[str, Any]) -> None:
    response = json_response(value)
    assert response.body == _stdlib(value)
    assert json.loads(bytes(response.body)) == value


def test_a_payment_method_shaped_body_and_its_headers() -> None:
    body = {
        "id": "pm_0VcM2qKn1a2B3c4D5e6F7g8H",
        "object": "payment_method",
        "livemode": False,
        "metadata": {"order": "Ünïcode ✓", "n": "1"},
        "card": {"brand": "visa", "exp_year": 2034, "checks": {"cvc_check": None}},
    }
    response = json_response(body, status=402, headers={"Idempotent-Replayed": "true"})
    assert response.body == _stdlib(body)
    assert response.status_code == 402
    assert response.headers["content-type"] == "application/json"
    assert response.headers["content-length"] == str(len(_stdlib(body)))
    assert response.headers["idempotent-replayed"] == "true"


def test_what_orjson_refuses_is_written_by_the_standard_library() -> None:
    # Integers beyond 64 bits and nesting deeper than orjson's 255 levels.
    deep: Any = "leaf"
    for _ in range(300):
        deep = {"d": deep}
    for value in ({"n": 2**70, "m": -(2**80)}, {"deep": deep}, {"list": [2**64]}):
        response = json_response(value)
        assert response.status_code == 200
        assert response.body == _stdlib(value)
