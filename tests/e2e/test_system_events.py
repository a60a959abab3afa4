"""The card environment's own events with real processes: ``key.rotated`` (``cardvault
keys rotate``: the key service rotates, the vault takes a data key under the new version
with the events in the same transaction) and ``audit.failed_closed`` (the vault's audit
directory full: the events written to the store as the vault refuses, delivered by the
vault restarted after its exit 74). Each goes to every account, in test and live mode,
and is delivered signed to the endpoints subscribed to it."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import stripe

from cardvault.transport.tls import client_context
from e2e.test_health import fill, small_filesystem
from e2e.test_webhooks import receiver, wait_until
from helpers import Pki, free_port, wait_for_port
from hostile.hostile_support import card_numbers_in
from stack import Stack, run_stack, vault_database

AUDIT_FAILED_EXIT = 74
CARD = {
    "type": "card",
    "card[number]": "4242424242424242",
    "card[exp_month]": "12",
    "card[exp_year]": "2034",
}


def settings(pki: Pki, admin_port: int) -> str:
    return (
        f'[admin]\nport = {admin_port}\nclient_ca_file = "{pki.ca_file}"\n'
        'allowed_identities = ["admin"]\n'
        "[webhooks]\n"
        'allowed_hosts = ["localhost"]\n'
        f'ca_file = "{pki.ca_file}"\n'
        "retry_base_seconds = 0.5\nretry_max_seconds = 2.0\npoll_interval = 0.1\ntimeout = 5.0\n"
    )


@pytest.fixture(scope="module")
def http(pki: Pki) -> Iterator[httpx.Client]:
    with httpx.Client(verify=client_context(pki.ca_file), trust_env=False, timeout=15) as c:
        yield c


def events(http: httpx.Client, stack: Stack, key: str, type: str) -> list[dict[str, Any]]:
    r = http.get(f"{stack.url}/v1/events", params={"type": type}, auth=(key, ""))
    assert r.status_code == 200, r.text
    return list(r.json()["data"])


def subscribe(http: httpx.Client, stack: Stack, url: str, type: str) -> str:
    r = http.post(
        f"{stack.url}/v1/webhook_endpoints",
        data={"url": url, "enabled_events[]": type},
        auth=(stack.accounts[1]["sk"], ""),
    )
    assert r.status_code == 200, r.text
    return str(r.json()["secret"])


# --- key.rotated ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def admin_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pki: Pki, admin_port: int) -> Iterator[Stack]:
    with vault_database("sqlite", tmp_path_factory.mktemp("db")) as dsn:
        for stack in run_stack(
            tmp_path_factory, pki, "sqlite", dsn, vault_toml=settings(pki, admin_port)
        ):
            wait_for_port(admin_port, stack.processes["vault"])
            yield stack


def keys_cli(
    stack: Stack, pki: Pki, admin_port: int, *args: str
) -> subprocess.CompletedProcess[str]:
    cert, key = pki.cert("admin")
    env = {
        **os.environ,
        "CARDVAULT_KEYSERVICE_URL": f"https://localhost:{stack.keyd_port}",
        "CARDVAULT_VAULT_ADMIN_URL": f"https://localhost:{admin_port}",
        "CARDVAULT_CA_BUNDLE": str(pki.ca_file),
        "CARDVAULT_ADMIN_CERT": str(cert),
        "CARDVAULT_ADMIN_KEY": str(key),
    }
    env.pop("CARDVAULT_STACK", None)
    return subprocess.run(
        [sys.executable, "-m", "cardvault", "keys", *args],
        capture_output=True, text=True, timeout=60, env=env, cwd=stack.dir,
    )  # fmt: skip


def test_keys_rotate_writes_key_rotated_to_every_account_with_the_new_data_key(
    http: httpx.Client, stack: Stack, pki: Pki, admin_port: int
) -> None:
    assert (
        http.post(
            f"{stack.url}/v1/payment_methods", data=CARD, auth=(stack.accounts[1]["sk"], "")
        ).status_code
        == 200
    )
    with receiver(pki) as rx:
        secret = subscribe(http, stack, rx.url, "key.rotated")
        r = keys_cli(stack, pki, admin_port, "rotate", "pan")
        assert r.returncode == 0, r.stderr
        answer = json.loads(r.stdout)
        assert answer["vault"]["version"] == 2
        # Two accounts, each in test and live mode.
        assert answer["vault"]["events"] == 4

        # The vault's first data key under version 2 is stored, and the events with it.
        [(data_key_version,)] = stack.sql(
            "SELECT kek_version FROM data_keys WHERE id = ?", answer["vault"]["data_key"]
        )
        assert data_key_version == 2
        rows = stack.sql("SELECT account_id, livemode FROM events WHERE type = 'key.rotated'")
        assert sorted((str(a), bool(m)) for a, m in rows) == sorted(
            (acct["account"], live) for acct in stack.accounts for live in (False, True)
        )
        for key in (stack.accounts[0]["sk"], stack.accounts[0]["sk_live"], stack.accounts[1]["sk"]):
            [event] = events(http, stack, key, "key.rotated")
            assert event["data"]["object"]["id"] == "pan"
            assert event["data"]["object"]["version"] == 2

        wait_until(lambda: any(x.status == 200 for x in rx.received))
        got = stripe.Webhook.construct_event(
            rx.received[-1].body.decode(), rx.received[-1].signature, secret
        )
        assert got.type == "key.rotated" and got.data.object.version == 2

    # The vault told again of the same version (a retried call) writes no second set.
    admin = client_context(pki.ca_file, client_cert=pki.cert("admin"))
    with httpx.Client(verify=admin, trust_env=False, timeout=15) as c:
        again = c.post(f"https://localhost:{admin_port}/v1/admin/keys/pan/rotated")
        assert again.status_code == 200, again.text
        assert again.json()["events"] == 0
        unknown = c.post(f"https://localhost:{admin_port}/v1/admin/keys/fingerprint/rotated")
        assert unknown.status_code == 404
        assert unknown.json()["error"]["type"] == "invalid_request_error"
    assert len(events(http, stack, stack.accounts[1]["sk"], "key.rotated")) == 1
    # And tokenization goes on under the new data key.
    stored = http.post(
        f"{stack.url}/v1/payment_methods", data=CARD, auth=(stack.accounts[1]["sk"], "")
    )
    assert stored.status_code == 200, stored.text
    [(version,)] = stack.sql(
        "SELECT d.kek_version FROM payment_methods p JOIN data_keys d ON d.id = p.data_key_id "
        "WHERE p.id = ?",
        stored.json()["id"],
    )
    assert version == 2


# --- audit.failed_closed --------------------------------------------------------------


def test_a_vault_whose_audit_log_fails_closed_writes_audit_failed_closed_delivered_after_restart(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki, http: httpx.Client
) -> None:
    audit: list[Path] = []
    mounted: list[bool] = []
    with contextlib.ExitStack() as exits:

        def prepare(d: Path) -> None:
            audit.append(d / "audit")
            mounted.append(exits.enter_context(small_filesystem(d / "audit")))

        dsn = exits.enter_context(vault_database("sqlite", tmp_path_factory.mktemp("db")))
        stacks = run_stack(
            tmp_path_factory,
            pki,
            "sqlite",
            dsn,
            vault_toml=settings(pki, free_port()),
            prepare=prepare,
        )
        stack = next(stacks)
        exits.callback(stacks.close)  # the processes stop before the tmpfs goes
        if not mounted[0]:
            pytest.skip("no tmpfs of its own for the audit directory (not root)")
        check_audit_failed_closed(http, stack, pki, audit[0])


def check_audit_failed_closed(http: httpx.Client, stack: Stack, pki: Pki, audit: Path) -> None:
    sk = stack.accounts[1]["sk"]
    with receiver(pki) as rx:
        secret = subscribe(http, stack, rx.url, "audit.failed_closed")
        assert (
            http.post(f"{stack.url}/v1/payment_methods", data=CARD, auth=(sk, "")).status_code
            == 200
        )
        fill(audit, True)
        # The log's last page may still hold a few records: until it is full, they fit.
        for _ in range(50):
            r = http.post(f"{stack.url}/v1/payment_methods", data=CARD, auth=(sk, ""))
            if r.status_code != 200:
                break
        assert r.status_code == 503 and r.json()["error"]["code"] == "audit_unavailable"
        # Refused again: the same failure, no second set of events.
        http.post(f"{stack.url}/v1/payment_methods", data=CARD, auth=(sk, ""))
        assert stack.processes["vault"].wait(30) == AUDIT_FAILED_EXIT

        # Written to the store as the vault failed closed: to every account and mode.
        rows = stack.sql(
            "SELECT account_id, livemode FROM events WHERE type = 'audit.failed_closed'"
        )
        assert sorted((str(a), bool(m)) for a, m in rows) == sorted(
            (acct["account"], live) for acct in stack.accounts for live in (False, True)
        )
        # Space again (an operator freed it), and the supervisor's restart delivers.
        (audit / "filler").unlink()
        stack.start("vault")
        wait_until(lambda: any(x.status == 200 for x in rx.received), timeout=30)
        got = stripe.Webhook.construct_event(
            rx.received[-1].body.decode(), rx.received[-1].signature, secret
        )
        assert got.type == "audit.failed_closed"
        assert got.data.object.reason == "write_failed"
        [listed] = events(http, stack, sk, "audit.failed_closed")
        assert listed["id"] == got.id
        assert card_numbers_in(rx.received[-1].body.decode()) == []
    assert card_numbers_in(stack.vault_log.read_text(errors="replace")) == []
