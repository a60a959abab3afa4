"""The SDK's HTTP client (see the package docstring)."""

from __future__ import annotations

import random
import re
import ssl
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self, get_args

import httpcore
import httpx

from cardvault import __version__
from cardvault.client.resources import Forwarding, PaymentMethods
from cardvault.errors import CardVaultError, error_class_for
from cardvault.transport.errors import TransportError
from cardvault.transport.pins import PinMismatch, check_peer_pins, is_pin, spki_sha256
from cardvault.transport.tls import TlsProfile, client_context

__all__ = ["Client", "PinMismatch", "TransportError", "spki_sha256"]

_RETRY_STATUSES = frozenset({409, 429, 500, 502, 503, 504})
#: ``sha384-`` and the base64 of a 48-byte digest: what a script tag's integrity takes.
_SRI = re.compile(r"sha384-[A-Za-z0-9+/]{64}")


def _normalize_pins(pin_sha256: Iterable[str] | str | None) -> frozenset[str]:
    """The pins as a set, each checked to be base64 of a 32-byte SHA-256 digest.

    A single string is one pin (iterating it would give a set of characters, which
    would refuse every server with a confusing PinMismatch).
    """
    if pin_sha256 is None:
        return frozenset()
    pins = frozenset([pin_sha256] if isinstance(pin_sha256, str) else pin_sha256)
    if not all(is_pin(pin) for pin in pins):
        raise ValueError("each pin_sha256 must be base64 of a 32-byte SHA-256 digest")
    return pins


class _PinnedStream(httpcore.NetworkStream):
    """A network stream that checks the server key pin right after the TLS handshake."""

    def __init__(self, inner: httpcore.NetworkStream, pins: frozenset[str]) -> None:
        self._inner = inner
        self._pins = pins

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.start_tls(ssl_context, server_hostname, timeout)
        try:
            check_peer_pins(stream.get_extra_info("ssl_object"), self._pins)
        except BaseException:
            stream.close()
            raise
        return stream

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class _PinningBackend(httpcore.NetworkBackend):
    def __init__(self, pins: frozenset[str]) -> None:
        self._inner = httpcore.SyncBackend()
        self._pins = pins

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _PinnedStream(stream, self._pins)

    def sleep(self, seconds: float) -> None:  # pragma: no cover - httpcore API
        self._inner.sleep(seconds)


class Client:
    """A synchronous client for a cardvault service.

    ``api_key`` is sent as a bearer token (Stripe's convention). ``ca_bundle`` replaces
    the system trust store; ``pin_sha256`` additionally pins the server's key;
    ``client_cert`` = ``(cert_file, key_file)`` authenticates with mutual TLS.
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        base_url: str,
        ca_bundle: Path | str | None = None,
        pin_sha256: Iterable[str] | str | None = None,
        client_cert: tuple[Path | str, Path | str] | None = None,
        minimum_tls: TlsProfile = "intermediate",
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        max_retries: int = 2,
        backoff: float = 0.25,
    ) -> None:
        if not base_url.startswith("https://"):
            raise ValueError("cardvault speaks HTTPS only: base_url must start with https://")
        if minimum_tls not in get_args(TlsProfile):
            # client_context would quietly treat an unknown profile as "intermediate".
            raise ValueError(f"minimum_tls must be one of {get_args(TlsProfile)}")
        self._api_key = api_key
        self.max_retries = max_retries
        self._backoff = backoff
        ctx = client_context(ca_bundle, minimum=minimum_tls, client_cert=client_cert)
        transport = httpx.HTTPTransport(verify=ctx, retries=0)
        pins = _normalize_pins(pin_sha256)
        if pins:
            # httpx has no hook between the handshake and the first request byte, so the
            # pin check lives in the network layer underneath it.
            transport._pool = httpcore.ConnectionPool(
                ssl_context=ctx,
                network_backend=_PinningBackend(pins),
                retries=0,
            )
        self._http = httpx.Client(
            base_url=base_url,
            transport=transport,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            follow_redirects=False,
            trust_env=False,
            headers={"user-agent": f"cardvault-python/{__version__}"},
        )
        #: ``client.payment_methods.create(card={...})`` and the rest of Stripe's verbs.
        self.payment_methods = PaymentMethods(self)
        #: ``client.forwarding.create(payment_method=..., url=..., ...)``, retrieve, list.
        self.forwarding = Forwarding(self)

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(base_url={str(self._http.base_url)!r})"

    # -- requests --------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
        json: Any = None,
        idempotency_key: str | None = None,
    ) -> Any:
        """Send a request and return the decoded JSON body.

        Raises a :class:`cardvault.errors.CardVaultError` subclass for an error object and
        :class:`TransportError` when the server could not be reached safely.
        """
        response = self._send(
            method, path, params=params, data=data, json=json, idempotency_key=idempotency_key
        )
        return _decode(response)

    def _send(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | None = None,
        data: Mapping[str, Any] | None = None,
        json: Any = None,
        idempotency_key: str | None = None,
    ) -> httpx.Response:
        """Send with retries and return the last response, whatever its status."""
        if not httpx.URL(path).is_relative_url:
            # httpx would send an absolute URL as is, ignoring base_url: over plain HTTP
            # or to another host, with the API key in the Authorization header.
            raise ValueError("path must be relative to base_url, e.g. '/v1/tokens'")
        method = method.upper()
        headers: dict[str, str] = {}
        if self._api_key:
            headers["authorization"] = f"Bearer {self._api_key}"
        if method == "POST":
            headers["idempotency-key"] = idempotency_key or str(uuid.uuid4())
        attempt = 0
        while True:
            try:
                response = self._http.request(
                    method, path, params=params, data=data, json=json, headers=headers
                )
            except PinMismatch:
                raise
            except httpx.TransportError as exc:
                cause = exc.__cause__ or exc.__context__
                if isinstance(cause, PinMismatch):
                    raise PinMismatch(str(cause)) from exc
                if _is_certificate_error(exc) or attempt >= self.max_retries:
                    raise TransportError(_describe(exc)) from exc
            else:
                if response.status_code not in _RETRY_STATUSES or attempt >= self.max_retries:
                    return response
            attempt += 1
            time.sleep(self._backoff * (2 ** (attempt - 1)) * (0.5 + random.random() / 2))  # noqa: S311

    def get(self, path: str, **params: Any) -> Any:
        return self.request("GET", path, params=params or None)

    def post(self, path: str, data: Mapping[str, Any] | None = None, **kwargs: Any) -> Any:
        return self.request("POST", path, data=data, **kwargs)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def health(self) -> Any:
        return self.get("/healthz")

    def element_integrity(self) -> str:
        """The Subresource Integrity hash (``sha384-…``) of the vault's ``cardvault.js``,
        as the vault computed it from the bytes it serves (``/js/v1/cardvault.js.sri``).

        A checkout page puts it in the script tag's ``integrity`` attribute. Raises
        :class:`ValueError` if the answer is not such a hash.
        """
        response = self._send("GET", "/js/v1/cardvault.js.sri")
        if not response.is_success:
            _decode(response)
        value = response.text.strip()
        if not _SRI.fullmatch(value):
            raise ValueError("the vault's answer is not a sha384 integrity hash")
        return value


def _is_certificate_error(exc: Exception) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(exc) or "SSL" in type(exc).__name__


def _describe(exc: Exception) -> str:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return f"TLS certificate verification failed: {seen.verify_message}"
        if isinstance(seen, ssl.SSLError):
            return f"TLS handshake failed: {seen.reason or seen}"
        seen = seen.__cause__ or seen.__context__
    return f"network error: {type(exc).__name__}"


def _decode(response: httpx.Response) -> Any:
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.is_success:
        return body
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        error = {
            "type": "api_error",
            "message": f"HTTP {response.status_code} without an error object",
        }
    code, error_type, param = error.get("code"), error.get("type"), error.get("param")
    cls = error_class_for(
        code if isinstance(code, str) else None,
        error_type if isinstance(error_type, str) else None,
    )
    message = error.get("message")
    exc: CardVaultError = cls(
        message if isinstance(message, str) else None,
        param=param if isinstance(param, str) else None,
    )
    exc.http_body = body  # type: ignore[attr-defined]
    exc.http_status_received = response.status_code  # type: ignore[attr-defined]
    exc.request_id = response.headers.get("request-id")  # type: ignore[attr-defined]
    return _raise(exc)


def _raise(exc: CardVaultError) -> Any:
    raise exc
