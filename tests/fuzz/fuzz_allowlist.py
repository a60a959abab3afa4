"""Fuzz the allowlist's URL matcher, ``cardvault.vault.forwarding.allowlist.match_url``.

The input is the caller's ``url``, decoded as UTF-8 with undecodable bytes as lone
surrogates (``surrogateescape``). The allowlist is :data:`ALLOWLIST_TOML`, loaded once by
``load_allowlist`` from a temporary file.

Properties (anything else is a finding):

* the only exception is the documented refusal: exactly
  :class:`~cardvault.errors.InvalidRequestError` with :data:`REFUSAL_MESSAGE` and
  ``param="url"``;
* an accepted URL names exactly the scheme, host, port and path of the destination
  returned, read by an independent parser (``urllib.parse.urlsplit``) and by the one
  the vault's HTTP client uses (``yarl``), and has no userinfo, query or fragment;
* the same URL is refused for a method and an account the destination does not allow;
* an input takes at most ``CARDVAULT_FUZZ_SLOW_MS`` (100 ms).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import _harness
import yarl

ACCOUNT = "acct_fuzz0000000001"
OTHER_ACCOUNT = "acct_fuzz0000000002"
#: One of each shape the matcher must tell apart: an explicit port, the default port,
#: a trailing slash, every character a path may hold, and a destination any account
#: may use.
ALLOWLIST_TOML = f"""
[[destination]]
name = "local-acquirer"
url = "https://localhost:8445/v1/authorizations"
methods = ["POST"]
replacements = ["card_number", "card_expiry", "card_cvc"]
accounts = ["{ACCOUNT}"]

[[destination]]
name = "acquirer"
url = "https://acquirer.example.com/v1/charges"
methods = ["POST", "PUT"]
replacements = ["card_number"]
accounts = ["*"]

[[destination]]
name = "tokens"
url = "https://pay-1.eu.example.net:8443/api/v2/tokens/"
methods = ["POST"]
replacements = ["card_number", "card_cvc"]
accounts = ["{ACCOUNT}"]

[[destination]]
name = "odd-path"
url = "https://a.b.example.org/x;y=1/a:b/~c!$&'()*+,=/end-._"
methods = ["POST", "PATCH"]
replacements = ["cardholder_name"]
accounts = ["{ACCOUNT}"]
"""

_allowlist: Any = None


def load() -> None:
    global _allowlist
    from cardvault.vault.forwarding.loader import load_allowlist

    with tempfile.TemporaryDirectory(prefix="fuzz-allowlist-") as tmp:
        path = Path(tmp) / "allowlist.toml"
        path.write_text(ALLOWLIST_TOML)
        _allowlist = load_allowlist(path)


def _refused(call: Any, where: str) -> bool:
    """Whether ``call()`` is refused as documented; a finding for any other exception."""
    from cardvault.errors import InvalidRequestError
    from cardvault.vault.forwarding.allowlist import REFUSAL_MESSAGE

    try:
        with _harness.target():
            call()
    except InvalidRequestError as exc:
        if (type(exc), exc.message, exc.param) != (InvalidRequestError, REFUSAL_MESSAGE, "url"):
            _harness.finding("refusal-shape", f"{where}: refused with {exc!r}")
        return True
    except Exception as exc:
        _harness.unexpected(exc, where)
        return True
    return False


def _check_accepted(url: str, destination: Any) -> None:
    if destination not in _allowlist.destinations:
        _harness.finding("accepted-unknown", "match_url returned a destination not on the list")
    want = ("https", destination.host, destination.port, destination.path)
    try:
        split = urlsplit(url)
        got = (split.scheme, split.hostname, split.port or 443, split.path)
        extra = (split.username, split.password, split.query, split.fragment)
    except ValueError as exc:
        _harness.finding("accepted-unparseable", "urlsplit refuses an accepted URL", exc)
        return
    if got != want or extra != (None, None, "", ""):
        _harness.finding(
            "accepted-mismatch",
            f"urlsplit reads an accepted URL as {got} {extra}, the destination is {want}",
        )
    try:
        parsed = yarl.URL(url)
        got = (parsed.scheme, parsed.host, parsed.port, parsed.raw_path)
        extra = (parsed.user, parsed.password, parsed.raw_query_string, parsed.raw_fragment)
    except (ValueError, TypeError) as exc:
        _harness.finding("accepted-unparseable", "yarl refuses an accepted URL", exc)
        return
    if got != want or extra != (None, None, "", ""):
        _harness.finding(
            "accepted-mismatch",
            f"yarl reads an accepted URL as {got} {extra}, the destination is {want}",
        )


def _one(data: bytes) -> None:
    from cardvault.vault.forwarding.allowlist import match_url

    url = data.decode("utf-8", "surrogateescape")
    found: list[Any] = []

    def match() -> None:
        found.append(match_url(_allowlist, url, method="POST", account_id=ACCOUNT))

    def other_account() -> None:
        match_url(_allowlist, url, method="POST", account_id=OTHER_ACCOUNT)

    def other_method() -> None:
        match_url(_allowlist, url, method="GET", account_id=ACCOUNT)

    if _refused(match, "match_url") or not found:
        return
    destination = found[0]
    _check_accepted(url, destination)
    if not _refused(other_method, "match_url(GET)"):
        _harness.finding("method-ignored", "a method the destination does not allow matched")
    if "*" not in destination.accounts and not _refused(other_account, "match_url(other)"):
        _harness.finding("account-ignored", "an account the destination does not list matched")


def TestOneInput(data: bytes) -> None:
    _harness.timed(_one, data)


if __name__ == "__main__":
    _harness.main(TestOneInput, load)
