"""Rows and records: the columns each record is stored in, and the conversions both ways.

Written once for both backends, so the SQLite and PostgreSQL stores cannot drift apart.
Column and table names here are constants; SQL is built from them, never from input.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Literal, cast

import orjson

from cardvault.storage._shared import column_list, insert_sql
from cardvault.storage.base import (
    Account,
    ApiKey,
    DataKeyRecord,
    ForwardingRequestRecord,
    IdempotencyRecord,
    Mode,
    PaymentMethodRecord,
    StoredKek,
)


def select(table: str, columns: tuple[str, ...]) -> str:
    """``SELECT <columns> FROM <table>``, from constants of this module only."""
    return f"SELECT {column_list(columns)} FROM {table}"  # noqa: S608 (constants)


# -- the vault's records --------------------------------------------------------------------

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
    "outcome",
)
IDEMPOTENCY_COLUMNS = (
    "account_id",
    "mode",
    "idempotency_key",
    "request_hash",
    "created",
    "response_status",
    "response_body",
    "state",
    "owner",
    "boot",
    "token",
    "lease_until",
    "effect_id",
)


SELECT_ACCOUNT = select("accounts", ACCOUNT_COLUMNS)
SELECT_API_KEY = select("api_keys", API_KEY_COLUMNS)
SELECT_DATA_KEY = select("data_keys", DATA_KEY_COLUMNS)
SELECT_PAYMENT_METHOD = select("payment_methods", PAYMENT_METHOD_COLUMNS)
SELECT_FORWARDING = select("forwarding_requests", FORWARDING_COLUMNS)
SELECT_IDEMPOTENCY = select("idempotency_keys", IDEMPOTENCY_COLUMNS)

# -- the vault's statements of idempotency claims and forwards, written once --------------
#
# In SQLite's placeholders; the PostgreSQL store numbers them
# (cardvault.storage.postgres.pool.numbered).

#: Compare and set: a claimed record's holder, lease, request and effect, if its token
#: is still the one the caller saw.
TAKE_OVER_IDEMPOTENCY = (
    "UPDATE idempotency_keys SET request_hash = ?, owner = ?, boot = ?, token = ?, "
    "lease_until = ?, effect_id = ? "
    "WHERE account_id = ? AND mode = ? AND idempotency_key = ? "
    "AND token = ? AND state = 'claimed'"
)
COMPLETE_IDEMPOTENCY = (
    "UPDATE idempotency_keys SET state = ?, response_status = ?, response_body = ? "
    "WHERE account_id = ? AND mode = ? AND idempotency_key = ?"
)
#: As COMPLETE_IDEMPOTENCY, by the claim's holder only.
COMPLETE_HELD_IDEMPOTENCY = COMPLETE_IDEMPOTENCY + " AND token = ? AND state = 'claimed'"
RELEASE_IDEMPOTENCY = (
    "DELETE FROM idempotency_keys WHERE account_id = ? AND mode = ? AND idempotency_key = ?"
)
RELEASE_HELD_IDEMPOTENCY = RELEASE_IDEMPOTENCY + " AND token = ?"
#: Claims whose lease ran out, or held by this owner under another boot.
STALE_IDEMPOTENCY_CLAIMS = SELECT_IDEMPOTENCY + (
    " WHERE state = 'claimed' AND (lease_until <= ? OR (owner = ? AND boot <> ?))"
    " ORDER BY lease_until LIMIT ?"
)

COMPLETE_FORWARD = (
    "UPDATE forwarding_requests SET outcome = ?, request_context = ?, response_details = ? "
    "WHERE id = ? AND account_id = ? AND livemode = ? AND outcome = 'pending'"
)
DELETE_PENDING_FORWARD = (
    "DELETE FROM forwarding_requests "
    "WHERE id = ? AND account_id = ? AND livemode = ? AND outcome = 'pending'"
)
PENDING_FORWARDS = SELECT_FORWARDING + (
    " WHERE outcome = 'pending' AND created < ? ORDER BY created LIMIT ?"
)
#: A CVC put back as it was taken, into a payment method that holds none.
RESTORE_CVC = (
    "UPDATE payment_methods SET cvc_ct = ?, cvc_data_key_id = ?, cvc_expires = ? "
    "WHERE id = ? AND account_id = ? AND livemode = ? AND cvc_ct IS NULL"
)


_JSON = json.JSONEncoder(separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def _json(value: object) -> str:
    """``value`` as compact JSON with sorted keys: what the standard library's encoder
    above writes, by orjson (several times faster: a forward stores seven of these); by
    the standard library for what orjson refuses (keys that are not strings, integers
    past 64 bits, text that is not valid Unicode, which the store then refuses)."""
    if type(value) is dict and not value:
        return "{}"  # most rows' metadata and billing details
    try:
        return orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        return _JSON.encode(value)


def _opt_bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def origins_param(origins: Sequence[str]) -> str:
    """How an account's allowed origins are stored: a JSON list, in their order."""
    return _json(list(origins))


def account_params(a: Account) -> tuple[Any, ...]:
    return (a.id, a.name, a.created, origins_param(a.allowed_origins))


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
        i.state,
        i.owner,
        i.boot,
        i.token,
        i.lease_until,
        i.effect_id,
    )


def idempotency_from_row(r: Sequence[Any]) -> IdempotencyRecord:
    return IdempotencyRecord(
        account_id=str(r[0]),
        mode=cast(Mode, r[1]),
        key=str(r[2]),
        request_hash=str(r[3]),
        created=int(r[4]),
        response_status=_opt_int(r[5]),
        response_body=_opt_str(r[6]),
        state=str(r[7]),
        owner=_opt_str(r[8]),
        boot=_opt_str(r[9]),
        token=_opt_str(r[10]),
        lease_until=_opt_int(r[11]),
        effect_id=_opt_str(r[12]),
    )


def take_over_params(i: IdempotencyRecord, expected_token: str) -> tuple[Any, ...]:
    """TAKE_OVER_IDEMPOTENCY's parameters."""
    return (
        i.request_hash,
        i.owner,
        i.boot,
        i.token,
        i.lease_until,
        i.effect_id,
        i.account_id,
        i.mode,
        i.key,
        expected_token,
    )


def forward_outcome_params(
    account_id: str,
    livemode: bool,
    fwd_id: str,
    outcome: str,
    request_context: dict[str, object] | None,
    response_details: dict[str, object] | None,
) -> tuple[Any, ...]:
    """COMPLETE_FORWARD's parameters."""
    return (
        outcome,
        _json(request_context or {}),
        _json(response_details or {}),
        fwd_id,
        account_id,
        bool(livemode),
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
        f.outcome,
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
        outcome=str(r[12]),
    )


# -- the key service's records and statements ----------------------------------------------
#
# Every statement of the key store, written once in SQLite's placeholders; the PostgreSQL
# store numbers them (cardvault.storage.postgres.pool.numbered).

KEK_COLUMNS = ("name", "version", "sealed", "created")
EVENT_COLUMNS = ("at", "actor", "action", "result", "detail")

SELECT_META = "SELECT value FROM meta WHERE key = ?"
UPSERT_META = (
    "INSERT INTO meta (key, value) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)
INSERT_KEK = insert_sql("keks", KEK_COLUMNS)
SELECT_KEKS = select("keks", KEK_COLUMNS) + " ORDER BY name, version"
DELETE_KEK = "DELETE FROM keks WHERE name = ? AND version = ?"
UPDATE_KEK_SEALED = "UPDATE keks SET sealed = ? WHERE name = ? AND version = ?"
UPSERT_MIN_DECRYPTION_VERSION = (
    "INSERT INTO key_config (name, min_decryption_version) VALUES (?, ?) "
    "ON CONFLICT (name) DO UPDATE SET min_decryption_version = excluded.min_decryption_version"
)
SELECT_MIN_DECRYPTION_VERSIONS = "SELECT name, min_decryption_version FROM key_config"
INSERT_EVENT = insert_sql("events", EVENT_COLUMNS)
SELECT_EVENTS = select("events", EVENT_COLUMNS) + " ORDER BY id"


def kek_params(k: StoredKek) -> tuple[Any, ...]:
    return (k.name, k.version, k.sealed, k.created)


def kek_from_row(r: Sequence[Any]) -> StoredKek:
    return StoredKek(str(r[0]), int(r[1]), bytes(r[2]), int(r[3]))


def event_params(actor: str, action: str, result: str, detail: str) -> tuple[Any, ...]:
    """An event as it is stored, stamped now (unix milliseconds)."""
    return (int(time.time() * 1000), actor, action, result, detail)


def event_from_row(r: Sequence[Any]) -> dict[str, Any]:
    at, actor, action, result, detail = r
    return {
        "at": int(at),
        "actor": str(actor),
        "action": str(action),
        "result": str(result),
        "detail": str(detail),
    }
