from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from cardvault.cards import CardNumber, is_test_card, testcards
from cardvault.cards.errors import CardError

from ._gen import complete, published

CARDS: list[dict[str, Any]] = published()["cards"]
INVALID: list[dict[str, Any]] = published()["invalid"]
PACKAGED = Path(testcards.__file__).with_name("test_cards.json")


def test_packaged_table_holds_cards_and_invalid_entries() -> None:
    assert len(CARDS) >= 17
    assert len(INVALID) >= 4


def test_packaged_table_is_the_published_numbers_only() -> None:
    # The repository ships its own copy of the published test numbers; each passes
    # Luhn, and there is nothing else in the file.
    table = json.loads(PACKAGED.read_text("utf-8"))
    assert set(table) == {"about", "cards", "invalid"}
    assert all(entry["number"].isdigit() for entry in table["cards"])


@pytest.mark.parametrize("entry", CARDS, ids=lambda e: f"{e['brand']}-{e['number'][-4:]}")
def test_published_card_parses_with_table_brand_and_funding(entry: dict[str, Any]) -> None:
    card = CardNumber.parse(entry["number"])
    assert card.brand == entry["brand"]
    assert card.funding == entry["funding"]
    assert is_test_card(card)
    info = testcards.test_card_info(card)
    assert info is not None
    assert (info.brand, info.funding, info.outcome) == (
        entry["brand"],
        entry["funding"],
        entry["outcome"],
    )


def _expected_code(number: str) -> str:
    # The rule: digits that are not a card number are incorrect_number; anything that is
    # not ASCII digits is not a number at all, invalid_number.
    return "incorrect_number" if number.isascii() and number.isdigit() else "invalid_number"


@pytest.mark.parametrize("entry", INVALID, ids=lambda e: e["why"][:20])
def test_invalid_entry_is_rejected_with_the_right_code(entry: dict[str, Any]) -> None:
    with pytest.raises(CardError) as info:
        CardNumber.parse(entry["number"])
    assert info.value.code == _expected_code(entry["number"])
    assert info.value.param == "card[number]"


def test_the_arabic_indic_entry_is_expected_as_invalid_number() -> None:
    # Guard the rule above: the table's non-ASCII entry must map to invalid_number.
    codes = {_expected_code(e["number"]) for e in INVALID}
    assert codes == {"incorrect_number", "invalid_number"}


def test_non_test_card_has_no_test_info() -> None:
    card = CardNumber.parse(complete("424242" + "0" * 9))
    assert not is_test_card(card)
    assert testcards.test_card_info(card) is None


@pytest.mark.parametrize("entry", CARDS[:3], ids=lambda e: e["number"][-4:])
def test_test_mode_accepts_and_live_mode_refuses_test_cards(entry: dict[str, Any]) -> None:
    card = CardNumber.parse(entry["number"])
    testcards.check_card_allowed(card, livemode=False)
    with pytest.raises(CardError) as info:
        testcards.check_card_allowed(card, livemode=True)
    assert (info.value.code, info.value.param) == ("card_declined", "card[number]")
    assert "live mode" in info.value.message


def test_test_mode_refuses_and_live_mode_accepts_other_cards() -> None:
    card = CardNumber.parse(complete("555555" + "1" * 9))
    testcards.check_card_allowed(card, livemode=True)
    with pytest.raises(CardError) as info:
        testcards.check_card_allowed(card, livemode=False)
    assert (info.value.code, info.value.param) == ("card_declined", "card[number]")
    assert "test mode" in info.value.message


def test_outcomes_of_decline_cards_are_exposed() -> None:
    outcomes = set()
    for entry in CARDS:
        info = testcards.test_card_info(CardNumber.parse(entry["number"]))
        assert info is not None
        outcomes.add(info.outcome)
    assert {None, "card_declined", "insufficient_funds"} <= outcomes
