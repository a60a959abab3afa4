"""The forwarding allowlist, as the vault holds it, and the matcher of callers' URLs.

The allowlist is the only list of places the vault will ever send card data. It comes
from a TOML file named in the vault's configuration, read once at start-up by
:mod:`cardvault.vault.forwarding.loader` (which documents the file); changing it needs a
restart, and no API changes it. The SHA-256 of the file's bytes is kept on
:attr:`Allowlist.sha256` so that the vault can record which allowlist it ran with.

This module holds the model (:class:`Allowlist`, :class:`Destination`,
:class:`Placement`, :class:`Credential`), the names a forward may use
(:data:`REPLACEMENTS`, :data:`PLACEHOLDERS`, :data:`EXPIRY_FORMATS`), and the matcher.

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

import hashlib
import re
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from cardvault.config import Secret
from cardvault.errors import InvalidRequestError
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
    "ParsedUrl",
    "Placement",
    "PlacementKind",
    "UrlRefused",
    "format_expiry",
    "match_url",
    "parse_url",
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
_LABEL_RE: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
# WHATWG URL parsers read a host whose last label is a number (decimal, or 0x hex) as an
# IPv4 address in any of its notations (127.1, 2130706433, 0x7f000001, 0177.0.0.1), so
# such a host can never be a DNS name here.
_NUMERIC_LABEL_RE: Final = re.compile(r"[0-9]+|0x[0-9a-f]*")
# RFC 3986 pchar without percent-encoding and without "@": no allowlisted path needs
# either, and refusing them leaves nothing for two parsers to disagree about.
_PATH_RE: Final = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:/]*")


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

    @classmethod
    def empty(cls) -> Allowlist:
        """No destination at all (no file configured): every forward is refused."""
        return cls((), hashlib.sha256(b"").hexdigest(), Path("/dev/null"))

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


class UrlRefused(Exception):
    """Why a URL was refused. The reason is a constant and never contains the URL."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class ParsedUrl:
    """A URL that :func:`parse_url` accepted: the parts a destination is matched on."""

    host: str
    port: int
    path: str

    @property
    def canonical(self) -> str:
        port = "" if self.port == _HTTPS_PORT else f":{self.port}"
        return f"https://{self.host}{port}{self.path}"


def parse_url(url: object) -> ParsedUrl:
    """Parse ``https://<host>[:<port>]<path>`` strictly, or raise :class:`UrlRefused`.

    The order of checks matters only for the reason reported; every check is needed.
    """
    if not isinstance(url, str):
        raise UrlRefused("is not a string")
    if len(url) > _MAX_URL_LENGTH:
        raise UrlRefused("is too long")
    # Printable ASCII only: this refuses whitespace, CR/LF/NUL, and every Unicode
    # look-alike (fullwidth letters, ideographic full stops, homoglyphs) in one place.
    if any(not ("\x21" <= ch <= "\x7e") for ch in url):
        raise UrlRefused("contains whitespace, control or non-ASCII characters")
    if "\\" in url:
        raise UrlRefused("contains a backslash")
    if "%" in url:
        raise UrlRefused("contains percent-encoding")
    if "@" in url:
        raise UrlRefused("contains userinfo ('@')")
    if "?" in url:
        raise UrlRefused("has a query")
    if "#" in url:
        raise UrlRefused("has a fragment")
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise UrlRefused("is not an absolute https:// URL")
    if scheme.lower() != "https":
        raise UrlRefused("does not use https")
    authority, slash, path_rest = rest.partition("/")
    if not slash:
        raise UrlRefused("has no path")
    path = "/" + path_rest
    if "[" in authority or "]" in authority:
        raise UrlRefused("host is an IP address")
    host, colon, port_text = authority.partition(":")
    port = _HTTPS_PORT
    if colon:
        if not port_text:
            raise UrlRefused("has an empty port")
        if not port_text.isdigit() or port_text[0] == "0" or len(port_text) > 5:
            raise UrlRefused("port is not a canonical decimal number")
        port = int(port_text)
        if port > 65535:
            raise UrlRefused("port is out of range")
    host = host.lower()
    _check_host(host)
    _check_path(path)
    return ParsedUrl(host, port, path)


def _check_host(host: str) -> None:
    if not host:
        raise UrlRefused("has no host")
    if host.endswith("."):
        raise UrlRefused("host ends with a dot")
    if len(host) > 253:
        raise UrlRefused("host is too long")
    labels = host.split(".")
    for label in labels:
        if not _LABEL_RE.fullmatch(label):
            raise UrlRefused("host is not a DNS name")
        # "xn--" is IDNA; RFC 5891 reserves every "??--" label for such encodings.
        if label[2:4] == "--":
            raise UrlRefused("host has an IDNA or reserved label")
    if _NUMERIC_LABEL_RE.fullmatch(labels[-1]):
        raise UrlRefused("host is an IP address")


def _check_path(path: str) -> None:
    if not _PATH_RE.fullmatch(path):
        raise UrlRefused("path has characters outside the allowed set")
    segments = path[1:].split("/")
    for index, segment in enumerate(segments):
        if segment in (".", ".."):
            raise UrlRefused("path has a dot segment")
        # A trailing slash is an empty last segment and is compared exactly.
        if segment == "" and index != len(segments) - 1:
            raise UrlRefused("path has an empty segment")


def match_url(allowlist: Allowlist, url: str, *, method: str, account_id: str) -> Destination:
    """The destination that ``url`` names, for ``method`` and ``account_id``.

    Raises :class:`~cardvault.errors.InvalidRequestError` (``parameter_invalid``,
    ``param="url"``, :data:`REFUSAL_MESSAGE`) for every refusal alike: a malformed or
    suspicious URL, one that is not allowlisted, a method or an account the destination
    does not allow. The reason is logged, never the URL.
    """
    try:
        parsed = parse_url(url)
        for destination in allowlist.destinations:
            if (destination.host, destination.port, destination.path) == (
                parsed.host,
                parsed.port,
                parsed.path,
            ):
                break
        else:
            raise UrlRefused("is not allowlisted")
        if method not in destination.methods:
            raise UrlRefused("method is not allowed for the destination")
        if not destination.allows_account(account_id):
            raise UrlRefused("account may not use the destination")
    except UrlRefused as refusal:
        _log.info("forward_url_refused", reason=refusal.reason)
        # "from None": the chained UrlRefused holds only a reason, but nothing of the
        # caller's input should ride along on the exception either.
        raise InvalidRequestError(REFUSAL_MESSAGE, param="url") from None
    return destination
