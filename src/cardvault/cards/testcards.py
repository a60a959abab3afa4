"""The published test card numbers, and the rule that test and live cards never mix.

The table is ``test_cards.json`` beside this module, a verbatim copy of
``shared/testdata/test_cards.json`` (the numbers Stripe documents for test mode). Test
mode accepts only these numbers; live mode refuses them, as Stripe does.

Numbers are looked up by their SHA-256 digest, so the lookup never compares card
digits character by character and the table in memory holds digests, not numbers.
(The published numbers are public; the point is that the caller's number, which may be
real, is only ever hashed.)
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, ClassVar

from cardvault.cards.brands import Brand, Funding
from cardvault.cards.errors import CardError

if TYPE_CHECKING:
    from cardvault.cards.pan import CardNumber

__all__ = [
    "TestCardInfo",
    "check_card_allowed",
    "is_test_card",
    "test_card_info",
]

_TABLE_FILE = "test_cards.json"
_PARAM = "card[number]"

# Stripe answers both mismatches with card_declined (decline codes
# test_mode_live_card and live_mode_test_card); our messages say which mode was used but
# never which card.
_LIVE_CARD_IN_TEST_MODE = (
    "Your card was declined. Your request was in test mode, but used a card that is not "
    "a published test card."
)
_TEST_CARD_IN_LIVE_MODE = (
    "Your card was declined. Your request was in live mode, but used a known test card."
)


@dataclass(frozen=True, slots=True)
class TestCardInfo:
    """What the published table says about one test card.

    ``outcome`` is what a simulated acquirer should answer (a Stripe decline code such
    as ``card_declined`` or ``insufficient_funds``); ``None`` means approve.
    """

    __test__: ClassVar[bool] = False  # not a pytest test class, despite the name

    brand: Brand
    funding: Funding
    outcome: str | None


@functools.cache
def _table() -> dict[bytes, TestCardInfo]:
    raw = resources.files(__package__).joinpath(_TABLE_FILE).read_text(encoding="utf-8")
    table: dict[bytes, TestCardInfo] = {}
    for entry in json.loads(raw)["cards"]:
        number = entry["number"]
        if not (isinstance(number, str) and number.isascii() and number.isdigit()):
            raise ValueError(f"{_TABLE_FILE}: a test card number is not ASCII digits")
        table[hashlib.sha256(number.encode("ascii")).digest()] = TestCardInfo(
            brand=Brand(entry["brand"]),
            funding=Funding(entry["funding"]),
            outcome=entry["outcome"],
        )
    return table


def lookup_digits(digits: bytes | bytearray | memoryview) -> TestCardInfo | None:
    """The table entry for these ASCII digits, or ``None``. Used by the parser."""
    return _table().get(hashlib.sha256(digits).digest())


def test_card_info(card: CardNumber) -> TestCardInfo | None:
    """Brand, funding and outcome of ``card`` if it is a published test card, else None.

    :meth:`CardNumber.parse` looked the number up already; that answer is kept."""
    return card._test_card


# Keep pytest from collecting this function when a test module imports it by name.
test_card_info.__test__ = False  # type: ignore[attr-defined]


def is_test_card(card: CardNumber) -> bool:
    """True when ``card`` is one of the published test card numbers."""
    return test_card_info(card) is not None


def check_card_allowed(card: CardNumber, *, livemode: bool) -> None:
    """Raise :class:`CardError` (``card_declined``) when ``card`` does not fit the mode.

    Test mode takes only published test cards; live mode refuses them.
    """
    test_card = is_test_card(card)
    if livemode and test_card:
        raise CardError(_TEST_CARD_IN_LIVE_MODE, param=_PARAM)
    if not livemode and not test_card:
        raise CardError(_LIVE_CARD_IN_TEST_MODE, param=_PARAM)
