"""Validating the expiry date and the CVC.

Expiry rules (Stripe's, as far as its API shows them; ``param`` is ``card[exp_month]``
or ``card[exp_year]``):

* ``None`` or an empty string: :class:`ParameterMissing`.
* The month must be 1-12, given as an ``int`` or a string of one or two ASCII digits
  ("1", "01"); anything else is ``invalid_expiry_month``.
* The year is an ``int`` or a string of ASCII digits with two or four digits; two-digit
  years mean 20YY, as on the card face. Anything else (three digits, "2O30", "٢٠٣٠",
  a float) is ``invalid_expiry_year``.
* A year before the current one is ``invalid_expiry_year``; the current year with a
  month already past is ``invalid_expiry_month``. That is how Stripe reports a date in
  the past when a card is created: it names the field that is wrong. ``expired_card``
  is left for the issuer's answer at authorisation time (test card ...0069).
* A year more than :data:`MAX_YEARS_AHEAD` after the current one is
  ``invalid_expiry_year``: cards are issued for a few years, so such a date is a typo.
* A card is valid through the last day of its expiry month. "Now" is UTC unless the
  caller passes ``now`` (a naive ``now`` is taken as it is).

The month is checked before the year, so "13/1999" is reported as the month.

CVC rules (``param`` is ``card[cvc]``): a string of ASCII digits, four for American
Express and three for every other brand (three or four when the brand is unknown).
Anything else is ``invalid_cvc``; ``None`` or an empty string is
:class:`ParameterMissing` (callers that treat the CVC as optional check for absence
first). An ``int`` is refused: it cannot carry a leading zero, and "012" is a CVC.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from cardvault.cards._secret import SecretDigits
from cardvault.cards.brands import brand_info
from cardvault.cards.errors import (
    CardError,
    InvalidCVC,
    InvalidExpiryMonth,
    InvalidExpiryYear,
    ParameterMissing,
)

__all__ = ["CVC", "MAX_YEARS_AHEAD", "Expiry", "validate_cvc", "validate_expiry"]

MONTH_PARAM: Final = "card[exp_month]"
YEAR_PARAM: Final = "card[exp_year]"
CVC_PARAM: Final = "card[cvc]"
MAX_YEARS_AHEAD: Final = 50
_CVC_MAX_DIGITS: Final = 4


@dataclass(frozen=True, slots=True)
class Expiry:
    """A validated expiry date; ``year`` always has four digits."""

    month: int
    year: int


def _missing(param: str) -> ParameterMissing:
    return ParameterMissing(f"Missing required param: {param}.", param=param)


def _ascii_digits(value: str) -> bool:
    return value.isascii() and value.isdigit()


def _to_int(
    value: object, param: str, error: type[CardError], *, str_lengths: tuple[int, ...]
) -> tuple[int, int | None]:
    """``value`` as an int, and the number of digits it was written with (None for int)."""
    if value is None:
        raise _missing(param)
    if isinstance(value, bool):
        raise error(param=param)
    if isinstance(value, int):
        return value, None
    if isinstance(value, str):
        text = value.strip(" ")
        if not text:
            raise _missing(param)
        if _ascii_digits(text) and len(text) in str_lengths:
            return int(text), len(text)
    raise error(param=param)


def validate_expiry(month: object, year: object, *, now: datetime | None = None) -> Expiry:
    """Validate ``card[exp_month]`` and ``card[exp_year]``; see the module docstring."""
    m, _ = _to_int(month, MONTH_PARAM, InvalidExpiryMonth, str_lengths=(1, 2))
    if not 1 <= m <= 12:
        raise InvalidExpiryMonth(param=MONTH_PARAM)

    y, written = _to_int(year, YEAR_PARAM, InvalidExpiryYear, str_lengths=(2, 4))
    if written == 2 or (written is None and 0 <= y <= 99):
        y += 2000
    elif not 1000 <= y <= 9999:
        raise InvalidExpiryYear(param=YEAR_PARAM)

    today = now if now is not None else datetime.now(UTC)
    if y < today.year or y > today.year + MAX_YEARS_AHEAD:
        raise InvalidExpiryYear(param=YEAR_PARAM)
    if y == today.year and m < today.month:
        raise InvalidExpiryMonth(param=MONTH_PARAM)
    return Expiry(month=m, year=y)


class CVC(SecretDigits):
    """A validated card security code. Prints as ``***``; never shows its digits.

    Build one with :func:`validate_cvc`. Like :class:`~cardvault.cards.pan.CardNumber`
    it can be wiped, is a context manager, compares in constant time, and refuses
    pickling and copying. :meth:`digits_for_crypto` is the only way to the digits.
    """

    __slots__ = ()

    @classmethod
    def parse(cls, value: object, brand: str) -> CVC:
        """Same as :func:`validate_cvc`."""
        return validate_cvc(value, brand)

    def _printable(self) -> str:
        return "***"


def validate_cvc(cvc: object, brand: str) -> CVC:
    """Validate ``card[cvc]`` for a card of ``brand`` (a Stripe brand name).

    ``ValueError`` if ``brand`` is not a brand name at all (a bug in the caller).
    """
    lengths = brand_info(brand).cvc_lengths
    if cvc is None:
        raise _missing(CVC_PARAM)
    if not isinstance(cvc, str):
        raise InvalidCVC(param=CVC_PARAM)
    start, end = 0, len(cvc)
    while start < end and cvc[start] == " ":
        start += 1
    while end > start and cvc[end - 1] == " ":
        end -= 1
    if start == end:
        raise _missing(CVC_PARAM)
    count = end - start
    if count > _CVC_MAX_DIGITS or count not in lengths:
        raise InvalidCVC(param=CVC_PARAM)
    # Index by index into a buffer of the final size, as CardNumber.parse does: no
    # stripped copy of the string, no growing buffer.
    buf = bytearray(count)
    for j in range(count):
        ch = cvc[start + j]
        if not "0" <= ch <= "9":
            buf[:] = bytes(count)
            raise InvalidCVC(param=CVC_PARAM)
        buf[j] = ord(ch)
    return CVC._adopt(buf)
