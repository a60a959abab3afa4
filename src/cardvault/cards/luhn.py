"""The Luhn check, and finding card-number-shaped runs of digits in text.

Pure functions, no I/O. The finder is what the log scrubber, the error renderer, the
audit record's checks and the forwarding redactor use. It is deliberately wider than
what :meth:`cardvault.cards.CardNumber.parse` accepts, because it guards places where
the caller chose the text: a card number is any run of 13 to 19 digits whose digits
pass the Luhn check, where

* a digit is any Unicode decimal digit (``4``, fullwidth ``４``, Arabic-Indic ``٤`` …),
  read as its value,
* one separator may stand between two digits: a space of any kind, a dash (``-``,
  ``‐``, ``–``, ``−``, fullwidth ``－`` …), a dot (``.``, ``·``, ``．``), an underscore or a
  slash ("4242 4242 4242 4242", "4242.4242.4242.4242"), or a line break or other
  control character, except when a whole file is read line by line
  (``line_breaks=False``, for the scanner); and

* a run of 13 to 19 digits holds a card number when its digits after any leading zeros
  (no card number starts with 0) are 13 or more and pass Luhn, or when any run of its
  whole groups of card length does (a group ends at a separator or where the digits'
  script changes): "4242…4242/12" and "1 4242…4242" hold one.

A run of more than 19 digits may hide a card number glued to other digits: it is
condemned whole when any window of card length in it, starting with a digit other than
0, passes Luhn. The windows are checked in linear time (running sums), since the run
is the caller's text: checking each window digit by digit took a third of a second for
an 8 KiB URL of digits.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator

__all__ = [
    "PAN_MAX_DIGITS",
    "PAN_MIN_DIGITS",
    "card_number_in",
    "digits_of",
    "find_card_numbers",
    "holds_card_number",
    "luhn_valid",
    "redact_card_numbers",
]

PAN_MIN_DIGITS = 13
PAN_MAX_DIGITS = 19

# A digit is \d: any Unicode decimal digit (category Nd), since a card number typed in
# fullwidth or Arabic-Indic digits is still a card number to whoever reads the log.
# Only runs long enough to be a card number are matched at all: shorter ones (times,
# amounts) are the common case in logs and need no Luhn check.
# A separator is one character of space, a dash, a dot, an underscore or a slash, in
# ASCII or another script's form; in one value (a field, a header, a path) also a line
# break or any other control character, which a caller may put between the digits.
# Across the lines of a whole file (``line_breaks=False``, for the scanner) a line break
# separates nothing: the digits that end one log line and begin the next, a port and a
# date, are no card number.
_SEPARATOR = (
    r"[\t \u00a0\u1680\u2000-\u200a\u202f\u205f\u3000"
    r"\-._/\u00b7\u2010-\u2015\u2022\u2024\u2027\u2212\u30fb\uff0d\uff0e\uff0f\uff3f]"
)
_FIELD_SEPARATOR = rf"(?:{_SEPARATOR}|[\s\x00-\x1f\x7f])"
_LINE_RUN = re.compile(rf"(?<!\d)\d(?:{_SEPARATOR}?\d){{12,}}(?!\d)")
_FIELD_RUN = re.compile(rf"(?<!\d)\d(?:{_FIELD_SEPARATOR}?\d){{12,}}(?!\d)")
_NOT_DIGIT = re.compile(r"\D")


def digits_of(run: str) -> str:
    """The ASCII digits of a run that :func:`find_card_numbers` matched: separators
    dropped, other scripts' digits read as their values."""
    digits = _NOT_DIGIT.sub("", run)
    if digits.isascii():
        return digits
    return "".join(str(unicodedata.decimal(ch)) for ch in digits)


def luhn_valid(digits: str) -> bool:
    """True when ``digits`` (ASCII digits only) passes the Luhn check."""
    if not digits or not digits.isascii() or not digits.isdigit():
        return False
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = ord(ch) - 48
        if i % 2:
            n *= 2
            if n > 9:
                n -= 9
        total += n
    return total % 10 == 0


_DOUBLED = (0, 2, 4, 6, 8, 1, 3, 5, 7, 9)


def _window_card_number(digits: str) -> str | None:
    """The first card-length window of ``digits`` (ASCII) that starts with a digit
    other than 0 and passes Luhn, or None. Linear time: the Luhn sum of every window comes from two
    running sums, one for each parity of the doubled positions."""
    values = [ord(ch) - 48 for ch in digits]
    # sums[p][k]: the sum over positions j < k, doubling those with j % 2 == p.
    sums: list[list[int]] = [[0], [0]]
    for j, d in enumerate(values):
        for parity in (0, 1):
            sums[parity].append(sums[parity][-1] + (_DOUBLED[d] if j % 2 == parity else d))
    n = len(values)
    for width in range(PAN_MIN_DIGITS, PAN_MAX_DIGITS + 1):
        for start in range(n - width + 1):
            if values[start] == 0:
                continue  # ISO/IEC 7812: no card number starts with 0.
            end = start + width
            # Luhn doubles every second digit counting from the last one leftwards,
            # that is the positions j whose parity differs from the last one's.
            parity = end % 2
            if (sums[parity][end] - sums[parity][start]) % 10 == 0:
                return digits[start:end]
    return None


def _groups(run: str) -> list[str]:
    """The groups of digits of a matched run, as ASCII: a separator ends a group, and so
    does a change of script (``4242`` then fullwidth ``４２４２``)."""
    groups: list[str] = []
    current: list[str] = []
    zero = -1
    for ch in run:
        value = unicodedata.decimal(ch, -1)
        if value < 0:
            if current:
                groups.append("".join(current))
                current = []
            continue
        if current and ord(ch) - value != zero:
            groups.append("".join(current))
            current = []
        zero = ord(ch) - value
        current.append(chr(48 + value))
    if current:
        groups.append("".join(current))
    return groups


def card_number_in(run: str) -> str | None:
    """The card number (ASCII digits) in ``run``, a text :func:`find_card_numbers` can
    match, or None: the whole run, a run of its whole groups, or for a run longer than a
    card number, the first card-length window that passes (see the module docstring)."""
    digits = digits_of(run)
    n = len(digits)
    if n < PAN_MIN_DIGITS:
        return None
    if n > PAN_MAX_DIGITS:
        # A longer run may hide a card number glued to other digits: any Luhn-valid
        # window of card length condemns it.
        return _window_card_number(digits)
    # No card number starts with 0 (ISO/IEC 7812), and leading zeros change no Luhn sum:
    # a card number glued to zeros is the run without them, and a run of zeros is none.
    card = digits.lstrip("0")
    if len(card) >= PAN_MIN_DIGITS and luhn_valid(card):
        return card
    if run.isascii() and run.isdigit():
        return None
    # A card number written as groups may have a group of other digits beside it
    # ("4242…4242/12", "1 4242…4242", a digit of another script before it): every run of
    # whole groups of card length is a candidate too.
    groups = _groups(run)
    for first in range(len(groups)):
        candidate = ""
        for last in range(first, len(groups)):
            candidate += groups[last]
            if len(candidate) > PAN_MAX_DIGITS:
                break
            found = candidate.lstrip("0")
            if len(found) >= PAN_MIN_DIGITS and found != card and luhn_valid(found):
                return found
    return None


def _run_holds_card_number(run: str) -> bool:
    return card_number_in(run) is not None


def _runs(line_breaks: bool) -> re.Pattern[str]:
    return _FIELD_RUN if line_breaks else _LINE_RUN


def find_card_numbers(text: str, *, line_breaks: bool = True) -> Iterator[re.Match[str]]:
    """Yield the matches in ``text`` that hold a card number (see module docstring).
    ``line_breaks=False`` reads a line break (and any control character) as no
    separator: for whole files, whose lines are unrelated."""
    for match in _runs(line_breaks).finditer(text):
        if _run_holds_card_number(match.group()):
            yield match


def holds_card_number(text: str, *, line_breaks: bool = True) -> bool:
    """Whether ``text`` holds a card number (see module docstring); a text shorter than
    a card number is answered without a search."""
    return (
        len(text) >= PAN_MIN_DIGITS
        and next(find_card_numbers(text, line_breaks=line_breaks), None) is not None
    )


def redact_card_numbers(
    text: str, replacement: str = "[REDACTED CARD NUMBER]", *, line_breaks: bool = True
) -> str:
    """``text`` with every card number replaced by ``replacement``."""
    if len(text) < PAN_MIN_DIGITS:
        return text
    return _runs(line_breaks).sub(
        lambda m: replacement if _run_holds_card_number(m.group()) else m.group(),
        text,
    )
