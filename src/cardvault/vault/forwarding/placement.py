"""The placement engine: a forward's outbound body and headers, with the card values in.

Values are placed where the destination's configuration says (a JSON Pointer, a form
field or a header; see :class:`~cardvault.vault.forwarding.allowlist.Placement`), so
Stripe's convention of leaving the card fields empty works, or where the caller wrote a
placeholder (``{{card_number}}`` …), encoded for the body's content type.

:func:`build_requests` builds both requests of a forward from one reading of the same
description: one with the real values, to send, and one with masked ones
(:func:`mask_pan`, ``***``, :data:`REDACTED`), to store and return, so the stored copy
has the shape of what was sent. :func:`mask_card_numbers` masks any card number in text
the vault keeps (the provider's answer included).

The caller's own headers are checked here too (:func:`caller_headers`): none the vault
sets itself, none with a control character (:func:`safe_header_value`, which also holds
the built headers to the same rule).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlencode

import orjson

from cardvault.cards import find_card_numbers
from cardvault.cards.luhn import PAN_MIN_DIGITS, digits_of
from cardvault.errors import InvalidRequestError
from cardvault.vault.forwarding.allowlist import PLACEHOLDERS, Destination, format_expiry
from cardvault.vault.forwarding.outbound import HOP_BY_HOP

__all__ = [
    "REDACTED",
    "CardValues",
    "build_request",
    "build_requests",
    "caller_headers",
    "json_body",
    "mask_card_numbers",
    "mask_pan",
    "safe_header_value",
]

#: What the stored copy shows for a cardholder name and for a credential the vault added.
REDACTED = "[REDACTED]"


def mask_pan(digits: str) -> str:
    """A card number's digits as BIN and last four: ``424242******4242``."""
    return digits[:6] + "*" * max(0, len(digits) - 10) + digits[-4:]


def mask_card_numbers(text: str) -> str:
    """``text`` with every card number shown as BIN and last four at most."""
    if len(text) < PAN_MIN_DIGITS:
        return text  # too short to hold one (a content type, a status, a date)
    out: list[str] = []
    last = 0
    for match in find_card_numbers(text):
        digits = digits_of(match.group())
        out.append(text[last : match.start()])
        out.append(mask_pan(digits) if len(digits) <= 19 else REDACTED)
        last = match.end()
    if not out:
        return text  # the common case: nothing to mask, no copy made
    out.append(text[last:])
    return "".join(out)


@dataclass
class CardValues:
    """The card values for one build: real ones to send, or masked ones to store."""

    number: str | None
    exp_month: int
    exp_year: int
    cvc: str | None
    name: str | None

    def single(self, replacement: str, expiry_format: str | None) -> str:
        if replacement == "card_number":
            return self.number or ""
        if replacement == "card_cvc":
            return self.cvc or ""
        if replacement == "cardholder_name":
            return self.name or ""
        return format_expiry(expiry_format or "MM/YY", self.exp_month, self.exp_year)

    def placeholders(self, replacement: str) -> dict[str, str]:
        if replacement == "card_expiry":
            return {
                "{{card_exp_month}}": f"{self.exp_month:02d}",
                "{{card_exp_year}}": f"{self.exp_year:04d}",
            }
        (name,) = PLACEHOLDERS[replacement]
        return {name: self.single(replacement, None)}


#: The deepest JSON request body a forward accepts: far beyond any acquirer's API, and
#: far below what would make writing it back out recurse past Python's limit.
_MAX_BODY_DEPTH = 64


def json_body(body: str) -> Any:
    """The caller's ``request[body]`` as JSON, parsed without recursing in Python and
    no deeper than ``_MAX_BODY_DEPTH``."""
    if not body.strip():
        return {}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequestError(
            "request[body] must be JSON for this destination.", param="request[body]"
        ) from exc
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > _MAX_BODY_DEPTH:
                raise InvalidRequestError(
                    "request[body] is nested too deeply.", param="request[body]"
                )
            children = value.values() if isinstance(value, dict) else value
            stack.extend((child, depth + 1) for child in children)
    return doc


def _pointer_set(doc: Any, pointer: str, value: Any) -> Any:
    """Set ``value`` at RFC 6901 ``pointer`` in ``doc``, creating missing objects."""
    parts = [p.replace("~1", "/").replace("~0", "~") for p in pointer.split("/")[1:]]
    if not parts:
        return value
    node = doc
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise InvalidRequestError(
                    "The request body does not have the shape the destination expects.",
                    param="request[body]",
                )
            if last:
                node[int(part)] = value
            else:
                node = node[int(part)]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise InvalidRequestError(
                "The request body does not have the shape the destination expects.",
                param="request[body]",
            )
    return doc


def _fill_placeholders(body: str, media: str, replacements: list[str], values: CardValues) -> str:
    """The caller's placeholders replaced, each value encoded for the body's type."""
    for replacement in replacements:
        for placeholder, raw in values.placeholders(replacement).items():
            if placeholder in body:
                if media == "application/json":
                    encoded = json.dumps(raw)[1:-1]
                elif media == "application/x-www-form-urlencoded":
                    encoded = quote_plus(raw)
                else:
                    encoded = raw
                body = body.replace(placeholder, encoded)
    return body


def build_request(
    destination: Destination,
    replacements: list[str],
    body: str,
    content_type: str,
    headers: list[tuple[str, str]],
    values: CardValues,
) -> tuple[str, list[tuple[str, str]]]:
    """The outbound body and headers with ``values`` placed (see the module docstring)."""
    return build_requests(destination, replacements, body, content_type, headers, values)[0]


def build_requests(
    destination: Destination,
    replacements: list[str],
    body: str,
    content_type: str,
    headers: list[tuple[str, str]],
    *value_sets: CardValues,
) -> list[tuple[str, list[tuple[str, str]]]]:
    """:func:`build_request` for each of ``value_sets`` (the real values and the masked
    ones) from one reading of the description: the content type, the placements and,
    when the caller wrote no placeholder, the JSON body are read once."""
    media = content_type.split(";")[0].strip().lower()
    placed = [
        (replacement, destination.placements[replacement])
        for replacement in replacements
        if replacement in destination.placements
    ]
    # Placeholders first: they are the caller's explicit choice of position. Without
    # any, every build starts from the same text.
    same_text = "{{" not in body
    parsed: Any = None
    builds: list[tuple[str, list[tuple[str, str]]]] = []
    for values in value_sets:
        text = body if same_text else _fill_placeholders(body, media, replacements, values)
        out_headers = list(headers)
        if not placed:
            builds.append((text, out_headers))
            continue
        json_doc: Any = None
        form: list[tuple[str, str]] | None = None
        for replacement, placement in placed:
            if placement.month_target is not None and placement.year_target is not None:
                pairs: list[tuple[str, Any]] = [
                    (placement.month_target, values.exp_month),
                    (placement.year_target, values.exp_year),
                ]
            else:
                assert placement.target is not None
                pairs = [(placement.target, values.single(replacement, placement.expiry_format))]
            for target, value in pairs:
                if placement.kind == "header":
                    out_headers = [(k, v) for k, v in out_headers if k.lower() != target.lower()]
                    out_headers.append((target, str(value)))
                elif placement.kind == "json":
                    if json_doc is None:
                        if same_text and parsed is not None:
                            # The same text, already checked: parsed again (orjson, in
                            # C) rather than walked again.
                            json_doc = orjson.loads(text) if text.strip() else {}
                        else:
                            json_doc = json_body(text)
                            parsed = True
                    json_doc = _pointer_set(json_doc, target, value)
                else:
                    if form is None:
                        form = parse_qsl(text, keep_blank_values=True)
                    form = [(k, v) for k, v in form if k != target] + [(target, str(value))]
        if json_doc is not None:
            text = json.dumps(json_doc, separators=(",", ":"), ensure_ascii=False)
        if form is not None:
            text = urlencode(form)
        builds.append((text, out_headers))
    return builds


# -- the caller's headers -------------------------------------------------------------------


#: A header name a caller may send: an RFC 9110 token.
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,100}$")
_MAX_HEADERS = 50
#: Control characters: none may be in a header value but the tab (RFC 9110 §5.5).
_HEADER_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def safe_header_value(value: str, param: str) -> str:
    """``value``, or 400 when it holds a control character other than tab."""
    if _HEADER_CONTROL.search(value):
        # Before: only CR, LF and NUL were refused; any other control character made the
        # HTTP client raise after the CVC was taken (a 500).
        raise InvalidRequestError(
            "Header values may not contain control characters other than tab.", param=param
        )
    return value


def caller_headers(raw: Any, destination: Destination) -> list[tuple[str, str]]:
    """``request[headers]`` as (name, value) pairs, refusing any header the vault sets
    itself (credentials, header placements, hop-by-hop) and any control character."""
    if raw in (None, ""):
        return []
    items = list(raw.values()) if isinstance(raw, dict) else raw
    if not isinstance(items, list) or len(items) > _MAX_HEADERS:
        raise InvalidRequestError(
            "request[headers] must be a list of name/value pairs.", param="request[headers]"
        )
    reserved = {c.header_name.lower() for c in destination.credentials}
    reserved |= {
        p.target.lower() for p in destination.placements.values() if p.kind == "header" and p.target
    }
    out: list[tuple[str, str]] = []
    for item in items:
        if not isinstance(item, dict) or set(item) - {"name", "value"}:
            raise InvalidRequestError(
                "Each header is a name and a value.", param="request[headers]"
            )
        name, value = item.get("name"), item.get("value", "")
        if not isinstance(name, str) or not _HEADER_NAME.match(name) or not isinstance(value, str):
            raise InvalidRequestError(
                "A header name or value is invalid.", param="request[headers]"
            )
        if name.lower() in HOP_BY_HOP or name.lower() in reserved:
            raise InvalidRequestError(
                "This header cannot be set by the caller.", param="request[headers]"
            )
        out.append((name, safe_header_value(value, "request[headers]")))
    return out
