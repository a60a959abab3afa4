"""The audit record: its fields, its hash, its line on disk, and what it may hold.

One record is one line of ``audit.jsonl``::

    {"seq":12,"time":"2025-06-01T12:00:00.000000Z","actor":"spiffe://cardvault/vault",
     "origin":"10.0.0.7","action":"keyservice.datakey.unwrap","object":"dk_1a2b",
     "result":"ok","request_id":"req_x1","detail":{"kek_version":3},
     "prev":"<64 hex>","hash":"<64 hex>"}

(one line on disk; wrapped here). ``seq`` counts from 1 with no gap, so in an untouched
log it equals the line number. ``prev`` is the ``hash`` of the record before (64 zeros
for the first record). ``hash`` is the lower-case hex SHA-256 of the *canonical JSON* of
the record without ``hash``: keys sorted, no spaces, ASCII only (``json.dumps(record,
sort_keys=True, separators=(",", ":"), ensure_ascii=True)``). Values are strings,
integers, booleans and ``null`` only, never floats, so the canonical form is exact.

The line itself is the record with its keys in the order above (``detail`` sorted), with
no spaces, ASCII only, and a newline. A reader must find exactly this text: a line that
parses to the same record but is written differently was rewritten by someone else.

What a record may hold (checked by :func:`check_entry` before anything is written; a
violation raises :class:`ValueError`, since it is a programming error in the caller):

* no card number: every string, and every integer written out, is searched with
  :func:`cardvault.cards.find_card_numbers` (13–19 Luhn-valid digits, spaces or dashes
  allowed);
* nothing that looks like key material or a secret: a run of 40 or more hex digits, a run
  of 40 or more base64/base64url characters mixing upper case, lower case and digits,
  an API secret key (``sk_live_`` …), an unseal share (``cvshare1-``) or a PEM block.
  Log a short key id or fingerprint (at most 39 characters) instead of a digest or key;
* no ``detail`` key whose name says it holds card data or a secret (``cvc``, ``pan``,
  ``number``, ``secret``, ``password``, ``share`` …), since a CVC cannot be recognised
  by its shape;
* plain text only: no control characters, at most :data:`MAX_TEXT` characters per value,
  at most :data:`MAX_DETAIL` detail entries, ``action`` and ``result`` in lower-case
  dotted identifier form (``vault.payment_method.create``, ``ok``, ``denied``).

Text the service did not choose (a request's path, a key name, a derivation context, a
file name given on the command line) goes through :func:`untrusted_text` first: it
replaces whatever the checks above refuse, so that recording it can never fail — above
all the record of a refused request.

Reading a line refuses nesting deeper than a record's (the object and its ``detail``)
before the JSON parser sees it (:func:`json_nesting_exceeds`), so a tampered line of
100,000 ``[`` is a :class:`RecordInvalid` like any other, not a ``RecursionError``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import time as _time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from cardvault.cards.luhn import PAN_MIN_DIGITS, holds_card_number, redact_card_numbers

__all__ = [
    "CHECKPOINT_ACTION",
    "FIELDS",
    "GENESIS",
    "MAX_DETAIL",
    "MAX_TEXT",
    "RECORD_DEPTH",
    "AuditRecord",
    "DetailValue",
    "RecordInvalid",
    "canonical_json",
    "check_entry",
    "format_time",
    "json_nesting_exceeds",
    "now_text",
    "record_hash",
    "untrusted_text",
]

#: The ``prev`` of the first record.
GENESIS: Final = "0" * 64
#: The action of the signature records the log writes itself.
CHECKPOINT_ACTION: Final = "audit.checkpoint"
#: The keys of a record, in the order its line lists them.
FIELDS: Final = (
    "seq",
    "time",
    "actor",
    "origin",
    "action",
    "object",
    "result",
    "request_id",
    "detail",
    "prev",
    "hash",
)
#: Longest string value. Audit records name things; they do not carry payloads.
MAX_TEXT: Final = 512
#: Most entries in ``detail``.
MAX_DETAIL: Final = 32
#: How deep a record's JSON nests: the record object, and ``detail`` inside it.
RECORD_DEPTH: Final = 2

DetailValue = str | int | bool | None

_HEX64 = re.compile(r"[0-9a-f]{64}")
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")
_ACTION = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*")
_RESULT = re.compile(r"[a-z][a-z0-9_]*")
_DETAIL_KEY = re.compile(r"[a-z][a-z0-9_]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Key material, by shape. A 128-bit key is 32 hex digits or 22 base64 characters, so
# these miss short keys; they exist to catch the common mistake of logging a whole key,
# token or digest. 40 characters leaves room for ids, key ids and short fingerprints.
_HEX_RUN = re.compile(r"[0-9a-fA-F]{40,}")
_B64_RUN = re.compile(r"[A-Za-z0-9+/_=-]{40,}")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_SECRET_MARKERS = re.compile(
    r"(?:^|[^A-Za-z0-9])(?:sk|rk)_(?:live|test)_|cvshare1-|-----BEGIN|PRIVATE KEY", re.IGNORECASE
)
# Detail keys that name card data or secrets. A CVC is three digits and cannot be told
# from any other number, so the name is all there is to refuse it by.
_SENSITIVE_KEY_PARTS = frozenset(
    {
        "cvc",
        "cvc2",
        "cvv",
        "cvv2",
        "csc",
        "cid",
        "pan",
        "number",
        "track",
        "pin",
        "secret",
        "password",
        "passphrase",
        "passwd",
        "share",
        "plaintext",
        "private",
        "material",
        "token",
    }
)

_EMPTY: Mapping[str, DetailValue] = MappingProxyType({})


class RecordInvalid(ValueError):
    """A line that is not a valid record. ``edited`` tells a hash mismatch from garbage."""

    def __init__(self, message: str, *, edited: bool = False) -> None:
        super().__init__(message)
        self.edited = edited


# One encoder of each kind, made once: ``json.dumps`` with options builds a new encoder
# on every call. The output is exactly ``json.dumps``'s with the same options.
_CANONICAL = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
)
_COMPACT = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)
#: A str as those encoders write it (their own function: the C one where there is one).
_quote = json.encoder.encode_basestring_ascii


def _json_value(value: Any) -> str:
    """One value as :data:`_CANONICAL` and :data:`_COMPACT` encode it (they agree on
    single values: ASCII only, no spaces)."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if type(value) is str:
        return _quote(value)
    if type(value) is int:
        return int.__repr__(value)
    return _CANONICAL.encode(value)


def canonical_json(value: Mapping[str, Any]) -> bytes:
    """The canonical JSON the hash is computed over (see module docstring)."""
    return _CANONICAL.encode(value).encode("ascii")


def record_hash(fields: Mapping[str, Any]) -> str:
    """SHA-256 hex of the canonical JSON of ``fields`` without ``hash``."""
    body = {k: v for k, v in fields.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body)).hexdigest()


def format_time(moment: dt.datetime) -> str:
    """``2025-06-01T12:00:00.000000Z`` for an aware ``datetime`` (converted to UTC)."""
    if not isinstance(moment, dt.datetime) or moment.tzinfo is None:
        raise ValueError("the audit clock must return an aware datetime")
    # isoformat (C, and a four-digit year always) ends in "+00:00" for UTC.
    return moment.astimezone(dt.UTC).isoformat(timespec="microseconds")[:-6] + "Z"


#: (second, its text) of the last call to :func:`now_text`.
_LAST_SECOND: tuple[int, str] = (-1, "")


def now_text() -> str:
    """The current UTC time as :func:`format_time` writes it, from ``time.time_ns()``:
    the text of the second is made once per second, the microseconds on each call
    (a third of the cost of ``format_time(datetime.now(UTC))``)."""
    global _LAST_SECOND
    second, micro = divmod(_time.time_ns() // 1000, 1_000_000)
    last, text = _LAST_SECOND
    if second != last:
        text = format_time(dt.datetime.fromtimestamp(second, dt.UTC))[:-8]
        _LAST_SECOND = (second, text)
    return f"{text}.{micro:06d}Z"


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One record of the chain, as written. ``object_id`` is the ``object`` field."""

    seq: int
    time: str
    actor: str
    origin: str | None
    action: str
    object_id: str | None
    result: str
    request_id: str | None
    detail: Mapping[str, DetailValue]
    prev: str
    hash: str
    #: The line as :meth:`seal` wrote it (None for a parsed record: made on demand).
    _line: bytes | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def seal(
        cls,
        *,
        seq: int,
        time: str,
        actor: str,
        origin: str | None,
        action: str,
        object_id: str | None,
        result: str,
        request_id: str | None,
        detail: Mapping[str, DetailValue],
        prev: str,
    ) -> AuditRecord:
        """The record with these fields and its hash computed.

        Each value is JSON-encoded once and the two texts, the canonical one the hash
        covers and the line, are put together from the same pieces: exactly what
        :func:`canonical_json` and the line's encoder produce (a property test holds
        them together), at a fraction of the cost of encoding the record twice."""
        ordered = dict(sorted(detail.items()))
        j_seq, j_time, j_actor = _json_value(seq), _json_value(time), _json_value(actor)
        j_origin, j_action = _json_value(origin), _json_value(action)
        j_object, j_result = _json_value(object_id), _json_value(result)
        j_request, j_prev = _json_value(request_id), _json_value(prev)
        j_detail = (
            "{" + ",".join([_quote(k) + ":" + _json_value(v) for k, v in ordered.items()]) + "}"
        )
        canonical = (
            f'{{"action":{j_action},"actor":{j_actor},"detail":{j_detail},"object":{j_object},'
            f'"origin":{j_origin},"prev":{j_prev},"request_id":{j_request},"result":{j_result},'
            f'"seq":{j_seq},"time":{j_time}}}'
        )
        digest = hashlib.sha256(canonical.encode("ascii")).hexdigest()
        record = cls(
            seq, time, actor, origin, action, object_id, result, request_id,
            MappingProxyType(ordered), prev, digest,
        )  # fmt: skip
        line = (
            f'{{"seq":{j_seq},"time":{j_time},"actor":{j_actor},"origin":{j_origin},'
            f'"action":{j_action},"object":{j_object},"result":{j_result},'
            f'"request_id":{j_request},"detail":{j_detail},"prev":{j_prev},"hash":"{digest}"}}\n'
        )
        object.__setattr__(record, "_line", line.encode("ascii"))
        return record

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON object, keys in :data:`FIELDS` order."""
        return {
            "seq": self.seq,
            "time": self.time,
            "actor": self.actor,
            "origin": self.origin,
            "action": self.action,
            "object": self.object_id,
            "result": self.result,
            "request_id": self.request_id,
            "detail": dict(sorted(self.detail.items())),
            "prev": self.prev,
            "hash": self.hash,
        }

    def line(self) -> bytes:
        """The record's line in the log, newline included."""
        if self._line is not None:
            return self._line
        return _COMPACT.encode(self.to_dict()).encode("ascii") + b"\n"

    @property
    def is_checkpoint(self) -> bool:
        return self.action == CHECKPOINT_ACTION

    @classmethod
    def from_line(cls, raw: bytes) -> AuditRecord:
        """Parse and check one line (with or without its newline).

        Raises :class:`RecordInvalid`: with ``edited=True`` when the line is a
        well-formed record whose hash does not match its content or whose text is not
        the one the log writes; with ``edited=False`` when it is not a record at all.
        """
        body = raw[:-1] if raw.endswith(b"\n") else raw
        if json_nesting_exceeds(body, RECORD_DEPTH):
            raise RecordInvalid("not a record: nested deeper than a record can be")
        try:
            value = json.loads(body, object_pairs_hook=_no_duplicates)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            # (RecursionError: UTF-16 or UTF-32 bytes, which json.loads reads too and the
            # check above counts as bytes; no line may fail any other way than this.)
            raise RecordInvalid("not a JSON object") from exc
        record = cls._from_value(value)
        if record_hash(record.to_dict()) != record.hash:
            raise RecordInvalid("the record's content does not match its hash", edited=True)
        if record.line()[:-1] != body:
            raise RecordInvalid(
                "the record's text is not the text the log writes (it was rewritten)",
                edited=True,
            )
        return record

    @classmethod
    def _from_value(cls, value: object) -> AuditRecord:
        if not isinstance(value, dict) or tuple(sorted(value)) != tuple(sorted(FIELDS)):
            raise RecordInvalid("not a record: wrong fields")
        seq, detail = value["seq"], value["detail"]
        if not _is_int(seq) or seq < 1:
            raise RecordInvalid("not a record: bad seq")
        for name in ("time", "actor", "action", "result", "prev", "hash"):
            if not isinstance(value[name], str):
                raise RecordInvalid(f"not a record: bad {name}")
        for name in ("origin", "object", "request_id"):
            if value[name] is not None and not isinstance(value[name], str):
                raise RecordInvalid(f"not a record: bad {name}")
        if not _HEX64.fullmatch(value["prev"]) or not _HEX64.fullmatch(value["hash"]):
            raise RecordInvalid("not a record: bad prev or hash")
        if not _TIME.fullmatch(value["time"]):
            raise RecordInvalid("not a record: bad time")
        if not isinstance(detail, dict) or not all(
            isinstance(k, str) and (v is None or isinstance(v, str | int))
            for k, v in detail.items()
        ):
            raise RecordInvalid("not a record: bad detail")
        return cls(
            seq=seq,
            time=value["time"],
            actor=value["actor"],
            origin=value["origin"],
            action=value["action"],
            object_id=value["object"],
            result=value["result"],
            request_id=value["request_id"],
            detail=MappingProxyType(detail),
            prev=value["prev"],
            hash=value["hash"],
        )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, val in pairs:
        if key in result:
            raise ValueError("duplicate key")
        result[key] = val
    return result


# --- nesting, before a JSON parser recurses into it ---------------------------------

#: What changes the nesting outside strings, and what starts a string.
_JSON_STRUCTURE = re.compile(rb'["\[\]{}]')
#: The rest of a string after its opening quote (escapes skipped), anchored with .match:
#: one linear attempt from one position, never retried from others.
_JSON_STRING_REST = re.compile(rb'(?:[^"\\]++|\\.)*+"', re.DOTALL)
_OPENERS = frozenset(b"[{")


def json_nesting_exceeds(text: bytes, limit: int) -> bool:
    """Whether the JSON ``text`` nests arrays and objects more than ``limit`` deep.

    Brackets inside strings do not count. Answered without recursion, in time linear in
    the text, so a caller can refuse a deeply nested document before ``json.loads``
    recurses into it (and raises ``RecursionError`` at about 1000 levels). For text that
    is not JSON the answer errs towards "too deep" only where the parser would fail
    anyway: it counts every bracket the parser could reach before failing. (UTF-8 or
    ASCII text; callers still catch ``RecursionError`` for the UTF-16 and UTF-32 that
    ``json.loads`` also accepts as bytes.)
    """
    if text.count(b"[") + text.count(b"{") <= limit:
        return False  # the common case (a record has two "{"): no scan
    depth = 0
    find, rest = _JSON_STRUCTURE.search, _JSON_STRING_REST.match
    match = find(text)
    while match is not None:
        char = text[match.start()]
        if char == 0x22:  # '"': skip the string
            end = rest(text, match.end())
            if end is None:
                return False  # an unterminated string: the parser stops there
            match = find(text, end.end())
            continue
        if char in _OPENERS:
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
        match = find(text, match.end())
    return False


def untrusted_text(value: str, *, limit: int = MAX_TEXT) -> str:
    """``value``, text a caller chose (a request path, a key name, a context), made fit
    to be recorded: the result is always accepted as any string field of a record.

    Cut to ``limit`` characters (at most :data:`MAX_TEXT`) first, so that the cut cannot
    make a card number out of a longer run of digits; then card numbers (whatever
    :func:`~cardvault.cards.luhn.holds_card_number` finds, by the same finder) become
    ``[card number]``, control characters ``?``, a secret's marker and the rest of its word
    (``sk_live_…``, ``cvshare1-…``, ``-----BEGIN``, ``PRIVATE KEY``) become ``[secret]``,
    and runs shaped like key material become ``[key material]``. No replacement is
    longer than what it replaces, so the result is never longer than the cut.
    """
    if not isinstance(value, str):
        raise TypeError("untrusted_text takes a str")
    if not 0 <= limit <= MAX_TEXT:
        raise ValueError(f"limit must be between 0 and {MAX_TEXT}")
    text = value[:limit]
    for _ in range(4):
        cleaned = _scrub_once(text)
        if cleaned == text:
            break
        text = cleaned
    try:
        _check_text("text", text)
    except ValueError:
        # Not reached by any text the property tests found; should a rule above ever
        # miss a case, the record is still written, without the text.
        return _UNRECORDABLE[:limit]
    return text


#: Replacements, none longer than the shortest text it stands for (13 digits, the
#: 8-character "sk_live_", 40 characters of key material).
_CARD_MARK: Final = "[card number]"
_WITHHELD_MARK: Final = "[secret]"
_KEY_MARK: Final = "[key material]"
_UNRECORDABLE: Final = "?"
#: A secret's marker (as :data:`_SECRET_MARKERS` finds it) and the rest of its word.
_SECRET_WORD = re.compile(
    r"(?:(?<![A-Za-z0-9])(?:sk|rk)_(?:live|test)_|cvshare1-|-----BEGIN|PRIVATE KEY)\S*",
    re.IGNORECASE,
)


def _key_material(match: re.Match[str]) -> str:
    run = match.group()
    return _KEY_MARK if _looks_random(run) else run


def _scrub_once(text: str) -> str:
    # Card numbers first: a control character (a tab, a newline) may be what separates
    # their digits, and once it is a "?" the digits would no longer be found.
    text = redact_card_numbers(text, _CARD_MARK)
    text = _CONTROL.sub("?", text)
    text = _SECRET_WORD.sub(_WITHHELD_MARK, text)
    text = _HEX_RUN.sub(_KEY_MARK, text)
    return _B64_RUN.sub(_key_material, text)


# --- what a record may hold ---------------------------------------------------------


#: Texts of the fields that repeat from record to record (actor, origin, detail values)
#: that passed :func:`_check_text`, so that each is checked once rather than on every
#: append. Only clean texts enter; emptied when full.
_CLEAN: set[str] = set()
_CLEAN_MAX = 4096


def _check_repeated(name: str, value: str) -> None:
    if value not in _CLEAN:
        _check_text(name, value)
        if len(_CLEAN) >= _CLEAN_MAX:
            _CLEAN.clear()
        _CLEAN.add(value)


#: The shape of the ids cardvault makes (``pm_…``, ``fwdreq_…``, ``req_…``): at most 39
#: characters, so no 40-character hex or base64 run fits in one.
_OWN_ID = re.compile(r"[a-z]{2,8}_[A-Za-z0-9_-]{8,30}")
_DIGITS = b"0123456789"


def _check_id(name: str, value: str) -> None:
    """:func:`_check_text` for an object or request id, with a shortcut for ids of
    cardvault's own shape: no control character or long run fits the shape, and fewer
    than ``PAN_MIN_DIGITS`` digits cannot make a card number; only a secret's prefix is
    left to look for."""
    if (
        _OWN_ID.fullmatch(value)
        # (ASCII, by the shape) the digits it holds
        and len(value) - len(value.encode("ascii").translate(None, _DIGITS)) < PAN_MIN_DIGITS
        # A secret's prefix needs a second "_" (sk_live_) or a "-" (cvshare1-, -----BEGIN);
        # the shape has no space for "PRIVATE KEY".
        and ((value.count("_") == 1 and "-" not in value) or not _SECRET_MARKERS.search(value))
    ):
        return
    _check_text(name, value)


def _check_text(name: str, value: str) -> None:
    # Messages name the field, never the value: the value is what must not be shown.
    if len(value) > MAX_TEXT:
        raise ValueError(f"audit {name} is longer than {MAX_TEXT} characters")
    if _CONTROL.search(value):
        raise ValueError(f"audit {name} contains a control character")
    if holds_card_number(value):
        raise ValueError(f"audit {name} contains a card number; audit records hold no card data")
    if _SECRET_MARKERS.search(value):
        raise ValueError(f"audit {name} contains a secret (API key, share or PEM block)")
    if _HEX_RUN.search(value) or any(_looks_random(m.group()) for m in _B64_RUN.finditer(value)):
        raise ValueError(
            f"audit {name} contains something shaped like key material "
            "(40+ hex or base64 characters); log a short key id instead"
        )


def _looks_random(run: str) -> bool:
    return (
        any(c.isupper() for c in run)
        and any(c.islower() for c in run)
        and any(c.isdigit() for c in run)
    )


def check_entry(
    *,
    action: str,
    actor: str,
    origin: str | None,
    object_id: str | None,
    result: str,
    request_id: str | None,
    detail: Mapping[str, DetailValue] = _EMPTY,
) -> None:
    """Raise :class:`ValueError` unless these fields may be written (module docstring)."""
    if type(action) is not str or type(result) is not str or (action, result) not in _CLEAN_NAMES:
        _check_names(action, result)
    if not isinstance(actor, str) or not actor:
        raise ValueError("audit actor must be a non-empty string")
    _check_repeated("actor", actor)
    for name, optional in (("origin", origin), ("object", object_id), ("request_id", request_id)):
        if optional is not None:
            if not isinstance(optional, str):
                raise ValueError(f"audit {name} must be a string or None")
            if name == "origin":
                _check_repeated(name, optional)
            else:
                _check_id(name, optional)
    if not isinstance(detail, Mapping):
        raise ValueError("audit detail must be a mapping")
    if len(detail) > MAX_DETAIL:
        raise ValueError(f"audit detail has more than {MAX_DETAIL} entries")
    for key, value in detail.items():
        if key not in _CLEAN_KEYS:
            _check_detail_key(key)
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, int):
            value = str(value)
        elif not isinstance(value, str):
            raise ValueError("audit detail values must be str, int, bool or None")
        elif key.endswith("sha256") and _SHA256_HEX.fullmatch(value):
            # A digest of a public file (the forwarding allowlist's SHA-256) is what an
            # auditor must see, and is not key material: allowed under a *sha256 key.
            continue
        if value not in _CLEAN:
            _check_repeated(f"detail[{key}]", value)


#: (action, result) pairs and detail keys that passed their checks: the services use a
#: few dozen, written in their code, so each is checked once. Emptied when full.
_CLEAN_NAMES: set[tuple[object, object]] = set()
_CLEAN_KEYS: set[object] = set()


def _check_names(action: object, result: object) -> None:
    if not isinstance(action, str) or not _ACTION.fullmatch(action) or len(action) > 128:
        raise ValueError(
            "audit action must be a dotted lower-case name (vault.payment_method.create)"
        )
    if action == CHECKPOINT_ACTION:
        raise ValueError(f"{CHECKPOINT_ACTION!r} is written by the audit log itself")
    if not isinstance(result, str) or not _RESULT.fullmatch(result) or len(result) > 64:
        raise ValueError("audit result must be a lower-case name (ok, denied, error, ...)")
    if len(_CLEAN_NAMES) >= _CLEAN_MAX:
        _CLEAN_NAMES.clear()
    _CLEAN_NAMES.add((action, result))


def _check_detail_key(key: object) -> None:
    if not isinstance(key, str) or not _DETAIL_KEY.fullmatch(key) or len(key) > 64:
        raise ValueError("audit detail keys must be lower-case identifiers")
    if _SENSITIVE_KEY_PARTS.intersection(key.split("_")):
        raise ValueError("audit detail key names card data or a secret; leave it out")
    if len(_CLEAN_KEYS) >= _CLEAN_MAX:
        _CLEAN_KEYS.clear()
    _CLEAN_KEYS.add(key)
