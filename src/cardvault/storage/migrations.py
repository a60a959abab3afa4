"""Every store's schema, as versioned migrations, and the rules one runner applies them by.

A migration is a list of statements written once, with ``{blob}``, ``{key}`` and
``{rowid}`` standing for the column types the dialects spell differently
(:func:`render`). Each store has its own :class:`Schema` (its migrations, oldest first,
and the PostgreSQL advisory lock that serialises them): :data:`VAULT_SCHEMA` for the
vault's database, :data:`KEY_SCHEMA` for the key service's. Their databases are never
the same one.

The ``schema_version`` table holds one row per applied migration. The runner of each
backend (``cardvault.storage.sqlite.connection.apply_migrations`` inside the writer's
``BEGIN IMMEDIATE``; ``cardvault.storage.postgres.pool`` under
``pg_advisory_xact_lock``) takes the lock, reads the newest version and applies the
missing ones in the same transaction, following :func:`plan`, so migrating is idempotent
and safe from several processes at once.

Never edit a migration that has shipped: append a new one.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Literal

__all__ = [
    "CURRENT_VERSION",
    "KEY_SCHEMA",
    "SCHEMA_VERSION_TABLE",
    "STORED_IDEMPOTENCY_KEY_PREFIX",
    "VAULT_SCHEMA",
    "Dialect",
    "Migration",
    "Schema",
    "plan",
    "render",
]

Dialect = Literal["sqlite", "postgresql"]

_TYPES: dict[Dialect, dict[str, str]] = {
    # ``rowid``: an integer key the database assigns, increasing.
    "sqlite": {"blob": "BLOB", "key": "TEXT", "rowid": "INTEGER PRIMARY KEY"},
    # Ids are compared bytewise in both databases: list order breaks ties on the id,
    # and PostgreSQL's default collation would otherwise sort "pm_a" before "pm_B"
    # where SQLite sorts it after.
    "postgresql": {"blob": "BYTEA", "key": 'TEXT COLLATE "C"', "rowid": "BIGSERIAL PRIMARY KEY"},
}


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


@dataclass(frozen=True)
class Schema:
    """One store's migrations, oldest first (``version`` is the position, from 1)."""

    name: str
    migrations: tuple[Migration, ...]
    #: The PostgreSQL advisory lock that serialises this schema's migrations (any 64-bit
    #: number, distinct per store in case two ever share a database by mistake).
    lock: int

    def __post_init__(self) -> None:
        numbers = [m.version for m in self.migrations]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"the {self.name} schema's versions must be 1, 2, 3 …")

    @property
    def latest(self) -> int:
        return self.migrations[-1].version


SCHEMA_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    applied BIGINT NOT NULL
)"""

#: The newest applied version; 0 for an empty table.
CURRENT_VERSION = "SELECT coalesce(max(version), 0) FROM schema_version"

#: The key service's store until the storage layer was one: ``schema_version`` had a
#: single column (and, since two processes could both record version 1, possibly the
#: same version twice). Rebuilt once in today's form, the versions kept; ``applied`` is
#: 0 for them, the time being unknown. Code of that release still reads the new form.
_ONE_COLUMN_UPGRADE = (
    "ALTER TABLE schema_version RENAME TO schema_version_v0",
    SCHEMA_VERSION_TABLE,
    "INSERT INTO schema_version (version, applied) "
    "SELECT DISTINCT version, 0 FROM schema_version_v0",
    "DROP TABLE schema_version_v0",
)

_RECORD: dict[Dialect, str] = {
    "sqlite": "INSERT INTO schema_version (version, applied) VALUES (?, ?)",
    "postgresql": "INSERT INTO schema_version (version, applied) VALUES ($1, $2)",
}


def render(statement: str, dialect: Dialect) -> str:
    """``statement`` in ``dialect``: the type placeholders filled in."""
    return statement.format(**_TYPES[dialect])


def plan(
    schema: Schema, dialect: Dialect, columns: Collection[str], current: int, now: int
) -> list[tuple[str, tuple[int, ...]]]:
    """The statements (with their parameters) that bring a database to ``schema.latest``,
    for a runner that holds the schema's lock: ``columns`` are those of the database's
    ``schema_version`` table (none when there is no such table), ``current`` is
    :data:`CURRENT_VERSION` read from it (0 without one), ``now`` the time to record."""
    steps: list[tuple[str, tuple[int, ...]]] = []
    if columns and "applied" not in columns:
        steps += [(statement, ()) for statement in _ONE_COLUMN_UPGRADE]
    steps.append((SCHEMA_VERSION_TABLE, ()))
    for migration in schema.migrations:
        if migration.version > current:
            steps += [(render(statement, dialect), ()) for statement in migration.statements]
            steps.append((_RECORD[dialect], (migration.version, now)))
    return steps


# -- the vault's database -------------------------------------------------------------------

_VAULT_1 = Migration(
    1,
    "accounts, API keys, data keys, payment methods, idempotency keys",
    (
        """CREATE TABLE accounts (
            id {key} PRIMARY KEY,
            name TEXT NOT NULL,
            created BIGINT NOT NULL,
            allowed_origins TEXT NOT NULL
        )""",
        """CREATE TABLE api_keys (
            id {key} PRIMARY KEY,
            account_id {key} NOT NULL REFERENCES accounts (id),
            kind TEXT NOT NULL CHECK (kind IN ('publishable', 'secret')),
            mode TEXT NOT NULL CHECK (mode IN ('test', 'live')),
            prefix TEXT NOT NULL,
            hash TEXT NOT NULL,
            created BIGINT NOT NULL,
            revoked BIGINT
        )""",
        # Authentication looks a key up by its hash; two keys can never share one.
        "CREATE UNIQUE INDEX api_keys_hash ON api_keys (hash)",
        "CREATE INDEX api_keys_account ON api_keys (account_id, created)",
        """CREATE TABLE data_keys (
            id {key} PRIMARY KEY,
            kek TEXT NOT NULL,
            kek_version INTEGER NOT NULL,
            wrapped {blob} NOT NULL,
            created BIGINT NOT NULL
        )""",
        """CREATE TABLE payment_methods (
            id {key} PRIMARY KEY,
            account_id {key} NOT NULL REFERENCES accounts (id),
            livemode BOOLEAN NOT NULL,
            created BIGINT NOT NULL,
            data_key_id {key} NOT NULL REFERENCES data_keys (id),
            number_ct {blob} NOT NULL,
            brand TEXT NOT NULL,
            last4 TEXT NOT NULL,
            exp_month INTEGER NOT NULL,
            exp_year INTEGER NOT NULL,
            funding TEXT NOT NULL,
            fingerprint TEXT NOT NULL,
            name_ct {blob},
            metadata TEXT NOT NULL,
            billing_details TEXT NOT NULL,
            cvc_ct {blob},
            cvc_data_key_id {key} REFERENCES data_keys (id),
            cvc_expires BIGINT,
            cvc_check TEXT
        )""",
        # Listing is newest first, ties broken by id, always within one account and mode.
        """CREATE INDEX payment_methods_list
            ON payment_methods (account_id, livemode, created DESC, id DESC)""",
        # The CVC sweeper scans only the few rows that still hold a CVC.
        """CREATE INDEX payment_methods_cvc_expires
            ON payment_methods (cvc_expires) WHERE cvc_expires IS NOT NULL""",
        """CREATE TABLE idempotency_keys (
            account_id {key} NOT NULL,
            mode TEXT NOT NULL CHECK (mode IN ('test', 'live')),
            idempotency_key TEXT NOT NULL,
            request_hash TEXT NOT NULL,
            created BIGINT NOT NULL,
            response_status INTEGER,
            response_body TEXT,
            PRIMARY KEY (account_id, mode, idempotency_key)
        )""",
        "CREATE INDEX idempotency_keys_created ON idempotency_keys (created)",
    ),
)

_VAULT_2 = Migration(
    2,
    "forwarding requests",
    (
        """CREATE TABLE forwarding_requests (
            id {key} PRIMARY KEY,
            account_id {key} NOT NULL REFERENCES accounts (id),
            livemode BOOLEAN NOT NULL,
            created BIGINT NOT NULL,
            payment_method {key} NOT NULL,
            url TEXT NOT NULL,
            destination TEXT NOT NULL,
            replacements TEXT NOT NULL,
            metadata TEXT NOT NULL,
            request_context TEXT NOT NULL,
            request_details TEXT NOT NULL,
            response_details TEXT NOT NULL
        )""",
        """CREATE INDEX forwarding_requests_list
            ON forwarding_requests (account_id, livemode, created DESC, id DESC)""",
        "CREATE INDEX forwarding_requests_created ON forwarding_requests (created)",
    ),
)

#: The prefix of an idempotency key as the vault stores it since version 3: a keyed MAC
#: of the caller's header (the vault's ``stored_idempotency_key``), never the
#: header itself, which is the caller's text and may hold a card number.
STORED_IDEMPOTENCY_KEY_PREFIX = "ik_"  # the constant in _VAULT_3's statement, too

_VAULT_3 = Migration(
    3,
    "idempotency keys are stored as MACs; claims stored in the clear are dropped",
    (
        # Earlier versions stored the Idempotency-Key header verbatim, and an outside
        # tester stored a card number in the clear that way. Those rows cannot be
        # rewritten here (the MAC needs the account's key, held by the key service), so
        # they are dropped: a request sent before the upgrade and retried after it runs
        # again (docs/deploy.md: drain clients before this upgrade).
        "DELETE FROM idempotency_keys WHERE substr(idempotency_key, 1, 3) <> 'ik_'",
    ),
)

_VAULT_4 = Migration(
    4,
    "idempotency claims with an owner, a lease and their effect's id; forwards' outcome",
    (
        # A claim is held by one process (owner: the replica's name, boot: that start of
        # it, token: this hold) until lease_until; effect_id is the id of the object its
        # request creates, chosen when the key is claimed, so that a retry after a crash
        # or a lost acknowledgement looks that object up instead of making another.
        "ALTER TABLE idempotency_keys ADD COLUMN state TEXT NOT NULL DEFAULT 'claimed' "
        "CHECK (state IN ('claimed', 'done', 'unknown'))",
        "ALTER TABLE idempotency_keys ADD COLUMN owner TEXT",
        "ALTER TABLE idempotency_keys ADD COLUMN boot TEXT",
        "ALTER TABLE idempotency_keys ADD COLUMN token TEXT",
        "ALTER TABLE idempotency_keys ADD COLUMN lease_until BIGINT",
        "ALTER TABLE idempotency_keys ADD COLUMN effect_id TEXT",
        "UPDATE idempotency_keys SET state = 'done' WHERE response_status IS NOT NULL",
        # Claims of the release before: their requests died with it (the upgrade restarts
        # the vault) and they name no effect, so they are stale at once and the next
        # request with the key runs afresh.
        "UPDATE idempotency_keys SET token = 'v3', lease_until = 0",
        # The settler reads the few claims still held.
        """CREATE INDEX idempotency_keys_claimed
            ON idempotency_keys (lease_until) WHERE state = 'claimed'""",
        # A forward is stored before it leaves (pending) and completed after.
        "ALTER TABLE forwarding_requests ADD COLUMN outcome TEXT NOT NULL DEFAULT 'completed' "
        "CHECK (outcome IN ('pending', 'completed', 'unknown'))",
        """CREATE INDEX forwarding_requests_pending
            ON forwarding_requests (created) WHERE outcome = 'pending'""",
    ),
)

_VAULT_5 = Migration(
    5,
    "re-encryption jobs: one cursor per KEK; data keys counted by KEK version",
    (
        # One row per KEK whose stored data keys are being (or were last) moved to a
        # newer KEK version: the run, its target, and the last data key id it reached,
        # committed after every batch so that a stopped run resumes there.
        """CREATE TABLE key_jobs (
            kek {key} PRIMARY KEY,
            run_id TEXT NOT NULL,
            target_version INTEGER NOT NULL,
            cursor TEXT NOT NULL,
            moved BIGINT NOT NULL,
            started BIGINT NOT NULL,
            updated BIGINT NOT NULL,
            finished BIGINT
        )""",
        # Counting the keys still under each version, and finding the next batch.
        "CREATE INDEX data_keys_kek_version ON data_keys (kek, kek_version, id)",
    ),
)

_VAULT_6 = Migration(
    6,
    "re-encryption of card data: a run's date bound",
    (
        # A run that re-seals card data (``cardvault keys reencrypt --data``) moves every
        # ciphertext under a data key made before this time to a fresh data key; its
        # row is the KEK's name with ":data" (the cursor is then a payment method id).
        "ALTER TABLE key_jobs ADD COLUMN data_before BIGINT",
        # Cards of the current pass that can never be opened again (their data key's
        # version was destroyed, or the stored data fails authentication): counted, so
        # that the run ends instead of walking them again and again.
        "ALTER TABLE key_jobs ADD COLUMN skipped BIGINT NOT NULL DEFAULT 0",
    ),
)

_VAULT_7 = Migration(
    7,
    "bulk import: the import key, import jobs, their rows, external ids",
    (
        # The vault's OpenPGP import keys (``cardvault import-key create``): the secret
        # key as gpg exports it, protected by a passphrase that is itself sealed under a
        # ``pan`` data key (so the key opens only while keyd serves the vault).
        """CREATE TABLE import_keys (
            fingerprint {key} PRIMARY KEY,
            public_key TEXT NOT NULL,
            secret_key TEXT NOT NULL,
            data_key_id {key} NOT NULL REFERENCES data_keys (id),
            sealed_passphrase {blob} NOT NULL,
            created BIGINT NOT NULL
        )""",
        # One row per file imported into an account and mode (the id is derived from
        # both and the file's SHA-256): the cursor is the last row committed.
        """CREATE TABLE import_jobs (
            id {key} PRIMARY KEY,
            account_id {key} NOT NULL REFERENCES accounts (id),
            livemode BOOLEAN NOT NULL,
            file_sha256 TEXT NOT NULL,
            format TEXT NOT NULL,
            total_rows BIGINT NOT NULL,
            cursor BIGINT NOT NULL,
            imported BIGINT NOT NULL,
            duplicates BIGINT NOT NULL,
            already BIGINT NOT NULL,
            invalid BIGINT NOT NULL,
            reasons TEXT NOT NULL,
            started BIGINT NOT NULL,
            updated BIGINT NOT NULL,
            finished BIGINT
        )""",
        # What became of each row of a job: its payment method, or why it was refused
        # (the external id and detail hold no card number: the vault masks them).
        """CREATE TABLE import_rows (
            job_id {key} NOT NULL,
            row_number BIGINT NOT NULL,
            line BIGINT NOT NULL,
            external_id TEXT NOT NULL,
            pm_id {key},
            reason TEXT,
            detail TEXT,
            PRIMARY KEY (job_id, row_number)
        )""",
        # An external id names one card per account and mode, whichever file brought
        # it: the same file imported twice creates nothing twice.
        """CREATE TABLE import_links (
            account_id {key} NOT NULL,
            livemode BOOLEAN NOT NULL,
            external_id {key} NOT NULL,
            pm_id {key} NOT NULL,
            fingerprint TEXT NOT NULL,
            job_id {key} NOT NULL,
            PRIMARY KEY (account_id, livemode, external_id)
        )""",
        # Duplicates by fingerprint: is this card already in the account?
        """CREATE INDEX payment_methods_fingerprint
            ON payment_methods (account_id, livemode, fingerprint)""",
    ),
)

_VAULT_8 = Migration(
    8,
    "events (the outbox), webhook endpoints and their deliveries",
    (
        # An event is written in the transaction of the change it describes; its data
        # (the object as the API renders it, the cardholder's name included) is sealed
        # under a ``pan`` data key, like the card it describes.
        """CREATE TABLE events (
            id {key} PRIMARY KEY,
            account_id {key} NOT NULL,
            livemode BOOLEAN NOT NULL,
            created BIGINT NOT NULL,
            type TEXT NOT NULL,
            object_id TEXT NOT NULL,
            data_key_id {key} NOT NULL,
            data_ct {blob} NOT NULL,
            dispatched BOOLEAN NOT NULL
        )""",
        """CREATE INDEX events_list ON events (account_id, livemode, created DESC, id DESC)""",
        "CREATE INDEX events_created ON events (created)",
        # The delivery loop reads the few events whose deliveries are not made yet.
        "CREATE INDEX events_undispatched ON events (created) WHERE dispatched = FALSE",
        # The signing secret is stored only sealed under a ``pan`` data key.
        """CREATE TABLE webhook_endpoints (
            id {key} PRIMARY KEY,
            account_id {key} NOT NULL REFERENCES accounts (id),
            livemode BOOLEAN NOT NULL,
            created BIGINT NOT NULL,
            url TEXT NOT NULL,
            enabled_events TEXT NOT NULL,
            description TEXT,
            metadata TEXT NOT NULL,
            data_key_id {key} NOT NULL REFERENCES data_keys (id),
            secret_ct {blob} NOT NULL
        )""",
        """CREATE INDEX webhook_endpoints_list
            ON webhook_endpoints (account_id, livemode, created DESC, id DESC)""",
        # One row per event and endpoint; next_attempt and last_attempt are unix ms.
        """CREATE TABLE webhook_deliveries (
            id {key} PRIMARY KEY,
            account_id {key} NOT NULL,
            livemode BOOLEAN NOT NULL,
            endpoint_id {key} NOT NULL,
            event_id {key} NOT NULL,
            created BIGINT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('pending', 'succeeded', 'dead')),
            attempts INTEGER NOT NULL,
            next_attempt BIGINT,
            last_attempt BIGINT,
            last_status INTEGER,
            last_error TEXT
        )""",
        """CREATE INDEX webhook_deliveries_due
            ON webhook_deliveries (next_attempt) WHERE state = 'pending'""",
        """CREATE INDEX webhook_deliveries_endpoint
            ON webhook_deliveries (endpoint_id, created DESC, id DESC)""",
        "CREATE INDEX webhook_deliveries_created ON webhook_deliveries (created)",
    ),
)

#: The vault's schema, in the vault's database.
VAULT_SCHEMA = Schema(
    "vault",
    (_VAULT_1, _VAULT_2, _VAULT_3, _VAULT_4, _VAULT_5, _VAULT_6, _VAULT_7, _VAULT_8),
    lock=7302,
)


# -- the key service's database -------------------------------------------------------------

_KEYS_1 = Migration(
    1,
    "metadata, sealed KEKs, key settings, events",
    (
        # The key service's tables as its first release created them, to the letter,
        # IF NOT EXISTS included: an existing keyd database is version 1 as it stands,
        # and one whose version was never recorded runs them again harmlessly.
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE IF NOT EXISTS keks (
        name TEXT NOT NULL, version INTEGER NOT NULL, sealed {blob} NOT NULL,
        created BIGINT NOT NULL, PRIMARY KEY (name, version))""",
        """CREATE TABLE IF NOT EXISTS key_config (
        name TEXT PRIMARY KEY, min_decryption_version INTEGER NOT NULL)""",
        """CREATE TABLE IF NOT EXISTS events (
        id {rowid}, at BIGINT NOT NULL, actor TEXT NOT NULL,
        action TEXT NOT NULL, result TEXT NOT NULL, detail TEXT NOT NULL)""",
    ),
)

#: The key service's schema, in its own database.
KEY_SCHEMA = Schema("keys", (_KEYS_1,), lock=7301)
