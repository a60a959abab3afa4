"""The redirect port points at the configured public name only, and every service's
listeners take the configured [server.limits]."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cardvault.config import ListenerSettings, ServerLimits
from cardvault.errors import ConfigurationError
from cardvault.transport.asgi import redirect_app
from helpers import Pki

CANARY = "4242424242424242"  # a published test card number


def redirect(app: Any, path: bytes, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    """One request to an ASGI app; its response start message."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "GET",
        "path": path.decode("latin-1").split("?")[0],
        "raw_path": path.split(b"?")[0],
        "query_string": path.partition(b"?")[2],
        "headers": headers,
    }
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start"
    return sent[0]


def location(start: dict[str, Any]) -> str:
    (value,) = [v for k, v in start["headers"] if k == b"location"]
    return str(value.decode("latin-1"))


@pytest.mark.parametrize(
    "host",
    [
        b"evil.example",  # a perfectly valid host name, just not ours
        b"evil.example:443",
        b"[2001:db8::1]",
        b"evil.example/<script>",
        f"{CANARY}.example".encode(),
        b"",
    ],
)
def test_the_location_host_comes_from_configuration_never_from_the_request(host: bytes) -> None:
    app = redirect_app(https_port=443, public_host="vault.example.com")
    start = redirect(app, b"/v1/x?card=" + CANARY.encode(), [(b"host", host)] if host else [])
    assert start["status"] == 301
    assert location(start) == "https://vault.example.com/v1/x"


def test_the_port_is_written_unless_it_is_443() -> None:
    app = redirect_app(https_port=8443, public_host="vault.example.com")
    assert location(redirect(app, b"/", [(b"host", b"evil.example:80")])) == (
        "https://vault.example.com:8443/"
    )


def test_an_ipv6_public_host_is_bracketed() -> None:
    app = redirect_app(https_port=443, public_host="2001:db8::5")
    assert location(redirect(app, b"/a", [])) == "https://[2001:db8::5]/a"


@pytest.mark.parametrize("bad", ["", "evil.example/x", "a b", "host:443"])
def test_a_public_host_that_is_no_host_name_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="public_host"):
        redirect_app(https_port=443, public_host=bad)


def vault_settings(pki: Pki, **fields: Any) -> Any:
    from cardvault.vault.settings import AdminSettings, VaultSettings

    cert, key = pki.cert("vault")
    server = ListenerSettings(
        cert_file=cert,
        key_file=key,
        port=8443,
        redirect_port=8080,
        limits=ServerLimits(max_headers=7, first_byte_timeout=2.5),
    )
    admin = AdminSettings(port=8447, client_ca_file=pki.ca_file)
    return VaultSettings(server=server, admin=admin, **fields)


def test_the_vaults_redirect_port_points_at_public_url(pki: Pki) -> None:
    from cardvault.vault.app import build_listeners

    for public_url, expected in [
        ("https://vault.example.com", "https://vault.example.com/p"),
        ("https://vault.example.com:9443/", "https://vault.example.com:9443/p"),
        ("", "https://localhost:8443/p"),  # no public_url: the listener's host name
    ]:
        listeners = {
            lst.name: lst for lst in build_listeners(vault_settings(pki, public_url=public_url))
        }
        app = listeners["redirect"].app
        assert location(redirect(app, b"/p", [(b"host", b"evil.example")])) == expected


def test_a_public_url_without_a_host_name_stops_start_up(pki: Pki) -> None:
    from cardvault.vault.app import build_listeners

    with pytest.raises(ConfigurationError, match="public_url"):
        build_listeners(vault_settings(pki, public_url="https://exa mple.com"))


def test_every_vault_listener_takes_server_limits(pki: Pki) -> None:
    from cardvault.vault.app import build_listeners

    settings = vault_settings(pki)
    listeners = build_listeners(settings)
    assert {lst.name for lst in listeners} == {"public", "redirect", "admin"}
    assert all(lst.limits is settings.server.limits for lst in listeners)
    assert settings.server.limits.max_headers == 7


def test_the_key_service_listener_takes_server_limits(pki: Pki) -> None:
    from cardvault.keyservice.app import build_listener
    from cardvault.keyservice.settings import KeyServiceSettings, StoreSettings

    cert, key = pki.cert("vault")
    server = ListenerSettings(
        cert_file=cert, key_file=key, client_ca_file=pki.ca_file, limits=ServerLimits(max_headers=9)
    )
    settings = KeyServiceSettings(server=server, store=StoreSettings(url="sqlite:///unused.db"))
    listener = build_listener(settings, service=object())  # type: ignore[arg-type]
    assert listener.limits is server.limits
