"""The vault store's schema: one ordered list of migrations that both backends run.

A migration is a list of statements written once, with ``{blob}`` and ``{key}`` standing
for the two column types the dialects spell differently (:func:`render`). The
``schema_version`` table holds one row per applied migration; ``migrate()`` in each
backend takes a lock (SQLite ``BEGIN IMMEDIATE``, PostgreSQL ``pg_advisory_xact_lock``),
reads the newest version, and applies the missing ones in the same transaction, so it is
idempotent and safe to run from several processes at once.

Never edit a migration that has shipped: append a new one.

This module also names the columns each record is stored in and converts between rows
and records, so the SQLite and PostgreSQL stores cannot drift apart.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

from cardvault.storage.base import (
    Account,
    ApiKey,
    DataKeyRecord,
    ForwardingRequestRecord,
    IdempotencyRecord,
    Mode,
    PaymentMethodRecord,
)

__all__ = [
    "ACCOUNT_COLUMNS",
    "API_KEY_COLUMNS",
    "DATA_KEY_COLUMNS",
    "FORWARDING_COLUMNS",
    "IDEMPOTENCY_COLUMNS",
    "MIGRATIONS",
    "PAYMENT_METHOD_COLUMNS",
    "SCHEMA_VERSION_TABLE",
    "STORED_IDEMPOTENCY_KEY_PREFIX",
    "Dialect",
    "Migration",
    "latest_version",
    "render",
]

Dialect = Literal["sqlite", "postgresql"]

_TYPES: dict[Dialect, dict[str, str]] = {
    "sqlite": {"blob": "BLOB", "key": "TEXT"},
    # Ids are compared bytewise in both databases: list order breaks ties on the id,
    # and PostgreSQL's default collation would otherwise sort "pm_a" before "pm_B"
    # where SQLite sorts it after.
    "postgresql": {"blob": "BYTEA", "key": 'TEXT COLLATE "C"'},
}


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


SCHEMA_VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_version (
    version INTEGER PRIMARY KEY,
    applied BIGINT NOT NULL
)"""

_V1 = Migration(
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

_V2 = Migration(
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
#: of the caller's header (see cardvault.vault.api.stored_idempotency_key), never the
#: header itself, which is the caller's text and may hold a card number.
STORED_IDEMPOTENCY_KEY_PREFIX = "ik_"  # the constant in _V3's statement, too

_V3 = Migration(
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

#: Every migration, oldest first; ``version`` is its position, counting from 1.
MIGRATIONS: tuple[Migration, ...] = (_V1, _V2, _V3)


def latest_version() -> int:
    return MIGRATIONS[-1].version


def render(statement: str, dialect: Dialect) -> str:
    """``statement`` in ``dialect``: the type placeholders filled in."""
    return statement.format(**_TYPES[dialect])


# -- rows and records ---------------------------------------------------------------------

ACCOUNT_COLUMNS = ("id", "name", "created", "allowed_origins")
API_KEY_COLUMNS = ("id", "account_id", "kind", "mode", "prefix", "hash", "created", "revoked")
DATA_KEY_COLUMNS = ("id", "kek", "kek_version", "wrapped", "created")
PAYMENT_METHOD_COLUMNS = (
    "id",
    "account_id",
    "livemode",
    "created",
    "data_key_id",
    "number_ct",
    "brand",
    "last4",
    "exp_month",
    "exp_year",
    "funding",
    "fingerprint",
    "name_ct",
    "metadata",
    "billing_details",
    "cvc_ct",
    "cvc_data_key_id",
    "cvc_expires",
    "cvc_check",
)
FORWARDING_COLUMNS = (
    "id",
    "account_id",
    "livemode",
    "created",
    "payment_method",
    "url",
    "destination",
    "replacements",
    "metadata",
    "request_context",
    "request_details",
    "response_details",
)
IDEMPOTENCY_COLUMNS = (
    "account_id",
    "mode",
    "idempotency_key",
    "request_hash",
    "created",
    "response_status",
    "response_body",
)


_JSON = json.JSONEncoder(separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def _json(value: object) -> str:
    if type(value) is dict and not value:
        return "{}"  # most rows' metadata and billing details
    return _JSON.encode(value)


def _opt_bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def account_params(a: Account) -> tuple[Any, ...]:
    return (a.id, a.name, a.created, _json(list(a.allowed_origins)))


def account_from_row(r: Sequence[Any]) -> Account:
    return Account(str(r[0]), str(r[1]), int(r[2]), tuple(json.loads(r[3])))


def api_key_params(k: ApiKey) -> tuple[Any, ...]:
    return (k.id, k.account_id, k.kind, k.mode, k.prefix, k.hash, k.created, k.revoked)


def api_key_from_row(r: Sequence[Any]) -> ApiKey:
    return ApiKey(
        id=str(r[0]),
        account_id=str(r[1]),
        kind=cast(Literal["publishable", "secret"], r[2]),
        mode=cast(Mode, r[3]),
        prefix=str(r[4]),
        hash=str(r[5]),
        created=int(r[6]),
        revoked=_opt_int(r[7]),
    )


def data_key_params(d: DataKeyRecord) -> tuple[Any, ...]:
    return (d.id, d.kek, d.kek_version, d.wrapped, d.created)


def data_key_from_row(r: Sequence[Any]) -> DataKeyRecord:
    return DataKeyRecord(str(r[0]), str(r[1]), int(r[2]), bytes(r[3]), int(r[4]))


def payment_method_params(p: PaymentMethodRecord) -> tuple[Any, ...]:
    return (
        p.id,
        p.account_id,
        bool(p.livemode),
        p.created,
        p.data_key_id,
        p.number_ct,
        p.brand,
        p.last4,
        p.exp_month,
        p.exp_year,
        p.funding,
        p.fingerprint,
        p.name_ct,
        _json(p.metadata),
        _json(p.billing_details),
        p.cvc_ct,
        p.cvc_data_key_id,
        p.cvc_expires,
        p.cvc_check,
    )


def payment_method_from_row(r: Sequence[Any]) -> PaymentMethodRecord:
    return PaymentMethodRecord(
        id=str(r[0]),
        account_id=str(r[1]),
        livemode=bool(r[2]),
        created=int(r[3]),
        data_key_id=str(r[4]),
        number_ct=bytes(r[5]),
        brand=str(r[6]),
        last4=str(r[7]),
        exp_month=int(r[8]),
        exp_year=int(r[9]),
        funding=str(r[10]),
        fingerprint=str(r[11]),
        name_ct=_opt_bytes(r[12]),
        metadata=json.loads(r[13]),
        billing_details=json.loads(r[14]),
        cvc_ct=_opt_bytes(r[15]),
        cvc_data_key_id=None if r[16] is None else str(r[16]),
        cvc_expires=_opt_int(r[17]),
        cvc_check=None if r[18] is None else str(r[18]),
    )


def idempotency_params(i: IdempotencyRecord) -> tuple[Any, ...]:
    return (
        i.account_id,
        i.mode,
        i.key,
        i.request_hash,
        i.created,
        i.response_status,
        i.response_body,
    )


def idempotency_from_row(r: Sequence[Any]) -> IdempotencyRecord:
    return IdempotencyRecord(
        account_id=str(r[0]),
        mode=cast(Mode, r[1]),
        key=str(r[2]),
        request_hash=str(r[3]),
        created=int(r[4]),
        response_status=_opt_int(r[5]),
        response_body=None if r[6] is None else str(r[6]),
    )


def forwarding_params(f: ForwardingRequestRecord) -> tuple[Any, ...]:
    return (
        f.id,
        f.account_id,
        bool(f.livemode),
        f.created,
        f.payment_method,
        f.url,
        f.destination,
        _json(f.replacements),
        _json(f.metadata),
        _json(f.request_context),
        _json(f.request_details),
        _json(f.response_details),
    )


def forwarding_from_row(r: Sequence[Any]) -> ForwardingRequestRecord:
    return ForwardingRequestRecord(
        id=str(r[0]),
        account_id=str(r[1]),
        livemode=bool(r[2]),
        created=int(r[3]),
        payment_method=str(r[4]),
        url=str(r[5]),
        destination=str(r[6]),
        replacements=list(json.loads(r[7])),
        metadata=dict(json.loads(r[8])),
        request_context=dict(json.loads(r[9])),
        request_details=dict(json.loads(r[10])),
        response_details=dict(json.loads(r[11])),
    )
