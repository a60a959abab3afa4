"""Request parameters: Stripe's form encoding with bracket notation, or JSON.

``card[number]=4242…&metadata[order]=6735&expand[]=x`` becomes
``{"card": {"number": "4242…"}, "metadata": {"order": "6735"}, "expand": ["x"]}``.
Errors name the parameter, never its value.
"""

from __future__ import annotations

import json
import re
from typing import Any
from urllib.parse import unquote

from cardvault.cards.luhn import PAN_MIN_DIGITS
from cardvault.errors import InvalidRequestError, RequestTooLarge, UnsupportedMediaType

__all__ = ["MAX_BODY_BYTES", "parse_body", "parse_form", "parse_pairs"]

#: A payment method with metadata fits in a few kilobytes; a larger body is a mistake or
#: an attack, and is refused before it is parsed.
MAX_BODY_BYTES = 64 * 1024
_MAX_DEPTH = 4
#: The most fields a form body may have (as ``parse_qsl(max_num_fields=...)``).
_MAX_FIELDS = 1000
_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_PART = re.compile(r"\[([^\[\]]*)\]")
#: Decoded and parsed parameter names, so that the few names real clients send
#: (``card%5Bnumber%5D``) are decoded and parsed once. Only names with fewer digits than
#: a card number has are kept: a name is the caller's text, and none that could hold a
#: card number may stay in memory.
_NAME_CACHE: dict[str, str] = {}
_KEY_CACHE: dict[str, tuple[str, ...]] = {}
_KEY_CACHE_MAX = 512
_NO_DIGITS = str.maketrans("", "", "0123456789")


def _cacheable(name: str) -> bool:
    return len(name) - len(name.translate(_NO_DIGITS)) < PAN_MIN_DIGITS


def _form_value(raw: str) -> str:
    """A form field's name or value decoded as ``parse_qsl`` does: ``+`` is a space and
    ``%XX`` escapes are UTF-8 (invalid sequences become U+FFFD)."""
    if "%" in raw or "+" in raw:
        return unquote(raw.replace("+", " "))
    return raw


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """The ``(name, value)`` pairs of a form body, exactly as
    ``urllib.parse.parse_qsl(text, keep_blank_values=True, max_num_fields=1000)``
    returns them (a property test holds the two together), in a fraction of its time:
    a field without ``=`` has an empty value, empty fields are skipped, and more than
    1000 fields raise :class:`ValueError`."""
    if text.count("&") >= _MAX_FIELDS:
        raise ValueError("Max number of fields exceeded")
    pairs: list[tuple[str, str]] = []
    for field in text.split("&"):
        if field:
            raw, _, value = field.partition("=")
            name = _NAME_CACHE.get(raw)
            if name is None:
                name = _form_value(raw)
                if len(_NAME_CACHE) < _KEY_CACHE_MAX and _cacheable(raw) and _cacheable(name):
                    _NAME_CACHE[raw] = name
            pairs.append((name, _form_value(value)))
    return pairs


def _key_parts(raw_key: str) -> tuple[str, ...]:
    parts = _KEY_CACHE.get(raw_key)
    if parts is None:
        match = _KEY.match(raw_key)
        if match is None:
            raise InvalidRequestError("A parameter name is malformed.")
        parts = (match.group(1), *_PART.findall(match.group(2)))
        if len(parts) > _MAX_DEPTH:
            raise InvalidRequestError("Parameters are nested too deeply.")
        if len(_KEY_CACHE) < _KEY_CACHE_MAX and _cacheable(raw_key):
            _KEY_CACHE[raw_key] = parts
    return parts


def parse_form(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for raw_key, value in pairs:
        parts = _key_parts(raw_key)
        node: Any = out
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            nxt = None if last else parts[i + 1]
            if isinstance(node, list):
                # ``a[]=x`` appends; ``a[0][b]=x`` addresses an index.
                if part == "":
                    if last:
                        node.append(value)
                        break
                    node.append({})
                    node = node[-1]
                    continue
                if not part.isdigit():
                    raise InvalidRequestError("A parameter name is malformed.", param=parts[0])
                index = int(part)
                while len(node) <= index:
                    node.append({} if not last else None)
                if last:
                    node[index] = value
                else:
                    if not isinstance(node[index], dict | list):
                        node[index] = [] if nxt == "" or (nxt or "").isdigit() else {}
                    node = node[index]
                continue
            if last:
                if part in node and isinstance(node[part], dict | list):
                    raise InvalidRequestError("A parameter is given twice.", param=parts[0])
                node[part] = value
            else:
                container: Any = [] if nxt == "" or (nxt or "").isdigit() else {}
                existing = node.setdefault(part, container)
                if not isinstance(existing, dict | list):
                    raise InvalidRequestError("A parameter is given twice.", param=parts[0])
                node = existing
    return out


def parse_body(body: bytes, content_type: str | None) -> dict[str, Any]:
    """The parameters of a request body (empty body → no parameters)."""
    if len(body) > MAX_BODY_BYTES:
        raise RequestTooLarge()
    if not body:
        return {}
    media = (content_type or "").split(";")[0].strip().lower()
    if media == "application/x-www-form-urlencoded":
        try:
            pairs = parse_pairs(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidRequestError("The form body could not be parsed.") from exc
        return parse_form(pairs)
    if media == "application/json":
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise InvalidRequestError("The JSON body could not be parsed.") from exc
        if not isinstance(data, dict):
            raise InvalidRequestError("The JSON body must be an object.")
        return data
    raise UnsupportedMediaType()
