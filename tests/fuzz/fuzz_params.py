"""Fuzz the vault's request parameters: form and JSON bodies, and query strings.

The first byte of an input picks what the rest is (so that seeds read as what they are):

``f`` / ``F``
    a form body, ``parse_body(rest, "application/x-www-form-urlencoded")`` (``F``: with
    ``; charset=utf-8`` and odd case);
``j`` / ``J``
    a JSON body, ``parse_body(rest, "application/json")`` (``J``: likewise);
``q``
    a query string, as the API reads it: ``parse_form(list(QueryParams(rest).multi_items()))``.

Any other first byte picks by its value modulo 3, in that order. ``CARDVAULT_FUZZ_MODES``
(``j``, ``fq`` …) fuzzes only those modes.

Properties (anything else is a finding):

* the only exceptions are :class:`cardvault.errors.CardVaultError` subclasses (4xx);
* the result is a ``dict``; every string in it (keys too) encodes to UTF-8;
* no amplification: list items plus dict entries in the result are at most the number
  of bytes of input, and so are the characters of its strings (keys included);
* one input takes at most ``CARDVAULT_FUZZ_SLOW_MS`` (100 ms).

Run: ``.venv/bin/python tests/fuzz/fuzz_params.py -dict=tests/fuzz/dict/params.dict
tests/fuzz/corpus/params`` (better: ``bench/fuzz.py --harness params``).
"""

from __future__ import annotations

from typing import Any

import _harness
from starlette.datastructures import QueryParams

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"
#: First byte -> (mode, content type).
_MODES: dict[int, tuple[str, str | None]] = {
    ord("f"): ("f", FORM),
    ord("F"): ("f", "Application/X-WWW-Form-Urlencoded; charset=utf-8"),
    ord("j"): ("j", JSON),
    ord("J"): ("j", " APPLICATION/JSON ; charset=UTF-8"),
    ord("q"): ("q", None),
}
_BY_VALUE: tuple[tuple[str, str | None], ...] = (("f", FORM), ("j", JSON), ("q", None))


def load() -> None:
    import cardvault.errors
    import cardvault.vault.params  # noqa: F401


def _check_result(result: Any, size: int, where: str) -> None:
    if not isinstance(result, dict):
        _harness.finding("result-type", f"{where} returned a {type(result).__name__}, not a dict")
        return
    items, chars = _harness.shape_of(result, where)
    if items > size:
        _harness.finding(
            "amplification",
            f"{where}: {size} bytes of input became {items} list items and dict entries",
        )
    if chars > size:
        _harness.finding(
            "amplification", f"{where}: {size} bytes of input became {chars} characters of text"
        )


def _one(data: bytes) -> None:
    from cardvault.errors import CardVaultError
    from cardvault.vault.params import parse_body, parse_form

    if not data:
        return
    mode, content_type = _MODES.get(data[0]) or _BY_VALUE[data[0] % 3]
    if _harness.skip_mode(mode):
        return
    rest = data[1:]
    if mode == "q":
        # As Starlette reads request.query_params: latin-1, then parse_qsl.
        pairs = list(QueryParams(rest).multi_items())
        where = "parse_form(query)"
        try:
            with _harness.target():
                result = parse_form(pairs)
        except CardVaultError:
            return
        except Exception as exc:
            _harness.unexpected(exc, where)
            return
    else:
        where = f"parse_body({content_type!r})"
        try:
            with _harness.target():
                result = parse_body(rest, content_type)
        except CardVaultError:
            return
        except Exception as exc:
            _harness.unexpected(exc, where)
            return
    _check_result(result, len(rest), where)


def TestOneInput(data: bytes) -> None:
    _harness.timed(_one, data)


if __name__ == "__main__":
    _harness.main(TestOneInput, load, mode_bytes=1)
