"""The vault's settings (see :mod:`cardvault.config` for how they are read)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from cardvault.config import (
    AuditSettings,
    ListenerSettings,
    LoggingSettings,
    Profile,
    Secret,
    SecurityTxtSettings,
)
from cardvault.transport.selfaudit import TlsAuditSettings

__all__ = [
    "AdminSettings",
    "AuditSettings",
    "DataKeySettings",
    "ExportSettings",
    "ImportSettings",
    "JobSettings",
    "KeyServiceClientSettings",
    "LimitSettings",
    "StoreSettings",
    "VaultServerSettings",
    "VaultSettings",
    "WebhookSettings",
]


@dataclasses.dataclass
class VaultServerSettings(ListenerSettings):
    """The vault's listeners ([server]), and the processes that serve them."""

    #: Processes serving the public, redirect and admin ports (docs/deploy.md,
    #: "Workers"). 1: this process serves them itself. More: a parent process binds the
    #: ports and supervises that many workers (PostgreSQL only).
    workers: int = 1
    #: Seconds the workers get after SIGTERM to finish the requests in flight before
    #: they are killed (workers > 1).
    stop_grace: float = 30.0
    #: Restarts of one worker allowed within 60 s (workers > 1); one more exit is a
    #: crash loop, and the vault stops every worker and exits 1.
    worker_restarts: int = 5


@dataclasses.dataclass
class AdminSettings:
    """The vault's admin API: a separate listener that only accepts mutual TLS."""

    #: 0 turns the admin listener off.
    port: int = 0
    host: str = "127.0.0.1"
    #: The deployment CA whose client certificates are accepted. Required when port != 0.
    client_ca_file: Path | None = None
    #: Identities (``spiffe://cardvault/<identity>``) allowed to use the admin API.
    allowed_identities: list[str] = dataclasses.field(default_factory=lambda: ["admin"])


@dataclasses.dataclass
class StoreSettings:
    #: ``sqlite:///abs/path/vault.db`` (embedded default) or ``postgresql://role@host/db``.
    #: The vault's database is its own; nothing of the key service's is in it.
    url: str = ""
    #: This vault process's name among those that share the database (the host name when
    #: empty). Idempotency claims name their holder by it, so that a restarted process
    #: knows the claims of its earlier start for stale at once; two vault processes on
    #: one host sharing a database need names of their own. Workers (server.workers > 1)
    #: are named ``<replica>/w<i>``.
    replica: str = ""


@dataclasses.dataclass
class KeyServiceClientSettings:
    """How the vault reaches the key service: mutual TLS with the vault's own certificate."""

    url: str = ""
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    timeout: float = 5.0


@dataclasses.dataclass
class DataKeySettings:
    #: Encryptions per data key before the next is fetched.
    max_uses: int = 50_000
    #: Seconds a data key is used for encryption.
    max_age: int = 3600
    #: Seconds an unwrapped data key stays cached for decryption, and how many.
    cache_ttl: int = 300
    cache_size: int = 1024
    #: The ``fingerprint`` KEK version every fingerprint is derived under. Fingerprints
    #: are comparable only under one version, so rotating that KEK does not change
    #: them; moving to a new version means fingerprinting every card again
    #: (docs/keys.md, "Fingerprint key rotation").
    fingerprint_version: int = 1


@dataclasses.dataclass
class LimitSettings:
    #: Requests per second and burst, per secret key.
    secret_rate: float = 100.0
    secret_burst: float = 200.0
    #: The same for publishable keys (card testers abuse them).
    publishable_rate: float = 5.0
    publishable_burst: float = 20.0
    #: Where the buckets live: "memory" (this process: one process only) or "redis"
    #: (shared by every vault process; see docs/api.md, "Rate limits").
    backend: Literal["memory", "redis"] = "memory"
    #: ``redis://[user:password@]host:port/db``, or ``rediss://`` for TLS (certificate
    #: and host name verified). It holds a password: give it in the environment or in a
    #: file (``redis_url_file``, ``CARDVAULT_LIMITS_REDIS_URL_FILE``), never in source.
    redis_url: Secret | None = None
    #: The CA that signed the Redis server's certificate (rediss://); the system's
    #: CAs when empty.
    redis_ca_file: Path | None = None
    #: Seconds a connect, command or wait for a pooled connection to Redis may take
    #: before the request is limited in this process instead.
    redis_timeout: float = 0.25
    #: Seconds a CVC is kept, sealed, before the sweeper destroys it.
    cvc_ttl: int = 3600
    #: Seconds an idempotency key is remembered (Stripe: 24 hours).
    idempotency_ttl: int = 86_400
    #: Seconds a request holds its Idempotency-Key before the claim is stale whoever holds
    #: it: above the longest request (a forward waits at most 60 s for its destination).
    idempotency_lease: int = 300
    #: What one request's parameters may be (see docs/security.md): the most form
    #: fields or JSON values, names per parameter (card[number] has two), items per
    #: list, and body bytes.
    max_params: int = 1000
    max_param_depth: int = 4
    max_list_items: int = 100
    max_body_bytes: int = 64 * 1024


@dataclasses.dataclass
class ForwardingSettings:
    #: The allowlist file (TOML), read once at start-up; no file means no destination.
    allowlist_file: Path | None = None
    #: Days a forwarding request (redacted) is kept before it is purged.
    retention_days: int = 30


@dataclasses.dataclass
class ImportSettings:
    """Bulk import ([imports], docs/migration.md)."""

    #: Where uploaded files wait for their run (OpenPGP ciphertext only; each is removed
    #: when its run ends, or a day after its last part). Default: ``import-spool``
    #: beside the audit directory.
    spool_directory: Path | None = None
    #: The largest file an upload may grow to.
    max_upload_bytes: int = 64 * 1024**3


@dataclasses.dataclass
class ExportSettings:
    """Card export ([exports], docs/migration.md, "Exporting"). Without both files
    there is no export."""

    #: The static export allowlist (TOML: name, fingerprint, public_key_file per
    #: recipient), read and checked once at start-up.
    recipients_file: Path | None = None
    #: The export-approval ceremony's check (`cardvault export-approval create`).
    approval_file: Path | None = None
    #: Seconds custodian approvals are held, pending or granted.
    approval_timeout: float = 600.0


@dataclasses.dataclass
class WebhookSettings:
    """Events and their delivery to webhook endpoints ([webhooks], docs/api.md,
    "Webhook endpoints"; docs/reliability.md, "Events and webhooks")."""

    #: Host names a webhook URL may name although they resolve to a loopback, private,
    #: link-local or otherwise non-public address (a test receiver on ``localhost``).
    allowed_hosts: list[str] = dataclasses.field(default_factory=list)
    #: The CAs webhook receivers' certificates are verified against (the system's when
    #: empty). Verification is never off.
    ca_file: Path | None = None
    #: Seconds one delivery attempt may take, connection and answer included.
    timeout: float = 10.0
    #: The first retry's delay; each next one doubles, up to ``retry_max_seconds``.
    retry_base_seconds: float = 60.0
    retry_max_seconds: float = 3600.0
    #: Seconds after its event a delivery is given up (dead): Stripe's three days.
    give_up_seconds: float = 3 * 86_400.0
    #: Seconds between two looks for events to dispatch and deliveries due.
    poll_interval: float = 1.0
    #: Days an event is kept (and listed) before the periodic jobs purge it.
    event_retention_days: int = 30


@dataclasses.dataclass
class JobSettings:
    """The vault's periodic jobs: the CVC sweep, settling and purging idempotency keys,
    purging old forwarding requests. One process of those sharing the database runs
    them at a time (docs/reliability.md, "Jobs run once")."""

    #: Seconds between two runs (and between two tries for the lead by the others).
    interval: float = 60.0


@dataclasses.dataclass
class VaultSettings:
    #: "production" (the default) or "development", which announces itself at start-up.
    profile: Profile = "production"
    server: VaultServerSettings = dataclasses.field(default_factory=VaultServerSettings)
    admin: AdminSettings = dataclasses.field(default_factory=AdminSettings)
    security_txt: SecurityTxtSettings = dataclasses.field(default_factory=SecurityTxtSettings)
    logging: LoggingSettings = dataclasses.field(default_factory=LoggingSettings)
    store: StoreSettings = dataclasses.field(default_factory=StoreSettings)
    keyservice: KeyServiceClientSettings = dataclasses.field(
        default_factory=KeyServiceClientSettings
    )
    datakeys: DataKeySettings = dataclasses.field(default_factory=DataKeySettings)
    limits: LimitSettings = dataclasses.field(default_factory=LimitSettings)
    forwarding: ForwardingSettings = dataclasses.field(default_factory=ForwardingSettings)
    jobs: JobSettings = dataclasses.field(default_factory=JobSettings)
    imports: ImportSettings = dataclasses.field(default_factory=ImportSettings)
    webhooks: WebhookSettings = dataclasses.field(default_factory=WebhookSettings)
    exports: ExportSettings = dataclasses.field(default_factory=ExportSettings)
    audit: AuditSettings = dataclasses.field(default_factory=AuditSettings)
    #: The service's audit of its own TLS, into its audit log (docs/deploy.md).
    tls_audit: TlsAuditSettings = dataclasses.field(default_factory=TlsAuditSettings)
    #: The public base URL (https://vault.example.com); used for security.txt's Canonical.
    public_url: str = ""
