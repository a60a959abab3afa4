"""The acquirer simulator's HTTP application (routes, body decoding, test aids).

See the package docstring for what this is (a test simulator that records card
numbers on purpose) and :mod:`.rules` for what it answers.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from cardvault.errors import InvalidRequestError, ParameterMissing, UnsupportedMediaType
from cardvault.logging import get_logger
from cardvault.transport.asgi import SecurityHeaders, build_app, json_response

from .recording import RECEIVED_FILE, Recorder, read_records
from .rules import AuthorizationRequest, Decision, decide, parse_request

__all__ = [
    "ECHO_HEADER",
    "ECHO_RESPONSE_HEADER",
    "MAX_BODY",
    "AcquirerSettings",
    "build_acquirer_app",
]

#: Request bodies larger than this are answered 413 (and recorded, truncated).
MAX_BODY = 64 * 1024
#: Test aid: ``X-Acquirer-Echo: card`` echoes the number in the body, ``header`` in a header.
ECHO_HEADER = "x-acquirer-echo"
ECHO_RESPONSE_HEADER = "X-Acquirer-Card"
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_FORM_NAME = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
_MAX_FORM_FIELDS = 200
_MAX_FORM_DEPTH = 4
_JSON_TYPES = ("application/json",)
_FORM_TYPES = ("application/x-www-form-urlencoded",)

_log = get_logger("acquirer")


@dataclass(frozen=True, slots=True)
class AcquirerSettings:
    """What :func:`build_acquirer_app` needs. ``state_dir`` must exist."""

    state_dir: Path
    record_api: bool = False
    echo_card: bool = False
    redirect_path: str | None = None

    @property
    def received_file(self) -> Path:
        return self.state_dir / RECEIVED_FILE


# --- body decoding ------------------------------------------------------------------------


def _reject_constant(_name: str) -> Any:
    raise ValueError("not JSON")


def _decode_json(body: bytes) -> Mapping[str, Any]:
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidRequestError("The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    return data


def _decode_form(body: bytes) -> Mapping[str, Any]:
    """``a=1&card[number]=...&card[cvc]=...`` as nested dicts (last value wins)."""
    try:
        pairs = parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=False,
            max_num_fields=_MAX_FORM_FIELDS,
        )
    except (UnicodeDecodeError, ValueError):
        raise InvalidRequestError("The request body is not a valid form.") from None
    data: dict[str, Any] = {}
    for name, value in pairs:
        match = _FORM_NAME.match(name)
        if match is None:
            raise InvalidRequestError("The form has a malformed parameter name.")
        keys = [match.group(1), *re.findall(r"\[([^\[\]]*)\]", match.group(2))]
        if len(keys) > _MAX_FORM_DEPTH or any(k == "" for k in keys):
            raise InvalidRequestError("The form has a malformed parameter name.")
        node = data
        for key in keys[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = node[key] = {}
            node = child
        node[keys[-1]] = value
    return data


def _decode_body(content_type: str | None, body: bytes) -> Mapping[str, Any]:
    if not body.strip():
        raise ParameterMissing("The request body is empty.")
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media in _JSON_TYPES or media.endswith("+json"):
        return _decode_json(body)
    if media in _FORM_TYPES:
        return _decode_form(body)
    if not media:
        # No Content-Type: a forwarded request may have lost it. Guess from the body.
        return _decode_json(body) if body.lstrip()[:1] == b"{" else _decode_form(body)
    raise UnsupportedMediaType()


# --- responses --------------------------------------------------------------------------


def _echo_modes(request: Request, settings: AcquirerSettings) -> set[str]:
    modes = {
        part.strip().lower()
        for value in request.headers.getlist(ECHO_HEADER)
        for part in value.split(",")
    }
    if settings.echo_card:
        modes.add("card")
    return modes


def _authorization(auth_id: str, req: AuthorizationRequest, decision: Decision) -> dict[str, Any]:
    card = (
        {"brand": decision.brand, "last4": decision.last4, "funding": decision.funding}
        if decision.last4 is not None
        else None
    )
    return {
        "id": auth_id,
        "object": "authorization",
        "status": decision.status,
        "decline_code": decision.decline_code,
        "amount": req.amount,
        "currency": req.currency,
        "card": card,
        "reference": req.reference,
        "created": int(time.time()),
        "livemode": False,
    }


def build_routes(settings: AcquirerSettings) -> list[BaseRoute]:
    async def authorize(request: Request) -> Response:
        body = await request.body()
        req = parse_request(_decode_body(request.headers.get("content-type"), body))
        decision = decide(req)
        auth_id = "auth_" + secrets.token_hex(12)
        payload = _authorization(auth_id, req, decision)
        headers: dict[str, str] = {}
        modes = _echo_modes(request, settings)
        number = str(req.number)
        if modes:
            # TEST AID: put the card number back into the response on purpose, so that
            # tests can see the vault redact it. Never do this in a real service.
            if "card" in modes:
                payload["echo"] = number
            if "header" in modes and number.isascii() and number.isprintable():
                headers[ECHO_RESPONSE_HEADER] = number
        # Facts only: never the body, the number or the CVC.
        _log.info(
            "authorization",
            authorization=auth_id,
            status=decision.status,
            decline_code=decision.decline_code,
            brand=decision.brand,
            last4=decision.last4,
            amount=req.amount,
            currency=req.currency,
            echoed=sorted(modes) or None,
        )
        return json_response(payload, status=200 if decision.approved else 402, headers=headers)

    async def healthz(_request: Request) -> Response:
        return json_response({"status": "ok"})

    async def received(_request: Request) -> Response:
        # TEST AID: the recorded requests, card numbers included (--record-api only).
        return json_response({"object": "list", "data": read_records(settings.received_file)})

    async def redirect(request: Request) -> Response:
        # TEST AID: send the caller elsewhere; a vault that follows it is broken.
        # Without ?to= it points back at this acquirer's authorization endpoint, so a
        # client that follows it shows up as a second recorded request.
        location = request.query_params.get("to") or "/v1/authorizations"
        if not location.isascii() or not location.isprintable():
            raise InvalidRequestError("Invalid to: must be printable ASCII.", param="to")
        status_text = request.query_params.get("status", "302")
        if not status_text.isdigit() or int(status_text) not in _REDIRECT_STATUSES:
            raise InvalidRequestError(
                "Invalid status: must be 301, 302, 303, 307 or 308.", param="status"
            )
        return Response(
            status_code=int(status_text),
            headers={"location": location, "content-length": "0"},
        )

    routes: list[BaseRoute] = [
        Route("/v1/authorizations", authorize, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
    ]
    if settings.record_api:
        routes.append(Route("/v1/received", received, methods=["GET"]))
    if settings.redirect_path is not None:
        routes.append(
            Route(
                settings.redirect_path,
                redirect,
                methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
            )
        )
    return routes


def validate_redirect_path(path: str) -> str:
    """``path`` if it can serve as the redirect aid's route, else ``ValueError``."""
    if not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", path):
        raise ValueError("--redirect-path must be an absolute path like /v1/redirect")
    if path in ("/v1/authorizations", "/healthz", "/v1/received"):
        raise ValueError("--redirect-path must not replace another endpoint")
    return path


def build_acquirer_app(settings: AcquirerSettings) -> ASGIApp:
    """The ASGI application: cardvault's transport app with the recorder inside it.

    :func:`build_app` returns ``SecurityHeaders(starlette_app)``; the recorder is put
    between the two, so everything it answers carries the security headers and every
    record carries the request id.
    """
    if settings.redirect_path is not None:
        validate_redirect_path(settings.redirect_path)
    app = build_app(build_routes(settings), service="acquirer", security_txt=None)
    if not isinstance(app, SecurityHeaders):  # pragma: no cover - transport changed shape
        raise TypeError("cardvault.transport.asgi.build_app no longer returns SecurityHeaders")
    app.app = Recorder(
        app.app,
        path=settings.received_file,
        max_body=MAX_BODY,
        skip={("GET", "/healthz"), ("GET", "/v1/received"), ("HEAD", "/healthz")},
    )
    return app
