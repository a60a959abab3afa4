"""PaymentMethods over real HTTPS against a real vault and a real key-service process."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cardvault.cards import luhn_valid
from cardvault.transport.tls import client_context
from helpers import Pki, cardvault_process, cli, free_ports, keyservice_and_vault, wait_for_port
from stack import Stack, create_account, run_stack, vault_database

VISA = "4242424242424242"
AMEX = "378282246310005"
MASTERCARD = "5555555555554444"


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> Iterator[Stack]:
    with vault_database(request.param, tmp_path_factory.mktemp("db")) as dsn:
        yield from run_stack(tmp_path_factory, pki, request.param, dsn)


@pytest.fixture(scope="module")
def http(pki: Pki) -> Iterator[httpx.Client]:
    with httpx.Client(verify=client_context(pki.ca_file), trust_env=False, timeout=15) as c:
        yield c


def card_form(number: str = VISA, cvc: str = "123", **extra: str) -> dict[str, str]:
    return {
        "type": "card",
        "card[number]": number,
        "card[exp_month]": "12",
        "card[exp_year]": "2034",
        "card[cvc]": cvc,
        **extra,
    }


def create(
    http: httpx.Client, stack: Stack, key: str, data: dict[str, str], **headers: str
) -> httpx.Response:
    return http.post(
        f"{stack.url}/v1/payment_methods",
        data=data,
        headers={"authorization": f"Bearer {key}", **headers},
    )


def get(http: httpx.Client, stack: Stack, key: str, path: str) -> httpx.Response:
    return http.get(f"{stack.url}{path}", headers={"authorization": f"Bearer {key}"})


def random_pan(rng: random.Random, prefix: str = "4", length: int = 16) -> str:
    body = prefix + "".join(str(rng.randint(0, 9)) for _ in range(length - len(prefix) - 1))
    return next(body + c for c in "0123456789" if luhn_valid(body + c))


# --- creating and reading ---------------------------------------------------------------


def test_publishable_key_creates_a_payment_method_in_stripes_shape(
    http: httpx.Client, stack: Stack
) -> None:
    acct = stack.accounts[0]
    r = create(
        http,
        stack,
        acct["pk"],
        card_form(**{"billing_details[name]": "Jenny Rosen", "metadata[order]": "6735"}),
    )
    assert r.status_code == 200, r.text
    pm = r.json()
    assert pm["id"].startswith("pm_")
    assert pm["object"] == "payment_method"
    assert pm["type"] == "card"
    assert pm["livemode"] is False
    assert pm["metadata"] == {"order": "6735"}
    assert pm["billing_details"]["name"] == "Jenny Rosen"
    card = pm["card"]
    assert (
        card["brand"],
        card["display_brand"],
        card["last4"],
        card["exp_month"],
        card["exp_year"],
    ) == ("visa", "visa", "4242", 12, 2034)
    assert card["funding"] == "credit"
    assert len(card["fingerprint"]) == 16
    assert card["checks"]["cvc_check"] == "unchecked"
    assert VISA not in r.text
    assert "123" not in json.dumps(card)


def test_json_bodies_are_accepted(http: httpx.Client, stack: Stack) -> None:
    acct = stack.accounts[0]
    body = {
        "type": "card",
        "card": {"number": AMEX, "exp_month": 1, "exp_year": 2031, "cvc": "1234"},
    }
    r = http.post(
        f"{stack.url}/v1/payment_methods",
        json=body,
        headers={"authorization": f"Bearer {acct['sk']}"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["card"]["brand"] == "amex"


def test_billing_details_are_strings_without_card_numbers_or_the_create_is_400(
    http: httpx.Client, stack: Stack
) -> None:
    acct = stack.accounts[0]
    url, auth = f"{stack.url}/v1/payment_methods", {"authorization": f"Bearer {acct['pk']}"}
    before = http.get(f"{url}?limit=100", auth=(acct["sk"], "")).json()["data"]
    card = {"number": VISA, "exp_month": 12, "exp_year": 2034}
    refused = [
        # A number that no JSON encoder of 64-bit integers could echo back.
        ({"email": 123456789012345678901234567890}, "billing_details[email]"),
        ({"phone": ["a"]}, "billing_details[phone]"),
        ({"address": {"city": {"x": 1}}}, "billing_details[address][city]"),
        ({"address": {"line1": "x" * 501}}, "billing_details[address][line1]"),
        ({"phone": f"call {VISA}"}, "billing_details"),
        ({"address": {"line2": VISA[:8] + " " + VISA[8:]}}, "billing_details"),
    ]
    for billing, param in refused:
        body = {"type": "card", "card": card, "billing_details": billing}
        r = http.post(url, json=body, headers=auth)
        assert r.status_code == 400, (billing, r.text)
        assert r.json()["error"]["param"] == param
        assert VISA not in r.text and VISA[:8] not in r.text
    after = http.get(f"{url}?limit=100", auth=(acct["sk"], "")).json()["data"]
    assert after == before  # nothing was stored, and the list still renders
    billing = {"email": "j@example.com", "phone": "", "address": {"city": "Paris"}}
    r = http.post(
        url, json={"type": "card", "card": card, "billing_details": billing}, headers=auth
    )
    assert r.status_code == 200, r.text
    shown = r.json()["billing_details"]
    assert shown["email"] == "j@example.com"
    assert shown["phone"] is None
    assert shown["address"]["city"] == "Paris" and shown["address"]["line1"] is None


def test_secret_key_retrieves_and_publishable_key_cannot(http: httpx.Client, stack: Stack) -> None:
    acct = stack.accounts[0]
    pm = create(http, stack, acct["pk"], card_form(**{"billing_details[name]": "A B"})).json()
    r = get(http, stack, acct["sk"], f"/v1/payment_methods/{pm['id']}")
    assert r.status_code == 200
    assert r.json() == pm
    r = get(http, stack, acct["pk"], f"/v1/payment_methods/{pm['id']}")
    assert r.status_code == 403
    assert r.json()["error"]["type"] == "permission_error"


def test_other_accounts_and_the_other_mode_see_404(http: httpx.Client, stack: Stack) -> None:
    a, b = stack.accounts
    pm = create(http, stack, a["pk"], card_form()).json()
    for key in (b["sk"], a["sk_live"]):
        r = get(http, stack, key, f"/v1/payment_methods/{pm['id']}")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "resource_missing"


def test_fingerprint_is_stable_per_account_and_unrelated_across_accounts(
    http: httpx.Client, stack: Stack
) -> None:
    a, b = stack.accounts
    f1 = create(http, stack, a["pk"], card_form(MASTERCARD)).json()["card"]["fingerprint"]
    f2 = create(http, stack, a["pk"], card_form(MASTERCARD)).json()["card"]["fingerprint"]
    f3 = create(http, stack, b["pk"], card_form(MASTERCARD)).json()["card"]["fingerprint"]
    assert f1 == f2
    assert f1 != f3


def test_list_paginates_newest_first(http: httpx.Client, stack: Stack) -> None:
    b = stack.accounts[1]
    ids = [create(http, stack, b["sk"], card_form()).json()["id"] for _ in range(5)]
    page = get(http, stack, b["sk"], "/v1/payment_methods?limit=2").json()
    assert page["object"] == "list"
    assert page["has_more"] is True
    assert len(page["data"]) == 2
    everything = get(http, stack, b["sk"], "/v1/payment_methods?limit=100").json()["data"]
    listed = [p["id"] for p in everything]
    assert set(ids) <= set(listed)
    after = get(
        http, stack, b["sk"], f"/v1/payment_methods?limit=2&starting_after={listed[1]}"
    ).json()
    assert [p["id"] for p in after["data"]] == listed[2:4]


# --- validation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "status", "code", "param"),
    [
        (card_form("4242424242424241"), 402, "incorrect_number", "card[number]"),
        (card_form("424242424242"), 402, "incorrect_number", "card[number]"),
        (card_form("42424242424242424242"), 402, "incorrect_number", "card[number]"),
        (
            card_form(
                "\u0664\u0662\u0664\u0662\u0664\u0662\u0664\u0662\u0664\u0662\u0664\u0662\u0664\u0662\u0664\u0662"
            ),
            402,
            "invalid_number",
            "card[number]",
        ),
        (card_form(**{"card[exp_month]": "13"}), 402, "invalid_expiry_month", "card[exp_month]"),
        (card_form(**{"card[exp_year]": "2019"}), 402, "invalid_expiry_year", "card[exp_year]"),
        (card_form(cvc="12"), 402, "invalid_cvc", "card[cvc]"),
        (card_form(AMEX, cvc="123"), 402, "invalid_cvc", "card[cvc]"),
        ({"type": "card"}, 400, "parameter_missing", "card"),
        ({"card[number]": VISA}, 400, "parameter_missing", "type"),
        (card_form(**{"card[pin]": "1234"}), 400, "parameter_unknown", "card[pin]"),
        (card_form(**{"metadata[note]": f"card {VISA}"}), 400, "parameter_invalid", "metadata"),
    ],
)
def test_bad_input_gets_stripes_error_and_creates_nothing(
    http: httpx.Client, stack: Stack, data: dict[str, str], status: int, code: str, param: str
) -> None:
    acct = stack.accounts[1]
    before = get(http, stack, acct["sk"], "/v1/payment_methods?limit=100").json()["data"]
    r = create(http, stack, acct["sk"], data)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    for secret in (VISA, AMEX, "4242424242424241", "\u0664\u0662\u0664\u0662"):
        assert secret not in r.text
    after = get(http, stack, acct["sk"], "/v1/payment_methods?limit=100").json()["data"]
    assert len(after) == len(before)


def test_test_mode_refuses_unpublished_numbers_and_live_mode_refuses_test_cards(
    http: httpx.Client, stack: Stack
) -> None:
    acct = stack.accounts[0]
    other = random_pan(random.Random(7))
    r = create(http, stack, acct["sk"], card_form(other))
    assert r.status_code == 402
    assert r.json()["error"]["type"] == "card_error"
    assert other not in r.text
    r = create(http, stack, acct["sk_live"], card_form(VISA))
    assert r.status_code == 402
    r = create(http, stack, acct["sk_live"], card_form(other))
    assert r.status_code == 200, r.text
    assert r.json()["livemode"] is True


def test_missing_and_invalid_keys_are_401(http: httpx.Client, stack: Stack) -> None:
    r = http.post(f"{stack.url}/v1/payment_methods", data=card_form())
    assert r.status_code == 401
    r = create(http, stack, "sk_test_" + "x" * 40, card_form())
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"


def test_wrong_content_type_is_415(http: httpx.Client, stack: Stack) -> None:
    r = http.post(
        f"{stack.url}/v1/payment_methods",
        content=b"<card/>",
        headers={
            "authorization": f"Bearer {stack.accounts[1]['sk']}",
            "content-type": "application/xml",
        },
    )
    assert r.status_code == 415


def test_a_body_over_the_limit_is_413_and_creates_nothing(http: httpx.Client, stack: Stack) -> None:
    acct = stack.accounts[1]
    before = http.get(f"{stack.url}/v1/payment_methods?limit=100", auth=(acct["sk"], ""))
    headers = {
        "authorization": f"Bearer {acct['sk']}",
        "content-type": "application/x-www-form-urlencoded",
    }
    # Declared: refused from Content-Length. Chunked (no length): refused once read past
    # the limit. Either way the card in it is not echoed and nothing is stored.
    padded = card_form(VISA, **{"metadata[pad]": "x" * 70_000})
    declared = http.post(f"{stack.url}/v1/payment_methods", data=padded, headers=headers)

    def chunks() -> Iterator[bytes]:
        yield b"type=card&card[number]=" + VISA.encode() + b"&metadata[pad]="
        for _ in range(20):
            yield b"y" * 8192

    streamed = http.post(f"{stack.url}/v1/payment_methods", content=chunks(), headers=headers)
    for r in (declared, streamed):
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "request_too_large"
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert VISA not in r.text
    after = http.get(f"{stack.url}/v1/payment_methods?limit=100", auth=(acct["sk"], ""))
    assert after.json()["data"] == before.json()["data"]


# --- idempotency and limits ---------------------------------------------------------------


def test_idempotency_key_returns_the_first_result_and_refuses_other_parameters(
    http: httpx.Client, stack: Stack
) -> None:
    acct = stack.accounts[1]
    first = create(http, stack, acct["sk"], card_form(), **{"idempotency-key": "order-1"})
    again = create(http, stack, acct["sk"], card_form(), **{"idempotency-key": "order-1"})
    assert first.status_code == again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    other = create(http, stack, acct["sk"], card_form(MASTERCARD), **{"idempotency-key": "order-1"})
    assert other.status_code == 400
    assert other.json()["error"]["type"] == "idempotency_error"
    assert MASTERCARD not in other.text


def test_publishable_keys_are_rate_limited_with_retry_after(
    http: httpx.Client, stack: Stack
) -> None:
    acct = stack.accounts[1]
    # The burst is 30 at 2 tokens/s: 40 requests in a row run out of tokens. The refused
    # answer itself is checked, not one more request after it: on a loaded machine a
    # token may come back in the meantime.
    responses = [create(http, stack, acct["pk"], card_form()) for _ in range(40)]
    refused = [r for r in responses if r.status_code == 429]
    assert refused
    r = refused[-1]
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error"


# --- encryption at rest -----------------------------------------------------------------


def test_ciphertext_moved_to_another_row_does_not_decrypt(http: httpx.Client, stack: Stack) -> None:
    acct = stack.accounts[0]
    a = create(http, stack, acct["sk"], card_form(**{"billing_details[name]": "Alice"})).json()
    b = create(http, stack, acct["sk"], card_form(**{"billing_details[name]": "Bob"})).json()
    ((a_ct,),) = stack.sql("SELECT name_ct FROM payment_methods WHERE id = ?", a["id"])
    stack.sql("UPDATE payment_methods SET name_ct = ? WHERE id = ?", a_ct, b["id"])
    r = get(http, stack, acct["sk"], f"/v1/payment_methods/{b['id']}")
    assert r.status_code == 500
    assert "Alice" not in r.text
    assert (
        get(http, stack, acct["sk"], f"/v1/payment_methods/{a['id']}").json()["billing_details"][
            "name"
        ]
        == "Alice"
    )


def test_delete_destroys_the_card_data(http: httpx.Client, stack: Stack) -> None:
    acct = stack.accounts[0]
    pm = create(
        http, stack, acct["sk"], card_form(**{"billing_details[name]": "Deleted Person"})
    ).json()
    ((ct,),) = stack.sql("SELECT number_ct FROM payment_methods WHERE id = ?", pm["id"])
    r = http.delete(
        f"{stack.url}/v1/payment_methods/{pm['id']}",
        headers={"authorization": f"Bearer {acct['sk']}"},
    )
    assert r.json() == {"id": pm["id"], "object": "payment_method", "deleted": True}
    assert get(http, stack, acct["sk"], f"/v1/payment_methods/{pm['id']}").status_code == 404
    assert stack.sql("SELECT count(*) FROM payment_methods WHERE id = ?", pm["id"]) == [(0,)]
    if stack.backend != "sqlite":
        return  # PostgreSQL reclaims dead tuples with VACUUM; the row is gone from the table.
    assert stack.sql("SELECT count(*) FROM payment_methods WHERE id = ?", pm["id"]) == [(0,)]
    if stack.backend != "sqlite":
        return  # PostgreSQL reclaims dead tuples with VACUUM; the row is gone from the table.
    with sqlite3.connect(stack.db) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    raw = stack.db.read_bytes()
    wal = stack.db.with_name("vault.db-wal")
    raw += wal.read_bytes() if wal.exists() else b""
    assert bytes(ct) not in raw


def test_no_card_number_or_cvc_rests_in_the_database_or_logs(
    http: httpx.Client, stack: Stack
) -> None:
    acct = stack.accounts[0]
    rng = random.Random(2026 if stack.backend == "sqlite" else 2027)
    numbers = [random_pan(rng) for _ in range(200)]
    cvcs = [f"{rng.randint(0, 999):03d}" for _ in numbers]
    for number, cvc in zip(numbers, cvcs, strict=True):
        r = create(http, stack, acct["sk_live"], card_form(number, cvc=cvc))
        assert r.status_code == 200, r.text
    files = [stack.db, stack.db.with_name("vault.db-wal")] if stack.backend == "sqlite" else []
    files += [
        p
        for p in stack.dir.iterdir()
        if (p.is_file() and p.suffix in ("", ".db", ".log")) or p.name.endswith(("-wal", "-shm"))
    ]
    blob = b"".join(p.read_bytes() for p in files if p.exists())
    if stack.backend != "sqlite":
        # The database is PostgreSQL's: read every row of every vault table instead.
        tables = [
            t for (t,) in stack.sql("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        ]
        for table in tables:
            blob += repr(stack.sql(f"SELECT * FROM {table}")).encode()  # noqa: S608 - names from pg_tables
    assert len(blob) > 10_000
    for number in numbers:
        assert number.encode() not in blob
        assert number.encode("utf-16-le") not in blob
    # CVCs are three digits and occur by chance in any large file; look for them in the
    # shape they were sent (beside their parameter name).
    for cvc in cvcs:
        assert f'"cvc": "{cvc}"'.encode() not in blob
        assert f"card[cvc]={cvc}".encode() not in blob


def test_key_service_down_gives_503_and_stores_nothing(
    http: httpx.Client, stack: Stack, pki: Pki, tmp_path: Path
) -> None:
    # A second vault on the same kind of store, pointed at a key service that is not there.
    port, dead = free_ports(2)
    vcert, vkey = pki.cert("vault")
    conf = tmp_path / "vault.toml"
    conf.write_text(
        f'[server]\nport = {port}\ncert_file = "{vcert}"\nkey_file = "{vkey}"\n'
        f'[store]\nurl = "sqlite:///{tmp_path / "v.db"}"\n'
        f'[keyservice]\nurl = "https://localhost:{dead}"\nca_file = "{pki.ca_file}"\ncert_file = "{vcert}"\nkey_file = "{vkey}"\n'
    )
    acct = create_account(conf)
    with cardvault_process(["vault", "serve", "--config", str(conf)], log=tmp_path / "log") as proc:
        wait_for_port(port, proc)
        r = http.post(
            f"https://localhost:{port}/v1/payment_methods",
            data=card_form(),
            headers={"authorization": f"Bearer {acct['sk']}"},
        )
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "keyservice_unavailable"
        listed = http.get(
            f"https://localhost:{port}/v1/payment_methods",
            headers={"authorization": f"Bearer {acct['sk']}"},
        )
        assert listed.json()["data"] == []


# --- Stripe's own client library ----------------------------------------------------------


def test_official_stripe_library_creates_retrieves_and_gets_card_errors(
    stack: Stack, pki: Pki
) -> None:
    import stripe

    # Only the API base and the CA bundle change, as the design promises.
    stripe.api_key = stack.accounts[1]["sk"]
    stripe.api_base = stack.url
    stripe.ca_bundle_path = str(pki.ca_file)
    try:
        pm = stripe.PaymentMethod.create(
            type="card", card={"number": VISA, "exp_month": 12, "exp_year": 2034, "cvc": "123"}
        )
        assert pm.id.startswith("pm_")
        assert pm.card.last4 == "4242"
        again = stripe.PaymentMethod.retrieve(pm.id)
        assert again.card.fingerprint == pm.card.fingerprint
        with pytest.raises(stripe.CardError) as info:
            stripe.PaymentMethod.create(
                type="card",
                card={
                    "number": "4242424242424241",
                    "exp_month": 12,
                    "exp_year": 2034,
                    "cvc": "123",
                },
            )
        assert info.value.code == "incorrect_number"
    finally:
        stripe.api_base = "https://api.stripe.com"
        stripe.ca_bundle_path = None


def test_revoked_keys_stop_working(http: httpx.Client, stack: Stack) -> None:
    acct = stack.accounts[1]
    r = cli("api-keys", "create", "--config", str(stack.vault_config), "--account", acct["account"])
    assert r.returncode == 0, r.stderr
    key_id, secret = r.stdout.split()[:2]
    assert key_id.startswith("key_")
    assert secret.startswith("sk_test_")
    assert get(http, stack, secret, "/v1/payment_methods").status_code == 200
    r = cli("api-keys", "revoke", "--config", str(stack.vault_config), key_id)
    assert r.returncode == 0, r.stderr
    time.sleep(2.2)  # the vault caches key lookups for two seconds
    r = get(http, stack, secret, "/v1/payment_methods")
    assert r.status_code == 401
    assert cli("api-keys", "revoke", "--config", str(stack.vault_config), key_id).returncode == 1


def test_sealed_key_service_gives_503_keyservice_sealed(
    http: httpx.Client, pki: Pki, tmp_path: Path
) -> None:
    kport, vport = free_ports(2)
    if not pki.cert("keyd")[0].exists():
        pki.ca.issue("keyd", dns=["localhost"], ips=["127.0.0.1"])
    kcert, kkey = pki.cert("keyd")
    kconf = tmp_path / "keyd.toml"
    kconf.write_text(
        f'[server]\nport = {kport}\ncert_file = "{kcert}"\nkey_file = "{kkey}"\nclient_ca_file = "{pki.ca_file}"\n'
        f'[store]\nurl = "sqlite:///{tmp_path / "keyd.db"}"\n'
        f'[audit]\ndirectory = "{tmp_path / "keyd-audit"}"\n'
    )
    r = cli(
        "keyservice",
        "init",
        "--config",
        str(kconf),
        "--shares",
        "2",
        "--threshold",
        "2",
        "--out-dir",
        str(tmp_path / "s"),
    )
    assert r.returncode == 0, r.stderr
    vcert, vkey = pki.cert("vault")
    vconf = tmp_path / "vault.toml"
    vconf.write_text(
        f'[server]\nport = {vport}\ncert_file = "{vcert}"\nkey_file = "{vkey}"\n'
        f'[store]\nurl = "sqlite:///{tmp_path / "v.db"}"\n'
        f'[keyservice]\nurl = "https://localhost:{kport}"\nca_file = "{pki.ca_file}"\ncert_file = "{vcert}"\nkey_file = "{vkey}"\n'
    )
    acct = create_account(vconf)
    with keyservice_and_vault(kconf, kport, vconf, vport, tmp_path):
        url = f"https://localhost:{vport}/v1/payment_methods"
        auth = {"authorization": f"Bearer {acct['sk']}"}
        r = http.post(url, data=card_form(), headers=auth)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "keyservice_sealed"
        assert http.get(url, headers=auth).json()["data"] == []


def test_wrong_method_names_every_allowed_method(http: httpx.Client, stack: Stack) -> None:
    r = http.put(
        f"{stack.url}/v1/payment_methods",
        headers={"authorization": f"Bearer {stack.accounts[0]['sk']}"},
    )
    assert r.status_code == 405
    assert set(r.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}


# --- crashes: a vault killed with SIGKILL in the middle of its creates (issue 19) ----------


@dataclass
class Crashable:
    """A stack of its own whose vault the test kills (SIGKILL) and starts again, and whose
    key service it can stop (SIGSTOP) and let go on (SIGCONT)."""

    stack: Stack
    keyd_pid: int
    vault_pid: int
    later: contextlib.ExitStack

    def kill_vault(self) -> None:
        os.kill(self.vault_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _port_open(self.port):
            assert time.monotonic() < deadline, "the killed vault still listens"
            time.sleep(0.02)

    def start_vault(self) -> None:
        proc = self.later.enter_context(
            cardvault_process(
                ["vault", "serve", "--config", str(self.stack.vault_config)],
                log=self.stack.vault_log,
            )
        )
        wait_for_port(self.port, proc)
        self.vault_pid = proc.pid

    @property
    def port(self) -> int:
        return int(self.stack.url.rsplit(":", 1)[1])


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pid_of(config: Path) -> int:
    """The process whose command line names ``config`` (the stack's key service)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(config).encode() in cmdline and b"serve" in cmdline:
            return int(proc.name)
    raise AssertionError(f"no process runs {config}")


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def crashable(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> Iterator[Crashable]:
    with vault_database(request.param, tmp_path_factory.mktemp("db")) as dsn:
        for stack in run_stack(tmp_path_factory, pki, request.param, dsn):
            with contextlib.ExitStack() as later:
                keyd = _pid_of(stack.dir / "keyd.toml")
                yield Crashable(stack, keyd, stack.vault_pid, later)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(keyd, signal.SIGCONT)


def _cards(stack: Stack) -> list[str]:
    return sorted(str(r[0]) for r in stack.sql("SELECT id FROM payment_methods"))


def _recorded(stack: Stack, action: str) -> set[str]:
    lines = (stack.audit_dir / "audit.jsonl").read_text().splitlines()
    return {r["object"] for r in map(json.loads, lines) if r["action"] == action}


def test_a_vault_killed_during_a_create_answers_the_retry_with_one_card(
    http: httpx.Client, crashable: Crashable
) -> None:
    # Before: the key was claimed before the work and released only in-process, so after
    # the kill every retry was 409 idempotency_key_in_use, for 24 hours.
    stack, sk = crashable.stack, crashable.stack.accounts[1]["sk"]
    crashable.kill_vault()
    crashable.start_vault()  # cold: it has no data key yet
    # Its account key (for the Idempotency-Key's MAC) is fetched now; no data key is.
    warm = create(
        http, stack, sk, card_form(**{"card[exp_month]": "13"}), **{"idempotency-key": "w"}
    )
    assert warm.status_code == 402
    before = _cards(stack)
    os.kill(crashable.keyd_pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(
                create, http, stack, sk, card_form(), **{"idempotency-key": "crash-1"}
            )
            deadline = time.monotonic() + 4  # the vault gives up on the key service at 5 s
            while not stack.sql("SELECT 1 FROM idempotency_keys WHERE response_status IS NULL"):
                assert time.monotonic() < deadline, "the create never claimed its key"
                time.sleep(0.02)
            crashable.kill_vault()
            with pytest.raises(httpx.HTTPError):
                first.result()
    finally:
        os.kill(crashable.keyd_pid, signal.SIGCONT)
    crashable.start_vault()
    retry = create(http, stack, sk, card_form(), **{"idempotency-key": "crash-1"})
    assert retry.status_code == 200, retry.text
    again = create(http, stack, sk, card_form(), **{"idempotency-key": "crash-1"})
    assert again.json()["id"] == retry.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert _cards(stack) == sorted([*before, retry.json()["id"]])


def test_kill_9_under_load_then_every_key_is_answered_once_and_every_card_recorded(
    http: httpx.Client, crashable: Crashable, pki: Pki
) -> None:
    # Before: after 20 kills, 34 of 83 in-flight keys were stuck, and 17 cards had no
    # audit record (the row came before the record).
    stack, sk = crashable.stack, crashable.stack.accounts[1]["sk"]
    keys = [f"load-{n}" for n in range(48)]
    before = set(_cards(stack))
    first: dict[str, str] = {}

    def worker(mine: list[str]) -> None:
        with httpx.Client(verify=client_context(pki.ca_file), trust_env=False, timeout=10) as c:
            for key in mine:
                try:
                    r = create(c, stack, sk, card_form(), **{"idempotency-key": key})
                except httpx.HTTPError:
                    continue
                if r.status_code == 200:
                    first[key] = r.json()["id"]

    with ThreadPoolExecutor(12) as pool:
        for n in range(12):
            pool.submit(worker, keys[n::12])
        deadline = time.monotonic() + 10
        while len(set(_cards(stack)) - before) < 8:
            assert time.monotonic() < deadline, "no load reached the store"
            time.sleep(0.005)
        crashable.kill_vault()
    crashable.start_vault()
    answers = {
        key: create(http, stack, sk, card_form(), **{"idempotency-key": key}) for key in keys
    }
    stuck = {k: r.json()["error"]["code"] for k, r in answers.items() if r.status_code != 200}
    assert stuck == {}
    ids = {key: r.json()["id"] for key, r in answers.items()}
    # Answered before the kill: the same card again.
    assert {k: ids[k] for k in first} == first
    # One card per key, and no card the keys do not answer.
    assert len(set(ids.values())) == len(keys)
    new = set(_cards(stack)) - before
    assert new == set(ids.values())
    # Every card has its audit record.
    assert new <= _recorded(stack, "payment_method.created")
