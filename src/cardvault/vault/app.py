"""Start the vault: settings → objects → listeners → run.

:func:`build_vault` makes the vault's objects from its settings (:class:`Vault`),
:func:`build_listeners` its public HTTPS listener, the optional redirect port and the
admin API (the routes are :func:`cardvault.vault.http.routes`), and :func:`run` serves
them until the process is stopped, opening the audit log, the sweeper and the watch of
the audit log at start-up.

Health (docs/reliability.md, "Health and supervision"): ``/healthz`` answers while the
process serves; ``/readyz`` (:class:`Readiness`) answers 200 only while the store
answers, the key service answers its own ``/readyz`` (reachable, unsealed, its store
and audit log working) and the audit log's last write succeeded. When the audit log
fails for good (:func:`cardvault.audit.recorder.watch_audit_log`), the vault stops its
listeners and exits with status 74 (``AUDIT_FAILED_EXIT``), for its supervisor to
restart it; a start whose audit records cannot be written exits 74 too.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import httpx
from starlette.routing import BaseRoute

from cardvault import pgp
from cardvault.audit.recorder import (
    AUDIT_FAILED_EXIT,
    Recorder,
    start_recording,
    watch_audit_log,
)
from cardvault.errors import AuditUnavailableError, CardVaultError, ConfigurationError
from cardvault.logging import add_line_tap, configure_logging, get_logger
from cardvault.storage.base import VaultStore
from cardvault.transport.asgi import build_app, redirect_app
from cardvault.transport.securitytxt import render_security_txt
from cardvault.transport.selfaudit import OwnListener, self_audit_loop
from cardvault.transport.server import Listener, run_until_stopped
from cardvault.transport.tls import client_context, server_context
from cardvault.vault.accounts import Accounts
from cardvault.vault.datakeys import DataKeyManager, DataKeyPolicy
from cardvault.vault.events import Events
from cardvault.vault.exports import Exports
from cardvault.vault.exports.approval import Approvals, load_check
from cardvault.vault.exports.recipients import load_recipients
from cardvault.vault.forwarding.allowlist import Allowlist
from cardvault.vault.forwarding.forwarder import Forwarder
from cardvault.vault.forwarding.loader import load_allowlist
from cardvault.vault.forwarding.outbound import OutboundClient
from cardvault.vault.http import PublicAPI, routes
from cardvault.vault.idempotency import Idempotency
from cardvault.vault.imports import Imports
from cardvault.vault.keyclient import KeyServiceClient
from cardvault.vault.keyjobs import KeyMaintenance
from cardvault.vault.params import ParseLimits
from cardvault.vault.payment_methods import PaymentMethods
from cardvault.vault.ratelimit import key_limits
from cardvault.vault.requestlog import RequestLog
from cardvault.vault.settings import VaultSettings
from cardvault.vault.systemevents import SystemEvents
from cardvault.vault.webhooks import WebhookDelivery, WebhookEndpoints
from cardvault.vault.workers import WorkerSpec

__all__ = ["Readiness", "Vault", "build_listeners", "build_vault", "run"]

_log = get_logger("cardvault.vault")

#: Seconds a readiness answer is reused (a load balancer's probes, or anyone's: the
#: public /readyz must not turn every request into a database query and a key-service
#: call), and the most each of its checks may take.
READY_CACHE: Final = 1.0
READY_TIMEOUT: Final = 2.0


@dataclass(frozen=True)
class Vault:
    """The vault's objects, made once from its settings. Each service receives the few
    of the others it uses, and they share one audit recorder, whose log is opened when
    the vault starts (:func:`run`)."""

    store: VaultStore
    keys: DataKeyManager
    audit: Recorder
    accounts: Accounts
    payment_methods: PaymentMethods
    idempotency: Idempotency
    forwarder: Forwarder
    #: The key lifecycle's side in the vault (usage counts, re-encryption job).
    maintenance: KeyMaintenance | None = None
    #: Bulk import (docs/migration.md).
    imports: Imports | None = None
    #: Events, webhook endpoints and their delivery (docs/api.md, "Events").
    events: Events | None = None
    webhooks: WebhookEndpoints | None = None
    delivery: WebhookDelivery | None = None
    #: Card export (docs/migration.md); None without [exports] recipients_file.
    exports: Exports | None = None


def build_vault(settings: VaultSettings) -> Vault | None:
    """The vault's objects, or None when no store and key service are configured (the
    vault then serves only its transport endpoints and says so at start-up)."""
    ks = settings.keyservice
    if not settings.store.url and not ks.url:
        return None
    if not settings.store.url:
        raise ConfigurationError("missing required setting store.url (keyservice.url is set)")
    if not settings.jobs.interval > 0:
        raise ConfigurationError("jobs.interval must be more than 0 seconds")
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
    policy = DataKeyPolicy(
        dk.max_uses,
        float(dk.max_age),
        float(dk.cache_ttl),
        dk.cache_size,
        fingerprint_version=dk.fingerprint_version,
    )
    keys = DataKeyManager(store, client, policy)
    audit = Recorder(None)
    events = Events(store, keys)
    # key.rotated and audit.failed_closed: to every account (cardvault.vault.systemevents).
    system_events = SystemEvents(store, events)
    audit.on_failed_closed = system_events.audit_failed_closed
    payment_methods = PaymentMethods(
        store, keys, cvc_ttl=settings.limits.cvc_ttl, audit=audit, events=events
    )
    # gpg homes left by a vault killed during an import hold the import key's secret
    # half (and maybe an agent holding it unlocked): removed before anything else.
    pgp.sweep_stale_homes()
    spool = settings.imports.spool_directory or (
        settings.audit.resolved(settings.store.url)[0].parent / "import-spool"
    )
    return Vault(
        store=store,
        keys=keys,
        audit=audit,
        accounts=Accounts(store, audit=audit),
        payment_methods=payment_methods,
        idempotency=Idempotency(
            store,
            keys,
            ttl=settings.limits.idempotency_ttl,
            lease=settings.limits.idempotency_lease,
            audit=audit,
            replica=settings.store.replica or None,
        ),
        forwarder=Forwarder(
            store, keys, audit, _allowlist(settings), OutboundClient(), events=events
        ),
        maintenance=KeyMaintenance(
            store,
            client,
            audit,
            fingerprint_version=dk.fingerprint_version,
            datakeys=keys,
            system_events=system_events,
        ),
        imports=Imports(
            store,
            payment_methods,
            keys,
            audit,
            spool=spool,
            max_upload_bytes=settings.imports.max_upload_bytes,
        ),
        exports=_exports(settings, store, keys, audit),
        events=events,
        webhooks=WebhookEndpoints(
            store, keys, audit, allowed_hosts=settings.webhooks.allowed_hosts
        ),
        delivery=_delivery(settings, store, keys, events),
    )


def _delivery(
    settings: VaultSettings, store: VaultStore, keys: DataKeyManager, events: Events
) -> WebhookDelivery:
    """The delivery of events to webhook endpoints ([webhooks])."""
    wh = settings.webhooks
    if not (wh.timeout > 0 and wh.retry_base_seconds > 0 and wh.poll_interval > 0):
        raise ConfigurationError(
            "webhooks.timeout, retry_base_seconds and poll_interval must be more than 0"
        )
    try:
        context = client_context(wh.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError("cannot load webhooks.ca_file") from exc
    return WebhookDelivery(
        store,
        keys,
        events,
        allowed_hosts=wh.allowed_hosts,
        timeout=wh.timeout,
        retry_base=wh.retry_base_seconds,
        retry_max=wh.retry_max_seconds,
        give_up=wh.give_up_seconds,
        poll_interval=wh.poll_interval,
        ssl_context=context,
    )


class Readiness:
    """What ``/readyz`` answers: ``(ready, checks)``, each check ``ok`` or what is wrong.

    ``store``: a read answered within :data:`READY_TIMEOUT`. ``keyservice``: the key
    service's own ``/readyz`` answered 200, over mutual TLS with the vault's certificate
    (``sealed``, ``not_ready`` or ``unreachable`` otherwise). ``audit``: the log's last
    write succeeded (``failed`` otherwise). The store's and the key service's answers are
    reused for :data:`READY_CACHE` seconds, and concurrent requests share one check; the
    audit log's state is read each time."""

    def __init__(self, vault: Vault | None, settings: VaultSettings) -> None:
        self.vault = vault
        ks = settings.keyservice
        self._http: httpx.AsyncClient | None = None
        if vault is not None and ks.ca_file and ks.cert_file and ks.key_file:
            self._http = httpx.AsyncClient(
                base_url=ks.url.rstrip("/"),
                verify=client_context(ks.ca_file, client_cert=(ks.cert_file, ks.key_file)),
                timeout=READY_TIMEOUT,
                trust_env=False,
                follow_redirects=False,
            )
        self._answer: tuple[float, dict[str, str]] | None = None
        self._running: asyncio.Future[None] | None = None

    async def __call__(self) -> tuple[bool, dict[str, str]]:
        vault = self.vault
        if vault is None:
            return True, {}
        now = time.monotonic()
        if self._answer is None or now - self._answer[0] >= READY_CACHE:
            if self._running is None or self._running.done():
                self._running = asyncio.ensure_future(self._check(vault))
            await asyncio.shield(self._running)
        assert self._answer is not None
        # The audit log's state is in memory: always the current one.
        checks = {**self._answer[1], "audit": "ok" if vault.audit.writable else "failed"}
        return all(value == "ok" for value in checks.values()), checks

    async def _check(self, vault: Vault) -> None:
        store, keyservice = await asyncio.gather(self._store(vault), self._keyservice())
        self._answer = (time.monotonic(), {"store": store, "keyservice": keyservice})

    async def _store(self, vault: Vault) -> str:
        try:
            await asyncio.wait_for(vault.store.get_account("acct_readiness"), READY_TIMEOUT)
        except Exception as exc:
            _log.warning("readiness: the store did not answer", error=type(exc).__name__)
            return "unavailable"
        return "ok"

    async def _keyservice(self) -> str:
        if self._http is None:
            return "unreachable"
        try:
            response = await self._http.get("/readyz")
        except httpx.HTTPError as exc:
            _log.warning("readiness: the key service did not answer", error=type(exc).__name__)
            return "unreachable"
        if response.status_code == 200:
            return "ok"
        try:
            seal = response.json()["checks"]["seal"]
        except (ValueError, KeyError, TypeError):
            seal = None
        return "sealed" if seal == "sealed" else "not_ready"

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()


def _exports(
    settings: VaultSettings, store: VaultStore, keys: DataKeyManager, audit: Recorder
) -> Exports | None:
    """Card export, when [exports] names a recipients file: the recipients and the
    approval check read once, now (docs/migration.md, "Exporting")."""
    ex = settings.exports
    if ex.recipients_file is None:
        return None
    if not ex.approval_timeout > 0:
        raise ConfigurationError("exports.approval_timeout must be more than 0 seconds")
    approvals = None
    if ex.approval_file is not None:
        approvals = Approvals(load_check(ex.approval_file), timeout=ex.approval_timeout)
    else:
        _log.warning("exports: no approval_file configured; every export will be refused")
    return Exports(store, keys, audit, load_recipients(ex.recipients_file), approvals)


def _allowlist(settings: VaultSettings) -> Allowlist:
    """The forwarding allowlist, read once, now. An invalid file stops start-up; no file
    means an empty allowlist (every URL refused)."""
    path = settings.forwarding.allowlist_file
    if path is None:
        _log.warning("forwarding allowlist: none configured; every forward will be refused")
        return Allowlist.empty()
    allowlist = load_allowlist(path)
    _log.info(
        "forwarding allowlist loaded",
        path=str(path),
        sha256=allowlist.sha256,
        destinations=[d.name for d in allowlist.destinations],
    )
    return allowlist


def _public_api(settings: VaultSettings, vault: Vault) -> PublicAPI:
    """What the public API's handlers need: the services, and the limits from settings."""
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

    return PublicAPI(
        accounts=vault.accounts,
        payment_methods=vault.payment_methods,
        idempotency=vault.idempotency,
        # One bucket per key for the whole API (docs/api.md, "Rate limits"): a key's
        # forwards and tokenizations draw from the same bucket.
        # In this process, or in Redis shared by every vault process ([limits] backend).
        payment_method_limits=key_limits(lim),
        forwarder=vault.forwarder,
        parse_limits=parse_limits,
        events=vault.events,
        webhooks=vault.webhooks,
    )


def build_listeners(
    settings: VaultSettings,
    vault: Vault | None = None,
    readiness: Callable[[], Any] | None = None,
    request_log: RequestLog | None = None,
) -> list[Listener]:
    """The vault's listeners, ready to serve. Raises ConfigurationError on bad settings.
    ``readiness`` answers ``/readyz`` (:class:`Readiness`); without it the vault is
    ready whenever it serves. ``request_log``: served on the admin API
    (``cardvault logs tail``)."""
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
    adm = settings.admin
    table = routes(
        _public_api(settings, vault) if vault is not None else None,
        admin_identities=adm.allowed_identities,
        readiness=readiness,
        maintenance=vault.maintenance if vault is not None else None,
        imports=vault.imports if vault is not None else None,
        exports=vault.exports if vault is not None else None,
        request_log=request_log,
    )
    public_app = build_app(table.public, service="vault", security_txt=security_txt)
    listeners = [Listener("public", public_app, srv.host, srv.port, public_ctx, limits=srv.limits)]
    if srv.redirect_port:
        redirect = _redirect_app(settings, public_port)
        listeners.append(
            Listener("redirect", redirect, srv.host, srv.redirect_port, limits=srv.limits)
        )
    if adm.port:
        listeners.append(_admin_listener(settings, table.admin, security_txt))
    return listeners


def _admin_listener(
    settings: VaultSettings, admin_routes: list[BaseRoute], security_txt: str | None
) -> Listener:
    """The admin API's listener: mutual TLS only, with the deployment CA's client
    certificates."""
    srv, adm = settings.server, settings.admin
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
    admin_app = build_app(admin_routes, service="vault-admin", security_txt=security_txt)
    return Listener("admin", admin_app, adm.host, adm.port, admin_ctx, limits=srv.limits)


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


def run(
    settings: VaultSettings,
    *,
    ready: Callable[[], Any] | None = None,
    worker: WorkerSpec | None = None,
) -> None:
    """Run the vault in this process until SIGINT/SIGTERM, or until its audit log fails:
    then exit with status 74 (:data:`~cardvault.audit.recorder.AUDIT_FAILED_EXIT`).

    ``worker``: this process is one of several serving the sockets a parent process
    bound (:mod:`cardvault.vault.workers`): its replica name and audit log are its own,
    and every log line names it."""
    if worker is not None:
        settings = worker.settings(settings)
    configure_logging(
        profile=settings.profile,
        level=settings.logging.level,
        fmt=settings.logging.format,
        fields={"worker": worker.name} if worker is not None else None,
    )
    if settings.profile == "development":
        _log.warning(
            "DEVELOPMENT PROFILE: this vault runs with development settings; "
            "never use it for real card data"
        )
    vault = build_vault(settings)
    if vault is None:
        _log.warning(
            "payment API disabled: store.url and keyservice.* are not set; "
            "only /healthz and the transport endpoints are served"
        )
    readiness = Readiness(vault, settings)
    # The last access lines of this process, for `cardvault logs tail` on the admin API.
    request_log = RequestLog(workers=worker.count if worker is not None else None)
    if settings.admin.port:
        add_line_tap(request_log.tap)
    listeners = build_listeners(settings, vault, readiness, request_log)
    if worker is not None:
        _inherit_sockets(listeners, worker)
    _log.info("vault starting", profile=settings.profile, listeners=[lst.name for lst in listeners])
    tasks: list[asyncio.Task[None]] = []
    stop = asyncio.Event()
    if vault is not None and vault.events is not None:
        # Open waits of GET /v1/events answer at once when the vault stops.
        vault.events.stopping = stop
    # Open polls of the request log answer at once when the vault stops.
    request_log.stopping = stop
    failed: list[str] = []

    def audit_failed(reason: str) -> None:
        failed.append(reason)
        stop.set()

    async def startup() -> None:
        if vault is not None:
            await _start(vault, settings, worker)
            tasks.append(asyncio.create_task(_sweeper(vault, settings)))
            if vault.delivery is not None:
                tasks.append(asyncio.create_task(vault.delivery.run()))
            tasks.append(asyncio.create_task(watch_audit_log(vault.audit, audit_failed)))
            if worker is None or worker.index == 0:  # one audit of the listeners they share
                tasks.append(asyncio.create_task(_tls_audit(vault, settings)))

    async def shutdown() -> None:
        if worker is not None:
            # The parent repeats the SIGTERM (or Ctrl-C) that the whole process group
            # got: once the listeners are closed, it must not cut the stop short.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        for task in tasks:
            task.cancel()
        await readiness.close()
        if vault is not None:
            await _stop(vault)

    try:
        run_until_stopped(listeners, ready=ready, startup=startup, shutdown=shutdown, stop=stop)
    except AuditUnavailableError:
        _log.error(
            "vault not started: its audit log cannot be written",
            exit_status=AUDIT_FAILED_EXIT,
        )
        raise SystemExit(AUDIT_FAILED_EXIT) from None
    if failed:
        _log.error(
            "vault stopped: its audit log failed", reason=failed[0], exit_status=AUDIT_FAILED_EXIT
        )
        raise SystemExit(AUDIT_FAILED_EXIT)
    _log.info("vault stopped")


def _inherit_sockets(listeners: list[Listener], worker: WorkerSpec) -> None:
    """A worker serves the sockets its parent bound, one per listener."""
    for listener in listeners:
        fd = worker.fds.get(listener.name)
        if fd is None:
            raise ConfigurationError(
                f"the vault's parent process passed no socket for the {listener.name} "
                "listener (were the settings changed while it ran?)"
            )
        listener.fd = fd


async def _start(vault: Vault, settings: VaultSettings, worker: WorkerSpec | None = None) -> None:
    """Open the audit log and record the start, then bring the store's schema up to date.
    A worker's ``config.loaded`` names it and its replica."""
    allowlist = vault.forwarder.allowlist
    workers: dict[str, str | int] = {}
    if worker is not None:
        workers = {
            "worker": worker.index,
            "workers": worker.count,
            "replica": vault.idempotency.replica,
        }
    await start_recording(
        vault.audit,
        settings.audit,
        settings.store.url,
        actor="vault",
        records=[
            ("service.start", {}),
            (
                "config.loaded",
                {
                    "profile": settings.profile,
                    "tls_profile": settings.server.tls_profile,
                    "store": settings.store.url.split(":", 1)[0],
                    "admin_api": bool(settings.admin.port),
                    **workers,
                },
            ),
            (
                "allowlist.loaded",
                {"sha256": allowlist.sha256, "destinations": len(allowlist.destinations)},
            ),
        ],
    )
    await vault.store.migrate()
    # What requests cut off by a crash left behind: claims completed with the effect
    # they made, forwards of unknown outcome marked so. Best effort: the next request
    # with a key settles its own claim anyway, and the sweeper comes back to it.
    try:
        settled = await vault.idempotency.settle_stale()
    except Exception:
        _log.exception("could not settle stale idempotency claims at start-up")
    else:
        if settled:
            _log.info("stale idempotency claims settled", count=settled)


async def _stop(vault: Vault) -> None:
    """Close the outbound sessions, record the stop, wipe the keys, close the store."""
    await vault.forwarder.outbound.close()
    if vault.delivery is not None:
        await vault.delivery.close()
    try:
        await vault.audit.record("service.stop", actor="vault", origin="local")
    except CardVaultError:
        _log.error("could not record the stop in the audit log")
    await vault.audit.close()
    vault.keys.wipe()
    await vault.keys.keys.close()
    await vault.store.close()


def own_listeners(settings: VaultSettings) -> list[OwnListener]:
    """The vault's TLS listeners, as its own TLS audit sees them: the public one (its
    certificate chained to ``[tls_audit] ca_file``, or to the public trust stores) and
    the admin API (mutual TLS, its certificate from the deployment CA)."""
    srv, adm = settings.server, settings.admin
    found = [OwnListener("public", srv.host, srv.port, srv.cert_file, settings.tls_audit.ca_file)]
    if adm.port:
        found.append(
            OwnListener(
                "admin",
                adm.host,
                adm.port,
                srv.cert_file,
                ca_file=adm.client_ca_file,
                mutual=True,
            )
        )
    return found


async def _tls_audit(vault: Vault, settings: VaultSettings) -> None:
    """The vault's audit of its own TLS, every ``[tls_audit] interval`` (a day), into
    its audit log as ``tls.audit`` (:mod:`cardvault.transport.selfaudit`)."""

    async def record(detail: dict[str, Any]) -> None:
        await vault.audit.record(
            "tls.audit",
            actor="vault",
            origin="local",
            result="ok" if detail["compliant"] == "yes" else "drift",
            detail=detail,
        )

    await self_audit_loop(
        "vault",
        own_listeners(settings),
        settings.tls_audit,
        record,
        profile=settings.server.tls_profile,
    )


async def _sweeper(vault: Vault, settings: VaultSettings) -> None:
    """The periodic jobs, every ``[jobs] interval`` seconds (60): destroy expired CVCs,
    settle stale idempotency claims, forget old idempotency keys and purge forwarding
    requests past their retention.

    They run on one process at a time of those sharing the database: the one whose store
    leads them (:meth:`~cardvault.storage.base.VaultStore.lead_jobs`, asked before each
    run, so that another takes over within an interval when the leader dies). Every
    process still follows up the creates of its own whose outcome it does not know
    (:meth:`Idempotency.settle_stale` with ``shared=False``): nobody else knows them."""
    leading = False
    while True:
        try:
            lead = await vault.store.lead_jobs()
        except Exception as exc:
            _log.warning(
                "periodic jobs: cannot take or keep their lead; trying again later",
                error=type(exc).__name__,
            )
            lead = False
        if vault.delivery is not None:
            # Webhooks are delivered by the leader alone (docs/reliability.md).
            vault.delivery.leading = lead
        if lead != leading:
            leading = lead
            if lead:
                _log.info("periodic jobs: this process runs them now")
            else:
                _log.warning("periodic jobs: this process lost their lead")
        try:
            await _jobs(vault, settings, lead=lead)
        except Exception:
            _log.exception("periodic jobs failed; retrying at the next interval")
        await asyncio.sleep(settings.jobs.interval)


async def _jobs(vault: Vault, settings: VaultSettings, *, lead: bool) -> None:
    """One run of the periodic jobs: all of them when this process leads, else only
    the follow-up of its own creates of unknown outcome."""
    settled = await vault.idempotency.settle_stale(shared=lead)
    if settled:
        _log.info("stale idempotency claims settled", count=settled)
    if not lead:
        return
    destroyed = await vault.payment_methods.sweep_expired_cvcs()
    if destroyed:
        _log.info("expired CVCs destroyed", count=destroyed)
    await vault.store.purge_idempotency_keys(int(time.time()) - settings.limits.idempotency_ttl)
    await vault.store.purge_forwarding_requests(
        int(time.time()) - settings.forwarding.retention_days * 86_400
    )
    await vault.store.purge_events(
        int(time.time()) - settings.webhooks.event_retention_days * 86_400
    )
    _log.debug("periodic jobs ran")
