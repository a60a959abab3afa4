"""The key service's HTTP API, in the style of Vault's transit engine. Mutual TLS only;
the caller's certificate identity decides what it may do, before anything else is
looked at. Binary values travel as standard base64.

One handler per endpoint, each a method of one object holding the service and the
allowed identities; :func:`routes` registers them all in one list.

Whatever the caller chose (the request's path, a key name, a derivation context) is
recorded only through :func:`~cardvault.audit.text.untrusted_text`, so that no request
can make its own record fail: a refused request always answers 401 or 403 and leaves a
``keyservice.auth.failed`` record, whatever its path holds.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from cardvault.audit.record import json_nesting_exceeds
from cardvault.audit.text import untrusted_text
from cardvault.cards.luhn import holds_card_number
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
#: Bodies are flat objects of strings and integers; anything nested deeper is refused
#: before the JSON parser recurses into it.
_MAX_BODY_DEPTH = 2
#: A KEK name in a path (``pan``, ``cvc``, ``fingerprint``): a short identifier.
_KEK_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")
#: Most wrapped keys in one ``rewrap`` call (each about 120 base64 characters: the
#: batch fits the body limit).
MAX_REWRAP_BATCH = 100
#: Longest derivation context: the vault sends an account id (``acct_…``).
MAX_CONTEXT = 200
#: The most the store may take to answer a readiness check (seconds).
_READY_TIMEOUT = 2.0
Handler = Callable[[Request], Awaitable[Response]]


async def _body(request: Request, allowed: Collection[str]) -> dict[str, Any]:
    raw = await read_body(request, _MAX_BODY)
    if not raw:
        data: Any = {}
    else:
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            raise UnsupportedMediaType("Send the body as application/json.")
        if json_nesting_exceeds(raw, _MAX_BODY_DEPTH):
            raise InvalidRequestError("The body is nested deeper than this API accepts.")
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            # (RecursionError: UTF-16 or UTF-32 bodies, which the check above reads as bytes.)
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


def _kek_name(request: Request) -> str:
    """The KEK name in the path; 400 unless it is a short identifier (never echoed). A
    well-formed name that names no KEK is the service's 404."""
    name = request.path_params["name"]
    if not isinstance(name, str) or not _KEK_NAME.fullmatch(name):
        raise InvalidRequestError(
            "The key name must be a lower-case identifier of at most 64 characters.",
            param="name",
        )
    return name


def _context(data: dict[str, Any]) -> str:
    """The derivation context: a non-empty string of at most :data:`MAX_CONTEXT`
    characters (the messages never show the value). A card number in it is refused by
    ``derive``, which records the attempt."""
    context = data.get("context")
    if not isinstance(context, str) or not context:
        raise ParameterMissing(param="context")
    if len(context) > MAX_CONTEXT:
        raise InvalidRequestError(
            f"The context must be at most {MAX_CONTEXT} characters.", param="context"
        )
    return context


def routes(
    service: KeyService, *, vault: Collection[str], admin: Collection[str]
) -> list[BaseRoute]:
    """Every route of the key service. ``vault`` and ``admin``: the certificate identities
    allowed the vault's endpoints (data keys) and the administrator's (seal, rotation)."""
    api = _KeyServiceHandlers(service, vault=vault, admin=admin)
    return [
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/readyz", api.readyz, methods=["GET"]),
        Route("/v1/noop", api.noop, methods=["POST"]),
        Route("/v1/status", api.status, methods=["GET"]),
        Route("/v1/unseal", api.unseal, methods=["POST"]),
        Route("/v1/seal", api.seal, methods=["POST"]),
        Route("/v1/keys/{name}/datakey", api.datakey, methods=["POST"]),
        Route("/v1/keys/{name}/unwrap", api.unwrap, methods=["POST"]),
        Route("/v1/keys/{name}/derive", api.derive, methods=["POST"]),
        Route("/v1/keys/{name}/rotate", api.rotate, methods=["POST"]),
        Route("/v1/keys/{name}/rewrap", api.rewrap, methods=["POST"]),
        Route("/v1/keys/{name}/config", api.config, methods=["POST"]),
        Route("/v1/keys/{name}/destroy", api.destroy, methods=["POST"]),
    ]


class _KeyServiceHandlers:
    """One method per endpoint, over one :class:`KeyService` and the identity sets.

    Each handler authorizes first (:meth:`actor`), then checks the key name and the body.
    Names reach a record only once the service knows them, and still as untrusted_text.
    """

    def __init__(
        self, service: KeyService, *, vault: Collection[str], admin: Collection[str]
    ) -> None:
        self.service = service
        self.vault_ids = frozenset(vault)
        self.admin_ids = frozenset(admin)

    async def actor(self, request: Request, allowed: frozenset[str]) -> str:
        """The caller's identity, if it is one of ``allowed``; else 401 or 403, recorded."""
        try:
            return require_identity(request.scope, allowed)
        except CardVaultError:
            # The path is the caller's text, and so, as far as this service is concerned,
            # is a refused identity: both recorded as untrusted_text, so that this record
            # is always written and the caller always gets its 401 or 403.
            await self.service.audit.record(
                "keyservice.auth.failed",
                actor=untrusted_text(peer_identity(request.scope) or "anonymous", limit=200),
                object_id=untrusted_text(request.url.path, limit=200),
                result="refused",
            )
            raise

    # -- every identity ----------------------------------------------------------------

    async def healthz(self, request: Request) -> Response:
        # Any verified identity may ask whether the service runs; nothing more.
        await self.actor(request, self.vault_ids | self.admin_ids)
        return json_response({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        """Readiness, to any verified identity: 200 when the store answers, the service
        is unsealed and its audit log's last write succeeded; else 503 with the same
        body. ``checks`` names each: ``store`` (ok, unavailable), ``seal`` (unsealed,
        sealed), ``audit`` (ok, failed). The vault's own ``/readyz`` asks this one."""
        await self.actor(request, self.vault_ids | self.admin_ids)
        try:
            await asyncio.wait_for(self.service.store.get_meta("seal"), _READY_TIMEOUT)
            store = "ok"
        except Exception:
            store = "unavailable"
        checks = {
            "store": store,
            "seal": "sealed" if self.service.sealed else "unsealed",
            "audit": "ok" if self.service.audit.writable else "failed",
        }
        ready = store == "ok" and checks["seal"] == "unsealed" and checks["audit"] == "ok"
        return json_response(
            {"status": "ready" if ready else "not_ready", "checks": checks},
            status=200 if ready else 503,
            headers={"cache-control": "no-store"},
        )

    async def noop(self, request: Request) -> Response:
        await self.actor(request, self.vault_ids | self.admin_ids)
        return json_response({"object": "noop"})

    # -- the administrator: status, seal and unseal --------------------------------------

    async def status(self, request: Request) -> Response:
        who = await self.actor(request, self.admin_ids)
        await self.service.audit.record("keyservice.status.read", actor=who)
        return json_response(self.service.status())

    async def unseal(self, request: Request) -> Response:
        who = await self.actor(request, self.admin_ids)
        data = await _body(request, {"share"})
        share = data.get("share")
        if not isinstance(share, str) or not share:
            raise ParameterMissing(param="share")
        progress = await self.service.submit_share(share, actor=who)
        return json_response(
            {
                "sealed": progress.sealed,
                "progress": progress.progress,
                "threshold": progress.threshold,
            }
        )

    async def seal(self, request: Request) -> Response:
        who = await self.actor(request, self.admin_ids)
        await self.service.seal(actor=who)
        return json_response({"sealed": True})

    # -- the vault: data keys and derived keys -------------------------------------------

    async def datakey(self, request: Request) -> Response:
        who = await self.actor(request, self.vault_ids)
        name = _kek_name(request)
        await _body(request, ())
        plaintext, wrapped, version = self.service.datakey(name)
        # Fail closed: a data key whose issue cannot be recorded is not handed out.
        await self.service.audit.record(
            "keyservice.datakey.issued",
            actor=who,
            object_id=untrusted_text(name),
            detail={"kek_version": version},
        )
        return json_response(
            {"plaintext": _enc(plaintext), "ciphertext": _enc(wrapped), "key_version": version}
        )

    async def unwrap(self, request: Request) -> Response:
        who = await self.actor(request, self.vault_ids)
        name = _kek_name(request)
        data = await _body(request, {"ciphertext"})
        plaintext = self.service.unwrap(name, _b64(data, "ciphertext"))
        await self.service.audit.record(
            "keyservice.datakey.unwrapped", actor=who, object_id=untrusted_text(name)
        )
        return json_response({"plaintext": _enc(plaintext)})

    async def derive(self, request: Request) -> Response:
        who = await self.actor(request, self.vault_ids)
        name = _kek_name(request)
        data = await _body(request, {"context", "version"})
        context = _context(data)
        if holds_card_number(context):
            # Card data where none may be: refused, and recorded (with the number
            # replaced) because it means a bug or an attack on the caller's side.
            await self.service.audit.record(
                "keyservice.key.derived",
                actor=who,
                object_id=untrusted_text(name),
                result="refused",
                detail={
                    "reason": "card_number_in_context",
                    "context": untrusted_text(context, limit=100),
                },
            )
            raise InvalidRequestError("The context must not hold a card number.", param="context")
        version = data.get("version")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool)):
            raise InvalidRequestError("Expected an integer.", param="version")
        key, used = self.service.derive(name, context, version)
        await self.service.audit.record(
            "keyservice.key.derived",
            actor=who,
            object_id=untrusted_text(name),
            detail={"context": untrusted_text(context, limit=100), "kek_version": used},
        )
        return json_response({"key": _enc(key), "key_version": used})

    # -- the administrator: the KEKs -----------------------------------------------------

    async def rotate(self, request: Request) -> Response:
        who = await self.actor(request, self.admin_ids)
        name = _kek_name(request)
        await _body(request, ())
        return json_response(await self.service.rotate(name, actor=who))

    async def rewrap(self, request: Request) -> Response:
        # The vault too: its re-encryption job moves its stored keys forward. The answer
        # holds no plaintext, and the vault may unwrap its keys anyway.
        who = await self.actor(request, self.vault_ids | self.admin_ids)
        name = _kek_name(request)
        data = await _body(request, {"ciphertext", "ciphertexts"})
        if "ciphertexts" in data:
            # A batch (the re-encryption job's): all re-wrapped, or none answered.
            many = data["ciphertexts"]
            if not isinstance(many, list) or not 1 <= len(many) <= MAX_REWRAP_BATCH:
                raise InvalidRequestError(
                    f"Expected a list of 1 to {MAX_REWRAP_BATCH} base64 strings.",
                    param="ciphertexts",
                )
            out, version = [], 0
            for value in many:
                wrapped, version = self.service.rewrap(
                    name, _b64({"ciphertexts": value}, "ciphertexts")
                )
                out.append(_enc(wrapped))
            await self.service.audit.record(
                "keyservice.datakey.rewrapped",
                actor=who,
                object_id=untrusted_text(name),
                detail={"kek_version": version, "count": len(out)},
            )
            return json_response({"ciphertexts": out, "key_version": version})
        wrapped, version = self.service.rewrap(name, _b64(data, "ciphertext"))
        await self.service.audit.record(
            "keyservice.datakey.rewrapped",
            actor=who,
            object_id=untrusted_text(name),
            detail={"kek_version": version},
        )
        return json_response({"ciphertext": _enc(wrapped), "key_version": version})

    async def config(self, request: Request) -> Response:
        who = await self.actor(request, self.admin_ids)
        name = _kek_name(request)
        data = await _body(request, {"min_decryption_version"})
        minimum = data.get("min_decryption_version")
        if minimum is None:
            raise ParameterMissing(param="min_decryption_version")
        if not isinstance(minimum, int) or isinstance(minimum, bool):
            raise InvalidRequestError("Expected an integer.", param="min_decryption_version")
        result = await self.service.configure(name, min_decryption_version=minimum, actor=who)
        return json_response(result)

    async def destroy(self, request: Request) -> Response:
        """One custodian's approval of a retired version's destruction (``version``,
        ``share``); the K-th destroys it."""
        who = await self.actor(request, self.admin_ids)
        name = _kek_name(request)
        data = await _body(request, {"version", "share"})
        version = data.get("version")
        if version is None:
            raise ParameterMissing(param="version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise InvalidRequestError("Expected a positive integer.", param="version")
        share = data.get("share")
        if share is not None and not isinstance(share, str):
            raise InvalidRequestError("Expected a string.", param="share")
        return json_response(await self.service.destroy(name, version, share=share, actor=who))
