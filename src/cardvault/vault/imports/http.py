"""Bulk import's endpoints on the vault's admin listener (mutual TLS, the admin
identities only), registered by :func:`cardvault.vault.http.routes`:

* ``GET /v1/admin/import_key``: the import key's fingerprint and public key;
  ``POST``: make a new one (``cardvault import-key create``).
* ``POST /v1/admin/import_uploads``: a new upload; ``PUT
  /v1/admin/import_uploads/{id}?offset=N``: one part (at most 512 KiB) at ``offset``.
* ``POST /v1/admin/imports``: run the import of an upload (a JSON object of at most
  8 KiB, :func:`~.service.parse_run_request`); the answer is a stream of JSON lines.
* ``GET /v1/admin/imports/{id}``: the job; ``GET /v1/admin/imports/{id}/rows?after=&limit=``:
  what became of each row (the mapping external id → ``pm_…``, the refused rows).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from cardvault.errors import CardVaultError, InvalidRequestError
from cardvault.transport.asgi import json_response, read_body
from cardvault.transport.identity import require_identity
from cardvault.vault.imports.service import PART_BYTES, Imports, parse_run_request

__all__ = ["import_routes"]

_RUN_BODY_BYTES = 8 * 1024


def _int_query(request: Request, name: str, default: int, most: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) > most:
        raise InvalidRequestError(f"{name} must be an integer from 0 to {most}.", param=name)
    return int(raw)


class _ImportHandlers:
    def __init__(self, imports: Imports, allowed: Collection[str]) -> None:
        self.imports = imports
        self.allowed = frozenset(allowed)

    async def key(self, request: Request) -> Response:
        identity = require_identity(request.scope, self.allowed)
        if request.method == "POST":
            await read_body(request, 1024)
            return json_response(await self.imports.create_key(identity))
        return json_response(await self.imports.public_key())

    async def new_upload(self, request: Request) -> Response:
        require_identity(request.scope, self.allowed)
        await read_body(request, 1024)
        return json_response(await self.imports.new_upload())

    async def part(self, request: Request) -> Response:
        require_identity(request.scope, self.allowed)
        offset = _int_query(request, "offset", -1, 2**62)
        data = await read_body(request, PART_BYTES)
        return json_response(
            await self.imports.append(str(request.path_params["id"]), offset, data)
        )

    async def run(self, request: Request) -> Response:
        identity = require_identity(request.scope, self.allowed)
        try:
            body = orjson.loads(await read_body(request, _RUN_BODY_BYTES) or b"{}")
        except ValueError as exc:
            raise InvalidRequestError("The body is not valid JSON.") from exc
        if not isinstance(body, dict):
            raise InvalidRequestError("The body must be a JSON object.")
        events = self.imports.run(identity, parse_run_request(body))
        # The first event comes after the check pass: an error until then (a file
        # refused whole) is an ordinary error answer.
        first = await anext(events)

        async def lines() -> AsyncIterator[bytes]:
            yield orjson.dumps(first) + b"\n"
            try:
                async for event in events:
                    yield orjson.dumps(event) + b"\n"
            except CardVaultError as exc:
                yield orjson.dumps({"event": "error", **exc.to_dict()["error"]}) + b"\n"

        return StreamingResponse(
            lines(), media_type="application/x-ndjson", headers={"cache-control": "no-store"}
        )

    async def job(self, request: Request) -> Response:
        require_identity(request.scope, self.allowed)
        return json_response(await self.imports.job(str(request.path_params["id"])[:64]))

    async def rows(self, request: Request) -> Response:
        require_identity(request.scope, self.allowed)
        after = _int_query(request, "after", 0, 2**62)
        limit = _int_query(request, "limit", 1000, 10_000)
        answer: dict[str, Any] = await self.imports.rows(
            str(request.path_params["id"])[:64], after, limit
        )
        return json_response(answer)


def import_routes(imports: Imports | None, allowed: Collection[str]) -> list[BaseRoute]:
    """The endpoints above, or none when the vault has no import service."""
    if imports is None:
        return []
    h = _ImportHandlers(imports, allowed)
    return [
        Route("/v1/admin/import_key", h.key, methods=["GET", "POST"]),
        Route("/v1/admin/import_uploads", h.new_upload, methods=["POST"]),
        Route("/v1/admin/import_uploads/{id}", h.part, methods=["PUT"]),
        Route("/v1/admin/imports", h.run, methods=["POST"]),
        Route("/v1/admin/imports/{id}", h.job, methods=["GET"]),
        Route("/v1/admin/imports/{id}/rows", h.rows, methods=["GET"]),
    ]
