"""The checks of one ``[[destination]]`` table of the allowlist file, field by field.

:func:`read_destination` is what :func:`~cardvault.vault.forwarding.loader.load_allowlist`
calls for each table. No check raises: each adds what is wrong to :class:`Problems`,
so that one start-up names every problem of the file. Messages name the destination
and the field, and the file a secret or a CA bundle was read from, never a secret.
"""

from __future__ import annotations

import base64
import re
import ssl
import types
from pathlib import Path
from typing import Any, Final

from cardvault.config import Secret
from cardvault.vault.forwarding.allowlist import (
    ANY_ACCOUNT,
    EXPIRY_FORMATS,
    METHODS,
    REPLACEMENTS,
    Credential,
    Destination,
    ParsedUrl,
    Placement,
    PlacementKind,
    UrlRefused,
    parse_url,
)

__all__ = ["Problems", "read_destination"]

_MAX_SECRET_BYTES: Final = 4096
_MAX_SIZE: Final = 10 * 1024 * 1024
_MAX_TIMEOUT: Final = 60.0
_DEFAULT_TIMEOUT: Final = 10.0
_DEFAULT_MAX_REQUEST: Final = 64 * 1024
_DEFAULT_MAX_RESPONSE: Final = 1024 * 1024

_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_ACCOUNT_RE: Final = re.compile(r"acct_[A-Za-z0-9]{1,64}")
_TOKEN_RE: Final = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,64}")
_FORM_FIELD_RE: Final = re.compile(r"[A-Za-z0-9_.\-\[\]]{1,128}")
# The vault writes these itself (framing, routing, body type) or they belong to one hop;
# letting a placement or a credential set them would let it rewrite the request.
_RESERVED_HEADERS: Final = frozenset(
    {
        "host",
        "content-length",
        "content-type",
        "content-encoding",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        "expect",
    }
)

_DESTINATION_KEYS: Final = frozenset(
    {
        "name",
        "url",
        "methods",
        "replacements",
        "accounts",
        "placements",
        "ca_file",
        "pin_sha256",
        "timeout",
        "max_request_bytes",
        "max_response_bytes",
        "credentials",
    }
)
_REQUIRED_KEYS: Final = ("name", "url", "methods", "replacements", "accounts")
_CREDENTIAL_KEYS: Final = frozenset({"header", "secret_file", "prefix"})
_KINDS: Final[tuple[PlacementKind, ...]] = ("json", "form", "header")


class Problems:
    """Every problem found in the file, so that one start-up shows all of them."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")


def read_destination(
    table: dict[str, Any], index: int, base: Path, problems: Problems
) -> Destination | None:
    name = table.get("name")
    valid_name = isinstance(name, str) and _NAME_RE.fullmatch(name) is not None
    where = f"destination {name!r}" if valid_name else f"destination #{index}"
    before = len(problems.items)

    for key in table:
        if key not in _DESTINATION_KEYS:
            problems.add(where, f"unknown key {key!r}")
    for key in _REQUIRED_KEYS:
        if key not in table:
            problems.add(where, f"{key}: required")
    if "name" in table and not valid_name:
        problems.add(
            where,
            "name: must be 1-64 lowercase letters, digits, '-' or '_', starting with "
            "a letter or digit",
        )

    parsed = _read_url(table.get("url"), where, problems) if "url" in table else None
    methods = _read_choices(table.get("methods"), "methods", METHODS, where, problems)
    replacements = _read_choices(
        table.get("replacements"), "replacements", REPLACEMENTS, where, problems
    )
    accounts = _read_accounts(table.get("accounts"), where, problems)
    credentials = _read_credentials(table.get("credentials", []), where, base, problems)
    placements = _read_placements(
        table.get("placements", {}), replacements, credentials, where, problems
    )
    ca_file = _read_ca_file(table.get("ca_file"), where, base, problems)
    pins = _read_pins(table.get("pin_sha256", []), where, problems)
    timeout = _read_timeout(table.get("timeout", _DEFAULT_TIMEOUT), where, problems)
    max_request = _read_size(
        table.get("max_request_bytes", _DEFAULT_MAX_REQUEST), "max_request_bytes", where, problems
    )
    max_response = _read_size(
        table.get("max_response_bytes", _DEFAULT_MAX_RESPONSE),
        "max_response_bytes",
        where,
        problems,
    )

    if len(problems.items) != before or parsed is None:
        return None
    assert isinstance(name, str)
    return Destination(
        name=name,
        url=parsed.canonical,
        scheme="https",
        host=parsed.host,
        port=parsed.port,
        path=parsed.path,
        methods=methods,
        replacements=replacements,
        accounts=accounts,
        placements=types.MappingProxyType(placements),
        ca_file=ca_file,
        pin_sha256=pins,
        timeout=timeout,
        max_request_bytes=max_request,
        max_response_bytes=max_response,
        credentials=credentials,
    )


def _read_url(value: object, where: str, problems: Problems) -> ParsedUrl | None:
    if not isinstance(value, str):
        problems.add(where, "url: must be a string")
        return None
    try:
        parsed = parse_url(value)
    except UrlRefused as refusal:
        # The reason, not the value: a URL with userinfo may carry a password.
        problems.add(where, f"url: {refusal.reason}")
        return None
    if parsed.canonical != value:
        problems.add(where, f"url: must be written in canonical form, {parsed.canonical}")
        return None
    return parsed


def _string_list(value: object, key: str, where: str, problems: Problems) -> list[str] | None:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        problems.add(where, f"{key}: must be a non-empty list of strings")
        return None
    if len(set(value)) != len(value):
        problems.add(where, f"{key}: has duplicates")
        return None
    return value


def _read_choices(
    value: object, key: str, choices: frozenset[str], where: str, problems: Problems
) -> frozenset[str]:
    """A non-empty list of distinct strings, each one of ``choices``."""
    chosen = _string_list(value, key, where, problems)
    if chosen is None:
        return frozenset()
    for item in chosen:
        if item not in choices:
            problems.add(where, f"{key}: {item!r} is not one of {', '.join(sorted(choices))}")
    return frozenset(chosen)


def _read_accounts(value: object, where: str, problems: Problems) -> frozenset[str]:
    accounts = _string_list(value, "accounts", where, problems)
    if accounts is None:
        return frozenset()
    if ANY_ACCOUNT in accounts:
        if len(accounts) != 1:
            problems.add(where, "accounts: '*' (any account) must be the only entry")
        return frozenset(accounts)
    for account in accounts:
        if not _ACCOUNT_RE.fullmatch(account):
            problems.add(where, "accounts: each entry must be an account id (acct_…) or '*'")
            break
    return frozenset(accounts)


def _read_header_name(value: object, key: str, where: str, problems: Problems) -> str | None:
    if not isinstance(value, str) or not _TOKEN_RE.fullmatch(value):
        problems.add(where, f"{key}: must be an HTTP header name")
        return None
    if value.lower() in _RESERVED_HEADERS or value.lower().startswith("proxy-"):
        problems.add(where, f"{key}: {value!r} is set by the vault and cannot be configured")
        return None
    return value


def _read_credentials(
    value: object, where: str, base: Path, problems: Problems
) -> tuple[Credential, ...]:
    if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
        problems.add(where, "credentials: must be an array of tables ([[destination.credentials]])")
        return ()
    credentials: list[Credential] = []
    seen: set[str] = set()
    for index, table in enumerate(value, start=1):
        at = f"credentials #{index}"
        for key in table:
            if key not in _CREDENTIAL_KEYS:
                problems.add(where, f"{at}: unknown key {key!r}")
        header = _read_header_name(table.get("header"), f"{at}: header", where, problems)
        if header is not None:
            if header.lower() in seen:
                problems.add(where, f"{at}: header: another credential sets the same header")
            seen.add(header.lower())
        prefix = table.get("prefix", "")
        if not isinstance(prefix, str) or not all("\x20" <= ch <= "\x7e" for ch in prefix):
            problems.add(where, f"{at}: prefix: must be a string of printable ASCII")
            prefix = ""
        secret_file = table.get("secret_file")
        secret: str | None = None
        file_path: Path | None = None
        if not isinstance(secret_file, str) or not secret_file:
            problems.add(where, f"{at}: secret_file: required, a path")
        else:
            file_path = (base / Path(secret_file).expanduser()).absolute()
            secret = _read_secret(file_path, f"{at}: secret_file", where, problems)
        if header is not None and secret is not None and file_path is not None:
            credentials.append(Credential(header, file_path, Secret(prefix + secret)))
    return tuple(credentials)


def _read_secret(path: Path, key: str, where: str, problems: Problems) -> str | None:
    # Messages here name the file, never its contents.
    try:
        with open(path, "rb") as fh:
            raw = fh.read(_MAX_SECRET_BYTES + 1)
    except OSError:
        problems.add(where, f"{key}: cannot read {path}")
        return None
    if len(raw) > _MAX_SECRET_BYTES:
        problems.add(where, f"{key}: {path} is larger than {_MAX_SECRET_BYTES} bytes")
        return None
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        problems.add(where, f"{key}: {path} must hold printable ASCII")
        return None
    if not text:
        problems.add(where, f"{key}: {path} is empty")
        return None
    # A CR or LF inside a header value would let the file add headers of its own.
    if not all("\x20" <= ch <= "\x7e" for ch in text):
        problems.add(where, f"{key}: {path} must hold one line of printable ASCII")
        return None
    return text


def _read_placements(
    value: object,
    replacements: frozenset[str],
    credentials: tuple[Credential, ...],
    where: str,
    problems: Problems,
) -> dict[str, Placement]:
    if not isinstance(value, dict):
        problems.add(where, "placements: must be a table")
        return {}
    placements: dict[str, Placement] = {}
    for replacement, spec in value.items():
        at = f"placements.{replacement}"
        if replacement not in REPLACEMENTS:
            hint = ""
            if replacement in _DESTINATION_KEYS:
                # TOML puts a key written after [destination.placements] in that table.
                hint = " (destination keys go above the [destination.placements] table)"
            problems.add(where, f"{at}: {replacement!r} is not a replacement{hint}")
            continue
        if replacement not in replacements:
            problems.add(where, f"{at}: {replacement!r} is not in this destination's replacements")
            continue
        placement = _read_placement(spec, replacement, at, where, problems)
        if placement is not None:
            placements[replacement] = placement
    _check_placement_conflicts(placements, credentials, where, problems)
    return placements


def _read_placement(
    spec: object, replacement: str, at: str, where: str, problems: Problems
) -> Placement | None:
    if not isinstance(spec, dict):
        problems.add(where, f'{at}: must be a table such as {{ json = "/card/number" }}')
        return None
    expiry = replacement == "card_expiry"
    allowed: set[str] = set(_KINDS)
    if expiry:
        allowed |= {"format"} | {f"{k}_{part}" for k in _KINDS for part in ("month", "year")}
    for key in spec:
        if key not in allowed:
            problems.add(where, f"{at}: unknown key {key!r}")
            return None
    single = [k for k in _KINDS if k in spec]
    split = sorted({k for k in _KINDS if f"{k}_month" in spec or f"{k}_year" in spec})
    if len(single) + len(split) != 1:
        problems.add(where, f"{at}: must name exactly one place (json, form or header)")
        return None
    if split:
        kind = split[0]
        month, year = spec.get(f"{kind}_month"), spec.get(f"{kind}_year")
        if month is None or year is None or "format" in spec:
            problems.add(where, f"{at}: give both {kind}_month and {kind}_year, and no format")
            return None
        ok = _check_target(kind, month, f"{at}.{kind}_month", where, problems)
        ok = _check_target(kind, year, f"{at}.{kind}_year", where, problems) and ok
        if not ok:
            return None
        return Placement(kind=kind, month_target=month, year_target=year)
    kind = single[0]
    target = spec[kind]
    fmt = spec.get("format")
    if expiry and fmt not in EXPIRY_FORMATS:
        problems.add(
            where,
            f"{at}.format: one value needs a format, one of {', '.join(sorted(EXPIRY_FORMATS))}"
            f" (or use {kind}_month and {kind}_year)",
        )
        return None
    if not _check_target(kind, target, f"{at}.{kind}", where, problems):
        return None
    return Placement(kind=kind, target=target, expiry_format=fmt if expiry else None)


def _check_target(
    kind: PlacementKind, target: object, at: str, where: str, problems: Problems
) -> bool:
    if kind == "header":
        return _read_header_name(target, at, where, problems) is not None
    if kind == "form":
        if not isinstance(target, str) or not _FORM_FIELD_RE.fullmatch(target):
            problems.add(where, f"{at}: must be a form field name of letters, digits, _ . - [ ]")
            return False
        return True
    if not isinstance(target, str) or not _is_json_pointer(target):
        problems.add(
            where,
            f"{at}: must be a JSON Pointer such as /card/number (RFC 6901: starts with '/', "
            "'~' only as ~0 or ~1, no empty tokens)",
        )
        return False
    return True


def _is_json_pointer(pointer: str) -> bool:
    # "" (the whole document) is a valid pointer but never a place for a card value.
    if not pointer.startswith("/") or len(pointer) > 256:
        return False
    if not all("\x20" <= ch <= "\x7e" for ch in pointer):
        return False
    tokens = pointer[1:].split("/")
    return all(token and re.fullmatch(r"(?:[^~]|~[01])*", token) for token in tokens)


def _pointer_tokens(pointer: str) -> tuple[str, ...]:
    return tuple(t.replace("~1", "/").replace("~0", "~") for t in pointer[1:].split("/"))


def _check_placement_conflicts(
    placements: dict[str, Placement],
    credentials: tuple[Credential, ...],
    where: str,
    problems: Problems,
) -> None:
    kinds = {p.kind for p in placements.values()}
    if {"json", "form"} <= kinds:
        problems.add(where, "placements: mix json and form, but a body is one or the other")
    targets = [
        (placement.kind, target, replacement)
        for replacement, placement in sorted(placements.items())
        for target in placement.targets
    ]
    headers = {c.header_name.lower() for c in credentials}
    for i, (kind, target, replacement) in enumerate(targets):
        if kind == "header" and target.lower() in headers:
            problems.add(where, f"placements.{replacement}: header is also set by a credential")
        for other_kind, other, other_replacement in targets[i + 1 :]:
            if kind != other_kind:
                continue
            if kind == "header":
                clash = target.lower() == other.lower()
            elif kind == "form":
                clash = target == other
            else:
                a, b = _pointer_tokens(target), _pointer_tokens(other)
                shorter = min(len(a), len(b))
                clash = a[:shorter] == b[:shorter]
            if clash:
                problems.add(
                    where,
                    f"placements.{replacement} and placements.{other_replacement}: "
                    "write to the same place",
                )


def _read_ca_file(value: object, where: str, base: Path, problems: Problems) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        problems.add(where, "ca_file: must be a path")
        return None
    path = (base / Path(value).expanduser()).absolute()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(path))
    except ssl.SSLError:  # a subclass of OSError, so it is caught first
        problems.add(where, f"ca_file: {path} holds no valid PEM certificate")
        return None
    except OSError:
        problems.add(where, f"ca_file: cannot read {path}")
        return None
    return path


def _read_pins(value: object, where: str, problems: Problems) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        problems.add(where, "pin_sha256: must be a list of strings")
        return ()
    for pin in value:
        try:
            digest = base64.b64decode(pin, validate=True)
        except ValueError:
            digest = b""
        if len(digest) != 32 or base64.b64encode(digest).decode() != pin:
            problems.add(
                where, "pin_sha256: each pin must be the base64 of a 32-byte SHA-256 digest"
            )
            return ()
    if len(set(value)) != len(value):
        problems.add(where, "pin_sha256: has duplicates")
    return tuple(value)


def _read_timeout(value: object, where: str, problems: Problems) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.add(where, "timeout: must be a number of seconds")
        return _DEFAULT_TIMEOUT
    if not 0 < value <= _MAX_TIMEOUT:
        problems.add(where, f"timeout: must be more than 0 and at most {_MAX_TIMEOUT:g} seconds")
    return float(value)


def _read_size(value: object, key: str, where: str, problems: Problems) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        problems.add(where, f"{key}: must be an integer number of bytes")
        return 0
    if not 1 <= value <= _MAX_SIZE:
        problems.add(where, f"{key}: must be between 1 and {_MAX_SIZE} bytes (10 MiB)")
    return value
