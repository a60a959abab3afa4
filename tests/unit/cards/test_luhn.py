"""The pre-existing Luhn helpers keep working beside the new card types."""

from __future__ import annotations

from cardvault.cards import find_card_numbers, holds_card_number, luhn_valid, redact_card_numbers
from cardvault.cards.luhn import card_number_in

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


#: Fullwidth digits read as ASCII, to look for digits left after redaction.
_TO_ASCII = {0xFF10 + d: 48 + d for d in range(10)}


def _in_script(number: str, zero: int) -> str:
    return "".join(chr(zero + int(d)) for d in number)


def test_the_finder_sees_dotted_underscored_and_unicode_dashed_groups() -> None:
    # Before: "4242.4242.4242.4242" in a URL path went into the access log verbatim.
    number = complete("5" + "1234567" * 2)
    for sep in [".", "_", "/", "\u00a0", "\u2013", "\u2212", "\uff0d", "\uff0e", "\t"]:
        grouped = sep.join(number[i : i + 4] for i in range(0, len(number), 4))
        assert holds_card_number(f"/v1/payment_methods/{grouped}"), repr(sep)
        assert number[-4:] not in redact_card_numbers(f"x {grouped} y"), repr(sep)


def test_the_finder_reads_other_scripts_digits() -> None:
    # Fullwidth, Arabic-Indic, Devanagari, and a mixture of scripts in one number.
    number = complete("4" + "7654321" * 2)
    for zero in (0xFF10, 0x0660, 0x0966, 0x06F0):
        text = f"card {_in_script(number, zero)} end"
        assert holds_card_number(text), hex(zero)
        assert redact_card_numbers(text) == "card [REDACTED CARD NUMBER] end"
    mixed = number[:8] + _in_script(number[8:], 0xFF10)
    assert holds_card_number(mixed)
    assert not holds_card_number(_in_script(number[:-1] + str((int(number[-1]) + 1) % 10), 0xFF10))


def test_a_longer_run_is_condemned_when_a_card_length_window_passes() -> None:
    number = complete("4" + "7654321" * 2)
    glued = "9" + number + "99999"
    assert holds_card_number(f"ref {glued}")
    assert redact_card_numbers(f"ref {glued} end") == "ref [REDACTED CARD NUMBER] end"
    # No window of these passes Luhn, and zeros never start a card number (the audit
    # log's genesis hash is 64 zeros).
    assert not holds_card_number("1" * 20)
    assert not holds_card_number("0" * 64)
    # 8,000 digits are checked in linear time (seconds before, when each window was
    # summed digit by digit).
    assert redact_card_numbers("id " + "7" * 8000) == "id " + "7" * 8000


def test_timestamps_and_short_numbers_are_left_alone() -> None:
    for text in ["2026-12-07T04:50:51.123456Z", "10.0.0.1", "duration 12.345 ms", "1 2 3 4"]:
        assert redact_card_numbers(text) == text


def test_a_line_break_separates_in_a_value_but_not_across_a_files_lines() -> None:
    # In one value a caller may put a newline between the digits; across the lines of a
    # file ("port 8443", then a date) it joins nothing.
    number = complete("4" + "7654321" * 2)
    for sep in ("\n", "\r\n"[:1], "\x00", "\x0b"):
        assert holds_card_number(f"{number[:8]}{sep}{number[8:]}"), repr(sep)
        assert not holds_card_number(f"{number[:8]}{sep}{number[8:]}", line_breaks=False)
    assert holds_card_number(f"{number[:8]}\t{number[8:]}", line_breaks=False)
    assert redact_card_numbers(f"a {number[:8]}\n{number[8:]} b") == "a [REDACTED CARD NUMBER] b"


def test_a_card_number_beside_another_group_of_digits_is_found() -> None:
    # Found by the fuzzer once dots, slashes, underscores and other scripts' digits
    # joined runs: "4242…4242/12" was one 18-digit run whose digits fail Luhn as a
    # whole, and the card number in it was left in the clear.
    number = complete("4" + "7654321" * 2)
    for text in (
        f"{number}/12",
        f"{number}.5",
        f"{number}_7",
        f"1 {number}",
        f"12-{number}",
        "x\u0664" + number,
        number[:8] + _in_script(number[8:], 0xFF10),
    ):
        assert holds_card_number(text), repr(text)
        assert number[-6:] not in redact_card_numbers(text).translate(_TO_ASCII), repr(text)
    assert card_number_in(f"{number}/12") == number
    # Groups too short to be a card number on their own are not one.
    assert not holds_card_number("order 12/34 5678")
