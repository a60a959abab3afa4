"""The forwarding allowlist: the only places the vault will ever send card data.

The allowlist is a TOML file named in the vault's configuration. It is read once, at
start-up; changing it needs a restart, and no API changes it. An invalid file stops
start-up with a :class:`~cardvault.errors.ConfigurationError` that names every problem
(destination and field). The SHA-256 of the file's bytes is logged at start-up and kept
on :attr:`Allowlist.sha256` so that the vault can record which allowlist it ran with.

The file
========

::

    [[destination]]
    name = "local-acquirer"
    url = "https://localhost:8445/v1/authorizations"
    methods = ["POST"]
    replacements = ["card_number", "card_expiry", "card_cvc", "cardholder_name"]
    accounts = ["acct_1a2b3c4d5e6f7g8h"]     # or ["*"]: any account, written out on purpose
    ca_file = "acquirer-ca.pem"              # optional; relative to this file
    pin_sha256 = ["<base64 of 32 bytes>"]    # optional SPKI SHA-256 pins
    timeout = 10.0                           # seconds, 0 < timeout <= 60
    max_request_bytes = 65536                # 1 .. 10 MiB
    max_response_bytes = 1048576             # 1 .. 10 MiB

    [destination.placements]
    card_number = { json = "/card/number" }
    card_expiry = { json_month = "/card/exp_month", json_year = "/card/exp_year" }
    card_cvc = { json = "/card/cvc" }
    cardholder_name = { json = "/card/name" }

    [[destination.credentials]]
    header = "Authorization"
    prefix = "Bearer "                       # optional, put before the secret
    secret_file = "/etc/cardvault/secrets/acquirer-key"

Only the key ``destination`` is allowed at the top level, and only the keys above inside
a destination: an unknown key is an error, because a misspelt ``pin_sha265`` must not
silently turn pinning off. ``name``, ``url``, ``methods``, ``replacements`` and
``accounts`` are required.

``url``
    ``https://<host>[:<port>]<path>``, written in canonical form (lowercase host, no
    ``:443``, no query, no fragment, no userinfo, no percent-encoding, no ``.``/``..``
    or empty segments). The host must be a DNS name: IP literals are refused entirely,
    and so are IDNA (``xn--``) labels and trailing dots. ``localhost`` is a name like any
    other, which is what the local stack's acquirer uses. Two destinations may not share
    a URL, so a URL always matches at most one destination.
``methods``
    Uppercase, from GET, POST, PUT, PATCH and DELETE. Methods are case-sensitive
    (RFC 9110), so a caller's ``post`` does not match ``POST``.
``replacements``
    Which card values the destination may receive, by Stripe's names:
    ``card_number``, ``card_expiry``, ``card_cvc``, ``cardholder_name``.
``accounts``
    The ``acct_…`` ids that may forward to this destination. There is no default: an
    operator who wants every account must write ``["*"]`` (alone), which the local
    stack does because its accounts are created after the vault starts.
``ca_file`` / ``pin_sha256``
    An optional CA bundle that replaces the system roots for this destination (it is
    parsed at load time, so a broken bundle stops start-up), and optional public-key
    pins: the base64 SHA-256 of the server certificate's SubjectPublicKeyInfo, as in
    HPKP's ``pin-sha256``.
``credentials``
    Headers the vault adds itself, e.g. the acquirer's API key. The secret is read at
    load time from ``secret_file`` (relative paths are relative to the allowlist file),
    stripped of surrounding whitespace, and kept in a :class:`~cardvault.config.Secret`;
    it is never printed, logged or returned to a caller.

Where the values go
===================

A replacement reaches the destination in one of two ways, and both may be used:

* an explicit placeholder in the caller's body, ``{{card_number}}``, ``{{card_cvc}}``,
  ``{{cardholder_name}}``, and for the expiry ``{{card_exp_month}}`` and
  ``{{card_exp_year}}`` (see :data:`PLACEHOLDERS`);
* a *placement* in the destination's configuration, which says where the vault writes
  the value whatever the caller sent there. This is what makes Stripe's convention of
  sending the card fields empty (``"number": ""``) work.

A placement is a table with one key naming the kind and the location:

``{ json = "/card/number" }``
    A JSON Pointer (RFC 6901) into a JSON body.
``{ form = "card[number]" }``
    A field of an ``application/x-www-form-urlencoded`` body.
``{ header = "X-Card-Number" }``
    A request header.

A card's expiry has two parts, so ``card_expiry`` is placed either as two values or as
one formatted string:

``{ json_month = "/card/exp_month", json_year = "/card/exp_year" }``
    (or ``form_month``/``form_year``, ``header_month``/``header_year``): the month
    (1-12) and the four-digit year. In JSON they are numbers, as in Stripe's API; in a
    form or a header they are their decimal digits.
``{ json = "/card/expiry", format = "MM/YY" }``
    One string in one of :data:`EXPIRY_FORMATS`; see :func:`format_expiry`.

One destination's body placements are all JSON or all form, never both; no two
placements may write to the same place (or, for JSON, one inside the other); and a
placement may only name a replacement the destination may receive.

Matching a caller's URL
=======================

:func:`match_url` is the single function the vault calls with the caller's ``url``. It
does not lean on a lenient URL library: it accepts only printable ASCII of the exact
shape ``https://<host>[:<port>]<path>`` and refuses everything two parsers could read
differently (userinfo, backslashes, percent-encoding, whitespace and control
characters, IP literals in any notation, trailing dots, IDNA, empty or
leading-zero ports, dot and empty path segments, queries and fragments). Only the
scheme's and the host's case and an explicit ``:443`` are normalized. Every refusal
raises the same :class:`~cardvault.errors.InvalidRequestError` with the same message,
which never repeats the URL, so a caller learns nothing about why, or about other
accounts' destinations. The vault then connects to :attr:`Destination.url`, the
allowlisted URL, never to the caller's string.
"""

from __future__ import annotations

import base64
import hashlib
import re
import ssl
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from cardvault.config import Secret
from cardvault.errors import ConfigurationError, InvalidRequestError
from cardvault.logging import get_logger

__all__ = [
    "ANY_ACCOUNT",
    "EXPIRY_FORMATS",
    "METHODS",
    "PLACEHOLDERS",
    "REFUSAL_MESSAGE",
    "REPLACEMENTS",
    "Allowlist",
    "Credential",
    "Destination",
    "Placement",
    "PlacementKind",
    "format_expiry",
    "load_allowlist",
    "match_url",
]

_log = get_logger("cardvault.vault.allowlist")

#: The card values a destination may receive, by Stripe's names.
REPLACEMENTS: Final = frozenset({"card_number", "card_expiry", "card_cvc", "cardholder_name"})

#: The placeholders a caller may write in a body, for each replacement.
PLACEHOLDERS: Final[Mapping[str, tuple[str, ...]]] = types.MappingProxyType(
    {
        "card_number": ("{{card_number}}",),
        "card_expiry": ("{{card_exp_month}}", "{{card_exp_year}}"),
        "card_cvc": ("{{card_cvc}}",),
        "cardholder_name": ("{{cardholder_name}}",),
    }
)

#: Methods a destination may allow. CONNECT, TRACE, OPTIONS and HEAD have no use for a
#: card and are left out so that an allowlist cannot enable them by mistake.
METHODS: Final = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})

#: Written alone in ``accounts``, lets every account use the destination.
ANY_ACCOUNT: Final = "*"

#: The single-string forms of ``card_expiry`` (YY is the year modulo 100).
EXPIRY_FORMATS: Final = frozenset({"MM/YY", "MM/YYYY", "MMYY", "MMYYYY", "YYMM", "YYYY-MM"})

#: The one message of every refusal. It never contains the URL: the caller already has
#: it, and echoing input is how a card number ends up in an error log.
REFUSAL_MESSAGE: Final = "This URL is not on the vault's forwarding allowlist."

PlacementKind = Literal["json", "form", "header"]

_HTTPS_PORT: Final = 443
_MAX_URL_LENGTH: Final = 2048
_MAX_FILE_BYTES: Final = 1024 * 1024
_MAX_SECRET_BYTES: Final = 4096
_MAX_SIZE: Final = 10 * 1024 * 1024
_MAX_TIMEOUT: Final = 60.0
_DEFAULT_TIMEOUT: Final = 10.0
_DEFAULT_MAX_REQUEST: Final = 64 * 1024
_DEFAULT_MAX_RESPONSE: Final = 1024 * 1024

_NAME_RE: Final = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_ACCOUNT_RE: Final = re.compile(r"acct_[A-Za-z0-9]{1,64}")
_LABEL_RE: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# WHATWG URL parsers read a host whose last label is a number (decimal, or 0x hex) as an
# IPv4 address in any of its notations (127.1, 2130706433, 0x7f000001, 0177.0.0.1), so
# such a host can never be a DNS name here.
_NUMERIC_LABEL_RE: Final = re.compile(r"[0-9]+|0x[0-9a-f]*")
# RFC 3986 pchar without percent-encoding and without "@": no allowlisted path needs
# either, and refusing them leaves nothing for two parsers to disagree about.
_PATH_RE: Final = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:/]*")
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


# --- the model -------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """Where one replacement goes in the outbound request.

    Either ``target`` is set (one value; for ``card_expiry`` with ``expiry_format``), or
    ``month_target`` and ``year_target`` are (``card_expiry`` as two values).
    """

    kind: PlacementKind
    target: str | None = None
    month_target: str | None = None
    year_target: str | None = None
    expiry_format: str | None = None

    @property
    def targets(self) -> tuple[str, ...]:
        """Every location this placement writes to."""
        if self.target is not None:
            return (self.target,)
        return tuple(t for t in (self.month_target, self.year_target) if t is not None)


@dataclass(frozen=True)
class Credential:
    """A header the vault adds to every request to a destination.

    ``value`` is the whole header value (prefix included); it is a
    :class:`~cardvault.config.Secret` and is never printed.
    """

    header_name: str
    secret_file: Path
    value: Secret = field(repr=False)


@dataclass(frozen=True)
class Destination:
    """One allowlisted destination. ``url`` is what the vault connects to."""

    name: str
    url: str
    scheme: str
    host: str
    port: int
    path: str
    methods: frozenset[str]
    replacements: frozenset[str]
    #: ``acct_…`` ids, or exactly ``{"*"}`` for any account.
    accounts: frozenset[str]
    placements: Mapping[str, Placement] = field(hash=False)
    ca_file: Path | None
    #: base64 SHA-256 of the server's SubjectPublicKeyInfo; any one must match.
    pin_sha256: tuple[str, ...]
    timeout: float
    max_request_bytes: int
    max_response_bytes: int
    credentials: tuple[Credential, ...]

    def allows_account(self, account_id: str) -> bool:
        return ANY_ACCOUNT in self.accounts or account_id in self.accounts


@dataclass(frozen=True)
class Allowlist:
    """The destinations read from ``path``, and the SHA-256 (hex) of its bytes."""

    destinations: tuple[Destination, ...]
    sha256: str
    path: Path

    def get(self, name: str) -> Destination | None:
        """The destination called ``name``, if any."""
        for destination in self.destinations:
            if destination.name == name:
                return destination
        return None


def format_expiry(expiry_format: str, month: int, year: int) -> str:
    """``month``/``year`` (four-digit) as one string in ``expiry_format``."""
    if expiry_format not in EXPIRY_FORMATS:
        raise ValueError("unknown expiry format")
    mm, yy, yyyy = f"{month:02d}", f"{year % 100:02d}", f"{year:04d}"
    return expiry_format.replace("YYYY", yyyy).replace("YY", yy).replace("MM", mm)


# --- strict URL parsing ------------------------------------------------------------------


class _Refusal(Exception):
    """Why a URL was refused. The reason is a constant and never contains the URL."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class _ParsedUrl:
    host: str
    port: int
    path: str

    @property
    def canonical(self) -> str:
        port = "" if self.port == _HTTPS_PORT else f":{self.port}"
        return f"https://{self.host}{port}{self.path}"


def _parse_url(url: object) -> _ParsedUrl:
    """Parse ``https://<host>[:<port>]<path>`` strictly, or raise :class:`_Refusal`.

    The order of checks matters only for the reason reported; every check is needed.
    """
    if not isinstance(url, str):
        raise _Refusal("is not a string")
    if len(url) > _MAX_URL_LENGTH:
        raise _Refusal("is too long")
    # Printable ASCII only: this refuses whitespace, CR/LF/NUL, and every Unicode
    # look-alike (fullwidth letters, ideographic full stops, homoglyphs) in one place.
    if any(not ("\x21" <= ch <= "\x7e") for ch in url):
        raise _Refusal("contains whitespace, control or non-ASCII characters")
    if "\\" in url:
        raise _Refusal("contains a backslash")
    if "%" in url:
        raise _Refusal("contains percent-encoding")
    if "@" in url:
        raise _Refusal("contains userinfo ('@')")
    if "?" in url:
        raise _Refusal("has a query")
    if "#" in url:
        raise _Refusal("has a fragment")
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise _Refusal("is not an absolute https:// URL")
    if scheme.lower() != "https":
        raise _Refusal("does not use https")
    authority, slash, path_rest = rest.partition("/")
    if not slash:
        raise _Refusal("has no path")
    path = "/" + path_rest
    if "[" in authority or "]" in authority:
        raise _Refusal("host is an IP address")
    host, colon, port_text = authority.partition(":")
    port = _HTTPS_PORT
    if colon:
        if not port_text:
            raise _Refusal("has an empty port")
        if not port_text.isdigit() or port_text[0] == "0" or len(port_text) > 5:
            raise _Refusal("port is not a canonical decimal number")
        port = int(port_text)
        if port > 65535:
            raise _Refusal("port is out of range")
    host = host.lower()
    _check_host(host)
    _check_path(path)
    return _ParsedUrl(host, port, path)


def _check_host(host: str) -> None:
    if not host:
        raise _Refusal("has no host")
    if host.endswith("."):
        raise _Refusal("host ends with a dot")
    if len(host) > 253:
        raise _Refusal("host is too long")
    labels = host.split(".")
    for label in labels:
        if not _LABEL_RE.fullmatch(label):
            raise _Refusal("host is not a DNS name")
        # "xn--" is IDNA; RFC 5891 reserves every "??--" label for such encodings.
        if label[2:4] == "--":
            raise _Refusal("host has an IDNA or reserved label")
    if _NUMERIC_LABEL_RE.fullmatch(labels[-1]):
        raise _Refusal("host is an IP address")


def _check_path(path: str) -> None:
    if not _PATH_RE.fullmatch(path):
        raise _Refusal("path has characters outside the allowed set")
    segments = path[1:].split("/")
    for index, segment in enumerate(segments):
        if segment in (".", ".."):
            raise _Refusal("path has a dot segment")
        # A trailing slash is an empty last segment and is compared exactly.
        if segment == "" and index != len(segments) - 1:
            raise _Refusal("path has an empty segment")


def match_url(allowlist: Allowlist, url: str, *, method: str, account_id: str) -> Destination:
    """The destination that ``url`` names, for ``method`` and ``account_id``.

    Raises :class:`~cardvault.errors.InvalidRequestError` (``parameter_invalid``,
    ``param="url"``, :data:`REFUSAL_MESSAGE`) for every refusal alike: a malformed or
    suspicious URL, one that is not allowlisted, a method or an account the destination
    does not allow. The reason is logged, never the URL.
    """
    try:
        parsed = _parse_url(url)
        for destination in allowlist.destinations:
            if (destination.host, destination.port, destination.path) == (
                parsed.host,
                parsed.port,
                parsed.path,
            ):
                break
        else:
            raise _Refusal("is not allowlisted")
        if method not in destination.methods:
            raise _Refusal("method is not allowed for the destination")
        if not destination.allows_account(account_id):
            raise _Refusal("account may not use the destination")
    except _Refusal as refusal:
        _log.info("forward_url_refused", reason=refusal.reason)
        # "from None": the chained _Refusal holds only a reason, but nothing of the
        # caller's input should ride along on the exception either.
        raise InvalidRequestError(REFUSAL_MESSAGE, param="url") from None
    return destination


# --- loading -------------------------------------------------------------------------------


class _Problems:
    """Every problem found in the file, so that one start-up shows all of them."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.items.append(f"{where}: {message}")


def load_allowlist(path: Path) -> Allowlist:
    """Read, validate and hash the allowlist at ``path``.

    The file is read once; the bytes that are hashed are the bytes that are parsed.
    Raises :class:`~cardvault.errors.ConfigurationError` naming every problem.
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigurationError(f"allowlist file {path} cannot be read") from exc
    if len(data) > _MAX_FILE_BYTES:
        raise ConfigurationError(f"allowlist file {path} is larger than 1 MiB")
    sha256 = hashlib.sha256(data).hexdigest()
    try:
        document = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"allowlist file {path} is not valid TOML: {exc}") from exc

    problems = _Problems()
    destinations = _read_document(document, path.parent, problems)
    if problems.items:
        raise ConfigurationError(f"allowlist file {path} is invalid: " + "; ".join(problems.items))
    allowlist = Allowlist(destinations=tuple(destinations), sha256=sha256, path=path)
    _log.info(
        "allowlist_loaded",
        path=str(path),
        sha256=sha256,
        destinations=[d.name for d in allowlist.destinations],
    )
    return allowlist


def _read_document(document: dict[str, Any], base: Path, problems: _Problems) -> list[Destination]:
    for key in document:
        if key != "destination":
            problems.add("top level", f"unknown key {key!r} (only [[destination]] tables)")
    raw = document.get("destination", [])
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        problems.add("top level", "destination must be an array of tables ([[destination]])")
        return []
    destinations: list[Destination] = []
    for index, table in enumerate(raw, start=1):
        destination = _read_destination(table, index, base, problems)
        if destination is not None:
            destinations.append(destination)
    seen_names: set[str] = set()
    seen_urls: set[str] = set()
    for destination in destinations:
        where = f"destination {destination.name!r}"
        if destination.name in seen_names:
            problems.add(where, "name: another destination has the same name")
        if destination.url in seen_urls:
            problems.add(where, "url: another destination has the same URL")
        seen_names.add(destination.name)
        seen_urls.add(destination.url)
    return destinations


def _read_destination(
    table: dict[str, Any], index: int, base: Path, problems: _Problems
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
    methods = _read_methods(table.get("methods"), where, problems)
    replacements = _read_replacements(table.get("replacements"), where, problems)
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


def _read_url(value: object, where: str, problems: _Problems) -> _ParsedUrl | None:
    if not isinstance(value, str):
        problems.add(where, "url: must be a string")
        return None
    try:
        parsed = _parse_url(value)
    except _Refusal as refusal:
        # The reason, not the value: a URL with userinfo may carry a password.
        problems.add(where, f"url: {refusal.reason}")
        return None
    if parsed.canonical != value:
        problems.add(where, f"url: must be written in canonical form, {parsed.canonical}")
        return None
    return parsed


def _string_list(value: object, key: str, where: str, problems: _Problems) -> list[str] | None:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        problems.add(where, f"{key}: must be a non-empty list of strings")
        return None
    if len(set(value)) != len(value):
        problems.add(where, f"{key}: has duplicates")
        return None
    return value


def _read_methods(value: object, where: str, problems: _Problems) -> frozenset[str]:
    methods = _string_list(value, "methods", where, problems)
    if methods is None:
        return frozenset()
    for method in methods:
        if method not in METHODS:
            problems.add(where, f"methods: {method!r} is not one of {', '.join(sorted(METHODS))}")
    return frozenset(methods)


def _read_replacements(value: object, where: str, problems: _Problems) -> frozenset[str]:
    replacements = _string_list(value, "replacements", where, problems)
    if replacements is None:
        return frozenset()
    for replacement in replacements:
        if replacement not in REPLACEMENTS:
            problems.add(
                where,
                f"replacements: {replacement!r} is not one of {', '.join(sorted(REPLACEMENTS))}",
            )
    return frozenset(replacements)


def _read_accounts(value: object, where: str, problems: _Problems) -> frozenset[str]:
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


def _read_header_name(value: object, key: str, where: str, problems: _Problems) -> str | None:
    if not isinstance(value, str) or not _TOKEN_RE.fullmatch(value):
        problems.add(where, f"{key}: must be an HTTP header name")
        return None
    if value.lower() in _RESERVED_HEADERS or value.lower().startswith("proxy-"):
        problems.add(where, f"{key}: {value!r} is set by the vault and cannot be configured")
        return None
    return value


def _read_credentials(
    value: object, where: str, base: Path, problems: _Problems
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


def _read_secret(path: Path, key: str, where: str, problems: _Problems) -> str | None:
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
    problems: _Problems,
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
    spec: object, replacement: str, at: str, where: str, problems: _Problems
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
    kind: PlacementKind, target: object, at: str, where: str, problems: _Problems
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
    problems: _Problems,
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


def _read_ca_file(value: object, where: str, base: Path, problems: _Problems) -> Path | None:
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


def _read_pins(value: object, where: str, problems: _Problems) -> tuple[str, ...]:
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


def _read_timeout(value: object, where: str, problems: _Problems) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        problems.add(where, "timeout: must be a number of seconds")
        return _DEFAULT_TIMEOUT
    if not 0 < value <= _MAX_TIMEOUT:
        problems.add(where, f"timeout: must be more than 0 and at most {_MAX_TIMEOUT:g} seconds")
    return float(value)


def _read_size(value: object, key: str, where: str, problems: _Problems) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        problems.add(where, f"{key}: must be an integer number of bytes")
        return 0
    if not 1 <= value <= _MAX_SIZE:
        problems.add(where, f"{key}: must be between 1 and {_MAX_SIZE} bytes (10 MiB)")
    return value
