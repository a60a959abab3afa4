"""Start the vault: its public HTTPS listener, the optional redirect port and admin API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cardvault.errors import ConfigurationError
from cardvault.logging import configure_logging, get_logger
from cardvault.transport.asgi import build_app, redirect_app
from cardvault.transport.securitytxt import render_security_txt
from cardvault.transport.server import Listener, run_until_stopped
from cardvault.transport.tls import server_context
from cardvault.vault.http import admin_routes, public_routes
from cardvault.vault.settings import VaultSettings

__all__ = ["build_listeners", "run"]

_log = get_logger("cardvault.vault")


def _public_host(settings: VaultSettings) -> str:
    host = settings.server.host
    return "localhost" if host in ("127.0.0.1", "::1", "0.0.0.0", "::") else host  # noqa: S104


def build_listeners(settings: VaultSettings) -> list[Listener]:
    """The vault's listeners, ready to serve. Raises ConfigurationError on bad settings."""
    srv = settings.server
    public_port = srv.public_port or srv.port
    base = settings.public_url.rstrip("/") or (
        f"https://{_public_host(settings)}" + ("" if public_port == 443 else f":{public_port}")
    )
    security_txt = render_security_txt(
        settings.security_txt, canonical=[f"{base}/.well-known/security.txt"]
    )
    try:
        public_ctx = server_context(srv.cert_file, srv.key_file, profile=srv.tls_profile)
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            "cannot load server.cert_file / server.key_file (missing, unreadable or not a pair)"
        ) from exc
    listeners = [
        Listener(
            "public",
            build_app(public_routes(), service="vault", security_txt=security_txt),
            srv.host,
            srv.port,
            public_ctx,
        )
    ]
    if srv.redirect_port:
        listeners.append(
            Listener(
                "redirect",
                redirect_app(https_port=public_port, default_host=_public_host(settings)),
                srv.host,
                srv.redirect_port,
            )
        )
    adm = settings.admin
    if adm.port:
        if adm.client_ca_file is None:
            raise ConfigurationError(
                "missing required setting admin.client_ca_file: the admin API accepts only "
                "mutual TLS (set it, or set admin.port = 0)"
            )
        try:
            admin_ctx = server_context(
                srv.cert_file,
                srv.key_file,
                profile=srv.tls_profile,
                client_ca_file=adm.client_ca_file,
            )
        except (OSError, ValueError) as exc:
            raise ConfigurationError("cannot load admin.client_ca_file") from exc
        listeners.append(
            Listener(
                "admin",
                build_app(
                    admin_routes(adm.allowed_identities),
                    service="vault-admin",
                    security_txt=security_txt,
                ),
                adm.host,
                adm.port,
                admin_ctx,
            )
        )
    return listeners


def run(settings: VaultSettings, *, ready: Callable[[], Any] | None = None) -> None:
    """Run the vault in this process until SIGINT/SIGTERM."""
    configure_logging(
        profile=settings.profile, level=settings.logging.level, fmt=settings.logging.format
    )
    if settings.profile == "development":
        _log.warning(
            "DEVELOPMENT PROFILE: this vault runs with development settings; "
            "never use it for real card data"
        )
    listeners = build_listeners(settings)
    _log.info("vault starting", profile=settings.profile, listeners=[lst.name for lst in listeners])
    run_until_stopped(listeners, ready=ready)
    _log.info("vault stopped")
