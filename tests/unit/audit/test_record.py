"""The record format: known-answer vectors, strict parsing, and what a record may hold."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import Any

import pytest

from cardvault.audit.record import GENESIS, AuditRecord, RecordInvalid, check_entry
from cardvault.audit.signing import CHECKPOINT_CONTEXT, checkpoint_message

from ._support import generated_card_number

# Known-answer vector. Source: written out by hand from the format in
# cardvault/audit/record.py (canonical JSON = sorted keys, no spaces, ASCII); the hash
# is SHA-256 of that text, computed here with hashlib rather than by the code under test.
KAT_FIELDS: dict[str, Any] = {
    "seq": 1,
    "time": "2025-06-01T12:00:00.000000Z",
    "actor": "spiffe://cardvault/vault",
    "origin": "10.0.0.7",
    "action": "keyservice.datakey.unwrap",
    "object": "dk_1a2b3c",
    "result": "ok",
    "request_id": "req_x1",
    "detail": {"purpose": "pan", "kek_version": 3},
    "prev": GENESIS,
}
KAT_CANONICAL = (
    '{"action":"keyservice.datakey.unwrap","actor":"spiffe://cardvault/vault",'
    '"detail":{"kek_version":3,"purpose":"pan"},"object":"dk_1a2b3c","origin":"10.0.0.7",'
    '"prev":"0000000000000000000000000000000000000000000000000000000000000000",'
    '"request_id":"req_x1","result":"ok","seq":1,"time":"2025-06-01T12:00:00.000000Z"}'
)
KAT_HASH = hashlib.sha256(KAT_CANONICAL.encode("ascii")).hexdigest()


def kat_record() -> AuditRecord:
    f = KAT_FIELDS
    return AuditRecord.seal(
        seq=1,
        time=f["time"],
        actor=f["actor"],
        origin=f["origin"],
        action=f["action"],
        object_id=f["object"],
        result=f["result"],
        request_id=f["request_id"],
        detail=f["detail"],
        prev=GENESIS,
    )


def test_hash_is_sha256_of_the_canonical_json_without_hash() -> None:
    assert kat_record().hash == KAT_HASH


def test_line_lists_fields_in_order_with_sorted_detail() -> None:
    line = kat_record().line()
    assert (
        line
        == (
            '{"seq":1,"time":"2025-06-01T12:00:00.000000Z","actor":"spiffe://cardvault/vault",'
            '"origin":"10.0.0.7","action":"keyservice.datakey.unwrap","object":"dk_1a2b3c",'
            '"result":"ok","request_id":"req_x1","detail":{"kek_version":3,"purpose":"pan"},'
            f'"prev":"{GENESIS}","hash":"{KAT_HASH}"}}\n'
        ).encode()
    )
    assert AuditRecord.from_line(line) == kat_record()


def test_checkpoint_message_layout() -> None:
    head = "ab" * 32
    assert CHECKPOINT_CONTEXT == b"cardvault audit checkpoint v1\x00"
    assert checkpoint_message(head, 258) == CHECKPOINT_CONTEXT + b"\xab" * 32 + bytes(
        [0, 0, 0, 0, 0, 0, 1, 2]
    )


def test_from_line_reports_a_changed_value_as_edited() -> None:
    line = kat_record().line().replace(b'"result":"ok"', b'"result":"no"')
    with pytest.raises(RecordInvalid) as info:
        AuditRecord.from_line(line)
    assert info.value.edited


def test_from_line_reports_reformatted_text_as_edited() -> None:
    value = json.loads(kat_record().line())
    with pytest.raises(RecordInvalid) as info:
        AuditRecord.from_line(json.dumps(value).encode())  # same content, with spaces
    assert info.value.edited


@pytest.mark.parametrize(
    "mutate",
    [
        lambda v: {**v, "extra": 1},
        lambda v: {k: x for k, x in v.items() if k != "actor"},
        lambda v: {**v, "seq": "1"},
        lambda v: {**v, "seq": 0},
        lambda v: {**v, "detail": {"x": 1.5}},
        lambda v: {**v, "detail": {"x": {"nested": 1}}},
        lambda v: {**v, "prev": "XYZ"},
        lambda v: {**v, "time": "yesterday"},
        lambda v: [v],
    ],
    ids=["extra", "missing", "seq-str", "seq-zero", "float", "nested", "prev", "time", "list"],
)
def test_from_line_rejects_what_is_not_a_record(mutate: object) -> None:
    value = json.loads(kat_record().line())
    bad = mutate(value)  # type: ignore[operator]
    with pytest.raises(RecordInvalid) as info:
        AuditRecord.from_line(json.dumps(bad, separators=(",", ":")).encode())
    assert not info.value.edited


def test_from_line_rejects_duplicate_keys() -> None:
    line = kat_record().line().replace(b'{"seq":1,', b'{"seq":1,"seq":1,')
    with pytest.raises(RecordInvalid):
        AuditRecord.from_line(line)


# --- what a record may hold -------------------------------------------------------------

OK = {
    "action": "vault.payment_method.create",
    "actor": "key_abc123",
    "origin": "127.0.0.1",
    "object_id": "pm_abc",
    "result": "ok",
    "request_id": "req_abc",
    "detail": {"livemode": False, "count": 3, "brand": "visa", "last4": "4242", "note": None},
}


def test_check_entry_accepts_ordinary_values() -> None:
    check_entry(**OK)  # type: ignore[arg-type]


def _secret_values() -> list[tuple[str, object]]:
    card = generated_card_number()
    spaced = " ".join(card[i : i + 4] for i in range(0, 16, 4))
    key = os.urandom(32)
    return [
        ("card", card),
        ("card-spaced", spaced),
        ("card-dashed", spaced.replace(" ", "-")),
        ("card-in-text", f"failed for {card} today"),
        ("card-int", int(card)),
        ("hex-key", key.hex()),
        ("base64-key", base64.b64encode(key + b"\x00\x01").decode()),
        ("base64url-key", base64.urlsafe_b64encode(key).decode().rstrip("=")),
        ("api-secret", "sk_live_" + base64.urlsafe_b64encode(key[:12]).decode()),
        ("share", "cvshare1-abc-2-1-xyz"),
        ("pem", "-----BEGIN PRIVATE KEY-----"),
        ("control", "two\nlines"),
        ("long", "x" * 600),
    ]


SECRETS = _secret_values()


CASES = [
    (field, what, value)
    for what, value in SECRETS
    for field in ("actor", "origin", "object_id", "request_id", "detail")
    if isinstance(value, str) or field == "detail"  # integers go in detail only
]


@pytest.mark.parametrize(
    ("field", "what", "value"), CASES, ids=[f"{c[1]}-in-{c[0]}" for c in CASES]
)
def test_check_entry_refuses_card_data_and_key_material(
    field: str, what: str, value: object
) -> None:
    fields: dict[str, object] = dict(OK)
    if field == "detail":
        fields["detail"] = {"info": value}
    else:
        fields[field] = value
    with pytest.raises(ValueError) as info:
        check_entry(**fields)  # type: ignore[arg-type]
    # The message names the field, never the value.
    assert str(value) not in str(info.value)


@pytest.mark.parametrize(
    "key", ["cvc", "card_number", "number", "pan", "secret_key", "password", "unseal_share"]
)
def test_check_entry_refuses_detail_keys_that_name_card_data_or_secrets(key: str) -> None:
    with pytest.raises(ValueError, match="names card data or a secret"):
        check_entry(**{**OK, "detail": {key: "123"}})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "change",
    [
        {"action": "audit.checkpoint"},
        {"action": "Vault Create"},
        {"result": "OK!"},
        {"actor": ""},
        {"detail": {"ratio": 0.5}},
        {"detail": {"nested": {"a": 1}}},
        {"detail": {"Bad-Key": 1}},
        {"detail": {f"k{i}": i for i in range(40)}},
    ],
    ids=["reserved", "action", "result", "actor", "float", "nested", "key", "too-many"],
)
def test_check_entry_refuses_malformed_fields(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        check_entry(**{**OK, **change})  # type: ignore[arg-type]
