"""The SDK client against real TLS listeners on loopback.

Every listener is a real uvicorn server with a context from
:func:`cardvault.transport.tls.server_context`; nothing about TLS is mocked. All the
listeners start once for the module. Each refusal test talks to a server that differs
from the ``good`` one in one respect only (its certificate, its TLS versions, the pin,
the client certificate), and the good server is accepted through the same helper, so a
refusal test fails if the client stops checking that respect. Every site counts the
requests its handler saw: a refused connection must leave the count unchanged.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import inspect
import ssl
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cardvault.client import Client, PinMismatch, TransportError
from cardvault.errors import (
    IncorrectNumber,
    InvalidRequestError,
    ParameterMissing,
    ServiceUnavailable,
)
from cardvault.transport.asgi import build_app, error_response, json_response
from cardvault.transport.server import Listener
from cardvault.transport.tls import server_context
from helpers import Pki, ThreadedServers, free_port, self_signed

# X509_V_ERR_* codes from OpenSSL's x509_vfy.h, as ssl.SSLCertVerificationError reports them.
CERT_NOT_YET_VALID = 9
CERT_HAS_EXPIRED = 10
DEPTH_ZERO_SELF_SIGNED_CERT = 18
UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
HOSTNAME_MISMATCH = 62


@dataclass(frozen=True)
class Hit:
    method: str
    path: str
    idempotency_key: str | None


@dataclass
class Site:
    """One listener: its URL, its certificate, and every request its handlers saw."""

    name: str
    url: str
    cert_file: Path
    hits: list[Hit] = field(default_factory=list)


# --- the servers ---------------------------------------------------------------------


def site_app(site: Site) -> Any:
    """The same routes on every listener; each request is recorded on ``site``."""
    flaky_calls: defaultdict[str, int] = defaultdict(int)
    lock = threading.Lock()

    def record(request: Request) -> None:
        with lock:
            site.hits.append(
                Hit(request.method, request.url.path, request.headers.get("idempotency-key"))
            )

    async def ping(request: Request) -> Response:
        record(request)
        return json_response({"site": site.name, "method": request.method})

    async def flaky(request: Request) -> Response:
        """503 for the first two calls with a given ``key``, then 200."""
        record(request)
        key = request.path_params["key"]
        with lock:
            flaky_calls[key] += 1
            n = flaky_calls[key]
        if n <= 2:
            return error_response(ServiceUnavailable())
        return json_response({"id": key, "attempt": n})

    async def bad_request(request: Request) -> Response:
        record(request)
        return error_response(ParameterMissing(param="amount"))

    async def card_error(request: Request) -> Response:
        record(request)
        return json_response(
            {
                "error": {
                    "type": "card_error",
                    "code": "incorrect_number",
                    "message": "Your card number is incorrect.",
                    "param": "card[number]",
                }
            },
            status=402,
        )

    async def unknown_code(request: Request) -> Response:
        record(request)
        return json_response(
            {
                "error": {
                    "type": "invalid_request_error",
                    "code": "a_code_this_sdk_has_never_heard_of",
                    "message": "Something about the request is wrong.",
                }
            },
            status=400,
        )

    routes = [
        Route("/v1/ping", ping, methods=["GET", "POST"]),
        Route("/v1/flaky/{key}", flaky, methods=["POST"]),
        Route("/v1/bad_request", bad_request, methods=["POST"]),
        Route("/v1/card_error", card_error, methods=["POST"]),
        Route("/v1/unknown_code", unknown_code, methods=["POST"]),
    ]
    return build_app(routes, service="test", security_txt=None)


@pytest.fixture(scope="module")
def sites(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Site]]:
    """Every listener the module needs, started once. Keys name what is wrong with each."""
    d = tmp_path_factory.mktemp("client-certs")
    now = dt.datetime.now(dt.UTC)
    vault = pki.cert("vault")  # issued by the CA the client trusts, for localhost
    expired = pki.ca.issue("expired", dns=["localhost"], days=-1, out_dir=d)
    not_yet = pki.ca.issue(
        "not-yet-valid", dns=["localhost"], now=now + dt.timedelta(days=2), out_dir=d
    )
    other_host = pki.ca.issue("other-host", dns=["other.example"], out_dir=d)
    rogue = pki.rogue.issue("rogue-vault", dns=["localhost"], ips=["127.0.0.1"], out_dir=d)

    def plain(pair: tuple[Path, Path]) -> ssl.SSLContext:
        return server_context(*pair)

    def tls12_only(pair: tuple[Path, Path]) -> ssl.SSLContext:
        ctx = server_context(*pair)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        return ctx

    def mutual(pair: tuple[Path, Path]) -> ssl.SSLContext:
        return server_context(*pair, client_ca_file=pki.ca_file)

    specs: dict[str, tuple[tuple[Path, Path], Any]] = {
        "good": (vault, plain),
        "self_signed": (self_signed(d), plain),
        "expired": ((expired.cert_path, expired.key_path), plain),
        "not_yet_valid": ((not_yet.cert_path, not_yet.key_path), plain),
        "wrong_host": ((other_host.cert_path, other_host.key_path), plain),
        "unknown_ca": ((rogue.cert_path, rogue.key_path), plain),
        "tls12_only": (vault, tls12_only),
        "mtls": (vault, mutual),
    }
    result: dict[str, Site] = {}
    listeners: list[Listener] = []
    for name, (pair, make_context) in specs.items():
        port = free_port()
        site = Site(name, f"https://localhost:{port}", pair[0])
        result[name] = site
        listeners.append(Listener(name, site_app(site), "127.0.0.1", port, make_context(pair)))
    with ThreadedServers(listeners):
        yield result


# --- helpers -------------------------------------------------------------------------


def make_client(pki: Pki, site: Site, **kwargs: Any) -> Client:
    kwargs.setdefault("ca_bundle", pki.ca_file)
    kwargs.setdefault("backoff", 0.0)
    return Client("sk_test_client", base_url=site.url, **kwargs)


def accepted(pki: Pki, site: Site, **kwargs: Any) -> None:
    """The client completes a request to ``site`` and the handler sees exactly it."""
    before = len(site.hits)
    with make_client(pki, site, **kwargs) as client:
        assert client.get("/v1/ping") == {"site": site.name, "method": "GET"}
    assert site.hits[before:] == [Hit("GET", "/v1/ping", None)]


def refused(pki: Pki, site: Site, **kwargs: Any) -> TransportError:
    """The client raises TransportError for ``site`` and its handler is never reached."""
    before = len(site.hits)
    with make_client(pki, site, **kwargs) as client, pytest.raises(TransportError) as info:
        client.get("/v1/ping")
    assert len(site.hits) == before, "a request reached a server the client refused"
    return info.value


def verify_code(exc: BaseException) -> int | None:
    """The OpenSSL verification error behind ``exc``, if a certificate was rejected."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return seen.verify_code
        seen = seen.__cause__ or seen.__context__
    return None


def ssl_reasons(exc: BaseException) -> list[str]:
    reasons = []
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            reasons.append(str(seen.reason))
        seen = seen.__cause__ or seen.__context__
    return reasons


def spki_pin(cert_file: Path) -> str:
    """The pin of a certificate, computed here rather than by the code under test."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


WRONG_PIN = base64.b64encode(hashlib.sha256(b"not the server's key").digest()).decode()


# --- 1. certificate and protocol refusals --------------------------------------------


def test_client_accepts_server_with_certificate_from_trusted_ca(
    pki: Pki, sites: dict[str, Site]
) -> None:
    accepted(pki, sites["good"])


def test_client_refuses_self_signed_certificate(pki: Pki, sites: dict[str, Site]) -> None:
    exc = refused(pki, sites["self_signed"])
    assert verify_code(exc) in (DEPTH_ZERO_SELF_SIGNED_CERT, UNABLE_TO_GET_ISSUER_CERT_LOCALLY)
    assert "certificate verification failed" in str(exc)


def test_client_refuses_expired_certificate(pki: Pki, sites: dict[str, Site]) -> None:
    exc = refused(pki, sites["expired"])
    assert verify_code(exc) == CERT_HAS_EXPIRED


def test_client_refuses_not_yet_valid_certificate(pki: Pki, sites: dict[str, Site]) -> None:
    exc = refused(pki, sites["not_yet_valid"])
    assert verify_code(exc) == CERT_NOT_YET_VALID


def test_client_refuses_certificate_for_another_hostname(pki: Pki, sites: dict[str, Site]) -> None:
    exc = refused(pki, sites["wrong_host"])
    assert verify_code(exc) == HOSTNAME_MISMATCH


def test_client_refuses_certificate_from_unknown_ca(pki: Pki, sites: dict[str, Site]) -> None:
    exc = refused(pki, sites["unknown_ca"])
    assert verify_code(exc) == UNABLE_TO_GET_ISSUER_CERT_LOCALLY


def test_client_trusting_the_rogue_ca_accepts_its_server(pki: Pki, sites: dict[str, Site]) -> None:
    """The unknown-CA refusal is about trust, not a broken certificate."""
    accepted(pki, sites["unknown_ca"], ca_bundle=pki.rogue.cert_path)


def test_client_refuses_wrong_pin_before_sending_any_request(
    pki: Pki, sites: dict[str, Site]
) -> None:
    exc = refused(pki, sites["good"], pin_sha256=[WRONG_PIN])
    assert isinstance(exc, PinMismatch)


def test_client_refuses_wrong_pin_for_post_without_retrying(
    pki: Pki, sites: dict[str, Site]
) -> None:
    site = sites["good"]
    before = len(site.hits)
    with make_client(pki, site, pin_sha256=[WRONG_PIN], max_retries=3) as client:
        with pytest.raises(PinMismatch):
            client.post("/v1/ping", {"amount": "100"})
    assert len(site.hits) == before


def test_client_with_modern_minimum_refuses_tls12_only_server(
    pki: Pki, sites: dict[str, Site]
) -> None:
    exc = refused(pki, sites["tls12_only"], minimum_tls="modern")
    assert verify_code(exc) is None  # a protocol failure, not a certificate one
    assert ssl_reasons(exc), "the refusal should come from the TLS handshake"


def test_client_with_default_minimum_accepts_tls12_only_server(
    pki: Pki, sites: dict[str, Site]
) -> None:
    accepted(pki, sites["tls12_only"])


def test_client_with_modern_minimum_accepts_tls13_server(pki: Pki, sites: dict[str, Site]) -> None:
    accepted(pki, sites["good"], minimum_tls="modern")


def test_client_rejects_unknown_minimum_tls_profile(pki: Pki, sites: dict[str, Site]) -> None:
    with pytest.raises(ValueError, match="minimum_tls"):
        make_client(pki, sites["good"], minimum_tls="moden")


# --- 2. pins that match --------------------------------------------------------------


def test_client_accepts_correct_pin(pki: Pki, sites: dict[str, Site]) -> None:
    accepted(pki, sites["good"], pin_sha256=[spki_pin(sites["good"].cert_file)])


def test_client_accepts_pin_list_with_one_wrong_and_one_right_pin(
    pki: Pki, sites: dict[str, Site]
) -> None:
    accepted(pki, sites["good"], pin_sha256=[WRONG_PIN, spki_pin(sites["good"].cert_file)])


def test_client_accepts_single_pin_given_as_string(pki: Pki, sites: dict[str, Site]) -> None:
    accepted(pki, sites["good"], pin_sha256=spki_pin(sites["good"].cert_file))


def test_client_with_correct_pin_still_verifies_the_certificate(
    pki: Pki, sites: dict[str, Site]
) -> None:
    """A pin adds to certificate verification; it does not replace it."""
    exc = refused(pki, sites["unknown_ca"], pin_sha256=[spki_pin(sites["unknown_ca"].cert_file)])
    assert not isinstance(exc, PinMismatch)
    assert verify_code(exc) == UNABLE_TO_GET_ISSUER_CERT_LOCALLY


@pytest.mark.parametrize("pin", ["", "not base64!", base64.b64encode(b"short").decode()])
def test_client_rejects_malformed_pin(pki: Pki, sites: dict[str, Site], pin: str) -> None:
    with pytest.raises(ValueError, match="pin_sha256"):
        make_client(pki, sites["good"], pin_sha256=[pin])


# --- 3. no way to turn verification off ----------------------------------------------


def test_client_init_has_no_verify_parameter() -> None:
    params = inspect.signature(Client.__init__).parameters
    assert "verify" not in params
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def test_client_init_with_verify_false_raises_type_error() -> None:
    with pytest.raises(TypeError):
        Client("sk_test", base_url="https://localhost", verify=False)  # type: ignore[call-arg]


@pytest.mark.parametrize("url", ["http://localhost:8443", "HTTP://localhost", "localhost:8443"])
def test_client_init_with_non_https_base_url_raises_value_error(url: str) -> None:
    with pytest.raises(ValueError, match="HTTPS"):
        Client("sk_test", base_url=url)


@pytest.mark.parametrize("path", ["http://localhost/v1/ping", "https://evil.example/v1/ping"])
def test_client_request_with_absolute_url_raises_value_error(
    pki: Pki, sites: dict[str, Site], path: str
) -> None:
    """An absolute URL would bypass base_url (and HTTPS) and carry the API key along."""
    with make_client(pki, sites["good"]) as client, pytest.raises(ValueError, match="relative"):
        client.get(path)


# --- 4. retries ----------------------------------------------------------------------


def test_client_post_retries_503_with_same_idempotency_key(
    pki: Pki, sites: dict[str, Site]
) -> None:
    site = sites["good"]
    before = len(site.hits)
    with make_client(pki, site, max_retries=2) as client:
        body = client.post("/v1/flaky/retry-then-succeed", {"amount": "100"})
    assert body == {"id": "retry-then-succeed", "attempt": 3}
    hits = site.hits[before:]
    assert len(hits) == 3
    assert {h.method for h in hits} == {"POST"}
    keys = {h.idempotency_key for h in hits}
    assert len(keys) == 1
    assert None not in keys


def test_client_post_uses_given_idempotency_key_on_every_retry(
    pki: Pki, sites: dict[str, Site]
) -> None:
    site = sites["good"]
    before = len(site.hits)
    with make_client(pki, site, max_retries=2) as client:
        client.post("/v1/flaky/given-key", {"amount": "1"}, idempotency_key="idem_123")
    assert [h.idempotency_key for h in site.hits[before:]] == ["idem_123"] * 3


def test_client_posts_get_distinct_idempotency_keys(pki: Pki, sites: dict[str, Site]) -> None:
    site = sites["good"]
    before = len(site.hits)
    with make_client(pki, site) as client:
        client.post("/v1/ping")
        client.post("/v1/ping")
    first, second = site.hits[before:]
    assert first.idempotency_key and second.idempotency_key
    assert first.idempotency_key != second.idempotency_key


def test_client_without_retries_raises_service_unavailable_on_first_503(
    pki: Pki, sites: dict[str, Site]
) -> None:
    site = sites["good"]
    before = len(site.hits)
    with make_client(pki, site, max_retries=0) as client, pytest.raises(ServiceUnavailable):
        client.post("/v1/flaky/no-retries", {"amount": "100"})
    assert len(site.hits) == before + 1


def test_client_does_not_retry_400(pki: Pki, sites: dict[str, Site]) -> None:
    site = sites["good"]
    before = len(site.hits)
    with (
        make_client(pki, site, max_retries=3) as client,
        pytest.raises(InvalidRequestError) as info,
    ):
        client.post("/v1/bad_request", {"amount": "-1"})
    assert info.value.param == "amount"
    assert len(site.hits) == before + 1


def test_client_does_not_retry_certificate_failure(
    pki: Pki, sites: dict[str, Site], monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps: list[float] = []
    # the client backs off with time.sleep; record the delays instead of sleeping
    monkeypatch.setattr(time, "sleep", sleeps.append)
    refused(pki, sites["expired"], max_retries=3)
    assert sleeps == []


def test_client_raises_transport_error_after_retrying_closed_port(
    pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    sleeps: list[float] = []
    # the client backs off with time.sleep; record the delays instead of sleeping
    monkeypatch.setattr(time, "sleep", sleeps.append)
    closed = Site("closed", f"https://localhost:{free_port()}", pki.ca_file)
    with make_client(pki, closed, max_retries=2, backoff=0.01) as client:
        with pytest.raises(TransportError, match="network error") as info:
            client.post("/v1/ping")
    assert isinstance(info.value.__cause__, httpx.ConnectError)
    assert len(sleeps) == 2  # three attempts in all
    assert sleeps[1] > sleeps[0] / 2  # backoff grows (with jitter in [0.5, 1))


# --- 5. error objects become typed exceptions ----------------------------------------


def test_client_maps_card_error_to_incorrect_number_with_param(
    pki: Pki, sites: dict[str, Site]
) -> None:
    with make_client(pki, sites["good"]) as client, pytest.raises(IncorrectNumber) as info:
        client.post("/v1/card_error", {"card[number]": "4242424242424241"})
    assert info.value.param == "card[number]"
    assert info.value.message == "Your card number is incorrect."
    assert info.value.http_status_received == 402  # type: ignore[attr-defined]
    assert info.value.request_id.startswith("req_")  # type: ignore[attr-defined]


def test_client_maps_unknown_code_to_class_of_its_type(pki: Pki, sites: dict[str, Site]) -> None:
    with make_client(pki, sites["good"]) as client, pytest.raises(InvalidRequestError) as info:
        client.post("/v1/unknown_code")
    assert type(info.value) is InvalidRequestError


# --- 6. mutual TLS -------------------------------------------------------------------


def test_client_with_admin_certificate_is_accepted_by_mtls_server(
    pki: Pki, sites: dict[str, Site]
) -> None:
    accepted(pki, sites["mtls"], client_cert=pki.cert("admin"))


def test_client_without_certificate_is_refused_by_mtls_server(
    pki: Pki, sites: dict[str, Site]
) -> None:
    refused(pki, sites["mtls"])


def test_client_with_rogue_ca_certificate_is_refused_by_mtls_server(
    pki: Pki, sites: dict[str, Site]
) -> None:
    refused(pki, sites["mtls"], client_cert=pki.cert("rogue-admin"))
