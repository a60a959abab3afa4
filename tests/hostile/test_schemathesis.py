"""Schemathesis, a schema-driven API tester, against a real stack.

The key service, the vault and the simulated acquirer run as processes over real TLS
(``tests.stack.run_stack``). Schemathesis reads the OpenAPI document the vault serves
(``/openapi.json``), generates valid and invalid requests for every operation in it
(examples, coverage, fuzzing and stateful phases, ``--checks all``), sends them with a
secret key of a test account and then with a publishable key, and checks every answer
against the document: no 5xx, only documented statuses, content types, headers and
bodies, invalid data refused, valid data accepted, 405 with ``Allow`` for other methods,
authentication not ignored, deleted objects gone.

Card numbers: the document says what ``card[number]`` looks like (13 to 19 digits, the
first not 0, the vault's separators), so about one generated number in ten passes the
Luhn check by chance; the published test cards are mixed into JSON bodies (a dictionary
binding) so that some creates succeed and the stateful phase can follow the document's
links from a new payment method to its reads, its delete and a forward, whose ``url``
is sometimes the allowlisted one; the card frame's ``key`` and ``origin`` are sometimes
the account's publishable key and allowed origin, so that the frame is rendered. After
each run the vault's log and every text and blob column of its SQLite database must
hold no Luhn-valid 13-19-digit run.

Bounded: ``--max-examples`` per operation and ``--max-time`` per run (see RUNS). The
certificate is verified with the test CA (``--tls-verify``), never turned off. Set
``CARDVAULT_SCHEMATHESIS_SEED`` to replay a run; the seed of each run is printed.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cardvault.cards import find_card_numbers, redact_card_numbers
from helpers import ROOT, Pki, cli, free_ports, wait_for_port
from stack import Stack, run_stack, vault_database

SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
PUBLISHED_TEST_CARDS = [
    str(card["number"])
    for card in json.loads(
        (ROOT / "src/cardvault/cards/test_cards.json").read_text(encoding="utf-8")
    )["cards"]
]


#: The merchant page allowed to frame the card element, for the frame's dictionary.
FRAMING_ORIGIN = "https://shop.example"


@dataclass(frozen=True)
class Run:
    name: str
    key: str  # "sk" or "pk": which key of the stack's second account
    max_examples: int
    max_time: int  # seconds


#: The secret key reaches every operation; the publishable key is 403 on all but the
#: create, so it gets a shorter run. Together, with the stack, about three minutes.
RUNS = [Run("secret", "sk", 25, 75), Run("publishable", "pk", 10, 30)]


@dataclass
class FuzzTarget:
    stack: Stack
    forward_url: str
    ca_file: Path


@pytest.fixture
def target(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[FuzzTarget]:
    """A stack of its own for each run (so that what its log and database hold is that
    run's doing), with an allowlist naming the simulated acquirer, and rate limits that a
    fuzzer does not drain (the limiter itself still runs on every request)."""
    d = tmp_path_factory.mktemp("schemathesis")
    if not pki.cert("acquirer")[0].exists():
        pki.ca.issue("acquirer", dns=["localhost"], ips=["127.0.0.1"])
    (aport,) = free_ports(1)
    forward_url = f"https://localhost:{aport}/v1/authorizations"
    allowlist = d / "allowlist.toml"
    allowlist.write_text(
        "[[destination]]\n"
        'name = "acquirer"\n'
        f'url = "{forward_url}"\n'
        'methods = ["POST"]\n'
        'replacements = ["card_number", "card_expiry", "card_cvc", "cardholder_name"]\n'
        'accounts = ["*"]\n'
        f'ca_file = "{pki.ca_file}"\n'
        "[destination.placements]\n"
        'card_number = { json = "/card/number" }\n'
        'card_expiry = { json_month = "/card/exp_month", json_year = "/card/exp_year" }\n'
        'card_cvc = { json = "/card/cvc" }\n'
        'cardholder_name = { json = "/card/name" }\n'
    )
    acert, akey = pki.cert("acquirer")
    with (d / "acquirer.log").open("wb") as alog:
        acquirer = subprocess.Popen(
            [sys.executable, "-m", "examples.acquirer", "--host", "127.0.0.1", "--port", str(aport),
             "--cert", str(acert), "--key", str(akey), "--state", str(d / "acquirer")],
            cwd=ROOT, stdout=alog, stderr=alog,
        )  # fmt: skip
    try:
        wait_for_port(aport, acquirer)
        with pytest.MonkeyPatch.context() as env, vault_database("sqlite", d) as dsn:
            # The environment overrides the stack's [limits] table (docs/configuration.md).
            for name in ("SECRET", "PUBLISHABLE"):
                env.setenv(f"CARDVAULT_LIMITS_{name}_RATE", "10000")
                env.setenv(f"CARDVAULT_LIMITS_{name}_BURST", "10000")
            stacks = run_stack(
                tmp_path_factory,
                pki,
                "sqlite",
                dsn,
                vault_toml=f'[forwarding]\nallowlist_file = "{allowlist}"\n',
            )
            for stack in stacks:
                # The account whose keys the runs use may be framed by one page, so the
                # card frame can be rendered, not only refused.
                r = cli(
                    "accounts", "set-origins", "--config", str(stack.vault_config),
                    stack.accounts[1]["account"], "--origin", FRAMING_ORIGIN,
                )  # fmt: skip
                assert r.returncode == 0, r.stderr
                yield FuzzTarget(stack, forward_url, pki.ca_file)
    finally:
        acquirer.terminate()
        acquirer.wait(10)


def schemathesis_config(target: FuzzTarget, key: str) -> str:
    """The run's settings (schemathesis.toml). Each departure from schemathesis's
    defaults says why; none hides a status the document does not list."""
    return f"""
[auth.openapi.bearerAuth]
bearer = "{key}"

# Invalid data must be refused. Besides the default 4xx list, the vault refuses an invalid
# card with Stripe's 402 card_error, and its transport a body, URL or head too large with
# 413, 414 and 431.
[checks.negative_data_rejection]
expected-statuses = ["400", "401", "402", "403", "404", "405", "406", "409", "413", "414", "415", "422", "428", "429", "431", "5xx"]

# A card number of the right shape may still fail the Luhn check, its brand's lengths,
# an expiry in the past or the key's mode (test mode takes only published test cards):
# 402, as documented. A create may also be 400 for an Idempotency-Key reused with other
# parameters, which the fuzzer does (it draws the header and the body independently).
[[operations]]
include-operation-id = "createPaymentMethod"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "402", "403", "404", "409", "429", "5xx"]

# The allowlist is the deployment's, not the schema's: a well-formed url that is not on
# it, or a replacement the destination does not permit, is 400; so is a reused key.
[[operations]]
include-operation-id = "createForwardingRequest"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429", "5xx"]

# Where a webhook URL may point is the deployment's too: a well-formed https URL whose
# host does not resolve, or resolves to an address that is not public, is 400.
[[operations]]
include-operation-id = "createWebhookEndpoint"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429", "5xx"]

# starting_after and ending_before are each valid; together they are 400, which a list
# of query parameters cannot say.
[[operations]]
include-operation-id = ["listPaymentMethods", "listForwardingRequests", "listEvents", "listWebhookEndpoints"]
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "403", "404", "409", "429", "5xx"]

[dictionaries]
allowlisted-url = {{ values = ["{target.forward_url}"] }}
publishable-key = {{ values = ["{target.stack.accounts[1]["pk"]}"] }}
framing-origin = {{ values = ["{FRAMING_ORIGIN}"] }}
test-card = {{ values = {json.dumps(PUBLISHED_TEST_CARDS)} }}

# Sometimes the allowlisted URL, so that forwards get past the allowlist; sometimes a
# published test card in a JSON create, so that test mode stores some payment methods;
# sometimes the account's publishable key and allowed origin, so that the card frame is
# rendered.
[parameters]
"body.url" = {{ dictionary = "allowlisted-url", probability = 0.5 }}
"body.card.number" = {{ dictionary = "test-card", probability = 0.3 }}
"query.key" = {{ dictionary = "publishable-key", probability = 0.5 }}
"query.origin" = {{ dictionary = "framing-origin", probability = 0.5 }}
"""


def run_schemathesis(
    target: FuzzTarget, run: Run, directory: Path
) -> subprocess.CompletedProcess[str]:
    key = target.stack.accounts[1][run.key]
    config = directory / "schemathesis.toml"
    config.write_text(schemathesis_config(target, key))
    seed = os.environ.get("CARDVAULT_SCHEMATHESIS_SEED")
    command = [
        str(SCHEMATHESIS),
        "--config-file", str(config),
        "run", f"{target.stack.url}/openapi.json",
        "--checks", "all",
        "--tls-verify", str(target.ca_file),
        "--max-examples", str(run.max_examples),
        "--max-time", str(run.max_time),
        "--request-timeout", "20",
        # One worker: schemathesis's generator is not safe in threads on Python 3.11
        # ("AST constructor recursion depth mismatch" from hypothesis, a tool error).
        "--workers", "1",
        "--generation-database", "none",
        "--report", "junit,ndjson",
        "--report-dir", str(directory / "report"),
        "--no-color",
        *(["--seed", seed] if seed else []),
    ]  # fmt: skip
    started = time.monotonic()
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=run.max_time + 120,
        check=False,
        env={**os.environ, "SCHEMATHESIS_TELEMETRY": "false", "NO_COLOR": "1"},
        cwd=directory,
    )
    (directory / "output.txt").write_text(result.stdout + result.stderr)
    print(
        f"schemathesis {run.name}: exit {result.returncode} in "
        f"{time.monotonic() - started:.0f} s; output in {directory / 'output.txt'}"
    )
    return result


# --- card numbers at rest --------------------------------------------------------------

#: A SHA-256 or HMAC-SHA-256 digest in hex (API key hashes): random hex digits, which
#: hold a Luhn-valid run of 13 digits by chance, not a card number.
_DIGEST = re.compile(r"[0-9a-f]{64}")


#: The time at the head of each log line. The finder reads a newline as a separator, so
#: a line ending in digits (a port) and the next line's date would make one run.
_LINE_TIME = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z", re.MULTILINE)


def card_numbers_in_log(path: Path) -> list[str]:
    text = _LINE_TIME.sub("[time]", path.read_text(encoding="utf-8", errors="replace"))
    return [mask(m.group()) for m in find_card_numbers(text)]


def card_numbers_in_database(path: Path) -> list[str]:
    """Every text and blob value of every table, searched as text (blobs as Latin-1, one
    character a byte, so an ASCII number inside binary data is found as it is)."""
    found = []
    # Read-only; the stack's path may start with "//" (sqlite:///…), which a URI would
    # take for an authority.
    with sqlite3.connect(f"file:/{path.as_posix().lstrip('/')}?mode=ro", uri=True) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            columns = [r[1] for r in db.execute(f'PRAGMA table_info("{table}")')]
            # The table names come from sqlite_master, not from outside.
            for row in db.execute(f'SELECT * FROM "{table}"'):  # noqa: S608
                for column, value in zip(columns, row, strict=True):
                    if isinstance(value, bytes | memoryview):
                        text = bytes(value).decode("latin-1")
                    elif isinstance(value, str):
                        text = value
                    else:
                        continue
                    if _DIGEST.fullmatch(text):
                        continue
                    found += [
                        f"{table}.{column}: {mask(m.group())}" for m in find_card_numbers(text)
                    ]
    return found


def mask(run: str) -> str:
    """A finding as it may be reported: the first six and last four digits of the run,
    and its length."""
    digits = "".join(str(unicodedata.decimal(c)) for c in run if c.isdecimal())
    return f"{digits[:6]}…{digits[-4:]} ({len(digits)} digits)"


def test_the_log_check_finds_a_number_and_not_a_port_before_a_date(tmp_path: Path) -> None:
    log = tmp_path / "vault.log"
    log.write_text(
        "2026-12-07T05:07:29.750343Z [info] listening url=https://127.0.0.1:35985\n"
        "2026-12-07T05:07:30.151057Z [info] request path=/v1/payment_methods/4242424242424242\n"
    )
    assert card_numbers_in_log(log) == ["424242…4242 (16 digits)"]


def test_the_database_check_finds_a_planted_number(tmp_path: Path) -> None:
    db = tmp_path / "planted.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (a TEXT, b BLOB, c INTEGER)")
        conn.execute(
            "INSERT INTO t VALUES (?, ?, ?)",
            (
                "card 4242 4242 4242 4242",
                b"\x00\x01" + b"5555555555554444" + b"\xff",
                4242424242424242,
            ),
        )
        conn.execute("INSERT INTO t VALUES (?, ?, ?)", ("a" * 64, None, None))
    assert card_numbers_in_database(db) == [
        "t.a: 424242…4242 (16 digits)",
        "t.b: 555555…4444 (16 digits)",
    ]


# --- the runs ----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS, ids=[r.name for r in RUNS])
def test_schemathesis_finds_no_failure_and_no_card_number_rests_in_the_clear(
    target: FuzzTarget, run: Run, tmp_path: Path
) -> None:
    assert SCHEMATHESIS.exists(), "schemathesis is not installed (pyproject.toml's dev extras)"
    result = run_schemathesis(target, run, tmp_path)
    output = result.stdout + result.stderr
    # Findings before failures: a card number in the clear is the worse of the two.
    stack = target.stack
    assert card_numbers_in_log(stack.vault_log) == [], "card numbers in the vault's log"
    assert card_numbers_in_database(stack.db) == [], "card numbers in the vault's database"
    # The output is shown with card numbers redacted: generated requests hold Luhn-valid
    # numbers by construction, and they are no business of a CI log.
    shown = redact_card_numbers(output)
    # Schemathesis ran, tested every operation it selected (the document's 18 but the
    # one that serves the document itself), and sent requests.
    selected = re.search(r"Selected:\s*(\d+)/(\d+)", output)
    tested = re.search(r"Tested:\s*(\d+)", output)
    generated = re.search(r"(\d+) generated", output)
    assert selected and tested and generated, shown[-3000:]
    assert int(tested.group(1)) == int(selected.group(2)) >= 17, shown[-3000:]
    assert int(generated.group(1)) > 0, shown[-3000:]
    assert result.returncode == 0, shown[-20000:]
