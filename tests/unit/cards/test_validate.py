from __future__ import annotations

import copy
import logging
import pickle
from datetime import UTC, datetime, timedelta, timezone

import pytest

from cardvault.cards import CVC, Brand, Expiry, WipedError, validate_cvc, validate_expiry
from cardvault.cards.errors import CardError, ParameterMissing

NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)


def _expiry_error(month: object, year: object, now: datetime = NOW) -> tuple[str, str | None]:
    with pytest.raises((CardError, ParameterMissing)) as info:
        validate_expiry(month, year, now=now)
    return info.value.code, info.value.param


MONTH = ("invalid_expiry_month", "card[exp_month]")
YEAR = ("invalid_expiry_year", "card[exp_year]")


# --- expiry: accepted ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("month", "year", "expected"),
    [
        (6, 2026, Expiry(6, 2026)),  # the current month is still valid
        (12, 2026, Expiry(12, 2026)),
        (1, 2027, Expiry(1, 2027)),
        ("01", "2027", Expiry(1, 2027)),
        ("1", "27", Expiry(1, 2027)),
        (7, 26, Expiry(7, 2026)),
        (" 7 ", " 2026 ", Expiry(7, 2026)),
        (12, 2076, Expiry(12, 2076)),  # exactly fifty years ahead
    ],
)
def test_validate_expiry_accepts(month: object, year: object, expected: Expiry) -> None:
    assert validate_expiry(month, year, now=NOW) == expected


def test_card_is_valid_through_the_last_moment_of_its_month() -> None:
    end_of_june = datetime(2026, 6, 30, 23, 59, 59, tzinfo=UTC)
    assert validate_expiry(6, 2026, now=end_of_june) == Expiry(6, 2026)
    first_of_july = end_of_june + timedelta(seconds=1)
    assert _expiry_error(6, 2026, now=first_of_july) == MONTH


def test_now_is_used_in_its_own_time_zone_and_may_be_naive() -> None:
    # 2026-07-01 01:00 UTC is still June in UTC-8.
    pacific = datetime(2026, 6, 30, 17, 0, tzinfo=timezone(timedelta(hours=-8)))
    assert validate_expiry(6, 2026, now=pacific) == Expiry(6, 2026)
    assert validate_expiry(6, 2026, now=datetime(2026, 6, 1)) == Expiry(6, 2026)


def test_default_now_is_the_current_date() -> None:
    this_year = datetime.now(UTC).year
    assert validate_expiry(12, this_year + 1).year == this_year + 1
    with pytest.raises(CardError) as info:
        validate_expiry(12, this_year - 1)
    assert info.value.code == "invalid_expiry_year"


# --- expiry: rejected ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("month", "year", "expected"),
    [
        (5, 2026, MONTH),  # earlier month of the current year
        (1, 2026, MONTH),
        (12, 2025, YEAR),  # last year
        (6, 25, YEAR),
        (1, 2077, YEAR),  # more than fifty years ahead
        (0, 2027, MONTH),
        (13, 2027, MONTH),
        (-1, 2027, MONTH),
        ("001", 2027, MONTH),
        ("1.0", 2027, MONTH),
        (1.0, 2027, MONTH),
        (True, 2027, MONTH),
        ("٠١", 2027, MONTH),  # Arabic-Indic digits
        ("ab", 2027, MONTH),
        (13, 1999, MONTH),  # the month is checked first
        (1, "027", YEAR),
        (1, "20270", YEAR),
        (1, 20270, YEAR),
        (1, 999, YEAR),
        (1, 100, YEAR),
        (1, "2O27", YEAR),
        (1, "٢٠٢٧", YEAR),
        (1, 2027.0, YEAR),
        (1, False, YEAR),
        (1, -27, YEAR),
        (1, [2027], YEAR),
    ],
)
def test_validate_expiry_rejects(month: object, year: object, expected: tuple[str, str]) -> None:
    assert _expiry_error(month, year) == expected


@pytest.mark.parametrize(
    ("month", "year", "param"),
    [
        (None, 2027, "card[exp_month]"),
        ("", 2027, "card[exp_month]"),
        (1, None, "card[exp_year]"),
        (1, "  ", "card[exp_year]"),
    ],
)
def test_validate_expiry_reports_missing_parts(month: object, year: object, param: str) -> None:
    assert _expiry_error(month, year) == ("parameter_missing", param)


# --- CVC -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cvc", "brand"),
    [
        ("123", "visa"),
        ("012", "mastercard"),
        ("1234", "amex"),
        ("1234", Brand.AMEX),
        (" 987 ", "jcb"),
        ("123", "unknown"),
        ("1234", "unknown"),
    ],
)
def test_validate_cvc_accepts(cvc: str, brand: str) -> None:
    value = validate_cvc(cvc, brand)
    assert value.digits_for_crypto().tobytes() == cvc.strip().encode()


@pytest.mark.parametrize(
    ("cvc", "brand"),
    [
        ("123", "amex"),
        ("1234", "visa"),
        ("12", "visa"),
        ("12345", "unknown"),
        ("12a", "visa"),
        ("١٢٣", "visa"),
        ("１２３", "visa"),
        ("1 23", "visa"),
        ("-12", "visa"),
        (123, "visa"),
        (True, "visa"),
        (b"123", "visa"),
        (12.3, "visa"),
    ],
)
def test_validate_cvc_rejects(cvc: object, brand: str) -> None:
    with pytest.raises(CardError) as info:
        validate_cvc(cvc, brand)
    assert (info.value.code, info.value.param) == ("invalid_cvc", "card[cvc]")


@pytest.mark.parametrize("cvc", [None, "", "   "])
def test_validate_cvc_reports_missing(cvc: object) -> None:
    with pytest.raises(ParameterMissing) as info:
        validate_cvc(cvc, "visa")
    assert info.value.param == "card[cvc]"


def test_validate_cvc_refuses_unknown_brand_name() -> None:
    with pytest.raises(ValueError, match="bogus"):
        validate_cvc("123", "bogus")


def test_cvc_parse_is_validate_cvc() -> None:
    assert CVC.parse("4321", "amex") == validate_cvc("4321", "amex")
    assert CVC.parse("432", "visa") != validate_cvc("431", "visa")


def test_cvc_never_prints_its_digits(caplog: pytest.LogCaptureFixture) -> None:
    cvc = validate_cvc("4821", "amex")
    outputs = [
        repr(cvc),
        str(cvc),
        f"{cvc}",
        f"{cvc!r}",
        f"{cvc:>10}",
        "%s" % cvc,  # noqa: UP031
        repr([cvc]),
    ]
    with caplog.at_level(logging.INFO):
        logging.getLogger("cardvault.test").info("cvc %s %r", cvc, cvc)
    outputs.append(caplog.text)
    assert repr(cvc) == "***"
    for text in outputs:
        assert "4821" not in text
        assert "***" in text


def test_cvc_wipe_and_context_manager() -> None:
    with validate_cvc("4821", "amex") as cvc:
        view = cvc.digits_for_crypto()
        assert view.tobytes() == b"4821"
    assert view.tobytes() == bytes(4)
    with pytest.raises(WipedError):
        cvc.digits_for_crypto()


def test_cvc_refuses_pickling_copying_hashing_and_construction() -> None:
    cvc = validate_cvc("482", "visa")
    for attempt in (pickle.dumps, copy.copy, copy.deepcopy, hash):
        with pytest.raises(TypeError):
            attempt(cvc)
    with pytest.raises(TypeError):
        CVC("482")
