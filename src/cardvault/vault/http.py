"""The vault's HTTP endpoints: every route of the vault, public and admin, in one list.

One handler per endpoint; :func:`routes` registers them all. The handlers read the
request (API key, rate limit, body or query) and call one method of a service
(:class:`~cardvault.vault.payment_methods.PaymentMethods`,
:class:`~cardvault.vault.forwarding.forwarder.Forwarder`,
:class:`~cardvault.vault.element.CardElement`); creates go through
:meth:`~cardvault.vault.idempotency.Idempotency.run`. Nothing here touches the store,
a key or a card value.

Authentication comes first on every endpoint that takes an API key, then its rate
limit, then the body: the order docs/api.md gives for the errors.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from cardvault import __version__
from cardvault.errors import (
    AuthenticationError,
    InvalidRequestError,
    ParameterMissing,
    ParameterUnknown,
    ServiceUnavailable,
)
from cardvault.transport.asgi import json_response, read_body
from cardvault.transport.identity import require_identity
from cardvault.vault.accounts import Accounts, Caller, require_secret
from cardvault.vault.element import (
    CARD_FRAME_CSS_PATH,
    CARD_FRAME_JS_PATH,
    CARD_FRAME_PATH,
    CARDVAULT_JS_PATH,
    CardElement,
)
from cardvault.vault.events import Events
from cardvault.vault.exports import Exports
from cardvault.vault.exports.http import export_routes
from cardvault.vault.forwarding.forwarder import Forwarder
from cardvault.vault.idempotency import Claim, Idempotency
from cardvault.vault.imports import Imports
from cardvault.vault.imports.http import import_routes
from cardvault.vault.keyjobs import KeyMaintenance
from cardvault.vault.params import DEFAULT_LIMITS, ParseLimits, parse_body, parse_form
from cardvault.vault.payment_methods import PaymentMethods
from cardvault.vault.ratelimit import KeyLimits
from cardvault.vault.requestlog import RequestLog, RequestLogHandler
from cardvault.vault.webhooks import WebhookEndpoints
from cardvault.vault.webhooks.http import event_routes

__all__ = ["PublicAPI", "VaultRoutes", "routes"]

Handler = Callable[[Request], Awaitable[Response]]
_OPENAPI = Path(__file__).with_name("openapi.json")


@dataclass(frozen=True)
class PublicAPI:
    """What the public API's handlers call, built once by :mod:`cardvault.vault.app`."""

    accounts: Accounts
    payment_methods: PaymentMethods
    idempotency: Idempotency
    #: The per-key buckets of the API (the forwarding API shares them unless it is given
    #: its own in ``forwarding_limits``).
    payment_method_limits: KeyLimits
    #: None: the vault serves no forwarding API.
    forwarder: Forwarder | None = None
    #: None: the forwarding API shares the payment-methods API's buckets.
    forwarding_limits: KeyLimits | None = None
    parse_limits: ParseLimits = DEFAULT_LIMITS
    #: None (either): the vault serves no events or webhook endpoints API.
    events: Events | None = None
    webhooks: WebhookEndpoints | None = None


class VaultRoutes(NamedTuple):
    """The vault's routes, by listener."""

    #: The public HTTPS listener's, in the order they are matched.
    public: list[BaseRoute]
    #: Those of the public ones that take an API key (the payment and forwarding APIs).
    with_api_key: list[BaseRoute]
    #: The admin listener's (mutual TLS only).
    admin: list[BaseRoute]


#: What ``/readyz`` asks: ``(ready, checks)``, each check ``ok`` or what is wrong.
Readiness = Callable[[], Awaitable[tuple[bool, dict[str, str]]]]


def routes(
    api: PublicAPI | None,
    *,
    admin_identities: Collection[str] = ("admin",),
    readiness: Readiness | None = None,
    maintenance: KeyMaintenance | None = None,
    imports: Imports | None = None,
    exports: Exports | None = None,
    request_log: RequestLog | None = None,
) -> VaultRoutes:
    """Every route of the vault. Without ``api`` (no store and key service configured)
    the public listener serves only its transport endpoints. ``readiness`` answers
    ``/readyz`` (:class:`cardvault.vault.app.Readiness`); without it the vault is ready
    whenever it serves."""
    admin = _Admin(admin_identities, maintenance)
    readyz = _ReadyZ(readiness)
    with_key: list[BaseRoute] = []
    element: list[BaseRoute] = []
    if api is not None:
        pay = _PaymentMethodHandlers(api)
        with_key += [
            Route(
                "/v1/payment_methods",
                by_method(POST=pay.create, GET=pay.list_),
                methods=["GET", "POST"],
            ),
            Route(
                "/v1/payment_methods/{pm}",
                by_method(GET=pay.retrieve, DELETE=pay.delete),
                methods=["GET", "DELETE"],
            ),
        ]
        if api.forwarder is not None:
            fwd = _ForwardingHandlers(api, api.forwarder)
            with_key += [
                Route(
                    "/v1/forwarding/requests",
                    by_method(POST=fwd.create, GET=fwd.list_),
                    methods=["GET", "POST"],
                ),
                Route("/v1/forwarding/requests/{id}", fwd.retrieve, methods=["GET"]),
            ]
        if api.events is not None and api.webhooks is not None:
            keyed = _KeyedHandlers(api, api.payment_method_limits)
            with_key += event_routes(keyed, api.events, api.webhooks, by_method)
        # The card element (cardvault.js and its frame) needs the accounts' keys and
        # allowed origins, so it exists only where the payment API does.
        card = CardElement(api.accounts)
        element = [
            Route(CARDVAULT_JS_PATH, card.cardvault_js, methods=["GET"]),
            Route(CARDVAULT_JS_PATH + ".sri", card.cardvault_js_sri, methods=["GET"]),
            Route(CARD_FRAME_PATH, card.card_frame, methods=["GET"]),
            Route(CARD_FRAME_JS_PATH, card.card_js, methods=["GET"]),
            Route(CARD_FRAME_CSS_PATH, card.card_css, methods=["GET"]),
        ]
    return VaultRoutes(
        public=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz.answer, methods=["GET"]),
            Route("/openapi.json", openapi, methods=["GET"]),
            Route("/v1/noop", noop, methods=["GET", "POST"]),
            *element,
            *with_key,
        ],
        with_api_key=with_key,
        admin=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz.answer, methods=["GET"]),
            Route("/v1/admin/whoami", admin.whoami, methods=["GET"]),
            *(
                [
                    Route("/v1/admin/keys", admin.key_usage, methods=["GET"]),
                    Route("/v1/admin/keys/{kek}/reencrypt", admin.reencrypt, methods=["POST"]),
                    Route("/v1/admin/keys/{kek}/rotated", admin.rotated, methods=["POST"]),
                    Route(
                        "/v1/admin/keys/{kek}/reencrypt_data",
                        admin.reencrypt_data,
                        methods=["POST"],
                    ),
                ]
                if maintenance is not None
                else []
            ),
            *import_routes(imports, admin_identities),
            *export_routes(exports, admin_identities),
            *(
                [
                    Route(
                        "/v1/admin/request_log",
                        RequestLogHandler(request_log, frozenset(admin_identities)).poll,
                        methods=["GET"],
                    )
                ]
                if request_log is not None
                else []
            ),
        ],
    )


# -- the transport endpoints, on every listener ---------------------------------------------


async def healthz(_request: Request) -> Response:
    """Liveness: the process serves requests (nothing else is asked)."""
    return json_response({"status": "ok"})


class _ReadyZ:
    """Readiness: 200 with every check ``ok``, or 503 ``service_unavailable`` naming the
    checks that failed (``keyservice sealed``, ``audit failed`` ...). Never cached by a
    client or proxy."""

    def __init__(self, readiness: Readiness | None) -> None:
        self.readiness = readiness

    async def answer(self, _request: Request) -> Response:
        ready, checks = (True, {}) if self.readiness is None else await self.readiness()
        if not ready:
            failing = ", ".join(
                f"{name} {state}" for name, state in checks.items() if state != "ok"
            )
            raise ServiceUnavailable(
                f"The vault is not ready: {failing}.", headers={"Cache-Control": "no-store"}
            )
        return json_response(
            {"status": "ready", "checks": checks}, headers={"cache-control": "no-store"}
        )


async def noop(_request: Request) -> Response:
    """The cheapest authenticated-path-free endpoint; benchmarks compare against it."""
    return json_response({"object": "noop"})


async def openapi(_request: Request) -> Response:
    """The OpenAPI document of this API (also in the repository as docs/openapi.json)."""
    return Response(
        _OPENAPI.read_bytes(),
        media_type="application/json",
        headers={"cache-control": "max-age=300"},
    )


class _Admin:
    """The admin listener's endpoints: mutual TLS, and only the allowed identities."""

    def __init__(
        self, allowed_identities: Collection[str], maintenance: KeyMaintenance | None = None
    ) -> None:
        self.allowed = frozenset(allowed_identities)
        self.maintenance = maintenance

    async def whoami(self, request: Request) -> Response:
        identity = require_identity(request.scope, self.allowed)
        return json_response({"object": "identity", "identity": identity, "version": __version__})

    async def key_usage(self, request: Request) -> Response:
        """How many stored data keys each KEK version wraps (``cardvault keys status``)."""
        require_identity(request.scope, self.allowed)
        assert self.maintenance is not None
        return json_response(await self.maintenance.usage())

    async def reencrypt(self, request: Request) -> Response:
        """One batch of the re-encryption job (``cardvault keys reencrypt``):
        ``{"target_version", "batch_size"}``."""
        identity = require_identity(request.scope, self.allowed)
        assert self.maintenance is not None
        values = await _int_fields(request, target_version=None, batch_size=100)
        return json_response(
            await self.maintenance.reencrypt_batch(
                str(request.path_params["kek"]),
                target_version=values["target_version"],
                batch_size=values["batch_size"],
                actor=identity,
            )
        )

    async def rotated(self, request: Request) -> Response:
        """The key service rotated a KEK (``cardvault keys rotate``): the vault takes a
        data key under the new version now and writes ``key.rotated``. No body."""
        identity = require_identity(request.scope, self.allowed)
        assert self.maintenance is not None
        await _int_fields(request)
        return json_response(
            await self.maintenance.rotated(str(request.path_params["kek"]), actor=identity)
        )

    async def reencrypt_data(self, request: Request) -> Response:
        """One batch of the card-data re-encryption job (``cardvault keys reencrypt
        --data``): ``{"before", "batch_size"}``."""
        identity = require_identity(request.scope, self.allowed)
        assert self.maintenance is not None
        values = await _int_fields(request, before=None, batch_size=100)
        return json_response(
            await self.maintenance.reencrypt_data_batch(
                str(request.path_params["kek"]),
                before=values["before"],
                batch_size=values["batch_size"],
                actor=identity,
            )
        )


async def _int_fields(request: Request, **defaults: int | None) -> dict[str, int]:
    """A small JSON object body of integer fields (at most 4 KiB): each of ``defaults``,
    required where its default is None; any other name is refused. orjson bounds the
    depth (the standard library's parser recurses until the interpreter gives up)."""
    try:
        body = orjson.loads(await read_body(request, 4096) or b"{}")
    except ValueError as exc:
        raise InvalidRequestError("The body is not valid JSON.") from exc
    if not isinstance(body, dict):
        raise InvalidRequestError("The body must be a JSON object.")
    for name in body:
        if name not in defaults:
            raise ParameterUnknown(param=str(name)[:64])
    values: dict[str, int] = {}
    for name, default in defaults.items():
        value = body.get(name, default)
        if value is None:
            raise ParameterMissing(param=name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise InvalidRequestError("Expected an integer.", param=name)
        values[name] = value
    return values


# -- the API that takes a key -----------------------------------------------------------------


def by_method(**handlers: Handler) -> Handler:
    """One route per path, so that a 405 names every allowed method in ``Allow``."""

    async def endpoint(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await handlers[method](request)

    return endpoint


def _presented_key(request: Request) -> str | None:
    """The API key of the ``Authorization`` header: a Bearer token, or the user name of
    Basic (``curl -u "$SK:"``). 401 for another scheme or a Basic value that is not
    base64."""
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


class _KeyedHandlers:
    """What every endpoint that takes an API key does first."""

    def __init__(self, api: PublicAPI, limits: KeyLimits) -> None:
        self.api = api
        self.limits = limits

    async def caller(self, request: Request) -> Caller:
        """Authenticate the request's API key and take one token from its rate limit."""
        caller = await self.api.accounts.authenticate(_presented_key(request))
        await self.limits.check(caller.kind, caller.key_id)
        return caller

    async def body(self, request: Request) -> dict[str, Any]:
        """The body's parameters (413 past ``max_body_bytes``, never held whole)."""
        limits = self.api.parse_limits
        return parse_body(
            await read_body(request, limits.max_body_bytes),
            request.headers.get("content-type"),
            limits,
        )

    def query(self, request: Request) -> dict[str, Any]:
        return parse_form(list(request.query_params.multi_items()), self.api.parse_limits)

    async def once(
        self,
        request: Request,
        caller: Caller,
        params: dict[str, Any],
        create: Callable[[Claim], Awaitable[dict[str, Any]]],
        replay: Callable[[str], Awaitable[dict[str, Any]]],
        *,
        prefix: str,
    ) -> Response:
        """A create, done at most once per Idempotency-Key; ``create`` makes its object
        under the claim's id (``prefix``: that of the ids it makes)."""
        outcome = await self.api.idempotency.run(
            caller,
            request.headers.get("idempotency-key"),
            request.url.path,
            params,
            create,
            replay,
            prefix=prefix,
        )
        if outcome.replayed:
            return json_response(outcome.body, headers={"idempotent-replayed": "true"})
        return json_response(outcome.body)


class _PaymentMethodHandlers(_KeyedHandlers):
    """``/v1/payment_methods``."""

    def __init__(self, api: PublicAPI) -> None:
        super().__init__(api, api.payment_method_limits)
        self.service = api.payment_methods

    async def create(self, request: Request) -> Response:
        caller = await self.caller(request)
        params = await self.body(request)

        async def replay(pm_id: str) -> dict[str, Any]:
            # A publishable key's retry reads its payment method again as a secret key
            # would: the object it was answered with the first time.
            as_secret = dataclasses.replace(caller, kind="secret")
            return await self.service.retrieve_payment_method(as_secret, pm_id)

        return await self.once(
            request,
            caller,
            params,
            lambda claim: self.service.create_payment_method(caller, params, claim),
            replay,
            prefix="pm_",
        )

    async def list_(self, request: Request) -> Response:
        caller = await self.caller(request)
        return json_response(await self.service.list_payment_methods(caller, self.query(request)))

    async def retrieve(self, request: Request) -> Response:
        caller = await self.caller(request)
        return json_response(
            await self.service.retrieve_payment_method(caller, request.path_params["pm"])
        )

    async def delete(self, request: Request) -> Response:
        caller = await self.caller(request)
        return json_response(
            await self.service.delete_payment_method(caller, request.path_params["pm"])
        )


class _ForwardingHandlers(_KeyedHandlers):
    """``/v1/forwarding/requests``."""

    def __init__(self, api: PublicAPI, forwarder: Forwarder) -> None:
        super().__init__(api, api.forwarding_limits or api.payment_method_limits)
        self.forwarder = forwarder

    async def create(self, request: Request) -> Response:
        caller = await self.caller(request)
        # Before the body is read: a publishable key is refused whatever it sends.
        require_secret(caller)
        params = await self.body(request)
        return await self.once(
            request,
            caller,
            params,
            lambda claim: self.forwarder.create(caller, params, claim),
            lambda fwd_id: self.forwarder.retrieve(caller, fwd_id),
            prefix="fwdreq_",
        )

    async def list_(self, request: Request) -> Response:
        caller = await self.caller(request)
        return json_response(await self.forwarder.list_requests(caller, self.query(request)))

    async def retrieve(self, request: Request) -> Response:
        caller = await self.caller(request)
        return json_response(await self.forwarder.retrieve(caller, request.path_params["id"]))
