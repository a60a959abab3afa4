"""Fuzz the card-number parser and the card-number finder and redactor.

The first byte of an input picks how the rest becomes the value under test:

``s``
    a ``str``: the rest decoded as UTF-8, undecodable bytes as lone surrogates
    (``surrogateescape``), as a JSON body can deliver them;
``l``
    a ``str``: the rest decoded as latin-1 (every byte one character);
``i``
    an ``int``: the rest read as decimal when it is ASCII digits (an optional leading
    ``-``), else as a signed big-endian integer; at most 4300 digits, the most a JSON
    body can hold.

Any other first byte picks by its value modulo 3 (``i``, ``s``, ``l``).
``CARDVAULT_FUZZ_MODES`` (``s``, ``il`` …) fuzzes only those modes.

Properties (anything else is a finding):

* ``CardNumber.parse`` raises only :class:`~cardvault.cards.errors.CardDataError`
  subclasses;
* what it accepts, ``holds_card_number`` finds in the same text (``str(value)`` for an
  int): the parser and the scrubber agree;
* ``holds_card_number`` is true exactly when ``find_card_numbers`` finds something;
* ``redact_card_numbers(text)`` holds nothing ``find_card_numbers`` finds, and no run
  that an independent reading of the grammar the parser accepts finds: 13 to 19 ASCII
  digits with one space or dash allowed between two of them, passing Luhn, and maximal
  (the finder may be wider than this, never narrower); it changes nothing when the
  finder finds nothing;
* no exception from the finder or redactor, and an input takes at most
  ``CARDVAULT_FUZZ_SLOW_MS`` (100 ms).
"""

from __future__ import annotations

import _harness

_MAX_INT_DIGITS = 4300
_MIN, _MAX = 13, 19
_SEPARATORS = " -"


def load() -> None:
    import cardvault.cards.luhn
    import cardvault.cards.pan
    import cardvault.errors  # noqa: F401


def _mode(data: bytes) -> str:
    return {ord("s"): "s", ord("l"): "l", ord("i"): "i"}.get(data[0]) or "isl"[data[0] % 3]


def _value(data: bytes) -> str | int:
    mode = _mode(data)
    rest = data[1:]
    if mode == "s":
        return rest.decode("utf-8", "surrogateescape")
    if mode == "l":
        return rest.decode("latin-1")
    text = rest.decode("latin-1")
    digits = text[1:] if text.startswith("-") else text
    if digits.isascii() and digits.isdigit():
        return int(text[: len(text) - len(digits) + _MAX_INT_DIGITS])
    return int.from_bytes(rest[: _MAX_INT_DIGITS * 10 // 25], "big", signed=True)


# --- an independent reading of the documented grammar ---------------------------------


def _luhn(digits: str) -> bool:
    total = 0
    for position, ch in enumerate(reversed(digits)):
        value = (ord(ch) - 48) * (2 if position % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def _is_digit(ch: str) -> bool:
    return "0" <= ch <= "9"


def reference_runs(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of every maximal run of ASCII digits, with one space or dash
    allowed between two of them, that has 13 to 19 digits, 13 or more after its leading
    zeros, and passes Luhn: what no redacted text may hold, read without the module's
    code."""
    found: list[tuple[int, int]] = []
    i, n = 0, len(text)
    while i < n:
        if not _is_digit(text[i]):
            i += 1
            continue
        j = i
        while True:
            if j + 1 < n and _is_digit(text[j + 1]):
                j += 1
            elif j + 2 < n and text[j + 1] in _SEPARATORS and _is_digit(text[j + 2]):
                j += 2
            else:
                break
        # No card number starts with 0, and leading zeros change no Luhn sum: a run of
        # zeros is no card number, and one glued to zeros is the run without them.
        digits = "".join(ch for ch in text[i : j + 1] if _is_digit(ch))
        card = digits.lstrip("0")
        if _MIN <= len(digits) <= _MAX and len(card) >= _MIN and _luhn(card):
            found.append((i, j + 1))
        i = j + 1
    return found


def _one(data: bytes) -> None:
    from cardvault.cards.errors import CardDataError
    from cardvault.cards.luhn import find_card_numbers, holds_card_number, redact_card_numbers
    from cardvault.cards.pan import CardNumber

    if not data or _harness.skip_mode(_mode(data)):
        return
    value = _value(data)
    text = value if isinstance(value, str) else str(value)

    accepted = False
    try:
        with _harness.target():
            card = CardNumber.parse(value)
    except CardDataError:
        pass
    except Exception as exc:
        _harness.unexpected(exc, "CardNumber.parse")
    else:
        accepted = True
        card.wipe()

    try:
        with _harness.target():
            matches = [m.span() for m in find_card_numbers(text)]
            holds = holds_card_number(text)
            redacted = redact_card_numbers(text)
            left = [m.span() for m in find_card_numbers(redacted)]
    except Exception as exc:
        _harness.unexpected(exc, "the card-number finder")
        return

    if accepted and not holds:
        _harness.finding(
            "parser-scrubber-disagree",
            f"CardNumber.parse accepted a {type(value).__name__} that holds_card_number "
            "does not find",
        )
    if holds != bool(matches):
        _harness.finding("finder-mismatch", f"holds_card_number is {holds}, matches {matches}")
    if left:
        _harness.finding("unredacted", "find_card_numbers finds a card number in redacted text")
    remaining = reference_runs(redacted)
    if remaining:
        _harness.finding(
            "unredacted",
            f"redact_card_numbers left a Luhn-valid run of 13-19 ASCII digits at {remaining}",
        )
    if not matches and redacted != text:
        _harness.finding("redactor-changed-clean-text", "redact_card_numbers changed a clean text")


def TestOneInput(data: bytes) -> None:
    _harness.timed(_one, data)


if __name__ == "__main__":
    _harness.main(TestOneInput, load, mode_bytes=1)
