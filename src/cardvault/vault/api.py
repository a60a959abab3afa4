"""The vault's Stripe-compatible API: /v1/payment_methods. One handler per endpoint."""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from cardvault import crypto
from cardvault.errors import (
    AuthenticationError,
    CardVaultError,
    IdempotencyError,
    IdempotencyKeyInUse,
    InvalidRequestError,
    error_class_for,
)
from cardvault.storage.base import IdempotencyRecord
from cardvault.storage.migrations import STORED_IDEMPOTENCY_KEY_PREFIX
from cardvault.transport.asgi import json_response, read_body
from cardvault.vault.forwarding import Forwarder
from cardvault.vault.params import DEFAULT_LIMITS, ParseLimits, parse_body, parse_form
from cardvault.vault.ratelimit import RateLimiter
from cardvault.vault.service import Caller, VaultService

__all__ = ["forwarding_routes", "payment_method_routes"]

_MAX_IDEMPOTENCY_KEY = 255
#: Domain separation: the same account key makes card fingerprints (digits only) and
#: parameter MACs (a JSON array), so this prefix can be neither.
_IDEMPOTENCY_KEY_CONTEXT = b"cardvault idempotency-key v1\x00"


def _presented_key(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer":
        return value.strip()
    if scheme.lower() == "basic":
        try:
            user = base64.b64decode(value.strip(), validate=True).decode("ascii").split(":", 1)[0]
        except (binascii.Error, UnicodeDecodeError) as exc:
            raise AuthenticationError() from exc
        return user
    raise AuthenticationError()


def stored_idempotency_key(account_key: crypto.Key, header: str) -> str:
    """The Idempotency-Key as it is stored: ``ik_`` and a MAC of the header under the
    account's key. The header is the caller's text, and an outside tester stored a card
    number in the clear through it; keyed, because an unkeyed hash of a card number is
    undone by trying every number."""
    return STORED_IDEMPOTENCY_KEY_PREFIX + crypto.fingerprint(
        account_key, _IDEMPOTENCY_KEY_CONTEXT + header.encode("utf-8")
    )


async def idempotent(
    service: VaultService,
    request: Request,
    caller: Caller,
    params: dict[str, Any],
    run: Callable[[], Awaitable[dict[str, Any]]],
    replay: Callable[[str], Awaitable[dict[str, Any]]],
    *,
    ttl: int,
) -> Response:
    """Stripe's semantics: same key + same parameters → the first result; other
    parameters → 400; the first still running → 409. The stored result is the new
    object's id, never its content, so no cardholder data rests in this table.

    An error whose ``consumes_idempotency_key`` is true (a forward that reached the
    network) is remembered too, so a retry with the same key repeats the error instead
    of sending a second outbound request."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return json_response(await run())
    if not key or len(key) > _MAX_IDEMPOTENCY_KEY:
        raise InvalidRequestError("Idempotency-Key must be 1 to 255 characters.")
    # Keyed with the account's own key: a plain hash of parameters holding a card
    # number could be brute-forced back to the number.
    account_key = await service.keys.account_key(caller.account_id)
    canonical = json.dumps([request.url.path, params], sort_keys=True, separators=(",", ":"))
    mac = crypto.fingerprint(account_key, canonical.encode())
    now = int(time.time())
    key = stored_idempotency_key(account_key, key)
    claim = IdempotencyRecord(caller.account_id, caller.mode, key, mac, now)
    existing = await service.store.claim_idempotency_key(claim)
    if existing is not None and existing.created < now - ttl:
        await service.store.release_idempotency_key(caller.account_id, caller.mode, key)
        existing = await service.store.claim_idempotency_key(claim)
    if existing is not None:
        if not hmac.compare_digest(existing.request_hash, mac):
            raise IdempotencyError()
        if existing.response_status is None or existing.response_body is None:
            raise IdempotencyKeyInUse()
        if existing.response_body.startswith("!"):
            replayed = error_class_for(existing.response_body[1:])()
            replayed.headers["Idempotent-Replayed"] = "true"
            raise replayed
        body = await replay(existing.response_body)
        return json_response(body, headers={"idempotent-replayed": "true"})
    try:
        body = await run()
    except CardVaultError as exc:
        if getattr(exc, "consumes_idempotency_key", False):
            await service.store.complete_idempotency_key(
                caller.account_id, caller.mode, key, exc.http_status, "!" + exc.code
            )
            raise
        # Nothing was done; the key may be used again, as Stripe does for requests
        # that failed validation.
        await service.store.release_idempotency_key(caller.account_id, caller.mode, key)
        raise
    except BaseException:
        await service.store.release_idempotency_key(caller.account_id, caller.mode, key)
        raise
    await service.store.complete_idempotency_key(
        caller.account_id, caller.mode, key, 200, body["id"]
    )
    return json_response(body)


def by_method(
    **handlers: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """One route per path, so that a 405 names every allowed method in ``Allow``."""

    async def endpoint(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await handlers[method](request)

    return endpoint


def make_caller_of(
    service: VaultService, secret_limits: RateLimiter, publishable_limits: RateLimiter
) -> Callable[[Request], Awaitable[Caller]]:
    """Authenticate a request's API key and take one token from its rate limit."""

    async def caller_of(request: Request) -> Caller:
        caller = await service.authenticate(_presented_key(request))
        limiter = publishable_limits if caller.kind == "publishable" else secret_limits
        limiter.check(caller.key_id)
        return caller

    return caller_of


def make_body_reader(
    limits: ParseLimits,
) -> Callable[[Request], Awaitable[dict[str, Any]]]:
    """Read a request's body (413 past ``limits.max_body_bytes``) and parse it."""

    async def body_of(request: Request) -> dict[str, Any]:
        raw = await read_body(request, limits.max_body_bytes)
        return parse_body(raw, request.headers.get("content-type"), limits)

    return body_of


def payment_method_routes(
    service: VaultService,
    *,
    secret_limits: RateLimiter,
    publishable_limits: RateLimiter,
    idempotency_ttl: int = 86_400,
    parse_limits: ParseLimits = DEFAULT_LIMITS,
) -> list[BaseRoute]:
    caller_of = make_caller_of(service, secret_limits, publishable_limits)
    body_of = make_body_reader(parse_limits)

    async def create(request: Request) -> Response:
        caller = await caller_of(request)
        params = await body_of(request)

        async def replay(pm_id: str) -> dict[str, Any]:
            return await service.retrieve_payment_method(
                Caller(caller.account_id, caller.mode, "secret", caller.key_id), pm_id
            )

        return await idempotent(
            service,
            request,
            caller,
            params,
            lambda: service.create_payment_method(caller, params),
            replay,
            ttl=idempotency_ttl,
        )

    async def list_(request: Request) -> Response:
        caller = await caller_of(request)
        query = parse_form(list(request.query_params.multi_items()), parse_limits)
        return json_response(await service.list_payment_methods(caller, query))

    async def retrieve(request: Request) -> Response:
        caller = await caller_of(request)
        return json_response(
            await service.retrieve_payment_method(caller, request.path_params["pm"])
        )

    async def delete(request: Request) -> Response:
        caller = await caller_of(request)
        return json_response(await service.delete_payment_method(caller, request.path_params["pm"]))

    return [
        Route("/v1/payment_methods", by_method(POST=create, GET=list_), methods=["GET", "POST"]),
        Route(
            "/v1/payment_methods/{pm}",
            by_method(GET=retrieve, DELETE=delete),
            methods=["GET", "DELETE"],
        ),
    ]


def forwarding_routes(
    service: VaultService,
    forwarder: Forwarder,
    *,
    secret_limits: RateLimiter,
    publishable_limits: RateLimiter,
    idempotency_ttl: int = 86_400,
    parse_limits: ParseLimits = DEFAULT_LIMITS,
) -> list[BaseRoute]:
    caller_of = make_caller_of(service, secret_limits, publishable_limits)
    body_of = make_body_reader(parse_limits)

    async def create(request: Request) -> Response:
        caller = await caller_of(request)
        service._require_secret(caller)
        params = await body_of(request)
        return await idempotent(
            service,
            request,
            caller,
            params,
            lambda: forwarder.create(caller, params),
            lambda fwd_id: forwarder.retrieve(caller, fwd_id),
            ttl=idempotency_ttl,
        )

    async def list_(request: Request) -> Response:
        caller = await caller_of(request)
        query = parse_form(list(request.query_params.multi_items()), parse_limits)
        return json_response(await forwarder.list_requests(caller, query))

    async def retrieve(request: Request) -> Response:
        caller = await caller_of(request)
        return json_response(await forwarder.retrieve(caller, request.path_params["id"]))

    return [
        Route(
            "/v1/forwarding/requests", by_method(POST=create, GET=list_), methods=["GET", "POST"]
        ),
        Route("/v1/forwarding/requests/{id}", retrieve, methods=["GET"]),
    ]
