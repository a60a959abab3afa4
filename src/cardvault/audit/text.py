"""What an audit record may hold: the checks every value passes before it is written,
and :func:`untrusted_text`, which makes text a caller chose fit to be recorded.

The record itself (its fields, hash and line) is :mod:`cardvault.audit.record`;
:meth:`cardvault.audit.log.AuditLog.append` calls :func:`check_entry` before it makes
one. A violation raises :class:`ValueError`, since it is a programming error in the
caller:

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
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from cardvault.audit.record import CHECKPOINT_ACTION, DetailValue
from cardvault.cards.luhn import PAN_MIN_DIGITS, holds_card_number, redact_card_numbers

__all__ = ["MAX_DETAIL", "MAX_TEXT", "check_entry", "untrusted_text"]

#: Longest string value. Audit records name things; they do not carry payloads.
MAX_TEXT: Final = 512
#: Most entries in ``detail``.
MAX_DETAIL: Final = 32

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


# --- text a caller chose ------------------------------------------------------------


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
            if _OWN_ID.fullmatch(value):
                # An id (a forward's fwdreq_…, its pm_…) is new on every record: checked
                # as one, and not kept among the texts that repeat.
                _check_id(f"detail[{key}]", value)
            else:
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
