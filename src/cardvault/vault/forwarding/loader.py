"""The forwarding allowlist's file: reading it, checking it, and what it may say.

:func:`load_allowlist` reads the file once, at start-up, and hashes the bytes it parses.
An invalid file stops start-up with a :class:`~cardvault.errors.ConfigurationError`
that names every problem (destination and field); the SHA-256 of the file's bytes is
logged and kept on :attr:`~cardvault.vault.forwarding.allowlist.Allowlist.sha256`.

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
  ``{{card_exp_year}}`` (see :data:`~cardvault.vault.forwarding.allowlist.PLACEHOLDERS`);
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
    One string in one of
    :data:`~cardvault.vault.forwarding.allowlist.EXPIRY_FORMATS`; see
    :func:`~cardvault.vault.forwarding.allowlist.format_expiry`.

One destination's body placements are all JSON or all form, never both; no two
placements may write to the same place (or, for JSON, one inside the other); and a
placement may only name a replacement the destination may receive.
"""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Any, Final

from cardvault.errors import ConfigurationError
from cardvault.logging import get_logger
from cardvault.vault.forwarding.allowlist import Allowlist, Destination
from cardvault.vault.forwarding.checks import Problems, read_destination

__all__ = ["load_allowlist"]

_log = get_logger("cardvault.vault.allowlist")

_MAX_FILE_BYTES: Final = 1024 * 1024


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

    problems = Problems()
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


def _read_document(document: dict[str, Any], base: Path, problems: Problems) -> list[Destination]:
    for key in document:
        if key != "destination":
            problems.add("top level", f"unknown key {key!r} (only [[destination]] tables)")
    raw = document.get("destination", [])
    if not isinstance(raw, list) or not all(isinstance(t, dict) for t in raw):
        problems.add("top level", "destination must be an array of tables ([[destination]])")
        return []
    destinations: list[Destination] = []
    for index, table in enumerate(raw, start=1):
        destination = read_destination(table, index, base, problems)
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
