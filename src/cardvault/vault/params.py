"""Request parameters: Stripe's form encoding with bracket notation, or JSON.

``card[number]=4242…&metadata[order]=6735&expand[]=x`` becomes
``{"card": {"number": "4242…"}, "metadata": {"order": "6735"}, "expand": ["x"]}``.
Errors name the parameter, never its value.

Every size a request chooses is bounded before work is done on it (:class:`ParseLimits`):
the number of fields, how deeply a name nests, and how long a list may grow. A list
index addresses an item that exists or the next one, never a gap: ``a[100000000]=x``
is refused, not padded to a hundred million items (an outside tester grew the vault by
800 MB with one 95-byte request that way). A JSON body is parsed by orjson, which
refuses lone surrogates (text no database can store) and nesting past 1024 levels
without recursing in Python; the shape is then held to the same limits as a form.

The checks every endpoint shares are here too: :func:`check_keys` (no parameter but the
endpoint's own, and a name echoed only when it has the shape of one), and
:func:`parse_metadata` (Stripe's ``metadata``, never holding a card number). For the
lists, :func:`parse_page` reads the pagination parameters and :func:`read_page` asks the
store for one page, the same way for every list.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote

import orjson

from cardvault.cards import holds_card_number
from cardvault.cards.luhn import PAN_MIN_DIGITS
from cardvault.errors import (
    InvalidRequestError,
    ParameterUnknown,
    RequestTooLarge,
    UnsupportedMediaType,
)
from cardvault.vault.ids import looks_like_id

__all__ = [
    "DEFAULT_LIMITS",
    "MAX_BODY_BYTES",
    "PAGE_PARAMS",
    "Page",
    "ParseLimits",
    "check_keys",
    "list_object",
    "parse_body",
    "parse_form",
    "parse_json",
    "parse_metadata",
    "parse_page",
    "parse_pairs",
    "read_page",
]

#: A payment method with metadata fits in a few kilobytes; a larger body is a mistake or
#: an attack, and is refused before it is parsed.
MAX_BODY_BYTES = 64 * 1024


@dataclass(frozen=True)
class ParseLimits:
    """What one request's parameters may be. Each is a setting (``[limits]`` in the
    vault's configuration; see docs/security.md)."""

    #: The most fields a form body or query string may have, and the most values
    #: (objects, lists and scalars) a JSON body may hold.
    max_fields: int = 1000
    #: The most names in one parameter: ``request[headers][0][name]`` has four.
    max_depth: int = 4
    #: The most items one list may hold (indices 0 to max_list_items - 1).
    max_list_items: int = 100
    #: The largest body read, in bytes.
    max_body_bytes: int = MAX_BODY_BYTES

    def __post_init__(self) -> None:
        if min(self.max_fields, self.max_depth, self.max_list_items, self.max_body_bytes) < 1:
            raise ValueError("parse limits must be at least 1")


DEFAULT_LIMITS = ParseLimits()

#: A parameter's first name is a word, as every name of Stripe's API is. The names in
#: brackets after it may be any text without brackets (metadata keys are the caller's).
_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]{0,63})((?:\[[^\[\]]*\])*)$")
_PART = re.compile(r"\[([^\[\]]*)\]")
#: The longest list index written out: max_list_items is far below a million.
_MAX_INDEX_DIGITS = 6
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


def parse_pairs(text: str, max_fields: int = DEFAULT_LIMITS.max_fields) -> list[tuple[str, str]]:
    """The ``(name, value)`` pairs of a form body, exactly as
    ``urllib.parse.parse_qsl(text, keep_blank_values=True, max_num_fields=max_fields)``
    returns them (a property test holds the two together), in a fraction of its time:
    a field without ``=`` has an empty value, empty fields are skipped, and more than
    ``max_fields`` fields raise :class:`ValueError`."""
    if text.count("&") >= max_fields:
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


def _key_parts(raw_key: str, max_depth: int) -> tuple[str, ...]:
    parts = _KEY_CACHE.get(raw_key)
    if parts is None:
        match = _KEY.match(raw_key)
        if match is None:
            raise InvalidRequestError(
                "A parameter name is malformed: names are words, with names in brackets "
                "after them (card[number])."
            )
        parts = (match.group(1), *_PART.findall(match.group(2)))
        if len(_KEY_CACHE) < _KEY_CACHE_MAX and _cacheable(raw_key):
            _KEY_CACHE[raw_key] = parts
    if len(parts) > max_depth:
        raise InvalidRequestError("Parameters are nested too deeply.", param=parts[0])
    return parts


def _container_for(next_part: str) -> dict[str, Any] | list[Any]:
    """What a name's next part opens: ``a[]``/``a[0]`` a list, ``a[b]`` a hash."""
    return [] if next_part == "" or (next_part.isascii() and next_part.isdigit()) else {}


def _list_index(node: list[Any], part: str, param: str, limits: ParseLimits) -> int:
    """The index ``part`` names in ``node``: an item that exists or the next one."""
    if part == "":
        index = len(node)
    elif not (part.isascii() and part.isdigit()):
        raise InvalidRequestError("A parameter name is malformed.", param=param)
    elif len(part) > _MAX_INDEX_DIGITS or int(part) > len(node):
        raise InvalidRequestError(
            "List indices must count up from 0 without gaps (a[0], a[1], …).", param=param
        )
    else:
        index = int(part)
    if index >= limits.max_list_items:
        raise InvalidRequestError(
            f"A list may hold at most {limits.max_list_items} items.", param=param
        )
    return index


def parse_form(
    pairs: list[tuple[str, str]], limits: ParseLimits = DEFAULT_LIMITS
) -> dict[str, Any]:
    """Nest form pairs by their bracket names (see the module docstring for the limits)."""
    if len(pairs) > limits.max_fields:
        raise InvalidRequestError(f"A request may have at most {limits.max_fields} parameters.")
    out: dict[str, Any] = {}
    for raw_key, value in pairs:
        parts = _key_parts(raw_key, limits.max_depth)
        param = parts[0]
        node: Any = out
        last_at = len(parts) - 1
        for i, part in enumerate(parts):
            last = i == last_at
            if isinstance(node, list):
                index = _list_index(node, part, param, limits)
                if index == len(node):
                    node.append(value if last else _container_for(parts[i + 1]))
                elif last:
                    if isinstance(node[index], dict | list):
                        raise InvalidRequestError("A parameter is given twice.", param=param)
                    node[index] = value
                elif not isinstance(node[index], dict | list):
                    raise InvalidRequestError("A parameter is given twice.", param=param)
                node = node[index]
                continue
            if last:
                if part in node and isinstance(node[part], dict | list):
                    raise InvalidRequestError("A parameter is given twice.", param=param)
                node[part] = value
            else:
                existing = node.setdefault(part, _container_for(parts[i + 1]))
                if not isinstance(existing, dict | list):
                    raise InvalidRequestError("A parameter is given twice.", param=param)
                node = existing
    return out


def _check_json_shape(data: dict[str, Any], limits: ParseLimits) -> None:
    """Hold a parsed JSON object to the limits a form is held to, without recursion."""
    count = 0
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
        elif isinstance(value, list):
            if len(value) > limits.max_list_items:
                raise InvalidRequestError(f"A list may hold at most {limits.max_list_items} items.")
            children = value
        else:
            continue
        count += len(value)
        if count > limits.max_fields:
            raise InvalidRequestError(f"A request may have at most {limits.max_fields} parameters.")
        if value and depth + 1 > limits.max_depth:
            raise InvalidRequestError("Parameters are nested too deeply.")
        stack.extend((child, depth + 1) for child in children)


def parse_json(body: bytes, limits: ParseLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """A JSON body's parameters: an object of at most ``limits``' size and depth."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        # orjson's message quotes positions, never the text; it is still not shown.
        raise InvalidRequestError(
            "The JSON body could not be parsed: send UTF-8 JSON without lone surrogates "
            "(\\ud800) or non-finite numbers."
        ) from exc
    if not isinstance(data, dict):
        raise InvalidRequestError("The JSON body must be an object.")
    _check_json_shape(data, limits)
    return data


def parse_body(
    body: bytes, content_type: str | None, limits: ParseLimits = DEFAULT_LIMITS
) -> dict[str, Any]:
    """The parameters of a request body (empty body → no parameters)."""
    if len(body) > limits.max_body_bytes:
        raise RequestTooLarge()
    if not body:
        return {}
    media = (content_type or "").split(";")[0].strip().lower()
    if media == "application/x-www-form-urlencoded":
        if body[:1] == b"{":
            # curl -d sends JSON as a form unless told otherwise; the whole body would
            # otherwise become one parameter name.
            raise InvalidRequestError(
                "The body looks like JSON: send it with Content-Type: application/json."
            )
        try:
            pairs = parse_pairs(body.decode("utf-8"), limits.max_fields)
        except (UnicodeDecodeError, ValueError) as exc:
            raise InvalidRequestError("The form body could not be parsed.") from exc
        return parse_form(pairs, limits)
    if media == "application/json":
        return parse_json(body, limits)
    raise UnsupportedMediaType()


# -- what every endpoint checks -------------------------------------------------------------

#: A parameter name is echoed in an error only when it looks like one of Stripe's names
#: (a word) or a metadata key without a long run of digits: any other name is the
#: caller's text, and may be a card number sent where a name belongs.
_ECHOED_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_ .\-]{0,39}")
_DIGIT_RUN = re.compile(r"[0-9]{7,}")


def check_keys(data: dict[str, Any], allowed: Collection[str], prefix: str = "") -> None:
    """400 ``parameter_unknown`` for the first name in ``data`` not in ``allowed``
    (``prefix`` names the hash they are in: ``card``, ``request``)."""
    for key in data:
        if key not in allowed:
            text = str(key)
            if not _ECHOED_NAME.fullmatch(text) or _DIGIT_RUN.search(text):
                raise ParameterUnknown(
                    "Received an unknown parameter" + (f" in {prefix}." if prefix else "."),
                    param=prefix or None,
                )
            name = f"{prefix}[{text}]" if prefix else text
            raise ParameterUnknown(f"Received unknown parameter: {name}", param=name)


# Stripe's limits on metadata, which callers' code already respects.
_METADATA_MAX_KEYS = 50
_METADATA_MAX_KEY = 40
_METADATA_MAX_VALUE = 500


def parse_metadata(value: Any) -> dict[str, str]:
    """Stripe's ``metadata``: at most 50 keys of 1 to 40 characters, values strings (or
    numbers, kept as strings) of at most 500. It is stored in the clear, so a key or
    value that holds a card number is refused."""
    if value in (None, ""):
        return {}
    if not isinstance(value, dict):
        raise InvalidRequestError("metadata must be a hash of keys to strings.", param="metadata")
    if len(value) > _METADATA_MAX_KEYS:
        raise InvalidRequestError("metadata may have at most 50 keys.", param="metadata")
    out: dict[str, str] = {}
    for k, v in value.items():
        if not isinstance(k, str) or not k or len(k) > _METADATA_MAX_KEY:
            raise InvalidRequestError("metadata keys are 1 to 40 characters.", param="metadata")
        if (
            not isinstance(v, str | int | float)
            or isinstance(v, bool)
            or len(str(v)) > _METADATA_MAX_VALUE
        ):
            raise InvalidRequestError(
                "metadata values are strings of at most 500 characters.", param=f"metadata[{k}]"
            )
        out[k] = str(v)
    for k, v in out.items():
        if holds_card_number(f"{k} {v}"):
            raise InvalidRequestError("metadata must not contain card numbers.", param="metadata")
    return out


# -- the lists ---------------------------------------------------------------------------------

#: The pagination parameters every list reads.
PAGE_PARAMS = frozenset({"limit", "starting_after", "ending_before"})


@dataclass(frozen=True)
class Page:
    """A list request's page: how many, and after or before which object."""

    limit: int
    starting_after: str | None
    ending_before: str | None


_LIMIT_DIGITS = 3


def _cursor(query: dict[str, Any], name: str, prefix: str) -> str | None:
    value = query.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not looks_like_id(value, prefix):
        raise InvalidRequestError(f"{name} must be an object id ({prefix}…).", param=name)
    return value


def parse_page(query: dict[str, Any], prefix: str, *, most: int = 100) -> Page:
    """Stripe's pagination parameters: ``limit`` (1 to ``most``, default 10) and at most
    one of ``starting_after`` / ``ending_before``, each an id with ``prefix``. An empty
    cursor is no cursor."""
    raw = query.get("limit", "10")
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    if not (isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= _LIMIT_DIGITS):
        raise InvalidRequestError("limit must be an integer.", param="limit")
    limit = int(raw)
    if not 1 <= limit <= most:
        raise InvalidRequestError(f"limit must be between 1 and {most}.", param="limit")
    after = _cursor(query, "starting_after", prefix)
    before = _cursor(query, "ending_before", prefix)
    if after is not None and before is not None:
        raise InvalidRequestError("Give starting_after or ending_before, not both.")
    return Page(limit, after, before)


_T = TypeVar("_T")


async def read_page(
    query: dict[str, Any],
    prefix: str,
    fetch: Callable[..., Awaitable[list[_T]]],
    *,
    params: Collection[str] = (),
) -> tuple[list[_T], bool]:
    """One page of a list endpoint: ``(objects, has_more)``.

    ``query`` may hold the pagination parameters and ``params`` (any other name is 400
    ``parameter_unknown``). ``fetch`` is the store's list query for the caller's account
    and mode, called as ``fetch(limit=…, starting_after=…, ending_before=…)``. It is
    asked for one object more than the page holds, to learn whether there are more;
    with ``ending_before`` the extra one is the one furthest from the cursor: the
    newest, at the front of the newest-first answer."""
    check_keys(query, PAGE_PARAMS | set(params))
    page = parse_page(query, prefix)
    records = await fetch(
        limit=page.limit + 1,
        starting_after=page.starting_after,
        ending_before=page.ending_before,
    )
    has_more = len(records) > page.limit
    records = records[1:] if (has_more and page.ending_before) else records[: page.limit]
    return records, has_more


def list_object(url: str, data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """Stripe's list object: one page of ``data``, the list's ``url``, ``has_more``."""
    return {"object": "list", "url": url, "has_more": has_more, "data": data}
