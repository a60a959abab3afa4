"""The handlers of ``/v1/events`` and ``/v1/webhook_endpoints``, registered by
:func:`cardvault.vault.http.routes`. Each authenticates the key, takes its rate-limit
token and reads the request through ``keyed`` (the vault's keyed handlers: the same
order of errors as every other endpoint), then calls one method of a service."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from cardvault.transport.asgi import json_response
from cardvault.vault.accounts import Caller, require_secret
from cardvault.vault.events import Events
from cardvault.vault.webhooks.endpoints import WebhookEndpoints

__all__ = ["Keyed", "event_routes"]

Handler = Callable[[Request], Awaitable[Response]]


class Keyed(Protocol):
    async def caller(self, request: Request) -> Caller: ...

    async def body(self, request: Request) -> dict[str, Any]: ...

    def query(self, request: Request) -> dict[str, Any]: ...


def event_routes(
    keyed: Keyed,
    events: Events,
    endpoints: WebhookEndpoints,
    by_method: Callable[..., Handler],
) -> list[BaseRoute]:
    """The routes of the events and webhook endpoints APIs (secret keys only)."""
    h = _Handlers(keyed, events, endpoints)
    return [
        Route("/v1/events", h.list_events, methods=["GET"]),
        Route("/v1/events/{id}", h.retrieve_event, methods=["GET"]),
        Route(
            "/v1/webhook_endpoints",
            by_method(POST=h.create_endpoint, GET=h.list_endpoints),
            methods=["GET", "POST"],
        ),
        Route(
            "/v1/webhook_endpoints/{id}",
            by_method(GET=h.retrieve_endpoint, DELETE=h.delete_endpoint),
            methods=["GET", "DELETE"],
        ),
        Route("/v1/webhook_endpoints/{id}/deliveries", h.deliveries, methods=["GET"]),
    ]


class _Handlers:
    def __init__(self, keyed: Keyed, events: Events, endpoints: WebhookEndpoints) -> None:
        self.keyed = keyed
        self.events = events
        self.endpoints = endpoints

    async def list_events(self, request: Request) -> Response:
        caller = await self.keyed.caller(request)
        return json_response(await self.events.list_events(caller, self.keyed.query(request)))

    async def retrieve_event(self, request: Request) -> Response:
        caller = await self.keyed.caller(request)
        return json_response(await self.events.retrieve(caller, request.path_params["id"]))

    async def create_endpoint(self, request: Request) -> Response:
        caller = await self.keyed.caller(request)
        # Before the body is read: a publishable key is refused whatever it sends.
        require_secret(caller)
        params = await self.keyed.body(request)
        return json_response(await self.endpoints.create(caller, params))

    async def list_endpoints(self, request: Request) -> Response:
        caller = await self.keyed.caller(request)
        query = self.keyed.query(request)
        return json_response(await self.endpoints.list_endpoints(caller, query))

    async def retrieve_endpoint(self, request: Request) -> Response:
        caller = await self.keyed.caller(request)
        return json_response(await self.endpoints.retrieve(caller, request.path_params["id"]))

    async def delete_endpoint(self, request: Request) -> Response:
        caller = await self.keyed.caller(request)
        return json_response(await self.endpoints.delete(caller, request.path_params["id"]))

    async def deliveries(self, request: Request) -> Response:
        caller = await self.keyed.caller(request)
        query = self.keyed.query(request)
        return json_response(
            await self.endpoints.deliveries(caller, request.path_params["id"], query)
        )
