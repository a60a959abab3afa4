"""Start the vault: its public HTTPS listener, the optional redirect port and admin API."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cardvault.audit.recorder import open_audit_log
from cardvault.errors import CardVaultError, ConfigurationError
from cardvault.logging import configure_logging, get_logger
from cardvault.transport.asgi import build_app, redirect_app
from cardvault.transport.securitytxt import render_security_txt
from cardvault.transport.server import Listener, run_until_stopped
from cardvault.transport.tls import server_context
from cardvault.vault.allowlist import Allowlist, load_allowlist
from cardvault.vault.api import forwarding_routes, payment_method_routes
from cardvault.vault.datakeys import DataKeyManager, DataKeyPolicy
from cardvault.vault.forwarding import Forwarder
from cardvault.vault.http import admin_routes, public_routes
from cardvault.vault.keyclient import KeyServiceClient
from cardvault.vault.outbound import OutboundClient
from cardvault.vault.params import ParseLimits
from cardvault.vault.ratelimit import RateLimiter
from cardvault.vault.service import VaultService
from cardvault.vault.settings import VaultSettings

__all__ = ["build_listeners", "build_service", "run"]


async def _sweeper(service: VaultService, settings: VaultSettings) -> None:
    """Destroy expired CVCs, forget old idempotency keys and purge forwarding requests
    past their retention, once a minute."""
    while True:
        try:
            destroyed = await service.sweep_expired_cvcs()
            if destroyed:
                _log.info("expired CVCs destroyed", count=destroyed)
            await service.store.purge_idempotency_keys(
                int(time.time()) - settings.limits.idempotency_ttl
            )
            await service.store.purge_forwarding_requests(
                int(time.time()) - settings.forwarding.retention_days * 86_400
            )
        except Exception:
            _log.exception("sweeper failed; retrying in a minute")
        await asyncio.sleep(60)


_log = get_logger("cardvault.vault")


def _public_host(settings: VaultSettings) -> str:
    host = settings.server.host
    return "localhost" if host in ("127.0.0.1", "::1", "0.0.0.0", "::") else host  # noqa: S104


def _redirect_app(settings: VaultSettings, public_port: int) -> Any:
    """The redirect port's app: to the configured public name only (``public_url``'s
    host and port when it is set, else the listener's host name and ``public_port``),
    never to the Host header a client sent."""
    host, port = _public_host(settings), public_port
    if not settings.public_url and settings.server.host in ("0.0.0.0", "::"):  # noqa: S104
        _log.warning(
            "the redirect port points browsers at localhost: set public_url to the "
            "vault's public name",
            listen=settings.server.host,
        )
    try:
        if settings.public_url:
            url = urlsplit(settings.public_url)
            host, port = url.hostname or host, url.port or 443
        return redirect_app(https_port=port, public_host=host)
    except ValueError as exc:
        raise ConfigurationError(
            "public_url or server.host is not a host name the redirect port can point at"
        ) from exc


def build_service(settings: VaultSettings) -> VaultService | None:
    """The PaymentMethods service, or None when no store and key service are configured
    (the vault then serves only its transport endpoints and says so at start-up)."""
    ks = settings.keyservice
    if not settings.store.url and not ks.url:
        return None
    if not settings.store.url:
        raise ConfigurationError("missing required setting store.url (keyservice.url is set)")
    if not ks.url or ks.ca_file is None or ks.cert_file is None or ks.key_file is None:
        raise ConfigurationError(
            "missing required setting keyservice.url, keyservice.ca_file, keyservice.cert_file "
            "or keyservice.key_file: the vault reaches the key service over mutual TLS only"
        )
    from cardvault.storage import open_vault_store

    store = open_vault_store(settings.store.url)
    client = KeyServiceClient(
        ks.url, ca_file=ks.ca_file, cert_file=ks.cert_file, key_file=ks.key_file, timeout=ks.timeout
    )
    dk = settings.datakeys
    policy = DataKeyPolicy(dk.max_uses, float(dk.max_age), float(dk.cache_ttl), dk.cache_size)
    return VaultService(
        store, DataKeyManager(store, client, policy), cvc_ttl=settings.limits.cvc_ttl
    )


def build_forwarder(settings: VaultSettings, service: VaultService) -> Forwarder:
    """The forwarding path, with the allowlist read once, now. An invalid file stops
    start-up; no file means an empty allowlist (every URL refused)."""
    path = settings.forwarding.allowlist_file
    if path is None:
        allowlist = Allowlist((), hashlib.sha256(b"").hexdigest(), Path("/dev/null"))
        _log.warning("forwarding allowlist: none configured; every forward will be refused")
    else:
        allowlist = load_allowlist(path)
        _log.info(
            "forwarding allowlist loaded",
            path=str(path),
            sha256=allowlist.sha256,
            destinations=[d.name for d in allowlist.destinations],
        )
    return Forwarder(service, allowlist, OutboundClient())


def build_listeners(
    settings: VaultSettings,
    service: VaultService | None = None,
    forwarder: Forwarder | None = None,
) -> list[Listener]:
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
    routes = public_routes(service)
    if service is not None:
        lim = settings.limits
        try:
            parse_limits = ParseLimits(
                max_fields=lim.max_params,
                max_depth=lim.max_param_depth,
                max_list_items=lim.max_list_items,
                max_body_bytes=lim.max_body_bytes,
            )
        except ValueError as exc:
            raise ConfigurationError(
                "limits.max_params, max_param_depth, max_list_items and max_body_bytes "
                "must be at least 1"
            ) from exc
        routes += payment_method_routes(
            service,
            secret_limits=RateLimiter(lim.secret_rate, lim.secret_burst),
            publishable_limits=RateLimiter(lim.publishable_rate, lim.publishable_burst),
            idempotency_ttl=lim.idempotency_ttl,
            parse_limits=parse_limits,
        )
        if forwarder is not None:
            routes += forwarding_routes(
                service,
                forwarder,
                secret_limits=RateLimiter(lim.secret_rate, lim.secret_burst),
                publishable_limits=RateLimiter(lim.publishable_rate, lim.publishable_burst),
                idempotency_ttl=lim.idempotency_ttl,
                parse_limits=parse_limits,
            )
    listeners = [
        Listener(
            "public",
            build_app(routes, service="vault", security_txt=security_txt),
            srv.host,
            srv.port,
            public_ctx,
            limits=srv.limits,
        )
    ]
    if srv.redirect_port:
        listeners.append(
            Listener(
                "redirect",
                _redirect_app(settings, public_port),
                srv.host,
                srv.redirect_port,
                limits=srv.limits,
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
                limits=srv.limits,
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
    service = build_service(settings)
    if service is None:
        _log.warning(
            "payment API disabled: store.url and keyservice.* are not set; "
            "only /healthz and the transport endpoints are served"
        )
    forwarder = build_forwarder(settings, service) if service is not None else None
    listeners = build_listeners(settings, service, forwarder)
    _log.info("vault starting", profile=settings.profile, listeners=[lst.name for lst in listeners])
    tasks: list[asyncio.Task[None]] = []

    async def startup() -> None:
        if service is not None:
            directory, _admin = settings.audit.resolved(settings.store.url)
            # A log whose tail does not verify stops start-up (AuditCorrupt): the chain
            # must never fork silently.
            service.audit.log = await open_audit_log(directory, settings.audit)
            await service.audit.record("service.start", actor="vault", origin="local")
            await service.audit.record(
                "config.loaded",
                actor="vault",
                origin="local",
                detail={
                    "profile": settings.profile,
                    "tls_profile": settings.server.tls_profile,
                    "store": settings.store.url.split(":", 1)[0],
                    "admin_api": bool(settings.admin.port),
                },
            )
            if forwarder is not None:
                await service.audit.record(
                    "allowlist.loaded",
                    actor="vault",
                    origin="local",
                    detail={
                        "sha256": forwarder.allowlist.sha256,
                        "destinations": len(forwarder.allowlist.destinations),
                    },
                )
            await service.store.migrate()
            tasks.append(asyncio.create_task(_sweeper(service, settings)))

    async def shutdown() -> None:
        for task in tasks:
            task.cancel()
        if forwarder is not None:
            await forwarder.outbound.close()
        if service is not None:
            try:
                await service.audit.record("service.stop", actor="vault", origin="local")
            except CardVaultError:
                _log.error("could not record the stop in the audit log")
            await service.audit.close()
            service.keys.wipe()
            await service.keys.keys.close()
            await service.store.close()

    run_until_stopped(listeners, ready=ready, startup=startup, shutdown=shutdown)
    _log.info("vault stopped")
