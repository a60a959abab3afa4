"""The vault settles at start-up what requests cut off by a crash left in its store,
before any retry comes: a claim whose card was stored is completed with it, and a claim
whose lease ran out with nothing stored is released after its follow-up audit record.

The stale claims are made as a crash leaves them: the vault is stopped, and rows of its
own making are set back to ``claimed`` under a boot that is gone (what a ``kill -9``
between the insert and the answer leaves), or with a lease run out and an effect that
never came. Then the vault starts, and the rows are read before any request is sent.
"""

from __future__ import annotations

import json
import socket
import sqlite3
from collections.abc import Iterator

import httpx
import pytest

from cardvault.transport.tls import client_context
from helpers import Pki, cli
from stack import Stack, run_stack, vault_database

FORM = {
    "type": "card",
    "card[number]": "4242424242424242",
    "card[exp_month]": "12",
    "card[exp_year]": "2034",
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Stack]:
    with vault_database("sqlite", tmp_path_factory.mktemp("db")) as dsn:
        yield from run_stack(tmp_path_factory, pki, "sqlite", dsn)


def _rows(stack: Stack) -> list[tuple[str, str, str | None, str | None]]:
    with sqlite3.connect(stack.db) as db:
        return db.execute(
            "SELECT idempotency_key, state, response_body, effect_id FROM idempotency_keys "
            "ORDER BY created, response_body"
        ).fetchall()


def _audit_actions(stack: Stack) -> list[tuple[str, str | None]]:
    lines = (stack.audit_dir / "audit.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [(r["action"], r["object"]) for r in records]


def test_start_up_settles_the_claims_a_crash_left(stack: Stack, pki: Pki) -> None:
    secret = stack.accounts[0]["sk"]
    auth = {"authorization": f"Bearer {secret}"}
    with httpx.Client(verify=client_context(pki.ca_file), trust_env=False, timeout=30) as http:
        stored = http.post(
            f"{stack.url}/v1/payment_methods", data=FORM, headers={**auth, "idempotency-key": "a"}
        )
        assert stored.status_code == 200, stored.text
        pm_id = stored.json()["id"]
        never = http.post(
            f"{stack.url}/v1/payment_methods",
            data={**FORM, "metadata[n]": "2"},
            headers={**auth, "idempotency-key": "b"},
        )
        assert never.status_code == 200, never.text
        assert stack.stop("vault") == 0

        # Key a: the card was stored and the process died before it stored the answer.
        # Key b: the process died before it stored anything, and the lease has run out.
        (key_a, _, body_a, effect_a), (key_b, *_) = _rows(stack)
        assert body_a == pm_id and effect_a == pm_id
        gone = "pm_" + "0" * 24
        with sqlite3.connect(stack.db) as db:
            db.execute(
                "UPDATE idempotency_keys SET state = 'claimed', response_status = NULL, "
                "response_body = NULL, owner = ?, boot = 'gone', token = 't-a', "
                "lease_until = 4102444800 WHERE idempotency_key = ?",
                (socket.gethostname(), key_a),
            )
            db.execute(
                "UPDATE idempotency_keys SET state = 'claimed', response_status = NULL, "
                "response_body = NULL, owner = 'another-host', boot = 'gone', token = 't-b', "
                "lease_until = 1, effect_id = ? WHERE idempotency_key = ?",
                (gone, key_b),
            )

        stack.start("vault")
        # Settled at start-up, before the vault listens: no request has been sent yet.
        rows = {key: (state, body) for key, state, body, _ in _rows(stack)}
        assert rows == {key_a: ("done", pm_id)}
        actions = _audit_actions(stack)
        assert ("payment_method.not_stored", gone) in actions
        assert ("payment_method.not_stored", pm_id) not in actions

        # The retry of a replays the card; b's key is free again.
        again = http.post(
            f"{stack.url}/v1/payment_methods", data=FORM, headers={**auth, "idempotency-key": "a"}
        )
        assert again.status_code == 200, again.text
        assert again.json()["id"] == pm_id
        assert again.headers["idempotent-replayed"] == "true"
        fresh = http.post(
            f"{stack.url}/v1/payment_methods",
            data={**FORM, "metadata[n]": "3"},
            headers={**auth, "idempotency-key": "b"},
        )
        assert fresh.status_code == 200, fresh.text
        assert "idempotent-replayed" not in fresh.headers

    log = stack.audit_dir / "audit.jsonl"
    verified = cli("audit", "verify", str(log))
    assert verified.returncode == 0, verified.stdout + verified.stderr
