"""The forwarding allowlist: loading the file, and matching a caller's URL against it."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from cardvault.config import Secret
from cardvault.errors import ConfigurationError, InvalidRequestError
from cardvault.vault.forwarding.allowlist import (
    REFUSAL_MESSAGE,
    Allowlist,
    Placement,
    format_expiry,
    match_url,
)
from cardvault.vault.forwarding.loader import load_allowlist
from helpers import Pki

ROOT = Path(__file__).resolve().parents[3]
CORPUS = json.loads((ROOT / "tests" / "data" / "hostile_urls.json").read_text())
EXAMPLE = ROOT / "examples" / "config" / "allowlist.toml"

ACCOUNT = "acct_allowed0000000001"
OTHER_ACCOUNT = "acct_other00000000002"
# Looks like a real key so that a leak would be obvious; it is not one.
API_KEY = "sk_test_allowlist_secret_do_not_print_0123456789"
PIN = base64.b64encode(hashlib.sha256(b"spki").digest()).decode()


def toml_value(value: Any) -> str:
    """A value in TOML syntax (inline tables and arrays; JSON strings are TOML strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value))


def render(*destinations: dict[str, Any]) -> str:
    out = []
    for destination in destinations:
        out.append("[[destination]]")
        out.extend(f"{key} = {toml_value(value)}" for key, value in destination.items())
        out.append("")
    return "\n".join(out)


def destination(**changes: Any) -> dict[str, Any]:
    """A valid destination; a change of ``None`` removes the key."""
    base: dict[str, Any] = {
        "name": "acquirer",
        "url": "https://acquirer.example.com/v1/charges",
        "methods": ["POST"],
        "replacements": ["card_number", "card_expiry", "card_cvc", "cardholder_name"],
        "accounts": [ACCOUNT],
        "placements": {
            "card_number": {"json": "/card/number"},
            "card_expiry": {"json_month": "/card/exp_month", "json_year": "/card/exp_year"},
            "card_cvc": {"json": "/card/cvc"},
        },
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not None}


def write(tmp_path: Path, text: str, name: str = "allowlist.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def corpus_allowlist(tmp_path_factory: pytest.TempPathFactory) -> Allowlist:
    """The allowlist the hostile and benign URLs are written against."""
    destinations = [
        destination(name=f"d{i}", url=url, placements={}, accounts=[ACCOUNT])
        for i, url in enumerate(CORPUS["destinations"])
    ]
    return load_allowlist(write(tmp_path_factory.mktemp("corpus"), render(*destinations)))


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-key"
    path.write_text(API_KEY + "\n")
    return path


# --- the corpus ----------------------------------------------------------------------------


def test_corpus_has_at_least_200_hostile_urls_each_with_a_distinct_reason() -> None:
    hostile = CORPUS["hostile"]
    assert len(hostile) >= 200
    assert all(entry["reason"].strip() for entry in hostile)
    assert len({entry["reason"] for entry in hostile}) == len(hostile)
    assert len({entry["url"] for entry in hostile}) == len(hostile)


@pytest.mark.parametrize(
    "entry", CORPUS["hostile"], ids=[entry["reason"] for entry in CORPUS["hostile"]]
)
def test_match_url_refuses_hostile_url(corpus_allowlist: Allowlist, entry: dict[str, str]) -> None:
    with pytest.raises(InvalidRequestError) as info:
        match_url(corpus_allowlist, entry["url"], method="POST", account_id=ACCOUNT)
    assert info.value.message == REFUSAL_MESSAGE
    assert info.value.param == "url"


@pytest.mark.parametrize(
    "entry", CORPUS["benign"], ids=[entry["reason"] for entry in CORPUS["benign"]]
)
def test_match_url_accepts_benign_url(corpus_allowlist: Allowlist, entry: dict[str, str]) -> None:
    found = match_url(corpus_allowlist, entry["url"], method="POST", account_id=ACCOUNT)
    # The vault connects to the allowlisted URL, never to the caller's spelling of it.
    assert found.url == entry["expect"]


def test_benign_urls_are_not_all_exact_copies_of_the_allowlist() -> None:
    # Otherwise the benign test would not show that normalization is accepted.
    assert {e["url"] for e in CORPUS["benign"]} - set(CORPUS["destinations"])


# --- the refusal -------------------------------------------------------------------------


def test_refusal_is_one_opaque_error_that_never_echoes_the_url(
    corpus_allowlist: Allowlist,
) -> None:
    url = "https://user:4242424242424242@localhost:8445/v1/authorizations?cvc=123"
    with pytest.raises(InvalidRequestError) as info:
        match_url(corpus_allowlist, url, method="POST", account_id=ACCOUNT)
    error = info.value
    assert type(error) is InvalidRequestError
    assert (error.code, error.http_status, error.param) == ("parameter_invalid", 400, "url")
    rendered = json.dumps(error.to_dict()) + str(error) + repr(error)
    for part in ("4242", "localhost", "cvc", "user"):
        assert part not in rendered
    # Nothing of the parsing rides along as a cause or a context either.
    assert error.__cause__ is None
    assert error.__suppress_context__


def test_refusal_logs_the_reason_but_not_the_url(corpus_allowlist: Allowlist) -> None:
    url = "https://localhost:8445/v1/authorizations?number=4242424242424242"
    with capture_logs() as logs, pytest.raises(InvalidRequestError):
        match_url(corpus_allowlist, url, method="POST", account_id=ACCOUNT)
    assert [entry["reason"] for entry in logs] == ["has a query"]
    assert "4242" not in repr(logs)


def test_match_url_refuses_a_method_the_destination_does_not_allow(
    corpus_allowlist: Allowlist,
) -> None:
    url = CORPUS["destinations"][0]
    for method in ("GET", "PUT", "post", "POST ", ""):
        with pytest.raises(InvalidRequestError) as info:
            match_url(corpus_allowlist, url, method=method, account_id=ACCOUNT)
        assert info.value.message == REFUSAL_MESSAGE


def test_match_url_refuses_an_account_the_destination_does_not_list(
    corpus_allowlist: Allowlist,
) -> None:
    url = CORPUS["destinations"][0]
    for account in (OTHER_ACCOUNT, "", "*"):
        with pytest.raises(InvalidRequestError) as info:
            match_url(corpus_allowlist, url, method="POST", account_id=account)
        assert info.value.message == REFUSAL_MESSAGE


def test_match_url_with_any_account_destination_accepts_every_account(tmp_path: Path) -> None:
    allowlist = load_allowlist(write(tmp_path, render(destination(accounts=["*"]))))
    for account in (ACCOUNT, OTHER_ACCOUNT):
        found = match_url(
            allowlist, "https://acquirer.example.com/v1/charges", method="POST", account_id=account
        )
        assert found.name == "acquirer"


def test_match_url_picks_the_destination_by_host_port_and_path(tmp_path: Path) -> None:
    allowlist = load_allowlist(
        write(
            tmp_path,
            render(
                destination(name="a", url="https://acquirer.example.com/v1/charges"),
                destination(name="b", url="https://acquirer.example.com/v1/refunds"),
                destination(name="c", url="https://acquirer.example.com:8443/v1/charges"),
            ),
        )
    )
    for url, name in [
        ("https://acquirer.example.com/v1/charges", "a"),
        ("https://acquirer.example.com/v1/refunds", "b"),
        ("https://acquirer.example.com:8443/v1/charges", "c"),
    ]:
        assert match_url(allowlist, url, method="POST", account_id=ACCOUNT).name == name


def test_match_url_refuses_a_url_that_is_not_a_string(corpus_allowlist: Allowlist) -> None:
    for value in (None, b"https://localhost:8445/v1/authorizations", 42):
        with pytest.raises(InvalidRequestError):
            match_url(corpus_allowlist, value, method="POST", account_id=ACCOUNT)  # type: ignore[arg-type]


def test_match_url_on_an_empty_allowlist_refuses_everything(tmp_path: Path) -> None:
    allowlist = load_allowlist(write(tmp_path, "# nothing may be forwarded\n"))
    assert allowlist.destinations == ()
    with pytest.raises(InvalidRequestError):
        match_url(allowlist, CORPUS["destinations"][0], method="POST", account_id=ACCOUNT)


# --- loading a valid file ------------------------------------------------------------------


def test_load_allowlist_reads_every_field(tmp_path: Path, secret_file: Path, pki: Pki) -> None:
    text = render(
        destination(
            url="https://acquirer.example.com:8443/v1/charges",
            methods=["POST", "PUT"],
            replacements=["card_number", "card_expiry", "card_cvc"],
            accounts=[ACCOUNT, OTHER_ACCOUNT],
            placements={
                "card_number": {"form": "card[number]"},
                "card_expiry": {"form": "card[expiry]", "format": "MM/YY"},
                "card_cvc": {"header": "X-Card-Cvc"},
            },
            ca_file=str(pki.ca_file),
            pin_sha256=[PIN],
            timeout=2.5,
            max_request_bytes=1000,
            max_response_bytes=2000,
            credentials=[
                {"header": "Authorization", "prefix": "Bearer ", "secret_file": secret_file.name}
            ],
        )
    )
    allowlist = load_allowlist(write(tmp_path, text))
    (d,) = allowlist.destinations
    assert allowlist.get("acquirer") is d
    assert allowlist.get("nope") is None
    assert (d.name, d.url, d.scheme, d.host, d.port, d.path) == (
        "acquirer",
        "https://acquirer.example.com:8443/v1/charges",
        "https",
        "acquirer.example.com",
        8443,
        "/v1/charges",
    )
    assert d.methods == {"POST", "PUT"}
    assert d.replacements == {"card_number", "card_expiry", "card_cvc"}
    assert d.accounts == {ACCOUNT, OTHER_ACCOUNT}
    assert dict(d.placements) == {
        "card_number": Placement("form", target="card[number]"),
        "card_expiry": Placement("form", target="card[expiry]", expiry_format="MM/YY"),
        "card_cvc": Placement("header", target="X-Card-Cvc"),
    }
    assert d.ca_file == pki.ca_file.absolute()
    assert d.pin_sha256 == (PIN,)
    assert (d.timeout, d.max_request_bytes, d.max_response_bytes) == (2.5, 1000, 2000)
    (credential,) = d.credentials
    assert credential.header_name == "Authorization"
    # A relative secret_file is relative to the allowlist file.
    assert credential.secret_file == secret_file.absolute()
    assert credential.value == Secret("Bearer " + API_KEY)
    assert credential.value.reveal() == "Bearer " + API_KEY


def test_load_allowlist_applies_defaults(tmp_path: Path) -> None:
    allowlist = load_allowlist(
        write(tmp_path, render(destination(url="https://acquirer.example.com/", placements=None)))
    )
    (d,) = allowlist.destinations
    assert (d.port, d.path, d.url) == (443, "/", "https://acquirer.example.com/")
    assert dict(d.placements) == {}
    assert (d.ca_file, d.pin_sha256, d.credentials) == (None, (), ())
    assert (d.timeout, d.max_request_bytes, d.max_response_bytes) == (10.0, 65536, 1048576)


def test_load_allowlist_allows_localhost_as_a_name(tmp_path: Path) -> None:
    url = "https://localhost:8445/v1/authorizations"
    allowlist = load_allowlist(write(tmp_path, render(destination(url=url))))
    assert allowlist.destinations[0].host == "localhost"


def test_load_allowlist_sha256_is_of_the_file_bytes(tmp_path: Path) -> None:
    path = write(tmp_path, render(destination()))
    first = load_allowlist(path)
    assert first.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert first.path == path
    # A comment is part of the file that was reviewed, so it changes the hash.
    path.write_text("# reviewed\n" + path.read_text())
    assert load_allowlist(path).sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_allowlist(path).sha256 != first.sha256


def test_load_allowlist_logs_the_sha256(tmp_path: Path) -> None:
    path = write(tmp_path, render(destination()))
    with capture_logs() as logs:
        allowlist = load_allowlist(path)
    (entry,) = logs
    assert entry["event"] == "allowlist_loaded"
    assert entry["sha256"] == allowlist.sha256
    assert entry["destinations"] == ["acquirer"]


def test_credential_secret_is_never_in_a_repr_or_str(tmp_path: Path, secret_file: Path) -> None:
    text = render(
        destination(credentials=[{"header": "Authorization", "secret_file": str(secret_file)}])
    )
    with capture_logs() as logs:
        allowlist = load_allowlist(write(tmp_path, text))
    d = allowlist.destinations[0]
    shown = [repr(allowlist), str(allowlist), repr(d), str(d), repr(d.credentials), repr(logs)]
    shown.append(f"{d.credentials[0].value}")
    assert d.credentials[0].value.reveal() == API_KEY
    for text_ in shown:
        assert API_KEY not in text_
        assert "sk_test" not in text_


def test_example_allowlist_loads(tmp_path: Path) -> None:
    allowlist = load_allowlist(EXAMPLE)
    (d,) = allowlist.destinations
    assert d.url == "https://localhost:8445/v1/authorizations"
    assert d.placements["card_number"] == Placement("json", target="/card/number")
    assert d.placements["card_expiry"] == Placement(
        "json", month_target="/card/exp_month", year_target="/card/exp_year"
    )
    assert d.placements["card_cvc"] == Placement("json", target="/card/cvc")
    assert "cardholder_name" in d.placements
    found = match_url(allowlist, d.url, method="POST", account_id=ACCOUNT)
    assert found is d


# --- loading an invalid file ---------------------------------------------------------------

# (what is wrong, the destination, what the message must say)
INVALID: list[tuple[str, dict[str, Any], str]] = [
    (
        "unknown key",
        destination(pin_sha265=[PIN]),
        "destination 'acquirer': unknown key 'pin_sha265'",
    ),
    ("missing url", destination(url=None), "destination 'acquirer': url: required"),
    ("missing methods", destination(methods=None), "methods: required"),
    ("missing replacements", destination(replacements=None), "replacements: required"),
    ("missing accounts", destination(accounts=None), "accounts: required"),
    ("missing name", destination(name=None), "destination #1: name: required"),
    ("bad name", destination(name="Acquirer One"), "destination #1: name: must be"),
    ("url not a string", destination(url=1), "url: must be a string"),
    ("http", destination(url="http://acquirer.example.com/v1/charges"), "url: does not use https"),
    (
        "userinfo",
        destination(url="https://u:pw@acquirer.example.com/v1/charges"),
        "url: contains userinfo",
    ),
    ("query", destination(url="https://acquirer.example.com/v1/charges?a=1"), "url: has a query"),
    (
        "fragment",
        destination(url="https://acquirer.example.com/v1/charges#a"),
        "url: has a fragment",
    ),
    ("no path", destination(url="https://acquirer.example.com"), "url: has no path"),
    (
        "uppercase host",
        destination(url="https://Acquirer.example.com/v1/charges"),
        "url: must be written in canonical form, https://acquirer.example.com/v1/charges",
    ),
    (
        "uppercase scheme",
        destination(url="HTTPS://acquirer.example.com/v1/charges"),
        "url: must be written in canonical form",
    ),
    (
        "explicit 443",
        destination(url="https://acquirer.example.com:443/v1/charges"),
        "url: must be written in canonical form, https://acquirer.example.com/v1/charges",
    ),
    (
        "IPv4 literal",
        destination(url="https://127.0.0.1:8445/v1/authorizations"),
        "url: host is an IP address",
    ),
    (
        "decimal IPv4",
        destination(url="https://2130706433/v1/charges"),
        "url: host is an IP address",
    ),
    (
        "IPv6 literal",
        destination(url="https://[::1]:8445/v1/charges"),
        "url: host is an IP address",
    ),
    (
        "trailing dot",
        destination(url="https://acquirer.example.com./v1/charges"),
        "url: host ends with a dot",
    ),
    (
        "punycode",
        destination(url="https://xn--acquirer-9za.example.com/v1/charges"),
        "url: host has an IDNA",
    ),
    (
        "non-ASCII host",
        destination(url="https://acquirer.ex\u0430mple.com/v1/charges"),
        "url: contains whitespace, control or non-ASCII",
    ),
    (
        "dot segment",
        destination(url="https://acquirer.example.com/v1/../charges"),
        "url: path has a dot segment",
    ),
    (
        "empty segment",
        destination(url="https://acquirer.example.com/v1//charges"),
        "url: path has an empty segment",
    ),
    (
        "percent",
        destination(url="https://acquirer.example.com/v1/ch%61rges"),
        "url: contains percent-encoding",
    ),
    (
        "empty port",
        destination(url="https://acquirer.example.com:/v1/charges"),
        "url: has an empty port",
    ),
    (
        "port 0",
        destination(url="https://acquirer.example.com:0/v1/charges"),
        "url: port is not a canonical",
    ),
    ("lowercase method", destination(methods=["post"]), "methods: 'post' is not one of"),
    ("CONNECT", destination(methods=["CONNECT"]), "methods: 'CONNECT' is not one of"),
    ("no methods", destination(methods=[]), "methods: must be a non-empty list"),
    ("duplicate method", destination(methods=["POST", "POST"]), "methods: has duplicates"),
    (
        "unknown replacement",
        destination(replacements=["card_pin"]),
        "replacements: 'card_pin' is not one of",
    ),
    (
        "no replacements",
        destination(replacements=[], placements={}),
        "replacements: must be a non-empty list",
    ),
    (
        "placement not listed",
        destination(replacements=["card_number"]),
        "placements.card_cvc: 'card_cvc' is not in this destination's replacements",
    ),
    (
        "placement unknown",
        destination(placements={"card_pin": {"json": "/pin"}}),
        "placements.card_pin: 'card_pin' is not a replacement",
    ),
    (
        "placement two kinds",
        destination(placements={"card_number": {"json": "/n", "form": "n"}}),
        "placements.card_number: must name exactly one place",
    ),
    (
        "placement no kind",
        destination(placements={"card_number": {}}),
        "placements.card_number: must name exactly one place",
    ),
    (
        "placement not a table",
        destination(placements={"card_number": "/card/number"}),
        "placements.card_number: must be a table",
    ),
    (
        "pointer without slash",
        destination(placements={"card_number": {"json": "card/number"}}),
        "placements.card_number.json: must be a JSON Pointer",
    ),
    (
        "pointer bad tilde",
        destination(placements={"card_number": {"json": "/card/~2"}}),
        "placements.card_number.json: must be a JSON Pointer",
    ),
    (
        "pointer empty",
        destination(placements={"card_number": {"json": ""}}),
        "placements.card_number.json: must be a JSON Pointer",
    ),
    (
        "form field with =",
        destination(placements={"card_number": {"form": "a=b"}}),
        "placements.card_number.form: must be a form field name",
    ),
    (
        "placement unknown key",
        destination(placements={"card_number": {"jsonn": "/n"}}),
        "placements.card_number: unknown key 'jsonn'",
    ),
    (
        "format on card_number",
        destination(placements={"card_number": {"json": "/n", "format": "MM/YY"}}),
        "placements.card_number: unknown key 'format'",
    ),
    (
        "expiry without format",
        destination(placements={"card_expiry": {"json": "/card/expiry"}}),
        "placements.card_expiry.format: one value needs a format",
    ),
    (
        "expiry bad format",
        destination(placements={"card_expiry": {"json": "/e", "format": "M/Y"}}),
        "placements.card_expiry.format: one value needs a format",
    ),
    (
        "expiry half split",
        destination(placements={"card_expiry": {"json_month": "/m"}}),
        "placements.card_expiry: give both json_month and json_year",
    ),
    (
        "expiry split with format",
        destination(
            placements={"card_expiry": {"json_month": "/m", "json_year": "/y", "format": "MMYY"}}
        ),
        "placements.card_expiry: give both json_month and json_year, and no format",
    ),
    (
        "expiry mixed split",
        destination(placements={"card_expiry": {"json_month": "/m", "form_year": "y"}}),
        "placements.card_expiry: must name exactly one place",
    ),
    (
        "json and form",
        destination(placements={"card_number": {"json": "/n"}, "card_cvc": {"form": "cvc"}}),
        "placements: mix json and form",
    ),
    (
        "same place",
        destination(
            placements={"card_number": {"json": "/card/x"}, "card_cvc": {"json": "/card/x"}}
        ),
        "placements.card_cvc and placements.card_number: write to the same place",
    ),
    (
        "nested place",
        destination(
            placements={"card_number": {"json": "/card"}, "card_cvc": {"json": "/card/cvc"}}
        ),
        "write to the same place",
    ),
    (
        "same header",
        destination(placements={"card_number": {"header": "X-A"}, "card_cvc": {"header": "x-a"}}),
        "write to the same place",
    ),
    (
        "reserved header",
        destination(placements={"card_number": {"header": "Host"}}),
        "placements.card_number.header: 'Host' is set by the vault",
    ),
    (
        "bad header name",
        destination(placements={"card_number": {"header": "X Card"}}),
        "placements.card_number.header: must be an HTTP header name",
    ),
    (
        "accounts bad id",
        destination(accounts=["merchant-1"]),
        "accounts: each entry must be an account id",
    ),
    (
        "accounts star with others",
        destination(accounts=["*", ACCOUNT]),
        "accounts: '*' (any account) must be the only entry",
    ),
    ("accounts empty", destination(accounts=[]), "accounts: must be a non-empty list"),
    (
        "pin not base64",
        destination(pin_sha256=["not base64!"]),
        "pin_sha256: each pin must be the base64 of a 32-byte",
    ),
    (
        "pin 31 bytes",
        destination(pin_sha256=[base64.b64encode(b"x" * 31).decode()]),
        "pin_sha256: each pin must be the base64 of a 32-byte",
    ),
    (
        "pin hex",
        destination(pin_sha256=[hashlib.sha256(b"spki").hexdigest()]),
        "pin_sha256: each pin must be the base64 of a 32-byte",
    ),
    ("pin not a list", destination(pin_sha256=PIN), "pin_sha256: must be a list of strings"),
    ("duplicate pins", destination(pin_sha256=[PIN, PIN]), "pin_sha256: has duplicates"),
    ("timeout 0", destination(timeout=0), "timeout: must be more than 0 and at most 60"),
    ("timeout negative", destination(timeout=-1.5), "timeout: must be more than 0"),
    ("timeout too long", destination(timeout=60.5), "timeout: must be more than 0 and at most 60"),
    ("timeout string", destination(timeout="10"), "timeout: must be a number"),
    ("timeout bool", destination(timeout=True), "timeout: must be a number"),
    (
        "request size 0",
        destination(max_request_bytes=0),
        "max_request_bytes: must be between 1 and 10485760",
    ),
    (
        "response size too big",
        destination(max_response_bytes=10 * 1024 * 1024 + 1),
        "max_response_bytes: must be between 1 and 10485760",
    ),
    ("size float", destination(max_request_bytes=1.5), "max_request_bytes: must be an integer"),
    ("ca_file missing", destination(ca_file="missing-ca.pem"), "ca_file: cannot read"),
    (
        "credentials not tables",
        destination(credentials=["Authorization"]),
        "credentials: must be an array of tables",
    ),
    (
        "credential no secret_file",
        destination(credentials=[{"header": "Authorization"}]),
        "credentials #1: secret_file: required",
    ),
    (
        "credential unknown key",
        destination(credentials=[{"header": "A", "secret": "x", "secret_file": "f"}]),
        "credentials #1: unknown key 'secret'",
    ),
    (
        "credential unreadable",
        destination(credentials=[{"header": "Authorization", "secret_file": "missing-key"}]),
        "credentials #1: secret_file: cannot read",
    ),
    (
        "credential reserved header",
        destination(credentials=[{"header": "Content-Length", "secret_file": "f"}]),
        "credentials #1: header: 'Content-Length' is set by the vault",
    ),
    (
        "credential proxy header",
        destination(credentials=[{"header": "Proxy-Foo", "secret_file": "f"}]),
        "credentials #1: header: 'Proxy-Foo' is set by the vault",
    ),
    (
        "credential prefix with newline",
        destination(credentials=[{"header": "A", "prefix": "x\n", "secret_file": "f"}]),
        "credentials #1: prefix: must be a string of printable ASCII",
    ),
]


@pytest.mark.parametrize(
    ("destination_", "expected"),
    [(d, e) for _, d, e in INVALID],
    ids=[what for what, _, _ in INVALID],
)
def test_load_allowlist_names_the_problem(
    tmp_path: Path, destination_: dict[str, Any], expected: str
) -> None:
    path = write(tmp_path, render(destination_))
    with pytest.raises(ConfigurationError) as info:
        load_allowlist(path)
    assert expected in info.value.message
    assert str(path) in info.value.message


def test_load_allowlist_never_repeats_a_password_from_the_url(tmp_path: Path) -> None:
    url = "https://user:hunter2secret@acquirer.example.com/v1/charges"
    with pytest.raises(ConfigurationError) as info:
        load_allowlist(write(tmp_path, render(destination(url=url))))
    assert "hunter2secret" not in info.value.message


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", "is empty"),
        (b"\n \n", "is empty"),
        (b"line one\nline two\n", "must hold one line of printable ASCII"),
        ("cl\u00e9".encode(), "must hold printable ASCII"),
        (b"x" * 5000, "is larger than 4096 bytes"),
    ],
    ids=["empty", "blank", "two lines", "non-ASCII", "too large"],
)
def test_load_allowlist_refuses_a_bad_secret_file_without_showing_it(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    (tmp_path / "key").write_bytes(content)
    text = render(destination(credentials=[{"header": "Authorization", "secret_file": "key"}]))
    with pytest.raises(ConfigurationError) as info:
        load_allowlist(write(tmp_path, text))
    assert f"credentials #1: secret_file: {tmp_path / 'key'} {expected}" in info.value.message
    assert "line one" not in info.value.message


def test_load_allowlist_refuses_a_header_set_by_both_a_placement_and_a_credential(
    tmp_path: Path, secret_file: Path
) -> None:
    text = render(
        destination(
            placements={"card_number": {"header": "authorization"}},
            credentials=[{"header": "Authorization", "secret_file": str(secret_file)}],
        )
    )
    with pytest.raises(ConfigurationError, match="header is also set by a credential"):
        load_allowlist(write(tmp_path, text))


def test_load_allowlist_refuses_two_credentials_for_one_header(
    tmp_path: Path, secret_file: Path
) -> None:
    credential = {"header": "Authorization", "secret_file": str(secret_file)}
    text = render(destination(credentials=[credential, credential]))
    with pytest.raises(ConfigurationError, match="another credential sets the same header"):
        load_allowlist(write(tmp_path, text))


def test_load_allowlist_explains_a_key_written_below_the_placements_table(
    tmp_path: Path,
) -> None:
    text = render(destination(placements=None)) + (
        '[destination.placements]\ncard_number = { json = "/card/number" }\ntimeout = 5\n'
    )
    with pytest.raises(ConfigurationError) as info:
        load_allowlist(write(tmp_path, text))
    assert (
        "placements.timeout: 'timeout' is not a replacement (destination keys go above the "
        "[destination.placements] table)"
    ) in info.value.message


def test_load_allowlist_refuses_a_ca_file_without_a_certificate(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigurationError, match=r"ca_file: .* holds no valid PEM certificate"):
        load_allowlist(write(tmp_path, render(destination(ca_file="ca.pem"))))


def test_load_allowlist_refuses_duplicate_names_and_urls(tmp_path: Path) -> None:
    text = render(
        destination(),
        destination(url="https://acquirer.example.com/v1/refunds"),
        destination(name="other"),
    )
    with pytest.raises(ConfigurationError) as info:
        load_allowlist(write(tmp_path, text))
    assert "destination 'acquirer': name: another destination has the same name" in (
        info.value.message
    )
    assert "destination 'other': url: another destination has the same URL" in info.value.message


def test_load_allowlist_reports_every_problem_at_once(tmp_path: Path) -> None:
    text = render(
        destination(methods=["post"], timeout=0),
        destination(name="second", url="http://acquirer.example.com/x"),
    )
    with pytest.raises(ConfigurationError) as info:
        load_allowlist(write(tmp_path, text))
    message = info.value.message
    assert "destination 'acquirer': methods:" in message
    assert "destination 'acquirer': timeout:" in message
    assert "destination 'second': url: does not use https" in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[[destination]\nname = 1", "is not valid TOML"),
        ("destination = 1\n", "destination must be an array of tables"),
        ("destinations = []\n", "top level: unknown key 'destinations'"),
        ("version = 1\n", "top level: unknown key 'version'"),
    ],
    ids=["not TOML", "not an array", "misspelt", "unknown top-level key"],
)
def test_load_allowlist_refuses_a_malformed_file(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigurationError, match=expected):
        load_allowlist(write(tmp_path, text))


def test_load_allowlist_refuses_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "allowlist.toml"
    path.write_bytes(b"# \xff\n")
    with pytest.raises(ConfigurationError, match="is not valid TOML"):
        load_allowlist(path)


def test_load_allowlist_refuses_a_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="cannot be read"):
        load_allowlist(tmp_path / "missing.toml")


def test_load_allowlist_refuses_a_huge_file(tmp_path: Path) -> None:
    path = write(tmp_path, "#" + "x" * (1024 * 1024) + "\n")
    with pytest.raises(ConfigurationError, match="larger than 1 MiB"):
        load_allowlist(path)


# --- expiry formats --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "expected"),
    [
        ("MM/YY", "03/34"),
        ("MM/YYYY", "03/2034"),
        ("MMYY", "0334"),
        ("MMYYYY", "032034"),
        ("YYMM", "3403"),
        ("YYYY-MM", "2034-03"),
    ],
)
def test_format_expiry(fmt: str, expected: str) -> None:
    assert format_expiry(fmt, 3, 2034) == expected


def test_format_expiry_refuses_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="unknown expiry format"):
        format_expiry("DD/MM", 3, 2034)
