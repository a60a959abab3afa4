"""Card numbers for tests, generated here so that no real-looking number is typed.

The IIN ranges below are written out again from the networks' published ranges rather
than imported from cardvault.cards.brands, so a mistake there shows up as a failure
here instead of being copied into the expectation.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from hypothesis import strategies as st


def luhn_check_digit(payload: str) -> str:
    """The digit that makes ``payload + digit`` pass the Luhn check."""
    total = 0
    # Counting from the right of the payload, positions 0, 2, 4, ... are doubled once
    # the check digit is appended after them.
    for i, ch in enumerate(reversed(payload)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d >= 5 else d * 2
        total += d
    return str(-total % 10)


def complete(payload: str) -> str:
    return payload + luhn_check_digit(payload)


def _span(first: int, last: int) -> list[str]:
    return [str(n) for n in range(first, last + 1)]


# brand -> (IIN prefixes, lengths the brand issues)
SPEC: dict[str, tuple[list[str], list[int]]] = {
    "visa": (["4"], [13, 16, 19]),
    "mastercard": (_span(51, 55) + _span(2221, 2720), [16]),
    "amex": (["34", "37"], [15]),
    "discover": (["6011", *_span(644, 649), "65"], [16, 17, 18, 19]),
    "diners": ([*_span(300, 305), "309", "36", "38", "39"], [14, 15, 16, 17, 18, 19]),
    "jcb": (_span(3528, 3589), [16, 17, 18, 19]),
    "unionpay": (["62", "81"], [16, 17, 18, 19]),
    # Prefixes just outside the ranges above, long enough that the random digits after
    # them cannot wander into a range.
    "unknown": (
        [
            "1", "7", "9", "50", "56", "57", "58", "2220", "2721", "3527", "3590",
            "306", "307", "308", "31", "32", "33", "6010", "6012", "640", "643", "63",
            "66", "69", "80", "82", "89",
        ],
        [13, 14, 15, 16, 17, 18, 19],
    ),
}  # fmt: skip


@st.composite
def card_numbers(draw: st.DrawFn, brand: str | None = None) -> tuple[str, str]:
    """(brand, a Luhn-valid number of that brand with a length it issues)."""
    if brand is None:
        brand = draw(st.sampled_from(sorted(SPEC)))
    prefixes, lengths = SPEC[brand]
    prefix = draw(st.sampled_from(prefixes))
    length = draw(st.sampled_from(lengths))
    body = draw(
        st.text(
            alphabet="0123456789",
            min_size=length - len(prefix) - 1,
            max_size=length - len(prefix) - 1,
        )
    )
    return brand, complete(prefix + body)


def published() -> dict[str, Any]:
    """The packaged test-card table, as the code under test reads it."""
    raw = resources.files("cardvault.cards").joinpath("test_cards.json").read_text("utf-8")
    data: dict[str, Any] = json.loads(raw)
    return data


def leaks(text: str, digits: str, window: int = 7) -> list[str]:
    """Every run of ``window`` consecutive digits of ``digits`` that appears in ``text``."""
    return [
        digits[i : i + window]
        for i in range(len(digits) - window + 1)
        if digits[i : i + window] in text
    ]
