"""The vault's listeners, as a real process over real TLS: headers, redirects,
security.txt, mutual TLS and identity authorization."""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator

import httpx
import pytest
import sectxt
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from cardvault.transport.asgi import HSTS, build_app
from cardvault.transport.server import Listener
from cardvault.transport.tls import client_context, server_context
from conftest import VaultProcess, write_vault_config
from helpers import Pki, ThreadedServers, cardvault_process, free_port, wait_for_port


@pytest.fixture(scope="module")
def https(pki: Pki) -> Iterator[httpx.Client]:
    with httpx.Client(
        verify=client_context(pki.ca_file), trust_env=False, follow_redirects=False
    ) as c:
        yield c


def assert_security_headers(response: httpx.Response) -> None:
    assert response.headers["strict-transport-security"] == HSTS
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.headers["referrer-policy"] == "no-referrer"
    assert "server" not in response.headers
    assert response.headers["request-id"].startswith("req_")


def test_healthz_answers_200_with_hsts_and_security_headers(
    vault: VaultProcess, https: httpx.Client
) -> None:
    r = https.get(f"{vault.url}/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}
    assert_security_headers(r)
    assert r.headers["cache-control"] == "no-store"
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]


def test_unknown_url_is_a_stripe_404_with_hsts(vault: VaultProcess, https: httpx.Client) -> None:
    r = https.get(f"{vault.url}/v1/nothing-here")
    assert r.status_code == 404
    assert_security_headers(r)
    assert r.json() == {
        "error": {
            "type": "invalid_request_error",
            "code": "url_invalid",
            "message": "Unrecognized request URL.",
        }
    }


def test_wrong_method_is_a_stripe_405_with_hsts(vault: VaultProcess, https: httpx.Client) -> None:
    r = https.delete(f"{vault.url}/healthz")
    assert r.status_code == 405
    assert_security_headers(r)
    assert r.json()["error"]["code"] == "method_not_allowed"


def test_legacy_security_txt_is_a_301_with_hsts(vault: VaultProcess, https: httpx.Client) -> None:
    r = https.get(f"{vault.url}/security.txt")
    assert r.status_code == 301
    assert r.headers["location"] == "/.well-known/security.txt"
    assert_security_headers(r)


def test_error_response_never_echoes_the_requested_path(
    vault: VaultProcess, https: httpx.Client
) -> None:
    canary = "4242424242424242"
    r = https.get(f"{vault.url}/v1/{canary}")
    assert r.status_code == 404
    assert canary not in r.text
    assert canary not in str(r.headers)


def test_security_txt_validates_with_sectxt(vault: VaultProcess, https: httpx.Client) -> None:
    url = f"{vault.url}/.well-known/security.txt"
    r = https.get(url)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; charset=utf-8"
    assert_security_headers(r)
    parser = sectxt.Parser(r.content, urls=url)
    assert parser.is_valid(), parser.errors
    assert parser.errors == []
    assert "Canonical: " + url in r.text


def test_redirect_port_answers_everything_with_a_301_to_https(vault: VaultProcess) -> None:
    with httpx.Client(trust_env=False, follow_redirects=False) as plain:
        for method, path in [
            ("GET", "/healthz"),
            ("POST", "/v1/payment_methods"),
            ("GET", "/a/b?c=d"),
        ]:
            r = plain.request(method, f"http://localhost:{vault.redirect_port}{path}")
            assert r.status_code == 301
            assert r.headers["location"] == f"https://localhost:{vault.port}{path.split('?')[0]}"
            assert r.content == b""
            assert (
                "strict-transport-security" not in r.headers
            )  # meaningless over HTTP (RFC 6797 §7.2)


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:443", "[2001:db8::1]", "evil.example/<script>"]
)
def test_redirect_port_points_at_the_configured_host_never_the_host_header(
    vault: VaultProcess, host: str
) -> None:
    # Even a well-formed host name is not ours to redirect to: the Location's host comes
    # from configuration (public_url, else the listener's host name: localhost here).
    with httpx.Client(trust_env=False, follow_redirects=False) as plain:
        r = plain.get(f"http://127.0.0.1:{vault.redirect_port}/x", headers={"host": host})
    assert r.status_code == 301
    assert r.headers["location"] == f"https://localhost:{vault.port}/x"


def test_redirect_port_serves_no_tls(vault: VaultProcess, pki: Pki) -> None:
    with socket.create_connection(("127.0.0.1", vault.redirect_port)) as raw:
        with pytest.raises(ssl.SSLError):
            client_context(pki.ca_file).wrap_socket(raw, server_hostname="localhost")


def test_https_port_refuses_plain_http(vault: VaultProcess) -> None:
    with httpx.Client(trust_env=False) as plain, pytest.raises(httpx.HTTPError):
        plain.get(f"http://localhost:{vault.port}/healthz")


def test_hsts_is_sent_on_500_responses(pki: Pki) -> None:
    async def boom(_request: Request) -> Response:
        raise RuntimeError("an internal failure holding 4242424242424242")

    cert, key = pki.cert("vault")
    port = free_port()
    app = build_app([Route("/boom", boom)], service="test", security_txt=None)
    with ThreadedServers([Listener("t", app, "127.0.0.1", port, server_context(cert, key))]):
        with httpx.Client(verify=client_context(pki.ca_file), trust_env=False) as c:
            r = c.get(f"https://localhost:{port}/boom")
    assert r.status_code == 500
    assert_security_headers(r)
    assert r.json() == {
        "error": {
            "type": "api_error",
            "code": "api_error",
            "message": "An internal error occurred.",
        }
    }
    assert "4242" not in r.text


# --- mutual TLS on the admin listener -------------------------------------------------


def admin_client(pki: Pki, cert: str | None) -> httpx.Client:
    pair = pki.cert(cert) if cert else None
    return httpx.Client(verify=client_context(pki.ca_file, client_cert=pair), trust_env=False)


def test_admin_identity_is_authorized(vault: VaultProcess, pki: Pki) -> None:
    with admin_client(pki, "admin") as c:
        r = c.get(f"{vault.admin_url}/v1/admin/whoami")
    assert r.status_code == 200
    assert r.json()["identity"] == "admin"
    assert_security_headers(r)


def test_valid_certificate_of_another_identity_gets_403(vault: VaultProcess, pki: Pki) -> None:
    with admin_client(pki, "shop") as c:
        r = c.get(f"{vault.admin_url}/v1/admin/whoami")
    assert r.status_code == 403
    assert r.json()["error"]["type"] == "permission_error"
    assert r.json()["error"]["code"] == "identity_not_allowed"
    assert_security_headers(r)


def test_admin_listener_fails_the_handshake_without_a_client_certificate(
    vault: VaultProcess, pki: Pki
) -> None:
    with admin_client(pki, None) as c, pytest.raises(httpx.HTTPError):
        c.get(f"{vault.admin_url}/v1/admin/whoami")


def test_admin_listener_refuses_a_certificate_from_another_ca(
    vault: VaultProcess, pki: Pki
) -> None:
    with admin_client(pki, "rogue-admin") as c, pytest.raises(httpx.HTTPError):
        c.get(f"{vault.admin_url}/v1/admin/whoami")


def test_public_listener_does_not_expose_admin_routes(
    vault: VaultProcess, https: httpx.Client
) -> None:
    r = https.get(f"{vault.url}/v1/admin/whoami")
    assert r.status_code == 404


def test_the_served_openapi_document_is_the_one_in_the_repository(
    vault: VaultProcess, https: httpx.Client
) -> None:
    import json

    from helpers import ROOT

    r = https.get(f"{vault.url}/openapi.json")
    assert r.status_code == 200
    assert_security_headers(r)
    assert r.json() == json.loads((ROOT / "docs" / "openapi.json").read_text())


# --- [server.limits] on every vault listener ------------------------------------------


@pytest.fixture(scope="module")
def limited_vault(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[VaultProcess]:
    """A vault whose [server.limits] allow 5 header fields and 1 s of silence."""
    directory = tmp_path_factory.mktemp("limited-vault")
    config, info = write_vault_config(directory, pki)
    with config.open("a") as fh:
        fh.write("[server.limits]\nmax_headers = 5\nfirst_byte_timeout = 1\n")
    with cardvault_process(["vault", "serve", "--config", str(config)], log=info.log) as proc:
        for port in (info.port, info.redirect_port, info.admin_port):
            wait_for_port(port, proc)
        yield info


SIX_FIELDS = {f"x-field-{i}": "1" for i in range(5)}  # and Host


def assert_431(r: httpx.Response, *, hsts: bool = True) -> None:
    assert r.status_code == 431
    assert r.headers["connection"] == "close"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert r.headers["request-id"].startswith("req_")
    assert ("strict-transport-security" in r.headers) is hsts
    if hsts:
        assert r.headers["strict-transport-security"] == HSTS
    assert r.json() == {
        "error": {
            "type": "invalid_request_error",
            "code": "request_header_fields_too_large",
            "message": "The request's header fields are too large or too many.",
        }
    }


def test_every_vault_listener_enforces_the_configured_limits(
    limited_vault: VaultProcess, pki: Pki
) -> None:
    with httpx.Client(verify=client_context(pki.ca_file), trust_env=False) as c:
        assert c.get(f"{limited_vault.url}/healthz").status_code == 200
        assert_431(c.get(f"{limited_vault.url}/healthz", headers=SIX_FIELDS))
    with admin_client(pki, "admin") as c:
        assert c.get(f"{limited_vault.admin_url}/v1/admin/whoami").status_code == 200
        assert_431(c.get(f"{limited_vault.admin_url}/v1/admin/whoami", headers=SIX_FIELDS))
    with httpx.Client(trust_env=False, follow_redirects=False) as plain:
        url = f"http://localhost:{limited_vault.redirect_port}/x"
        assert plain.get(url).status_code == 301
        assert_431(plain.get(url, headers=SIX_FIELDS), hsts=False)
    log = limited_vault.log.read_text()
    assert log.count('"limit": "max_headers"') == 3


def test_an_idle_connection_to_the_vault_is_closed(limited_vault: VaultProcess, pki: Pki) -> None:
    with socket.create_connection(("127.0.0.1", limited_vault.port), timeout=30) as raw:
        with client_context(pki.ca_file).wrap_socket(raw, server_hostname="localhost") as tls:
            started = time.monotonic()
            with contextlib.suppress(ConnectionResetError, ssl.SSLEOFError):
                assert tls.recv(1) == b""
            assert time.monotonic() - started < 10  # generous: the setting is 1 s
