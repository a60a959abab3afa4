"""The Luhn check, and finding card-number-shaped runs of digits in text.

Pure functions, no I/O. The finder is what the log scrubber and the forwarding redactor
use: a card number is any run of 13 to 19 ASCII digits, optionally split by single
spaces or dashes ("4242 4242 4242 4242"), whose digits pass the Luhn check.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

__all__ = [
    "PAN_MAX_DIGITS",
    "PAN_MIN_DIGITS",
    "find_card_numbers",
    "holds_card_number",
    "luhn_valid",
    "redact_card_numbers",
]

PAN_MIN_DIGITS = 13
PAN_MAX_DIGITS = 19

# A run of ASCII digits where single spaces or dashes may separate digits. [0-9], not \d:
# \d also matches other scripts' digits, which are never part of a card number.
# Only runs long enough to be a card number are matched at all: shorter ones (times,
# amounts) are the common case in logs and need no Luhn check.
_DIGIT_RUN = re.compile(r"(?<![0-9])[0-9](?:[ \-]?[0-9]){12,}(?![0-9])")
_SEPARATORS = str.maketrans("", "", " -")


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


def _run_holds_card_number(digits: str) -> bool:
    n = len(digits)
    if n < PAN_MIN_DIGITS:
        return False
    if n <= PAN_MAX_DIGITS:
        return luhn_valid(digits)
    # A longer run may hide a card number glued to other digits. Logs are not the
    # place to be clever: any Luhn-valid window of card length condemns the run.
    return any(
        luhn_valid(digits[start : start + width])
        for width in range(PAN_MIN_DIGITS, PAN_MAX_DIGITS + 1)
        for start in range(0, n - width + 1)
    )


def find_card_numbers(text: str) -> Iterator[re.Match[str]]:
    """Yield the matches in ``text`` that hold a card number (see module docstring)."""
    for match in _DIGIT_RUN.finditer(text):
        if _run_holds_card_number(match.group().translate(_SEPARATORS)):
            yield match


def holds_card_number(text: str) -> bool:
    """Whether ``text`` holds a card number (see module docstring); a text shorter than
    a card number is answered without a search."""
    return len(text) >= PAN_MIN_DIGITS and next(find_card_numbers(text), None) is not None


def redact_card_numbers(text: str, replacement: str = "[REDACTED CARD NUMBER]") -> str:
    """``text`` with every card number replaced by ``replacement``."""
    if len(text) < PAN_MIN_DIGITS:
        return text
    return _DIGIT_RUN.sub(
        lambda m: (
            replacement if _run_holds_card_number(m.group().translate(_SEPARATORS)) else m.group()
        ),
        text,
    )
