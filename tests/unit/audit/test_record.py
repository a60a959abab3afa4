"""The record format: known-answer vectors, strict parsing, and what a record may hold."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cardvault.audit import record as record_module
from cardvault.audit import text as text_module
from cardvault.audit.log import AuditLog
from cardvault.audit.record import (
    GENESIS,
    AuditRecord,
    RecordInvalid,
    format_time,
    json_nesting_exceeds,
)
from cardvault.audit.signing import CHECKPOINT_CONTEXT, checkpoint_message
from cardvault.audit.text import check_entry

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


# --- the shortcuts taken on the hot path must change no outcome -----------------------


_ID_LIKE = st.from_regex(r"[a-z]{1,9}_[A-Za-z0-9_\- ]{6,34}", fullmatch=True)
_DIGIT_HEAVY = st.builds(
    lambda prefix, digits, sep: f"{prefix}_{sep.join(digits)}",
    st.sampled_from(["pm", "req", "fwdreq", "sk", "x"]),
    st.lists(st.text("0123456789", min_size=1, max_size=6), min_size=1, max_size=6),
    st.sampled_from(["", "-", "_", " "]),
)
_MARKED = st.builds(
    lambda a, m, b: a + m + b,
    st.text("abc_", max_size=3),
    st.sampled_from(["sk_live_", "rk_test_", "_sk_test_", "cvshare1-"]),
    st.text("abcXYZ0189", max_size=20),
)


def _outcome(check: Any, value: str) -> str | None:
    try:
        check("object", value)
    except ValueError as exc:
        return str(exc)
    return None


@settings(max_examples=500)
@given(st.one_of(_ID_LIKE, _DIGIT_HEAVY, _MARKED, st.text(max_size=48)))
def test_the_id_shortcut_refuses_exactly_what_the_full_check_refuses(value: str) -> None:
    assert _outcome(text_module._check_id, value) == _outcome(text_module._check_text, value)


def test_the_id_shortcut_still_finds_a_card_number_and_a_secret_prefix() -> None:
    pan = generated_card_number()
    glued = f"pm_{pan[:4]}-{pan[4:8]}-{pan[8:12]}-{pan[12:]}"
    with pytest.raises(ValueError, match="card number"):
        text_module._check_id("object", glued)
    with pytest.raises(ValueError, match="secret"):
        text_module._check_id("object", "x_sk_live_abcdefgh")


_TEXT = st.text(max_size=40)  # any text: quotes, backslashes, non-ASCII, controls
_DETAIL = st.dictionaries(
    st.from_regex(r"[a-z][a-z_]{0,10}", fullmatch=True) | _TEXT,
    st.one_of(st.none(), st.booleans(), st.integers(), _TEXT),
    max_size=5,
)


# seal() puts the hashed text and the line together from values encoded once; the
# reference is the module docstring's definition, json.dumps of the record.
@settings(max_examples=300)
@given(
    detail=_DETAIL,
    actor=st.text(min_size=1, max_size=20),
    seq=st.integers(min_value=1, max_value=2**63),
    origin=st.none() | _TEXT,
    object_id=st.none() | _TEXT,
    request_id=st.none() | _TEXT,
)
def test_the_line_made_at_sealing_is_the_line_of_the_record(
    detail: dict[str, Any],
    actor: str,
    seq: int,
    origin: str | None,
    object_id: str | None,
    request_id: str | None,
) -> None:
    sealed = AuditRecord.seal(
        seq=seq,
        time="2025-06-01T12:00:00.000000Z",
        actor=actor,
        origin=origin,
        action="vault.test",
        object_id=object_id,
        result="ok",
        request_id=request_id,
        detail=detail,
        prev=GENESIS,
    )
    expected = json.dumps(sealed.to_dict(), separators=(",", ":"), ensure_ascii=True)
    assert sealed.line() == expected.encode("ascii") + b"\n"
    parsed = AuditRecord.from_line(sealed.line())
    assert parsed == sealed
    assert parsed.line() == sealed.line()
    assert (
        sealed.hash
        == hashlib.sha256(
            json.dumps(
                {k: v for k, v in sealed.to_dict().items() if k != "hash"},
                sort_keys=True,
                separators=(",", ":"),
                ensure_ascii=True,
            ).encode("ascii")
        ).hexdigest()
    )


def test_now_text_writes_the_instant_as_format_time_does(monkeypatch: pytest.MonkeyPatch) -> None:
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    # Within one second (the second's text is reused), across seconds, days and years,
    # and at the first and last microsecond of a second.
    instants_us = [
        1_748_779_200_000_000,
        1_748_779_200_000_001,
        1_748_779_200_999_999,
        1_748_779_201_000_000,
        1_767_225_599_999_999,
        1_767_225_600_000_000,
        0,
        253_402_300_799_999_999,  # 9999-12-31T23:59:59.999999Z
        1_748_779_200_500_000,
    ]
    for us in instants_us:
        monkeypatch.setattr(record_module._time, "time_ns", lambda us=us: us * 1000 + 999)
        expected = format_time(epoch + dt.timedelta(microseconds=us))
        assert record_module.now_text() == expected


def test_an_audit_log_on_the_default_clock_writes_the_current_time(tmp_path: Path) -> None:
    async def main() -> AuditRecord:
        log = await AuditLog.open(tmp_path)
        record = await log.append(
            "vault.payment_method.create", actor="key_1", origin=None, object_id=None,
            result="ok", request_id=None,
        )  # fmt: skip
        await log.close()
        return record

    before = dt.datetime.now(dt.UTC)
    written = dt.datetime.strptime(asyncio.run(main()).time, "%Y-%m-%dT%H:%M:%S.%fZ")
    after = dt.datetime.now(dt.UTC)
    assert before <= written.replace(tzinfo=dt.UTC) <= after


# --- nesting: refused before the parser recurses -------------------------------------

DEEP_LINES = {
    "brackets": b"[" * 100_000,
    "closed-brackets": b"[" * 100_000 + b"]" * 100_000,
    "objects": b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    "in-detail": kat_record().line()[:-1].replace(b'"detail":{', b'"detail":{"x":' + b"[" * 5000),
    "mixed": b"[{" * 50_000,
}


@pytest.mark.parametrize("line", DEEP_LINES.values(), ids=DEEP_LINES.keys())
def test_from_line_refuses_deep_nesting_without_recursing(line: bytes) -> None:
    with pytest.raises(RecordInvalid, match="nested deeper than a record") as info:
        AuditRecord.from_line(line + b"\n")
    assert not info.value.edited


def test_brackets_inside_strings_are_not_nesting() -> None:
    sealed = AuditRecord.seal(
        seq=1, time="2025-06-01T12:00:00.000000Z", actor="a[{b", origin='[{"\\',
        action="vault.test", object_id="[" * 500, result="ok", request_id="]}]}",
        detail={"x": '{"[' * 100}, prev=GENESIS,
    )  # fmt: skip
    assert AuditRecord.from_line(sealed.line()) == sealed


@pytest.mark.parametrize(
    ("text", "depth"),
    [
        (b"", 0),
        (b"1", 0),
        (b"{}", 1),
        (b'{"a":[]}', 2),
        (b'{"a":"[[[[[["}', 1),
        (b'{"a":"\\"[[[[[["}', 1),  # an escaped quote does not end the string
        (b'{"a":"\\\\"}', 1),  # an escaped backslash does not escape the quote
        (b"[[[]]]", 3),
        (b"[[],[],[],[]]", 2),
        (b'["unterminated [[[[[[', 1),
    ],
)
def test_json_nesting_exceeds_counts_outside_strings(text: bytes, depth: int) -> None:
    assert not json_nesting_exceeds(text, depth)
    if depth:
        assert json_nesting_exceeds(text, depth - 1)


@settings(max_examples=300)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=10),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(st.text(max_size=5), children, max_size=3)
        ),
        max_leaves=20,
    )
)
def test_json_nesting_exceeds_agrees_with_the_depth_of_any_document(value: Any) -> None:
    def depth(v: Any) -> int:
        if isinstance(v, list):
            return 1 + max((depth(x) for x in v), default=0)
        if isinstance(v, dict):
            return 1 + max((depth(x) for x in v.values()), default=0)
        return 0

    text = json.dumps(value).encode()
    assert not json_nesting_exceeds(text, depth(value))
    if depth(value):
        assert json_nesting_exceeds(text, depth(value) - 1)
