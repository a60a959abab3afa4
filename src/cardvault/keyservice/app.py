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
from typing import Any, Literal

from cardvault.audit.recorder import (
    AUDIT_FAILED_EXIT,
    Recorder,
    open_audit_log,
    start_recording,
    watch_audit_log,
)
from cardvault.errors import AuditUnavailableError, CardVaultError, ConfigurationError
from cardvault.keyservice import ceremony
from cardvault.keyservice.http import routes
from cardvault.keyservice.seals import TokenConfig
from cardvault.keyservice.service import KeyService, initialize
from cardvault.keyservice.settings import KeyServiceSettings
from cardvault.logging import configure_logging, get_logger
from cardvault.storage import open_key_store
from cardvault.transport.asgi import build_app
from cardvault.transport.securitytxt import render_security_txt
from cardvault.transport.selfaudit import OwnListener, self_audit_loop
from cardvault.transport.server import Listener, run_until_stopped
from cardvault.transport.tls import server_context

__all__ = [
    "build_listener",
    "check_settings",
    "rekey_key_service",
    "reseal_key_service",
    "run",
    "token_config",
]

_log = get_logger("cardvault.keyservice")


def initialize_key_service(
    settings: KeyServiceSettings, *, shares: int, threshold: int
) -> list[Any]:
    """Create the root key and the first KEKs in the key service's store, once (the
    door for ``cardvault keyservice init``). The custodian shares, or none with the
    development seal, which writes the root key to ``seal.dev_key_file``."""
    check_settings(settings)
    dev = settings.seal.dev_key_file if settings.seal.type == "dev" else None
    token = token_config(settings) if settings.seal.type == "pkcs11" else None

    async def go() -> list[Any]:
        store = open_key_store(settings.store.url)
        try:
            return await initialize(
                store, shares=shares, threshold=threshold, dev_key_file=dev, token=token
            )
        finally:
            await store.close()

    return asyncio.run(go())


def token_config(settings: KeyServiceSettings) -> TokenConfig | None:
    """The PKCS#11 token's settings, or None when they are not set (any seal type:
    ``reseal`` reads them to move to or from the token)."""
    seal = settings.seal
    if seal.pkcs11_module is None and not seal.pkcs11_token_label and seal.pkcs11_pin_file is None:
        return None
    missing = [
        name
        for name, value in (
            ("seal.pkcs11_module", seal.pkcs11_module),
            ("seal.pkcs11_token_label", seal.pkcs11_token_label),
            ("seal.pkcs11_pin_file", seal.pkcs11_pin_file),
        )
        if not value
    ]
    if missing:
        raise ConfigurationError(f"missing required setting {missing[0]} for the PKCS#11 seal")
    assert seal.pkcs11_module is not None
    assert seal.pkcs11_pin_file is not None
    if not seal.pkcs11_module.is_file():
        raise ConfigurationError(f"seal.pkcs11_module {seal.pkcs11_module} does not exist")
    return TokenConfig(seal.pkcs11_module, seal.pkcs11_token_label, seal.pkcs11_pin_file)


def _stopped_service_ceremony(settings: KeyServiceSettings, work: Callable[..., Any]) -> Any:
    """Run ``work(store, recorder)`` on the key service's store and audit log. The audit
    log is locked while open, by a running key service too: a ceremony on a running
    service is refused."""

    async def go() -> Any:
        directory, _admin = settings.audit.resolved(settings.store.url)
        try:
            log = await open_audit_log(directory, settings.audit)
        except (ConfigurationError, AuditUnavailableError) as exc:
            if "another process" in str(exc):
                raise ConfigurationError(
                    "the key service is running (it holds its audit log): stop it first"
                ) from exc
            raise
        recorder = Recorder(log)
        store = open_key_store(settings.store.url)
        try:
            return await work(store, recorder)
        finally:
            await store.close()
            await recorder.close()

    return asyncio.run(go())


def reseal_key_service(
    settings: KeyServiceSettings,
    *,
    to: Literal["shamir", "pkcs11"],
    shares: list[str],
    new_shares: int,
    new_threshold: int,
) -> list[Any]:
    """``cardvault keyservice reseal``: the door to :func:`ceremony.reseal`."""
    dev = settings.seal.dev_key_file if settings.profile == "development" else None
    token = token_config(settings)

    async def work(store: Any, recorder: Recorder) -> list[Any]:
        return await ceremony.reseal(
            store,
            recorder,
            to=to,
            shares=shares,
            new_shares=new_shares,
            new_threshold=new_threshold,
            token=token,
            dev_key_file=dev,
        )

    return _stopped_service_ceremony(settings, work)  # type: ignore[no-any-return]


def rekey_key_service(
    settings: KeyServiceSettings, *, shares: list[str], new_shares: int, new_threshold: int
) -> list[Any]:
    """``cardvault keyservice rekey``: the door to :func:`ceremony.rekey`."""

    token = token_config(settings)

    async def work(store: Any, recorder: Recorder) -> list[Any]:
        return await ceremony.rekey(
            store,
            recorder,
            shares=shares,
            new_shares=new_shares,
            new_threshold=new_threshold,
            token=token,
        )

    return _stopped_service_ceremony(settings, work)  # type: ignore[no-any-return]


def check_settings(settings: KeyServiceSettings) -> None:
    """Refuse unsafe combinations before anything starts."""
    if settings.server.client_ca_file is None:
        raise ConfigurationError(
            "missing required setting server.client_ca_file: the key service accepts only mutual TLS"
        )
    if settings.seal.type == "pkcs11" and token_config(settings) is None:
        raise ConfigurationError(
            'missing required setting seal.pkcs11_module for seal.type = "pkcs11"'
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


async def _tls_audit(service: KeyService, settings: KeyServiceSettings) -> None:
    """keyd's audit of its own TLS, every ``[tls_audit] interval`` (a day), into its
    audit log as ``tls.audit`` (:mod:`cardvault.transport.selfaudit`). Its listener asks
    for a client certificate: the scan runs when ``[tls_audit] client_cert_file`` and
    ``client_key_file`` are set; the certificate file is checked either way."""
    srv = settings.server

    async def record(detail: dict[str, Any]) -> None:
        await service.audit.record(
            "tls.audit",
            actor="keyservice",
            origin="local",
            result="ok" if detail["compliant"] == "yes" else "drift",
            detail=detail,
        )

    own = OwnListener(
        "keyservice", srv.host, srv.port, srv.cert_file, ca_file=srv.client_ca_file, mutual=True
    )
    await self_audit_loop("keyservice", [own], settings.tls_audit, record, profile=srv.tls_profile)


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
        token = token_config(settings) if settings.seal.type == "pkcs11" else None
        await service.start(dev_key_file=dev, token=token)
        tasks.append(asyncio.create_task(watch_audit_log(service.audit, audit_failed)))
        tasks.append(asyncio.create_task(_tls_audit(service, settings)))
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
