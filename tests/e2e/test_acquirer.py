"""The acquirer simulator (examples/acquirer) as a real process over real TLS.

Card numbers: only the published test numbers (read from test_cards.json) and numbers
generated here from random digits and a Luhn check digit.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any

import httpx
import pytest

from cardvault.cards import find_card_numbers, luhn_valid
from cardvault.transport.asgi import HSTS
from cardvault.transport.tls import client_context
from helpers import ROOT, Pki, free_port, wait_for_port

# --- test data -----------------------------------------------------------------------


def _load_table() -> dict[str, Any]:
    raw = resources.files("cardvault.cards").joinpath("test_cards.json").read_text("utf-8")
    return dict(json.loads(raw))


TABLE = _load_table()
APPROVING = [c for c in TABLE["cards"] if c["outcome"] is None]
DECLINING = [c for c in TABLE["cards"] if c["outcome"] is not None]
PUBLISHED = {c["number"] for c in TABLE["cards"]}
VISA_OK = next(c["number"] for c in APPROVING if c["brand"] == "visa")
MC_OK = next(c["number"] for c in APPROVING if c["brand"] == "mastercard")
NOW = datetime.now(UTC)
FUTURE_YEAR = NOW.year + 3

#: Every number this module sent, so the log checks can look for each of them.
SENT: set[str] = set()


def luhn_check_digit(payload: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(payload)):
        n = int(ch)
        if i % 2 == 0:  # doubled: these positions shift by one once the check digit is added
            n *= 2
            if n > 9:
                n -= 9
        total += n
    return str((10 - total % 10) % 10)


def generated_number(prefix: str, length: int) -> str:
    """A random Luhn-valid number with ``prefix`` that is not a published test card."""
    while True:
        body = prefix + "".join(
            secrets.choice("0123456789") for _ in range(length - 1 - len(prefix))
        )
        number = body + luhn_check_digit(body)
        if number not in PUBLISHED:
            assert luhn_valid(number)
            return number


def luhn_invalid(number: str) -> str:
    """``number`` with its check digit changed, so that it fails the Luhn check."""
    wrong = str((int(number[-1]) + 1) % 10)
    return number[:-1] + wrong


# --- the process --------------------------------------------------------------------


@dataclass
class Acquirer:
    port: int
    state: Path
    log: Path

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    @property
    def received_file(self) -> Path:
        return self.state / "received.jsonl"


def entry_point(script: bool) -> list[str]:
    """``-m examples.acquirer`` (needs the repository root as cwd), or the script path."""
    return (
        [str(ROOT / "examples" / "acquirer" / "__main__.py")]
        if script
        else ["-m", "examples.acquirer"]
    )


def acquirer_cert(pki: Pki) -> tuple[Path, Path]:
    cert, key = pki.cert("acquirer")
    if not (cert.exists() and key.exists()):
        pki.ca.issue("acquirer", dns=["localhost"], ips=["127.0.0.1"])
    return cert, key


@contextlib.contextmanager
def acquirer_process(
    args: Sequence[str], *, log: Path, script: bool = False, cwd: Path = ROOT
) -> Iterator[subprocess.Popen[bytes]]:
    """Run the acquirer as a child process (``-m examples.acquirer``, or the script path)."""
    entry = entry_point(script)
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, *entry, *args], stdout=fh, stderr=fh, cwd=cwd, env=dict(os.environ)
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def running_acquirer(
    directory: Path, pki: Pki, *extra: str, script: bool = False
) -> Iterator[Acquirer]:
    port = free_port()
    cert, key = acquirer_cert(pki)
    info = Acquirer(port, directory / "state", directory / "acquirer.log")
    args = ["--port", str(port), "--cert", str(cert), "--key", str(key), "--state", str(info.state)]
    cwd = directory if script else ROOT
    with acquirer_process([*args, *extra], log=info.log, script=script, cwd=cwd) as proc:
        wait_for_port(port, proc)
        yield info


@pytest.fixture(scope="module")
def acquirer(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Acquirer]:
    """With the record API and the redirect aid, started as ``python -m examples.acquirer``."""
    directory = tmp_path_factory.mktemp("acquirer")
    with running_acquirer(
        directory, pki, "--record-api", "--redirect-path", "/v1/redirect"
    ) as info:
        yield info


@pytest.fixture(scope="module")
def echoing(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Acquirer]:
    """With ``--echo-card`` and no other aid, started by its script path from elsewhere."""
    directory = tmp_path_factory.mktemp("acquirer-echo")
    with running_acquirer(directory, pki, "--echo-card", script=True) as info:
        yield info


@pytest.fixture(scope="module")
def https(pki: Pki) -> Iterator[httpx.Client]:
    with httpx.Client(
        verify=client_context(pki.ca_file), trust_env=False, follow_redirects=False, timeout=10
    ) as client:
        yield client


# --- helpers ------------------------------------------------------------------------


#: A parameter left out of the request altogether (``None`` sends JSON null).
_ABSENT: Any = object()


def card(number: str | int, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "number": number,
        "exp_month": 12,
        "exp_year": FUTURE_YEAR,
        "cvc": "1234" if str(number).startswith(("34", "37")) else "123",
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not _ABSENT}


def authorize(
    client: httpx.Client,
    acq: Acquirer,
    card_data: dict[str, Any],
    *,
    amount: int = 1999,
    currency: str = "usd",
    reference: str | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    number = card_data.get("number")
    if isinstance(number, str | int):
        SENT.add(str(number))
    body = {
        "amount": amount,
        "currency": currency,
        "card": card_data,
        "reference": reference or "ref_" + secrets.token_hex(8),
    }
    return client.post(f"{acq.url}/v1/authorizations", json=body, headers=headers)


def assert_security_headers(response: httpx.Response) -> None:
    assert response.headers["strict-transport-security"] == HSTS
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "server" not in response.headers
    assert response.headers["request-id"].startswith("req_")


def assert_declined(response: httpx.Response, code: str) -> dict[str, Any]:
    assert response.status_code == 402, response.text
    body: dict[str, Any] = response.json()
    assert body["status"] == "declined"
    assert body["decline_code"] == code
    assert_security_headers(response)
    return body


def record_for(acq: Acquirer, reference: str) -> dict[str, Any]:
    matches: list[dict[str, Any]] = [
        json.loads(line)
        for line in acq.received_file.read_text("utf-8").splitlines()
        if reference in line
    ]
    assert len(matches) == 1
    return matches[0]


# --- health and TLS -------------------------------------------------------------------


def test_healthz_answers_ok_with_hsts(acquirer: Acquirer, https: httpx.Client) -> None:
    r = https.get(f"{acquirer.url}/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok"}
    assert_security_headers(r)
    assert r.headers["cache-control"] == "no-store"


# --- the rules ------------------------------------------------------------------------


@pytest.mark.parametrize("entry", APPROVING, ids=[c["number"][-4:] + c["brand"] for c in APPROVING])
def test_published_approving_cards_are_approved(
    acquirer: Acquirer, https: httpx.Client, entry: dict[str, Any]
) -> None:
    r = authorize(https, acquirer, card(entry["number"]), amount=1234, currency="USD")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "approved"
    assert body["decline_code"] is None
    assert body["id"].startswith("auth_")
    assert body["amount"] == 1234
    assert body["currency"] == "usd"
    assert body["card"] == {
        "brand": entry["brand"],
        "last4": entry["number"][-4:],
        "funding": entry["funding"],
    }
    assert entry["number"] not in r.text
    assert_security_headers(r)


@pytest.mark.parametrize("entry", DECLINING, ids=[c["outcome"] for c in DECLINING])
def test_published_declining_cards_are_declined_with_their_outcome(
    acquirer: Acquirer, https: httpx.Client, entry: dict[str, Any]
) -> None:
    body = assert_declined(authorize(https, acquirer, card(entry["number"])), entry["outcome"])
    assert body["card"]["last4"] == entry["number"][-4:]
    assert body["card"]["brand"] == entry["brand"]


def test_every_decline_outcome_of_the_table_is_covered() -> None:
    assert {c["outcome"] for c in DECLINING} >= {
        "card_declined",
        "insufficient_funds",
        "expired_card",
        "incorrect_cvc",
    }


@pytest.mark.parametrize(
    ("prefix", "length", "brand"),
    [("4", 16, "visa"), ("51", 16, "mastercard"), ("37", 15, "amex"), ("6011", 16, "discover")],
)
def test_other_luhn_valid_numbers_are_approved(
    acquirer: Acquirer, https: httpx.Client, prefix: str, length: int, brand: str
) -> None:
    number = generated_number(prefix, length)
    r = authorize(https, acquirer, card(number))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "approved"
    assert body["card"] == {"brand": brand, "last4": number[-4:], "funding": "unknown"}
    assert number not in r.text


def test_luhn_invalid_number_is_incorrect_number(acquirer: Acquirer, https: httpx.Client) -> None:
    for number in (luhn_invalid(VISA_OK), luhn_invalid(generated_number("4", 16))):
        body = assert_declined(authorize(https, acquirer, card(number)), "incorrect_number")
        assert body["card"] is None


@pytest.mark.parametrize("entry", TABLE["invalid"], ids=[e["why"][:20] for e in TABLE["invalid"]])
def test_invalid_numbers_of_the_table_are_declined(
    acquirer: Acquirer, https: httpx.Client, entry: dict[str, Any]
) -> None:
    number = entry["number"]
    expected = "incorrect_number" if number.isascii() else "invalid_number"
    r = authorize(https, acquirer, card(number))
    body = assert_declined(r, expected)
    assert body["card"] is None
    assert number not in r.text


def test_number_with_spaces_or_dashes_is_read(acquirer: Acquirer, https: httpx.Client) -> None:
    spaced = " ".join(MC_OK[i : i + 4] for i in range(0, 16, 4))
    r = authorize(https, acquirer, card(spaced))
    assert r.status_code == 200
    assert r.json()["card"]["brand"] == "mastercard"


def test_json_integer_number_is_accepted(acquirer: Acquirer, https: httpx.Client) -> None:
    number = generated_number("4", 16)
    r = authorize(https, acquirer, card(int(number)))
    assert r.status_code == 200
    assert r.json()["card"]["last4"] == number[-4:]


def _previous_month() -> tuple[int, int]:
    return (NOW.year, NOW.month - 1) if NOW.month > 1 else (NOW.year - 1, 12)


@pytest.mark.parametrize(
    ("exp_month", "exp_year"),
    [
        (12, NOW.year - 1),
        (_previous_month()[1], _previous_month()[0]),
        (str(_previous_month()[1]).zfill(2), str(_previous_month()[0])[2:]),
        (1, 2001),
    ],
    ids=["last-year", "last-month", "last-month-as-strings", "long-ago"],
)
def test_expired_card_is_declined(
    acquirer: Acquirer, https: httpx.Client, exp_month: Any, exp_year: Any
) -> None:
    number = generated_number("4", 16)
    body = assert_declined(
        authorize(https, acquirer, card(number, exp_month=exp_month, exp_year=exp_year)),
        "expired_card",
    )
    assert body["card"]["last4"] == number[-4:]


def test_card_is_valid_through_its_expiry_month(acquirer: Acquirer, https: httpx.Client) -> None:
    r = authorize(https, acquirer, card(VISA_OK, exp_month=NOW.month, exp_year=str(NOW.year)))
    assert r.status_code == 200
    assert r.json()["status"] == "approved"


@pytest.mark.parametrize(
    ("exp_month", "exp_year", "code"),
    [
        (13, FUTURE_YEAR, "invalid_expiry_month"),
        ("0", FUTURE_YEAR, "invalid_expiry_month"),
        ("1a", FUTURE_YEAR, "invalid_expiry_month"),
        (12, "203", "invalid_expiry_year"),
        (12, 123456, "invalid_expiry_year"),
    ],
)
def test_invalid_expiry_is_declined(
    acquirer: Acquirer, https: httpx.Client, exp_month: Any, exp_year: Any, code: str
) -> None:
    assert_declined(
        authorize(https, acquirer, card(VISA_OK, exp_month=exp_month, exp_year=exp_year)), code
    )


@pytest.mark.parametrize(
    "cvc", [_ABSENT, None, "", "   "], ids=["absent", "null", "empty", "blank"]
)
def test_missing_cvc_is_incorrect_cvc(acquirer: Acquirer, https: httpx.Client, cvc: Any) -> None:
    body = assert_declined(authorize(https, acquirer, card(VISA_OK, cvc=cvc)), "incorrect_cvc")
    assert body["card"]["last4"] == VISA_OK[-4:]


def test_cvc_of_the_wrong_length_is_incorrect_cvc(acquirer: Acquirer, https: httpx.Client) -> None:
    assert_declined(authorize(https, acquirer, card(VISA_OK, cvc="1234")), "incorrect_cvc")
    amex = next(c["number"] for c in APPROVING if c["brand"] == "amex")
    assert_declined(authorize(https, acquirer, card(amex, cvc="123")), "incorrect_cvc")


def test_checks_run_in_order_number_expiry_cvc_outcome(
    acquirer: Acquirer, https: httpx.Client
) -> None:
    declining = next(c["number"] for c in DECLINING if c["outcome"] == "insufficient_funds")
    past = {"exp_month": 1, "exp_year": NOW.year - 1}
    assert_declined(
        authorize(https, acquirer, card(luhn_invalid(declining), cvc=None, **past)),
        "incorrect_number",
    )
    assert_declined(authorize(https, acquirer, card(declining, cvc=None, **past)), "expired_card")
    assert_declined(authorize(https, acquirer, card(declining, cvc=None)), "incorrect_cvc")
    assert_declined(authorize(https, acquirer, card(declining)), "insufficient_funds")


# --- malformed requests -------------------------------------------------------------------


def _valid_body() -> dict[str, Any]:
    return {"amount": 500, "currency": "usd", "card": card(VISA_OK), "reference": "r"}


def _without(path: str) -> bytes:
    body = _valid_body()
    node = body
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    del node[last]
    return json.dumps(body).encode()


def _with(path: str, value: Any) -> bytes:
    body = _valid_body()
    node = body
    *parents, last = path.split(".")
    for key in parents:
        node = node[key]
    node[last] = value
    return json.dumps(body).encode()


MALFORMED = {
    "truncated-json": json.dumps(_valid_body()).encode()[:-7],
    "json-array": json.dumps([_valid_body()]).encode(),
    "not-utf8": b'{"amount": "\xff\xfe"}',
    "nan": _with("amount", float("nan")),
    "no-amount": _without("amount"),
    "no-currency": _without("currency"),
    "no-card": _without("card"),
    "no-number": _without("card.number"),
    "no-exp-month": _without("card.exp_month"),
    "no-exp-year": _without("card.exp_year"),
    "empty-number": _with("card.number", ""),
    "number-as-list": _with("card.number", [VISA_OK]),
    "card-as-string": _with("card", VISA_OK),
    "cvc-as-int": _with("card.cvc", 123),
    "zero-amount": _with("amount", 0),
    "bool-amount": _with("amount", True),
    "float-amount": _with("amount", 10.5),
    "bad-currency": _with("currency", "dollars"),
    "reference-as-object": _with("reference", {"n": VISA_OK}),
    "deep-nesting": b"[" * 50_000,
    "empty": b"",
}


@pytest.mark.parametrize("raw", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_request_is_400_and_echoes_nothing(
    acquirer: Acquirer, https: httpx.Client, raw: bytes
) -> None:
    SENT.add(VISA_OK)
    r = https.post(
        f"{acquirer.url}/v1/authorizations",
        content=raw,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    assert VISA_OK not in r.text
    assert VISA_OK[-4:] not in r.text
    assert_security_headers(r)


def test_unsupported_content_type_is_415(acquirer: Acquirer, https: httpx.Client) -> None:
    r = https.post(
        f"{acquirer.url}/v1/authorizations",
        content=json.dumps(_valid_body()).encode(),
        headers={"content-type": "text/plain"},
    )
    assert r.status_code == 415
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert VISA_OK not in r.text


def test_wrong_method_and_unknown_url_are_stripe_errors(
    acquirer: Acquirer, https: httpx.Client
) -> None:
    r = https.get(f"{acquirer.url}/v1/authorizations")
    assert r.status_code == 405
    assert_security_headers(r)
    r = https.get(f"{acquirer.url}/v1/nothing")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "url_invalid"


def test_oversized_body_is_413_and_recorded_truncated(
    acquirer: Acquirer, https: httpx.Client
) -> None:
    reference = "big_" + secrets.token_hex(8)
    raw = json.dumps({"reference": reference, "pad": "x" * 100_000}).encode()
    r = https.post(
        f"{acquirer.url}/v1/authorizations",
        content=raw,
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413
    assert_security_headers(r)
    record = record_for(acquirer, reference)
    assert record["truncated"] is True
    assert len(record["body"]) == 64 * 1024


# --- form encoding ---------------------------------------------------------------------


def _form(number: str, **extra: str) -> dict[str, str]:
    SENT.add(number)
    return {
        "amount": "2500",
        "currency": "eur",
        "card[number]": number,
        "card[exp_month]": "07",
        "card[exp_year]": str(FUTURE_YEAR)[2:],
        "card[cvc]": "321",
        "reference": "form_" + secrets.token_hex(8),
        **extra,
    }


def test_form_encoded_authorization_is_approved(acquirer: Acquirer, https: httpx.Client) -> None:
    r = https.post(f"{acquirer.url}/v1/authorizations", data=_form(MC_OK))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "approved"
    assert body["amount"] == 2500
    assert body["currency"] == "eur"
    assert body["card"]["brand"] == "mastercard"


def test_form_encoded_decline_and_missing_cvc(acquirer: Acquirer, https: httpx.Client) -> None:
    declining = next(c for c in DECLINING if c["outcome"] == "card_declined")
    r = https.post(f"{acquirer.url}/v1/authorizations", data=_form(declining["number"]))
    assert_declined(r, "card_declined")
    r = https.post(f"{acquirer.url}/v1/authorizations", data=_form(VISA_OK, **{"card[cvc]": ""}))
    assert_declined(r, "incorrect_cvc")


def test_form_encoded_missing_number_is_400(acquirer: Acquirer, https: httpx.Client) -> None:
    data = _form(VISA_OK)
    del data["card[number]"]
    r = https.post(f"{acquirer.url}/v1/authorizations", data=data)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "card[number]"


def test_body_without_content_type_is_understood(acquirer: Acquirer, https: httpx.Client) -> None:
    raw = json.dumps(_valid_body()).encode()
    r = https.post(f"{acquirer.url}/v1/authorizations", content=raw, headers={"content-type": ""})
    assert r.status_code == 200, r.text


# --- the record of what was received -----------------------------------------------


def test_received_jsonl_records_exactly_what_arrived(
    acquirer: Acquirer, https: httpx.Client
) -> None:
    number = generated_number("4", 16)
    SENT.add(number)
    reference = "rec_" + secrets.token_hex(8)
    raw = json.dumps(
        {"amount": 700, "currency": "usd", "card": card(number), "reference": reference}
    ).encode()
    r = https.post(
        f"{acquirer.url}/v1/authorizations?trace=1",
        content=raw,
        headers={"Content-Type": "application/json", "X-Test-Marker": "Marker-Value"},
    )
    assert r.status_code == 200

    record = record_for(acquirer, reference)
    assert record["method"] == "POST"
    assert record["path"] == "/v1/authorizations"
    assert record["query"] == "trace=1"
    assert record["body"] == raw.decode()
    assert number in record["body"]
    assert record["truncated"] is False
    assert record["request_id"] == r.headers["request-id"]
    headers = record["headers"]
    assert all(name == name.lower() for name in headers)
    assert headers["content-type"] == "application/json"
    assert headers["x-test-marker"] == "Marker-Value"
    assert headers["host"] == f"localhost:{acquirer.port}"

    assert stat.S_IMODE(acquirer.received_file.stat().st_mode) == 0o600


def test_form_body_is_recorded_raw(acquirer: Acquirer, https: httpx.Client) -> None:
    number = generated_number("5", 16)
    SENT.add(number)
    reference = "raw_" + secrets.token_hex(8)
    raw = (
        f"amount=100&currency=usd&card[number]={number}&card[exp_month]=1"
        f"&card[exp_year]={FUTURE_YEAR}&card[cvc]=999&reference={reference}"
    ).encode()
    r = https.post(
        f"{acquirer.url}/v1/authorizations",
        content=raw,
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 200, r.text
    assert record_for(acquirer, reference)["body"] == raw.decode()


def test_non_utf8_body_is_recorded_as_base64(acquirer: Acquirer, https: httpx.Client) -> None:
    import base64

    marker = secrets.token_hex(8)
    raw = b"\xff\xfe" + marker.encode()
    https.post(
        f"{acquirer.url}/v1/authorizations",
        content=raw,
        headers={"content-type": "application/octet-stream"},
    )
    records = [
        json.loads(line)
        for line in acquirer.received_file.read_text("utf-8").splitlines()
        if json.loads(line)["body_base64"]
    ]
    assert any(base64.b64decode(rec["body_base64"]) == raw for rec in records)


def test_record_api_lists_what_was_received(acquirer: Acquirer, https: httpx.Client) -> None:
    reference = "api_" + secrets.token_hex(8)
    authorize(https, acquirer, card(VISA_OK), reference=reference)
    r = https.get(f"{acquirer.url}/v1/received")
    assert r.status_code == 200
    assert_security_headers(r)
    listing = r.json()
    assert listing["object"] == "list"
    mine = [rec for rec in listing["data"] if reference in (rec["body"] or "")]
    assert len(mine) == 1
    assert VISA_OK in mine[0]["body"]
    # Reading the record and the health check are not themselves recorded.
    assert not any(rec["path"] in ("/v1/received", "/healthz") for rec in listing["data"])


def test_record_api_is_404_without_the_flag(echoing: Acquirer, https: httpx.Client) -> None:
    r = https.get(f"{echoing.url}/v1/received")
    assert r.status_code == 404
    assert_security_headers(r)
    # Recording itself is always on.
    authorize(https, echoing, card(VISA_OK))
    assert VISA_OK in echoing.received_file.read_text("utf-8")
    assert stat.S_IMODE(echoing.received_file.stat().st_mode) == 0o600


# --- the echo aid -----------------------------------------------------------------------


def test_no_echo_by_default(acquirer: Acquirer, https: httpx.Client) -> None:
    number = generated_number("4", 16)
    r = authorize(https, acquirer, card(number))
    assert "echo" not in r.json()
    assert number not in r.text
    assert "x-acquirer-card" not in r.headers


def test_echo_header_puts_the_number_in_the_body(acquirer: Acquirer, https: httpx.Client) -> None:
    number = generated_number("4", 16)
    r = authorize(https, acquirer, card(number), headers={"X-Acquirer-Echo": "card"})
    assert r.status_code == 200
    assert r.json()["echo"] == number
    declining = DECLINING[0]["number"]
    r = authorize(https, acquirer, card(declining), headers={"X-Acquirer-Echo": "card"})
    assert r.status_code == 402
    assert r.json()["echo"] == declining


def test_echo_header_mode_puts_the_number_in_a_response_header(
    acquirer: Acquirer, https: httpx.Client
) -> None:
    number = generated_number("4", 16)
    r = authorize(https, acquirer, card(number), headers={"X-Acquirer-Echo": "header, card"})
    assert r.headers["x-acquirer-card"] == number
    assert r.json()["echo"] == number


def test_echo_card_flag_echoes_every_authorization(echoing: Acquirer, https: httpx.Client) -> None:
    number = generated_number("6011", 16)
    r = authorize(https, echoing, card(number))
    assert r.status_code == 200
    assert r.json()["echo"] == number
    form = _form(MC_OK)
    r = https.post(f"{echoing.url}/v1/authorizations", data=form)
    assert r.json()["echo"] == MC_OK


# --- the redirect aid -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "status"), [("GET", None), ("POST", "307"), ("POST", "308"), ("PUT", "301")]
)
def test_redirect_aid_answers_a_redirect_to_the_given_location(
    acquirer: Acquirer, https: httpx.Client, method: str, status: str | None
) -> None:
    target = "https://elsewhere.example/v1/steal?x=1"
    params = {"to": target} | ({"status": status} if status else {})
    r = https.request(method, f"{acquirer.url}/v1/redirect", params=params, content=b"a=1")
    assert r.status_code == int(status or "302")
    assert r.headers["location"] == target
    assert_security_headers(r)


@pytest.mark.parametrize(
    "params",
    [
        {"to": "https://x.example/", "status": "200"},
        {"to": "https://x.example/\r\nSet-Cookie: a"},
    ],
    ids=["bad-status", "header-injection"],
)
def test_redirect_aid_refuses_bad_parameters(
    acquirer: Acquirer, https: httpx.Client, params: dict[str, str]
) -> None:
    r = https.get(f"{acquirer.url}/v1/redirect", params=params)
    assert r.status_code == 400
    assert "location" not in r.headers
    assert "set-cookie" not in r.headers


def test_redirect_aid_is_off_unless_asked_for(echoing: Acquirer, https: httpx.Client) -> None:
    r = https.get(f"{echoing.url}/v1/redirect", params={"to": "https://x.example/"})
    assert r.status_code == 404


# --- mutual TLS, start-up -------------------------------------------------------------


def test_client_ca_requires_a_client_certificate(tmp_path: Path, pki: Pki) -> None:
    with running_acquirer(tmp_path, pki, "--client-ca", str(pki.ca_file)) as acq:
        with (
            httpx.Client(verify=client_context(pki.ca_file), trust_env=False) as anonymous,
            pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)),
        ):
            anonymous.get(f"{acq.url}/healthz")
        vault_ctx = client_context(pki.ca_file, client_cert=pki.cert("vault"))
        with httpx.Client(verify=vault_ctx, trust_env=False) as vault:
            assert vault.get(f"{acq.url}/healthz").status_code == 200
            r = authorize(vault, acq, card(VISA_OK))
            assert r.status_code == 200


def run_cli(
    *args: str, cwd: Path = ROOT, script: bool = False
) -> subprocess.CompletedProcess[bytes]:
    """Run the acquirer's command line to completion (for start-up failures and --help)."""
    entry = entry_point(script)
    return subprocess.run(
        [sys.executable, *entry, *args], cwd=cwd, capture_output=True, timeout=60, check=False
    )


def test_missing_certificate_stops_start_up(tmp_path: Path) -> None:
    result = run_cli(
        "--port", str(free_port()), "--cert", str(tmp_path / "none.pem"),
        "--key", str(tmp_path / "none.key"), "--state", str(tmp_path / "state"),
    )  # fmt: skip
    assert result.returncode == 1
    assert b"cannot start" in result.stderr


def test_port_in_use_stops_start_up(tmp_path: Path, pki: Pki) -> None:
    cert, key = acquirer_cert(pki)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli(
            "--port", str(port), "--cert", str(cert), "--key", str(key),
            "--state", str(tmp_path / "state"),
        )  # fmt: skip
    assert result.returncode == 1
    assert b"cannot listen" in result.stderr


def test_script_form_runs_from_anywhere(tmp_path: Path) -> None:
    result = run_cli("--help", cwd=tmp_path, script=True)
    assert result.returncode == 0
    assert b"--record-api" in result.stdout


def test_redirect_path_over_another_endpoint_is_a_usage_error(tmp_path: Path) -> None:
    result = run_cli(
        "--cert", "c", "--key", "k", "--state", str(tmp_path),
        "--redirect-path", "/v1/authorizations",
    )  # fmt: skip
    assert result.returncode == 2
    assert b"--redirect-path" in result.stderr


# --- logs (keep last: it checks every number the tests above sent) ------------------


def test_logs_hold_no_card_number(
    acquirer: Acquirer, echoing: Acquirer, https: httpx.Client
) -> None:
    number = generated_number("4", 16)
    authorize(https, acquirer, card(number), headers={"X-Acquirer-Echo": "card,header"})
    authorize(https, echoing, card(number, cvc=None))
    https.post(f"{acquirer.url}/v1/authorizations", data=_form(number))
    https.post(
        f"{acquirer.url}/v1/authorizations",
        content=b'{"card": {"number": "' + number.encode() + b'"',
        headers={"content-type": "application/json"},
    )
    assert number in SENT
    for acq in (acquirer, echoing):
        log = acq.log.read_text("utf-8")
        assert '"event": "authorization"' in log
        assert f'"last4": "{number[-4:]}"' in log
        leaked = [n for n in SENT if n in log and len(n) >= 13]
        assert leaked == []
        assert [m.group() for m in find_card_numbers(log)] == []


def test_redirect_aid_without_a_target_points_back_at_authorizations(
    acquirer: Any, https: httpx.Client
) -> None:
    r = https.post(f"{acquirer.url}/v1/redirect", content=b"{}")
    assert r.status_code == 302
    assert r.headers["location"] == "/v1/authorizations"
