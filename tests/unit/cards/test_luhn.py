"""The pre-existing Luhn helpers keep working beside the new card types."""

from __future__ import annotations

from cardvault.cards import find_card_numbers, holds_card_number, luhn_valid, redact_card_numbers

from ._gen import complete, published


def test_luhn_valid_on_published_cards_and_generated_numbers() -> None:
    for entry in published()["cards"]:
        assert luhn_valid(entry["number"])
    number = complete("4" + "1234567" * 2)
    assert luhn_valid(number)
    assert not luhn_valid(number[:-1] + str((int(number[-1]) + 1) % 10))


def test_luhn_valid_refuses_non_ascii_digits() -> None:
    assert not luhn_valid("".join(chr(0x0660 + int(d)) for d in "4242424242424242"))


def test_redact_and_find_handle_separated_numbers() -> None:
    number = complete("5" + "12345678" + "987654")
    spaced = f"{number[:4]} {number[4:8]}-{number[8:12]} {number[12:]}"
    text = f"paid with {spaced} today"
    assert [m.group() for m in find_card_numbers(text)] == [spaced]
    assert redact_card_numbers(text) == "paid with [REDACTED CARD NUMBER] today"


def test_holds_card_number_agrees_with_find_card_numbers() -> None:
    texts = [
        "4242424242424242",
        "card 4242 4242 4242 4242 here",
        "4242-4242-4242-4242",
        "4242424242424241",  # fails Luhn
        "424242424242",  # twelve digits
        "no digits at all",
        "",
        "pm_0VcM2qKnAbCdEfGhIjKlMnOp",
    ]
    for text in texts:
        assert holds_card_number(text) == any(True for _ in find_card_numbers(text)), text
    assert holds_card_number("4242 4242 4242 4242")
    assert not holds_card_number("424242424242")
