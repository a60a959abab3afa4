"""The vault's side of the key service: an HTTPS client with the vault's own certificate.

The vault never imports the key service; it talks to it only over mutual TLS. Errors
become :class:`KeyServiceSealed` when the key service answers 503 ``keyservice_sealed``,
else :class:`KeyServiceUnavailable` (cannot reach it, or any other answer: its own 503s
for its database, its audit log or its connections included), so nothing half-done is
stored. Both are 503s with their ``Retry-After`` (:mod:`cardvault.errors`).
"""

from __future__ import annotations

import base64
import contextlib
from pathlib import Path
from typing import Any

import httpx

from cardvault.errors import KeyServiceSealed, KeyServiceUnavailable, KeyVersionUnavailable
from cardvault.logging import get_logger
from cardvault.transport.tls import client_context

__all__ = ["DataKey", "KeyServiceClient"]

_log = get_logger("cardvault.vault.keyclient")


class DataKey:
    """A data key as the key service returned it. ``repr`` hides the plaintext."""

    __slots__ = ("kek_version", "plaintext", "wrapped")

    def __init__(self, plaintext: bytearray, wrapped: bytes, kek_version: int) -> None:
        self.plaintext = plaintext
        self.wrapped = wrapped
        self.kek_version = kek_version

    def __repr__(self) -> str:
        return f"DataKey(kek_version={self.kek_version})"


class KeyServiceClient:
    """The key service's API as the vault calls it (``datakey``, ``unwrap``,
    ``derive``), over mutual TLS with the vault's own certificate; no redirects, no
    proxy from the environment."""

    def __init__(
        self,
        url: str,
        *,
        ca_file: Path,
        cert_file: Path,
        key_file: Path,
        timeout: float = 5.0,
    ) -> None:
        ctx = client_context(ca_file, client_cert=(cert_file, key_file))
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            verify=ctx,
            timeout=timeout,
            trust_env=False,
            follow_redirects=False,
        )
        self.calls = 0  # round trips made, for the benchmark's calls-per-10k figure

    async def _post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        self.calls += 1
        try:
            response = await self._http.post(path, json=body or {})
        except httpx.HTTPError as exc:
            _log.error("key service unreachable", error=type(exc).__name__)
            raise KeyServiceUnavailable() from exc
        if response.status_code != 200:
            code = None
            with contextlib.suppress(ValueError, KeyError, TypeError):
                code = response.json()["error"]["code"]
            if response.status_code == 503 and code == KeyServiceSealed.code:
                raise KeyServiceSealed()
            if code == KeyVersionUnavailable.code:
                # Data under a retired or destroyed KEK version: a clear, final answer.
                raise KeyVersionUnavailable()
            _log.error("key service refused", status=response.status_code, code=code)
            raise KeyServiceUnavailable()
        data: dict[str, Any] = response.json()
        return data

    async def datakey(self, kek: str) -> DataKey:
        data = await self._post(f"/v1/keys/{kek}/datakey")
        return DataKey(
            bytearray(base64.b64decode(data["plaintext"])),
            base64.b64decode(data["ciphertext"]),
            int(data["key_version"]),
        )

    async def unwrap(self, kek: str, wrapped: bytes) -> bytearray:
        data = await self._post(
            f"/v1/keys/{kek}/unwrap", {"ciphertext": base64.b64encode(wrapped).decode()}
        )
        return bytearray(base64.b64decode(data["plaintext"]))

    async def rewrap(self, kek: str, wrapped: bytes) -> tuple[bytes, int]:
        """``wrapped`` re-wrapped under the newest KEK version: ``(wrapped, version)``.
        No plaintext travels."""
        data = await self._post(
            f"/v1/keys/{kek}/rewrap", {"ciphertext": base64.b64encode(wrapped).decode()}
        )
        return base64.b64decode(data["ciphertext"]), int(data["key_version"])

    async def rewrap_many(self, kek: str, wrapped: list[bytes]) -> tuple[list[bytes], int]:
        """Each of ``wrapped`` re-wrapped under the newest KEK version, in one call (at
        most 100): ``(wrapped, version)``. No plaintext travels."""
        data = await self._post(
            f"/v1/keys/{kek}/rewrap",
            {"ciphertexts": [base64.b64encode(w).decode() for w in wrapped]},
        )
        return [base64.b64decode(c) for c in data["ciphertexts"]], int(data["key_version"])

    async def derive(
        self, kek: str, context: str, version: int | None = None
    ) -> tuple[bytearray, int]:
        body: dict[str, Any] = {"context": context}
        if version is not None:
            body["version"] = version
        data = await self._post(f"/v1/keys/{kek}/derive", body)
        return bytearray(base64.b64decode(data["key"])), int(data["key_version"])

    async def close(self) -> None:
        await self._http.aclose()
