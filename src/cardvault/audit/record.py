"""The audit record: its fields, its hash, and its line on disk.

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

What a record may hold (no card data, no key material or secret, plain text) is checked
before it is written, by :mod:`cardvault.audit.text`, which also holds
:func:`~cardvault.audit.text.untrusted_text` for text a caller chose.

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

__all__ = [
    "CHECKPOINT_ACTION",
    "FIELDS",
    "GENESIS",
    "RECORD_DEPTH",
    "AuditRecord",
    "DetailValue",
    "RecordInvalid",
    "canonical_json",
    "format_time",
    "json_nesting_exceeds",
    "now_text",
    "record_hash",
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
#: How deep a record's JSON nests: the record object, and ``detail`` inside it.
RECORD_DEPTH: Final = 2

DetailValue = str | int | bool | None

_HEX64 = re.compile(r"[0-9a-f]{64}")
_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")


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
