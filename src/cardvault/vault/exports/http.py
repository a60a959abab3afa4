"""Card export's endpoints on the vault's admin listener (mutual TLS, the admin
identities only), registered by :func:`cardvault.vault.http.routes`:

* ``GET /v1/admin/export_recipients``: the static allowlist (names, fingerprints,
  whether each key was accepted) and the approval threshold.
* ``POST /v1/admin/export_approvals``: one custodian's share approving one export
  (``account``, ``mode``, ``recipient``, ``share``).
* ``POST /v1/admin/exports``: the approved export (``account``, ``mode``,
  ``recipient``); the answer is the OpenPGP message, streamed.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from cardvault.errors import InvalidRequestError
from cardvault.transport.asgi import json_response, read_body
from cardvault.transport.identity import require_identity
from cardvault.vault.exports.service import Exports, parse_export_request

__all__ = ["export_routes"]

_BODY_BYTES = 4 * 1024


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await read_body(request, _BODY_BYTES) or b"{}")
    except ValueError as exc:
        raise InvalidRequestError("The body is not valid JSON.") from exc
    if not isinstance(body, dict):
        raise InvalidRequestError("The body must be a JSON object.")
    return body


class _ExportHandlers:
    def __init__(self, exports: Exports, allowed: Collection[str]) -> None:
        self.exports = exports
        self.allowed = frozenset(allowed)

    async def recipients(self, request: Request) -> Response:
        require_identity(request.scope, self.allowed)
        return json_response(self.exports.list_recipients())

    async def approve(self, request: Request) -> Response:
        identity = require_identity(request.scope, self.allowed)
        parsed = parse_export_request(await _body(request), share=True)
        return json_response(await self.exports.approve(identity, parsed))

    async def export(self, request: Request) -> Response:
        identity = require_identity(request.scope, self.allowed)
        parsed = parse_export_request(await _body(request), share=False)
        stream = await self.exports.export(identity, parsed)
        return StreamingResponse(
            stream,
            media_type="application/pgp-encrypted",
            headers={"cache-control": "no-store"},
        )


def export_routes(exports: Exports | None, allowed: Collection[str]) -> list[BaseRoute]:
    """The endpoints above, or none when the vault has no export configuration."""
    if exports is None:
        return []
    h = _ExportHandlers(exports, allowed)
    return [
        Route("/v1/admin/export_recipients", h.recipients, methods=["GET"]),
        Route("/v1/admin/export_approvals", h.approve, methods=["POST"]),
        Route("/v1/admin/exports", h.export, methods=["POST"]),
    ]
