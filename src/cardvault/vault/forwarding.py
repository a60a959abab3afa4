"""Forwarding: the only way a card number leaves the vault (Stripe's forwarding API).

A caller with a secret key names a payment method, an allowlisted URL, the card values
to put in (``replacements``), and a request body and headers. The vault:

1. matches the URL against the static allowlist (:mod:`cardvault.vault.allowlist`) for
   this method and account; anything else is refused with one opaque error;
2. refuses replacements the destination may not receive, headers it may not set, and
   any value or header holding CR or LF;
3. opens the card data (the CVC is *taken*: read and erased in one step, so it can be
   sent once at most);
4. builds the request twice from the same description: once with the real values, to
   send, and once with masked values (``424242******4242``, ``***``), to store and
   return; credentials the vault adds are ``[REDACTED]`` in the stored copy;
5. sends it to the destination's own URL (:mod:`cardvault.vault.outbound`), and masks
   any card number in the response before it is stored or returned.

Values are placed where the destination's configuration says (a JSON Pointer, a form
field or a header), so Stripe's convention of leaving the card fields empty works, or
where the caller wrote a placeholder (``{{card_number}}`` …), encoded for the body's
content type.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlencode

import orjson

from cardvault import crypto
from cardvault.cards import find_card_numbers
from cardvault.cards.luhn import digits_of
from cardvault.errors import (
    APIError,
    CardVaultError,
    InvalidRequestError,
    ParameterMissing,
    ResourceMissing,
)
from cardvault.logging import bind_request_fields, get_logger
from cardvault.storage.base import ForwardingRequestRecord, PaymentMethodRecord
from cardvault.vault.allowlist import (
    PLACEHOLDERS,
    REPLACEMENTS,
    Allowlist,
    Destination,
    format_expiry,
    match_url,
)
from cardvault.vault.outbound import HOP_BY_HOP, OutboundClient
from cardvault.vault.params import looks_like_id, parse_page
from cardvault.vault.service import (
    Caller,
    VaultService,
    _check_keys,
    _context,
    _metadata,
    time_ordered_id,
)

__all__ = ["Forwarder", "mask_card_numbers"]

_log = get_logger("cardvault.vault.forwarding")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,100}$")
_MAX_HEADERS = 50
_REDACTED = "[REDACTED]"
_PARAMS = {"payment_method", "url", "replacements", "request", "metadata", "expand"}
_REQUEST_PARAMS = {"body", "headers"}


def _mask(digits: str) -> str:
    return digits[:6] + "*" * max(0, len(digits) - 10) + digits[-4:]


def mask_card_numbers(text: str) -> str:
    """``text`` with every card number shown as BIN and last four at most."""
    out, last = [], 0
    for match in find_card_numbers(text):
        digits = digits_of(match.group())
        out.append(text[last : match.start()])
        out.append(_mask(digits) if len(digits) <= 19 else _REDACTED)
        last = match.end()
    out.append(text[last:])
    return "".join(out)


#: Control characters: none may be in a header value but the tab (RFC 9110 §5.5).
_HEADER_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


def _safe_header_value(value: str, param: str) -> str:
    if _HEADER_CONTROL.search(value):
        # Before: only CR, LF and NUL were refused; any other control character made the
        # HTTP client raise after the CVC was taken (a 500).
        raise InvalidRequestError(
            "Header values may not contain control characters other than tab.", param=param
        )
    return value


@dataclass
class _Values:
    """The card values for one request: real ones to send, or masked ones to store."""

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


def _json_body(body: str) -> Any:
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


def _build(
    destination: Destination,
    replacements: list[str],
    body: str,
    content_type: str,
    headers: list[tuple[str, str]],
    values: _Values,
) -> tuple[str, list[tuple[str, str]]]:
    """The outbound body and headers with ``values`` placed (see the module docstring)."""
    media = content_type.split(";")[0].strip().lower()
    out_headers = list(headers)
    # Placeholders first: they are the caller's explicit choice of position.
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
    placed = [r for r in replacements if r in destination.placements]
    if not placed:
        return body, out_headers
    json_doc: Any = None
    form: list[tuple[str, str]] | None = None
    for replacement in placed:
        placement = destination.placements[replacement]
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
                    json_doc = _json_body(body)
                json_doc = _pointer_set(json_doc, target, value)
            else:
                if form is None:
                    form = parse_qsl(body, keep_blank_values=True)
                form = [(k, v) for k, v in form if k != target] + [(target, str(value))]
    if json_doc is not None:
        body = json.dumps(json_doc, separators=(",", ":"), ensure_ascii=False)
    if form is not None:
        body = urlencode(form)
    return body, out_headers


class Forwarder:
    def __init__(
        self, service: VaultService, allowlist: Allowlist, outbound: OutboundClient
    ) -> None:
        self.service = service
        self.allowlist = allowlist
        self.outbound = outbound

    # -- the API -------------------------------------------------------------------------

    async def create(self, caller: Caller, params: dict[str, Any]) -> dict[str, Any]:
        self.service._require_secret(caller)
        _check_keys(params, _PARAMS)
        pm_id = params.get("payment_method")
        if not isinstance(pm_id, str) or not pm_id:
            raise ParameterMissing(
                "Missing required param: payment_method.", param="payment_method"
            )
        url = params.get("url")
        if not isinstance(url, str) or not url:
            raise ParameterMissing("Missing required param: url.", param="url")
        destination = match_url(self.allowlist, url, method="POST", account_id=caller.account_id)
        replacements = params.get("replacements")
        if isinstance(replacements, dict):  # form: replacements[0]=… arrives as a mapping
            replacements = list(replacements.values())
        if not isinstance(replacements, list) or not replacements:
            raise ParameterMissing("Missing required param: replacements.", param="replacements")
        if any(r not in REPLACEMENTS for r in replacements) or len(set(replacements)) != len(
            replacements
        ):
            raise InvalidRequestError(
                "replacements may contain card_number, card_expiry, card_cvc and cardholder_name, once each.",
                param="replacements",
            )
        # Only replacements both requested and permitted are made; asking for one the
        # destination may not receive is an error, not a silent omission.
        if not set(replacements) <= destination.replacements:
            raise InvalidRequestError(
                "This destination may not receive one of the requested replacements.",
                param="replacements",
            )
        request = params.get("request") or {}
        if not isinstance(request, dict):
            raise InvalidRequestError("request must be a hash.", param="request")
        _check_keys(request, _REQUEST_PARAMS, "request")
        body = request.get("body") or ""
        if not isinstance(body, str):
            raise InvalidRequestError("request[body] must be a string.", param="request[body]")
        headers = self._caller_headers(request.get("headers"), destination)
        metadata = _metadata(params.get("metadata"))
        content_type = next((v for k, v in headers if k.lower() == "content-type"), None)
        if content_type is None:
            content_type = "application/json"
            headers.append(("Content-Type", content_type))

        record = await self.service._get(caller, pm_id)
        real = await self._values(caller, record, replacements)
        masked = _Values(
            number=_mask(real.number) if real.number else None,
            exp_month=real.exp_month,
            exp_year=real.exp_year,
            cvc="***" if real.cvc else None,
            name=_REDACTED if real.name else None,
        )
        out_body, out_headers = _build(destination, replacements, body, content_type, headers, real)
        shown_body, shown_headers = _build(
            destination, replacements, body, content_type, headers, masked
        )
        for _name, value in out_headers:
            _safe_header_value(value, "request[headers]")
        if "\r" in (real.name or "") or "\n" in (real.name or ""):
            raise InvalidRequestError("The cardholder name cannot be forwarded in a header.")
        credentials = [(c.header_name, c.value.reveal()) for c in destination.credentials]
        payload = out_body.encode("utf-8")
        if len(payload) > destination.max_request_bytes:
            raise InvalidRequestError(
                "request[body] is larger than this destination accepts.", param="request[body]"
            )

        # Recorded before anything leaves the vault: no record, no forward.
        await self.service.audit.record(
            "forward.requested",
            actor=caller.key_id,
            object_id=pm_id,
            detail={"destination": destination.name, "replacements": ",".join(replacements)},
        )
        try:
            response = await self.outbound.send(
                destination=destination.name,
                url=destination.url,
                method="POST",
                headers=out_headers + credentials,
                body=payload,
                timeout=destination.timeout,
                max_response_bytes=destination.max_response_bytes,
                ca_file=destination.ca_file,
                pins=destination.pin_sha256,
            )
        except CardVaultError:
            await self.service.audit.record(
                "forward.completed",
                actor=caller.key_id,
                object_id=pm_id,
                result="destination_error",
                detail={"destination": destination.name},
            )
            raise
        fwd = ForwardingRequestRecord(
            id=time_ordered_id("fwdreq_"),
            account_id=caller.account_id,
            livemode=caller.livemode,
            created=int(time.time()),
            payment_method=pm_id,
            url=destination.url,
            destination=destination.name,
            replacements=list(replacements),
            metadata=metadata,
            request_context={
                "destination_duration": response.duration_ms,
                "destination_ip_address": response.peer_ip,
            },
            request_details={
                "body": mask_card_numbers(shown_body),
                "headers": [{"name": k, "value": mask_card_numbers(v)} for k, v in shown_headers]
                + [{"name": c.header_name, "value": _REDACTED} for c in destination.credentials],
                "http_method": "POST",
            },
            response_details={
                "body": self._redact_response(response.body, real),
                "headers": [
                    {"name": k, "value": mask_card_numbers(v)}
                    for k, v in response.headers
                    if k not in HOP_BY_HOP
                ],
                "status": response.status,
            },
        )
        # The forward has happened: its record and its audit record are both true
        # whatever becomes of the other, so they are made durable together (one flush
        # of each in the same loop iteration), and the answer waits for both.
        stored, recorded = await asyncio.gather(
            self.service.store.insert_forwarding_request(fwd),
            self.service.audit.record(
                "forward.completed",
                actor=caller.key_id,
                object_id=fwd.id,
                detail={
                    "destination": destination.name,
                    "payment_method": pm_id,
                    "status": response.status,
                },
            ),
            return_exceptions=True,
        )
        for outcome in (recorded, stored):
            if isinstance(outcome, BaseException):
                raise outcome
        # On the request's access line rather than a line of its own.
        bind_request_fields(
            forwarding_request=fwd.id,
            payment_method=pm_id,
            destination=destination.name,
            destination_status=response.status,
            key=caller.key_id,
        )
        return self.render(fwd)

    async def retrieve(self, caller: Caller, fwd_id: str) -> dict[str, Any]:
        self.service._require_secret(caller)
        record = None
        if looks_like_id(fwd_id, "fwdreq_"):
            record = await self.service.store.get_forwarding_request(
                caller.account_id, caller.livemode, fwd_id
            )
        if record is None:
            raise ResourceMissing("No such forwarding request.", param="id")
        return self.render(record)

    async def list_requests(self, caller: Caller, query: dict[str, Any]) -> dict[str, Any]:
        self.service._require_secret(caller)
        _check_keys(query, {"limit", "starting_after", "ending_before", "expand", "created"})
        page = parse_page(query, "fwdreq_")
        records = await self.service.store.list_forwarding_requests(
            caller.account_id,
            caller.livemode,
            limit=page.limit + 1,
            starting_after=page.starting_after,
            ending_before=page.ending_before,
        )
        limit, before = page.limit, page.ending_before
        has_more = len(records) > limit
        records = records[1:] if (has_more and before) else records[:limit]
        return {
            "object": "list",
            "url": "/v1/forwarding/requests",
            "has_more": has_more,
            "data": [self.render(r) for r in records],
        }

    @staticmethod
    def render(record: ForwardingRequestRecord) -> dict[str, Any]:
        return {
            "id": record.id,
            "object": "forwarding.request",
            "created": record.created,
            "livemode": record.livemode,
            "metadata": record.metadata,
            "payment_method": record.payment_method,
            "replacements": record.replacements,
            "url": record.url,
            "request_context": record.request_context,
            "request_details": record.request_details,
            "response_details": record.response_details,
        }

    # -- helpers -------------------------------------------------------------------------

    def _caller_headers(self, raw: Any, destination: Destination) -> list[tuple[str, str]]:
        if raw in (None, ""):
            return []
        items = list(raw.values()) if isinstance(raw, dict) else raw
        if not isinstance(items, list) or len(items) > _MAX_HEADERS:
            raise InvalidRequestError(
                "request[headers] must be a list of name/value pairs.", param="request[headers]"
            )
        reserved = {c.header_name.lower() for c in destination.credentials}
        reserved |= {
            p.target.lower()
            for p in destination.placements.values()
            if p.kind == "header" and p.target
        }
        out: list[tuple[str, str]] = []
        for item in items:
            if not isinstance(item, dict) or set(item) - {"name", "value"}:
                raise InvalidRequestError(
                    "Each header is a name and a value.", param="request[headers]"
                )
            name, value = item.get("name"), item.get("value", "")
            if (
                not isinstance(name, str)
                or not _HEADER_NAME.match(name)
                or not isinstance(value, str)
            ):
                raise InvalidRequestError(
                    "A header name or value is invalid.", param="request[headers]"
                )
            if name.lower() in HOP_BY_HOP or name.lower() in reserved:
                raise InvalidRequestError(
                    "This header cannot be set by the caller.", param="request[headers]"
                )
            out.append((name, _safe_header_value(value, "request[headers]")))
        return out

    async def _values(
        self, caller: Caller, record: PaymentMethodRecord, replacements: list[str]
    ) -> _Values:
        keys = self.service.keys
        number = name = cvc = None
        try:
            if "card_number" in replacements or "cardholder_name" in replacements:
                key = await keys.for_decryption(record.data_key_id, "pan")
                if "card_number" in replacements:
                    number = crypto.open_(
                        key, record.number_ct, _context(caller, record.id, "number")
                    ).decode()
                if "cardholder_name" in replacements and record.name_ct is not None:
                    name = crypto.open_(
                        key, record.name_ct, _context(caller, record.id, "name")
                    ).decode()
            if "card_cvc" in replacements:
                taken = await self.service.store.take_cvc(
                    caller.account_id, caller.livemode, record.id
                )
                if taken is None:
                    raise InvalidRequestError(
                        "This PaymentMethod has no CVC: it was never given, was already used by a "
                        "forward, or has expired.",
                        param="replacements",
                    )
                cvc_ct, cvc_dk = taken
                cvc_key = await keys.for_decryption(cvc_dk, "cvc")
                cvc = crypto.open_(cvc_key, cvc_ct, _context(caller, record.id, "cvc")).decode()
                await self.service.audit.record(
                    "cvc.destroyed",
                    actor=caller.key_id,
                    object_id=record.id,
                    detail={"reason": "used by a forward"},
                )
        except crypto.InvalidCiphertext as exc:
            _log.error("stored card data failed authentication", payment_method=record.id)
            raise APIError() from exc
        return _Values(number, record.exp_month, record.exp_year, cvc, name)

    @staticmethod
    def _redact_response(body: bytes, real: _Values) -> str:
        text = body.decode("utf-8", errors="replace")
        text = mask_card_numbers(text)
        # A provider that echoes the CVC back gets it masked where it appears as a value.
        if real.cvc:
            text = re.sub(rf"(?<![0-9]){re.escape(real.cvc)}(?![0-9])", "***", text)
        return text
