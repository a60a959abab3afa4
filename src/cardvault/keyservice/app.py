"""Start the key service: one mutual-TLS listener in front of :class:`KeyService`.

Health: ``/healthz`` answers while the process serves, ``/readyz`` while its store
answers, it is unsealed and its audit log writes (:mod:`cardvault.keyservice.http`).
When the audit log fails for good (:func:`cardvault.audit.recorder.watch_audit_log`),
the key service seals itself, stops its listener and exits with status 74
(``AUDIT_FAILED_EXIT``) for its supervisor to restart it; a start whose audit records
cannot be written exits 74 too.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from cardvault.audit.recorder import AUDIT_FAILED_EXIT, start_recording, watch_audit_log
from cardvault.errors import AuditUnavailableError, CardVaultError, ConfigurationError
from cardvault.keyservice.http import routes
from cardvault.keyservice.service import KeyService, initialize
from cardvault.keyservice.settings import KeyServiceSettings
from cardvault.logging import configure_logging, get_logger
from cardvault.storage import open_key_store
from cardvault.transport.asgi import build_app
from cardvault.transport.securitytxt import render_security_txt
from cardvault.transport.server import Listener, run_until_stopped
from cardvault.transport.tls import server_context

__all__ = ["build_listener", "check_settings", "run"]

_log = get_logger("cardvault.keyservice")


def initialize_key_service(
    settings: KeyServiceSettings, *, shares: int, threshold: int
) -> list[Any]:
    """Create the root key and the first KEKs in the key service's store, once (the
    door for ``cardvault keyservice init``). The custodian shares, or none with the
    development seal, which writes the root key to ``seal.dev_key_file``."""
    check_settings(settings)
    dev = settings.seal.dev_key_file if settings.seal.type == "dev" else None

    async def go() -> list[Any]:
        store = open_key_store(settings.store.url)
        try:
            return await initialize(store, shares=shares, threshold=threshold, dev_key_file=dev)
        finally:
            await store.close()

    return asyncio.run(go())


def check_settings(settings: KeyServiceSettings) -> None:
    """Refuse unsafe combinations before anything starts."""
    if settings.server.client_ca_file is None:
        raise ConfigurationError(
            "missing required setting server.client_ca_file: the key service accepts only mutual TLS"
        )
    if settings.seal.type == "dev":
        if settings.profile != "development":
            raise ConfigurationError(
                'seal.type = "dev" is refused in the production profile: the development seal '
                'keeps the root key in a local file. Use custodian shares (seal.type = "shamir").'
            )
        if settings.seal.dev_key_file is None:
            raise ConfigurationError(
                'missing required setting seal.dev_key_file for seal.type = "dev"'
            )


def build_listener(settings: KeyServiceSettings, service: KeyService) -> Listener:
    srv = settings.server
    check_settings(settings)
    base = settings.public_url.rstrip("/") or f"https://localhost:{srv.port}"
    security_txt = render_security_txt(
        settings.security_txt, canonical=[f"{base}/.well-known/security.txt"]
    )
    try:
        ctx = server_context(
            srv.cert_file, srv.key_file, profile=srv.tls_profile, client_ca_file=srv.client_ca_file
        )
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            "cannot load server.cert_file, server.key_file or server.client_ca_file"
        ) from exc
    app = build_app(
        routes(service, vault=settings.identities.vault, admin=settings.identities.admin),
        service="keyservice",
        security_txt=security_txt,
    )
    return Listener("keyservice", app, srv.host, srv.port, ctx, limits=srv.limits)


def run(settings: KeyServiceSettings, *, ready: Callable[[], Any] | None = None) -> None:
    configure_logging(
        profile=settings.profile, level=settings.logging.level, fmt=settings.logging.format
    )
    check_settings(settings)
    if settings.profile == "development":
        _log.warning("DEVELOPMENT PROFILE: this key service runs with development settings")
    if settings.seal.type == "dev":
        _log.warning(
            "DEVELOPMENT SEAL: the root key is read from a local file and the service unseals "
            "itself. Never use this with real card data."
        )
    store = open_key_store(settings.store.url)
    service = KeyService(store, unseal_timeout=settings.seal.unseal_timeout)
    listener = build_listener(settings, service)
    stop = asyncio.Event()
    failed: list[str] = []
    tasks: list[asyncio.Task[None]] = []

    def audit_failed(reason: str) -> None:
        failed.append(reason)
        stop.set()

    async def startup() -> None:
        await start_recording(
            service.audit,
            settings.audit,
            settings.store.url,
            actor="keyservice",
            records=[
                (
                    "keyservice.config.loaded",
                    {
                        "profile": settings.profile,
                        "seal": settings.seal.type,
                        "store": settings.store.url.split(":", 1)[0],
                        "tls_profile": settings.server.tls_profile,
                    },
                )
            ],
        )
        dev = settings.seal.dev_key_file if settings.seal.type == "dev" else None
        await service.start(dev_key_file=dev)
        tasks.append(asyncio.create_task(watch_audit_log(service.audit, audit_failed)))
        _log.info("key service ready", sealed=service.sealed)

    async def shutdown() -> None:
        for task in tasks:
            task.cancel()
        try:
            try:
                await service._event("service", "stop", "ok", "")
            except CardVaultError:
                _log.error("could not record the stop")
            try:
                await service.seal(actor="shutdown")  # wipes the keys, then records it
            except CardVaultError:
                _log.error("could not record the seal at shutdown")
        finally:
            await service.audit.close()
            await service.store.close()

    try:
        run_until_stopped([listener], ready=ready, startup=startup, shutdown=shutdown, stop=stop)
    except AuditUnavailableError:
        _log.error(
            "key service not started: its audit log cannot be written",
            exit_status=AUDIT_FAILED_EXIT,
        )
        raise SystemExit(AUDIT_FAILED_EXIT) from None
    if failed:
        _log.error(
            "key service stopped: its audit log failed",
            reason=failed[0],
            exit_status=AUDIT_FAILED_EXIT,
        )
        raise SystemExit(AUDIT_FAILED_EXIT)
