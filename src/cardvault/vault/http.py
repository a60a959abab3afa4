"""The vault's HTTP endpoints: one handler per endpoint, registered in the lists below."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from cardvault import __version__
from cardvault.transport.asgi import json_response
from cardvault.transport.identity import require_identity

if TYPE_CHECKING:
    from cardvault.vault.service import VaultService

__all__ = ["admin_routes", "public_routes"]


async def healthz(_request: Request) -> Response:
    return json_response({"status": "ok"})


async def noop(_request: Request) -> Response:
    """The cheapest authenticated-path-free endpoint; benchmarks compare against it."""
    return json_response({"object": "noop"})


_OPENAPI = Path(__file__).with_name("openapi.json")


async def openapi(_request: Request) -> Response:
    """The OpenAPI document of this API (also in the repository as docs/openapi.json)."""
    return Response(
        _OPENAPI.read_bytes(),
        media_type="application/json",
        headers={"cache-control": "max-age=300"},
    )


def public_routes(service: VaultService | None = None) -> list[BaseRoute]:
    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/openapi.json", openapi, methods=["GET"]),
        Route("/v1/noop", noop, methods=["GET", "POST"]),
    ]
    if service is not None:
        # The card element (cardvault.js and its frame) needs the accounts' keys and
        # allowed origins, so it exists only where the payment API does.
        from cardvault.vault.element import element_routes

        routes += element_routes(service)
    return routes


def admin_routes(allowed_identities: Collection[str]) -> list[BaseRoute]:
    allowed = frozenset(allowed_identities)

    async def whoami(request: Request) -> Response:
        identity = require_identity(request.scope, allowed)
        return json_response({"object": "identity", "identity": identity, "version": __version__})

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/v1/admin/whoami", whoami, methods=["GET"]),
    ]
