from __future__ import annotations

import copy
import gc
import logging
import pickle
import random

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from cardvault.cards import CardNumber, WipedError, find_card_numbers
from cardvault.cards.errors import CardDataError, CardError, IncorrectNumber, ParameterMissing

from ._gen import SPEC, card_numbers, complete, leaks, published

VISA = published()["cards"][0]["number"]  # the published 4242... test card
AMEX = next(c["number"] for c in published()["cards"] if c["brand"] == "amex")


def _generated(prefix: str, length: int, seed: int = 7) -> str:
    rng = random.Random(seed)
    body = "".join(rng.choice("0123456789") for _ in range(length - len(prefix) - 1))
    return complete(prefix + body)


def _code(value: object) -> str:
    with pytest.raises(CardError) as info:
        CardNumber.parse(value)
    assert info.value.param == "card[number]"
    return info.value.code


# --- accepted input --------------------------------------------------------------------


def test_parse_reads_brand_bin_last4_length_of_published_card() -> None:
    card = CardNumber.parse(VISA)
    assert (card.brand, card.display_brand, card.funding) == ("visa", "visa", "credit")
    assert (card.bin, card.last4, card.length) == (VISA[:6], VISA[-4:], 16)
    assert card.masked() == VISA[:6] + "******" + VISA[-4:]


@pytest.mark.parametrize(
    "template",
    ["{a} {b} {c} {d}", "{a}-{b}-{c}-{d}", "  {a}{b}{c}{d}  ", "{a} {b}-{c}{d}"],
)
def test_parse_accepts_single_spaces_and_dashes_between_digits(template: str) -> None:
    value = template.format(a=VISA[0:4], b=VISA[4:8], c=VISA[8:12], d=VISA[12:16])
    with CardNumber.parse(value) as card, CardNumber.parse(VISA) as plain:
        assert card == plain


def test_parse_accepts_an_int_from_a_json_body() -> None:
    assert CardNumber.parse(int(VISA)) == CardNumber.parse(VISA)


def test_generated_number_outside_test_table_has_unknown_funding() -> None:
    card = CardNumber.parse(_generated("4", 16))
    assert card.brand == "visa"
    assert card.funding == "unknown"


def test_unknown_brand_is_accepted_and_displayed_as_other() -> None:
    card = CardNumber.parse(_generated("7", 16))
    assert (card.brand, card.display_brand) == ("unknown", "other")


# --- rejected input --------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, "", "   "])
def test_parse_reports_missing_number_as_parameter_missing(value: object) -> None:
    with pytest.raises(ParameterMissing) as info:
        CardNumber.parse(value)
    assert info.value.code == "parameter_missing"
    assert info.value.param == "card[number]"


def test_parse_rejects_arabic_indic_digits_as_invalid_number() -> None:
    arabic = "".join(chr(0x0660 + int(d)) for d in VISA)
    assert arabic.isdigit()  # the trap: str.isdigit() and int() accept these
    assert _code(arabic) == "invalid_number"


@pytest.mark.parametrize(
    "transform",
    [
        pytest.param(lambda n: "".join(chr(0xFF10 + int(d)) for d in n), id="fullwidth"),
        pytest.param(lambda n: n[:8] + "x" + n[9:], id="letter"),
        pytest.param(lambda n: n[:8] + "  " + n[8:], id="double-space"),
        pytest.param(lambda n: n[:8] + "\t" + n[8:], id="tab"),
        pytest.param(lambda n: n[:8] + "." + n[8:], id="dot"),
        pytest.param(lambda n: n[:8] + "--" + n[8:], id="double-dash"),
        pytest.param(lambda n: "-" + n, id="leading-dash"),
        pytest.param(lambda n: n + "-", id="trailing-dash"),
        pytest.param(lambda n: n + "\n", id="trailing-newline"),
        pytest.param(lambda n: "+" + n, id="plus-sign"),
    ],
)
def test_parse_rejects_non_digits_as_invalid_number(transform: object) -> None:
    assert callable(transform)
    assert _code(transform(VISA)) == "invalid_number"


@pytest.mark.parametrize(
    "value", [True, False, -1, 4.0, b"4242", bytearray(b"4242"), ["4"], {"n": 1}]
)
def test_parse_rejects_values_that_are_not_numbers_as_invalid_number(value: object) -> None:
    assert _code(value) == "invalid_number"


def test_parse_rejects_luhn_failure_as_incorrect_number() -> None:
    wrong = VISA[:-1] + str((int(VISA[-1]) + 1) % 10)
    assert _code(wrong) == "incorrect_number"


@pytest.mark.parametrize(
    ("prefix", "length"),
    [("4", 15), ("4", 14), ("51", 15), ("51", 17), ("34", 16), ("36", 13), ("7", 12), ("7", 20)],
)
def test_parse_rejects_length_brand_does_not_issue_as_incorrect_number(
    prefix: str, length: int
) -> None:
    assert _code(_generated(prefix, length)) == "incorrect_number"


def test_parse_rejects_oversized_digit_strings_as_incorrect_number() -> None:
    assert _code("4" * 500) == "incorrect_number"
    assert _code(int("4" * 40)) == "incorrect_number"


def test_parse_rejects_leading_zero_even_when_luhn_valid() -> None:
    assert _code("0" * 16) == "incorrect_number"
    assert _code(_generated("0", 16)) == "incorrect_number"


def test_error_messages_do_not_repeat_the_input() -> None:
    wrong = VISA[:-1] + str((int(VISA[-1]) + 1) % 10)
    for value in (wrong, VISA + "x", VISA * 2):
        with pytest.raises(CardError) as info:
            CardNumber.parse(value)
        rendered = f"{info.value} {info.value!r} {info.value.message} {info.value.param} {info.value.args}"
        assert leaks(rendered, value.replace("x", "")) == []


def test_constructor_cannot_bypass_parse() -> None:
    with pytest.raises(TypeError):
        CardNumber(VISA)


# --- properties over generated numbers -------------------------------------------------


@settings(max_examples=300)
@given(card_numbers())
def test_generated_numbers_parse_with_their_brand(case: tuple[str, str]) -> None:
    brand, number = case
    card = CardNumber.parse(number)
    assert card.brand == brand
    assert (card.length, card.bin, card.last4) == (len(number), number[:6], number[-4:])
    assert leaks(card.masked(), number) == []
    # Every number we accept is one the log scrubber would find, separators and all.
    spaced = " ".join(number[i : i + 4] for i in range(0, len(number), 4))
    assert [m.group() for m in find_card_numbers(f"card={spaced};")] == [spaced]


@settings(max_examples=300)
@given(card_numbers(), st.data())
def test_changing_one_digit_makes_parse_fail_with_incorrect_number(
    case: tuple[str, str], data: st.DataObject
) -> None:
    _, number = case
    pos = data.draw(st.integers(0, len(number) - 1), label="position")
    digit = data.draw(st.sampled_from([d for d in "0123456789" if d != number[pos]]))
    with pytest.raises(IncorrectNumber):
        CardNumber.parse(number[:pos] + digit + number[pos + 1 :])


def test_spec_covers_every_brand() -> None:
    assert set(SPEC) == {
        "visa",
        "mastercard",
        "amex",
        "discover",
        "diners",
        "jcb",
        "unionpay",
        "unknown",
    }


# --- never printed ---------------------------------------------------------------------


def _renderings(card: CardNumber) -> list[str]:
    return [
        repr(card),
        str(card),
        f"{card}",
        f"{card!r}",
        f"{card!s}",
        f"{card:>40}",
        f"{card:^40}",
        format(card),
        format(card, "<30"),
        "%s %r" % (card, card),  # noqa: UP031 - the old operator is what logging uses
        repr([card]),
        repr({"card": card}),
    ]


@pytest.mark.parametrize("number", [c["number"] for c in published()["cards"]])
def test_renderings_never_show_more_than_first6_last4(number: str) -> None:
    card = CardNumber.parse(number)
    for text in _renderings(card):
        assert number not in text
        assert leaks(text, number) == [], text
        assert card.masked() in text


def test_logging_a_card_shows_only_the_masked_form(caplog: pytest.LogCaptureFixture) -> None:
    number = _generated("4", 16, seed=99)
    card = CardNumber.parse(number)
    log = logging.getLogger("cardvault.test")
    with caplog.at_level(logging.DEBUG, logger="cardvault.test"):
        log.info("card %s", card)
        log.info("card %r", card)
        log.info("card %(card)s", {"card": card})
        log.info(f"card {card}")
        try:
            raise ValueError(card)
        except ValueError:
            log.exception("failed with %s", card)
    text = caplog.text + "".join(r.getMessage() for r in caplog.records)
    assert card.masked() in text
    assert leaks(text, number) == []


def test_structlog_renderers_show_only_the_masked_form() -> None:
    number = _generated("5", 16, seed=3)
    card = CardNumber.parse(number)
    event = {"event": "tokenized", "card": card}
    for renderer in (
        structlog.processors.KeyValueRenderer(),
        structlog.processors.JSONRenderer(),
        structlog.dev.ConsoleRenderer(colors=False),
    ):
        out = renderer(None, "info", dict(event))
        text = out if isinstance(out, str) else out.decode()
        assert leaks(text, number) == [], text


def test_amex_masks_five_middle_digits() -> None:
    assert CardNumber.parse(AMEX).masked() == AMEX[:6] + "*****" + AMEX[-4:]


# --- wiping ----------------------------------------------------------------------------


def test_wipe_zeroes_the_buffer_behind_digits_for_crypto() -> None:
    card = CardNumber.parse(VISA)
    view = card.digits_for_crypto()
    assert view.tobytes() == VISA.encode()
    assert view.readonly
    card.wipe()
    assert view.tobytes() == bytes(16)
    assert card.wiped
    with pytest.raises(WipedError):
        card.digits_for_crypto()


def test_facts_survive_wipe_but_digits_do_not() -> None:
    card = CardNumber.parse(VISA)
    card.wipe()
    card.wipe()  # idempotent
    assert (card.brand, card.last4, card.masked()) == ("visa", VISA[-4:], str(card))
    with pytest.raises(WipedError):
        _ = card == CardNumber.parse(VISA)


def test_context_manager_wipes_on_exit_and_on_error() -> None:
    with CardNumber.parse(VISA) as card:
        view = card.digits_for_crypto()
    assert view.tobytes() == bytes(16)

    views: list[memoryview] = []

    def use_and_fail() -> None:
        with CardNumber.parse(VISA) as card2:
            views.append(card2.digits_for_crypto())
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        use_and_fail()
    assert views[0].tobytes() == bytes(16)


def test_garbage_collection_wipes() -> None:
    card = CardNumber.parse(VISA)
    view = card.digits_for_crypto()
    del card
    gc.collect()
    assert view.tobytes() == bytes(16)


# --- comparison, hashing, pickling -----------------------------------------------------


def test_equality_is_by_digits_and_never_with_strings() -> None:
    assert CardNumber.parse(VISA) == CardNumber.parse(VISA)
    assert CardNumber.parse(VISA) != CardNumber.parse(AMEX)
    assert CardNumber.parse(VISA) != VISA


def test_card_numbers_are_unhashable() -> None:
    with pytest.raises(TypeError):
        hash(CardNumber.parse(VISA))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickling_is_refused(protocol: int) -> None:
    with pytest.raises(TypeError):
        pickle.dumps(CardNumber.parse(VISA), protocol=protocol)


@pytest.mark.parametrize("fn", [copy.copy, copy.deepcopy])
def test_copying_is_refused(fn: object) -> None:
    assert callable(fn)
    with pytest.raises(TypeError):
        fn(CardNumber.parse(VISA))


def test_card_number_has_no_instance_dict() -> None:
    with pytest.raises(TypeError):
        vars(CardNumber.parse(VISA))


@given(st.text(alphabet="0123456789", min_size=1, max_size=40))
def test_the_buffer_luhn_check_agrees_with_the_text_one_and_wipes_its_copies(
    digits: str,
) -> None:
    from cardvault.cards import luhn_valid
    from cardvault.cards.pan import _luhn_ok

    buf = bytearray(digits.encode("ascii"))
    assert _luhn_ok(buf) == luhn_valid(digits)
    assert buf == bytearray(digits.encode("ascii"))  # the buffer itself is untouched


@given(st.text(alphabet="0123456789", min_size=13, max_size=19))
def test_plain_digits_and_spaced_digits_parse_to_the_same_card(digits: str) -> None:
    spaced = " ".join(digits[i : i + 4] for i in range(0, len(digits), 4))
    outcomes = []
    for text in (digits, spaced, f"  {digits} "):
        try:
            with CardNumber.parse(text) as card:
                outcomes.append((card.brand, card.last4, card.length, card.masked()))
        except CardDataError as exc:
            outcomes.append((type(exc).__name__,))
    assert outcomes[0] == outcomes[1] == outcomes[2]
