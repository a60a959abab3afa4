"""The key service's HTTP API, in the style of Vault's transit engine. Mutual TLS only;
the caller's certificate identity decides what it may do, before anything else is
looked at. Binary values travel as standard base64."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from cardvault.errors import (
    CardVaultError,
    InvalidRequestError,
    ParameterMissing,
    ParameterUnknown,
    UnsupportedMediaType,
)
from cardvault.keyservice.service import KeyService
from cardvault.transport.asgi import json_response, read_body
from cardvault.transport.identity import peer_identity, require_identity

__all__ = ["routes"]

_MAX_BODY = 16 * 1024
Handler = Callable[[Request], Awaitable[Response]]


async def _body(request: Request, allowed: Collection[str]) -> dict[str, Any]:
    raw = await read_body(request, _MAX_BODY)
    if not raw:
        data: Any = {}
    else:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise UnsupportedMediaType("Send the body as application/json.")
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise InvalidRequestError("The body is not valid JSON.") from exc
    if not isinstance(data, dict):
        raise InvalidRequestError("The body must be a JSON object.")
    for key in data:
        if key not in allowed:
            raise ParameterUnknown(param=str(key)[:64])
    return data


def _b64(data: dict[str, Any], field: str) -> bytes:
    value = data.get(field)
    if value is None:
        raise ParameterMissing(param=field)
    if not isinstance(value, str):
        raise InvalidRequestError("Expected a base64 string.", param=field)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequestError("Expected a base64 string.", param=field) from exc


def _enc(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def routes(
    service: KeyService, *, vault: Collection[str], admin: Collection[str]
) -> list[BaseRoute]:
    vault_ids, admin_ids = frozenset(vault), frozenset(admin)

    async def actor(request: Request, allowed: frozenset[str]) -> str:
        try:
            return require_identity(request.scope, allowed)
        except CardVaultError:
            await service.audit.record(
                "keyservice.auth.failed",
                actor=peer_identity(request.scope) or "anonymous",
                object_id=request.url.path[:100],
                result="refused",
            )
            raise

    async def healthz(request: Request) -> Response:
        # Any verified identity may ask whether the service runs; nothing more.
        await actor(request, vault_ids | admin_ids)
        return json_response({"status": "ok"})

    async def status(request: Request) -> Response:
        who = await actor(request, admin_ids)
        await service.audit.record("keyservice.status.read", actor=who)
        return json_response(service.status())

    async def unseal(request: Request) -> Response:
        who = await actor(request, admin_ids)
        data = await _body(request, {"share"})
        share = data.get("share")
        if not isinstance(share, str) or not share:
            raise ParameterMissing(param="share")
        progress = await service.submit_share(share, actor=who)
        return json_response(
            {
                "sealed": progress.sealed,
                "progress": progress.progress,
                "threshold": progress.threshold,
            }
        )

    async def seal(request: Request) -> Response:
        who = await actor(request, admin_ids)
        await service.seal(actor=who)
        return json_response({"sealed": True})

    async def datakey(request: Request) -> Response:
        who = await actor(request, vault_ids)
        await _body(request, ())
        name = request.path_params["name"]
        plaintext, wrapped, version = service.datakey(name)
        # Fail closed: a data key whose issue cannot be recorded is not handed out.
        await service.audit.record(
            "keyservice.datakey.issued", actor=who, object_id=name, detail={"kek_version": version}
        )
        return json_response(
            {"plaintext": _enc(plaintext), "ciphertext": _enc(wrapped), "key_version": version}
        )

    async def unwrap(request: Request) -> Response:
        who = await actor(request, vault_ids)
        data = await _body(request, {"ciphertext"})
        plaintext = service.unwrap(request.path_params["name"], _b64(data, "ciphertext"))
        await service.audit.record(
            "keyservice.datakey.unwrapped", actor=who, object_id=request.path_params["name"]
        )
        return json_response({"plaintext": _enc(plaintext)})

    async def derive(request: Request) -> Response:
        who = await actor(request, vault_ids)
        data = await _body(request, {"context", "version"})
        context = data.get("context")
        if not isinstance(context, str) or not context:
            raise ParameterMissing(param="context")
        version = data.get("version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise InvalidRequestError("Expected an integer.", param="version")
        key, used = service.derive(request.path_params["name"], context, version)
        await service.audit.record(
            "keyservice.key.derived",
            actor=who,
            object_id=request.path_params["name"],
            detail={"context": context[:100], "kek_version": used},
        )
        return json_response({"key": _enc(key), "key_version": used})

    async def rotate(request: Request) -> Response:
        who = await actor(request, admin_ids)
        await _body(request, ())
        return json_response(await service.rotate(request.path_params["name"], actor=who))

    async def rewrap(request: Request) -> Response:
        who = await actor(request, admin_ids)
        data = await _body(request, {"ciphertext"})
        wrapped, version = service.rewrap(request.path_params["name"], _b64(data, "ciphertext"))
        await service.audit.record(
            "keyservice.datakey.rewrapped",
            actor=who,
            object_id=request.path_params["name"],
            detail={"kek_version": version},
        )
        return json_response({"ciphertext": _enc(wrapped), "key_version": version})

    async def config(request: Request) -> Response:
        who = await actor(request, admin_ids)
        data = await _body(request, {"min_decryption_version"})
        minimum = data.get("min_decryption_version")
        if minimum is None:
            raise ParameterMissing(param="min_decryption_version")
        if not isinstance(minimum, int) or isinstance(minimum, bool):
            raise InvalidRequestError("Expected an integer.", param="min_decryption_version")
        result = await service.configure(
            request.path_params["name"], min_decryption_version=minimum, actor=who
        )
        return json_response(result)

    async def noop(request: Request) -> Response:
        await actor(request, vault_ids | admin_ids)
        return json_response({"object": "noop"})

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/v1/noop", noop, methods=["POST"]),
        Route("/v1/status", status, methods=["GET"]),
        Route("/v1/unseal", unseal, methods=["POST"]),
        Route("/v1/seal", seal, methods=["POST"]),
        Route("/v1/keys/{name}/datakey", datakey, methods=["POST"]),
        Route("/v1/keys/{name}/unwrap", unwrap, methods=["POST"]),
        Route("/v1/keys/{name}/derive", derive, methods=["POST"]),
        Route("/v1/keys/{name}/rotate", rotate, methods=["POST"]),
        Route("/v1/keys/{name}/rewrap", rewrap, methods=["POST"]),
        Route("/v1/keys/{name}/config", config, methods=["POST"]),
    ]
