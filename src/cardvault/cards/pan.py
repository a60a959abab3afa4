"""The card number (PAN) type.

A :class:`CardNumber` holds its digits in a wipeable buffer (see
:mod:`cardvault.cards._secret`), prints only as ``424242******4242``, and can only be
made by :meth:`CardNumber.parse`, which validates. The non-secret facts a
PaymentMethod shows (brand, funding, BIN, last four, length) are worked out once at
parse time and stay available after the digits are wiped, so a caller can encrypt,
wipe, and then build its response.

Parsing rules, and the error each failure raises (always with ``param="card[number]"``):

* ``None``, or a string that is empty or only spaces: :class:`ParameterMissing`
  (``parameter_missing``), as Stripe answers a missing ``card[number]``.
* Input that is not a number at all: :class:`InvalidNumber` (``invalid_number``). That
  is any type but ``str`` or ``int``; a negative ``int``; a ``bool``; and any string
  holding a character other than ASCII ``0``-``9`` and the separators below. Other
  scripts' digits (Arabic-Indic ``٤``, fullwidth ``４``, ...) are rejected here: they
  pass ``str.isdigit()`` and ``int()``, but no card network issues them.
* A number that is made of digits but is not a card number: :class:`IncorrectNumber`
  (``incorrect_number``). That is a length outside 13-19 digits, a length the brand
  does not issue (a 15-digit Visa), a leading ``0`` (reserved by ISO/IEC 7812, never a
  payment card), or a failed Luhn check. Stripe answers a mistyped
  number with ``incorrect_number`` ("Your card number is incorrect."), and a mistyped
  digit is what these checks catch.

Separators: Stripe documents ``card[number]`` as "a string without any separators", but
people paste numbers as printed on the card. We accept leading and trailing ASCII
spaces, and a single ASCII space or hyphen between two digits (``4242 4242 4242 4242``,
``4242-4242-4242-4242``). That is exactly the grammar the log scrubber
(:func:`cardvault.cards.luhn.find_card_numbers`) recognises, so any input we accept is
also one the scrubber would redact. Anything else (two spaces in a row, a tab, a dot)
is ``invalid_number``.

An ``int`` is accepted for JSON bodies that send the number unquoted. No brand issues
numbers with a leading zero, so nothing is lost.
"""

from __future__ import annotations

from typing import Final

from cardvault.cards import testcards
from cardvault.cards._secret import SecretDigits, WipedError
from cardvault.cards.brands import BRAND_INFO, Brand, Funding, detect_brand
from cardvault.cards.errors import IncorrectNumber, InvalidNumber, ParameterMissing
from cardvault.cards.luhn import PAN_MAX_DIGITS, PAN_MIN_DIGITS

__all__ = ["CardNumber", "WipedError"]

PARAM: Final = "card[number]"
_ZERO: Final = 0x30
# PCI DSS allows at most the first six and last four digits to be displayed.
_SHOWN_LEADING: Final = 6
_SHOWN_TRAILING: Final = 4
# Doubling table for the Luhn check: the value of digit d at a doubled position. A table
# lookup instead of "if n > 9: n -= 9" keeps the loop free of digit-dependent branches.
_LUHN_DOUBLED: Final = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


#: ``bytearray.translate`` table: an ASCII digit to its value when doubled by Luhn.
_LUHN_DOUBLED_ASCII: Final = bytes(
    _LUHN_DOUBLED[b - _ZERO] if _ZERO <= b <= _ZERO + 9 else 0 for b in range(256)
)


def _luhn_ok(buf: bytearray) -> bool:
    """Luhn over a buffer of ASCII digits, in a few C-level calls rather than a Python
    loop per digit. The slices and the translated copy hold digits of the card number,
    so they are wiped before returning, as the buffer itself will be."""
    parity = len(buf) % 2
    doubled = buf[parity::2]
    plain = buf[1 - parity :: 2]
    values = doubled.translate(_LUHN_DOUBLED_ASCII)
    try:
        return (sum(values) + sum(plain) - _ZERO * len(plain)) % 10 == 0
    finally:
        for copy in (doubled, plain, values):
            copy[:] = bytes(len(copy))


def _digits_from_str(value: str) -> bytearray:
    """Copy the digits of ``value`` into a new buffer, enforcing the separator grammar.

    Two passes over ``value`` by index: the first validates and counts, the second
    writes into a buffer allocated at its final size. No slices, no ``replace``, no
    growing buffer (a ``bytearray`` that grows is reallocated, leaving the old copy
    behind in freed memory).
    """
    if value.isascii() and value.isdigit():
        # The common case, plain digits: one pass, nothing to check between them.
        if len(value) > PAN_MAX_DIGITS:
            raise IncorrectNumber(param=PARAM)
        buf = bytearray(len(value))
        for j, ch in enumerate(value):
            buf[j] = ord(ch)
        return buf
    start, end = 0, len(value)
    while start < end and value[start] == " ":
        start += 1
    while end > start and value[end - 1] == " ":
        end -= 1
    if start == end:
        raise ParameterMissing(f"Missing required param: {PARAM}.", param=PARAM)

    count = 0
    for i in range(start, end):
        ch = value[i]
        if "0" <= ch <= "9":
            count += 1
        elif (
            ch in " -"
            and start < i < end - 1
            and "0" <= value[i - 1] <= "9"
            and "0" <= value[i + 1] <= "9"
        ):
            continue
        else:
            raise InvalidNumber(param=PARAM)
    if count > PAN_MAX_DIGITS:
        raise IncorrectNumber(param=PARAM)

    buf = bytearray(count)
    j = 0
    for i in range(start, end):
        ch = value[i]
        if "0" <= ch <= "9":
            buf[j] = ord(ch)
            j += 1
    return buf


def _digits_from_int(value: int) -> bytearray:
    if value < 0:
        raise InvalidNumber(param=PARAM)
    count, rest = 1, value
    while rest >= 10:
        rest //= 10
        count += 1
    if count > PAN_MAX_DIGITS:
        raise IncorrectNumber(param=PARAM)
    buf = bytearray(count)
    rest = value
    for j in range(count - 1, -1, -1):
        rest, d = divmod(rest, 10)
        buf[j] = _ZERO + d
    return buf


class CardNumber(SecretDigits):
    """A validated card number. Prints as ``424242******4242`` at most.

    Build one with :meth:`parse`. Use it as a context manager, or call :meth:`wipe`,
    to overwrite the digits when done. :meth:`digits_for_crypto` is the only way to the
    digits. Comparison with ``==`` is constant-time; instances are unhashable and
    refuse pickling and copying.
    """

    __slots__ = ("_bin", "_brand", "_funding", "_last4", "_length", "_test_card")

    _bin: str
    _brand: Brand
    _funding: Funding
    _last4: str
    _length: int
    #: The published test card this number is, found once by :meth:`parse`.
    _test_card: testcards.TestCardInfo | None

    @classmethod
    def parse(cls, value: object) -> CardNumber:
        """Validate ``value`` (the ``card[number]`` parameter) and return a CardNumber.

        Raises :class:`ParameterMissing`, :class:`InvalidNumber` or
        :class:`IncorrectNumber` as the module docstring describes; every error names
        ``card[number]`` and none repeats the input.
        """
        if value is None:
            raise ParameterMissing(f"Missing required param: {PARAM}.", param=PARAM)
        if isinstance(value, bool):
            raise InvalidNumber(param=PARAM)
        if isinstance(value, str):
            buf = _digits_from_str(value)
        elif isinstance(value, int):
            buf = _digits_from_int(value)
        else:
            raise InvalidNumber(param=PARAM)

        # From here the buffer is ours: wrap it at once so that every failure below
        # wipes it on the way out.
        card = cls._adopt(buf)
        try:
            length = len(buf)
            if not PAN_MIN_DIGITS <= length <= PAN_MAX_DIGITS:
                raise IncorrectNumber(param=PARAM)
            if buf[0] == _ZERO:
                # Major industry identifier 0 is reserved for ISO/TC 68; no card network
                # issues such numbers, and "0000000000000" would otherwise pass Luhn.
                raise IncorrectNumber(param=PARAM)
            bin_ = buf[:_SHOWN_LEADING].decode("ascii")
            brand = detect_brand(bin_)
            if length not in BRAND_INFO[brand].lengths or not _luhn_ok(buf):
                raise IncorrectNumber(param=PARAM)
            known = testcards.lookup_digits(buf)
        except BaseException:
            card.wipe()
            raise
        card._bin = bin_
        card._last4 = buf[length - _SHOWN_TRAILING :].decode("ascii")
        card._length = length
        card._brand = brand
        # Without a BIN table, funding is known only for the published test cards.
        card._funding = known.funding if known is not None else Funding.UNKNOWN
        card._test_card = known
        return card

    # --- non-secret facts, available after wipe() --------------------------------------

    @property
    def brand(self) -> Brand:
        """Stripe's ``card.brand`` (``visa``, ``amex``, ..., ``unknown``)."""
        return self._brand

    @property
    def display_brand(self) -> str:
        """Stripe's ``card.display_brand`` (``american_express``, ..., ``other``)."""
        return BRAND_INFO[self._brand].display_brand

    @property
    def funding(self) -> Funding:
        """``credit``, ``debit``, ``prepaid``, or ``unknown`` (see :mod:`.brands`)."""
        return self._funding

    @property
    def bin(self) -> str:
        """The first six digits (the issuer's BIN)."""
        return self._bin

    @property
    def last4(self) -> str:
        return self._last4

    @property
    def length(self) -> int:
        """How many digits the number has."""
        return self._length

    def masked(self) -> str:
        """``424242******4242``: first six, one ``*`` per hidden digit, last four."""
        hidden = self._length - _SHOWN_LEADING - _SHOWN_TRAILING
        return f"{self._bin}{'*' * hidden}{self._last4}"

    def _printable(self) -> str:
        # An object whose parse failed is wiped before anyone can print it, but a
        # debugger or a traceback formatter may still try: never fail, never leak.
        if not hasattr(self, "_last4"):
            return "****"
        return self.masked()
