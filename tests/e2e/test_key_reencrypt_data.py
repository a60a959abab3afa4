"""``cardvault keys reencrypt pan --data`` with real processes: every card sealed under a
data key made before a date is sealed again under a fresh one while a client tokenizes
and forwards; the job is killed with SIGKILL midway and resumed; a card whose stored
data fails authentication is reported as unreadable and does not stop the run.

A vault of its own (the ``life`` fixture of test_key_lifecycle, a new instance for this
module), so that the card count stays small: with one data key per card, each re-sealed
card costs an unwrap and a new data key from keyd."""

from __future__ import annotations

import json
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor

from e2e.test_key_lifecycle import (
    NUMBERS,
    Lifecycle,
    Traffic,
    client,
    forward,
    keys_cli,
    killed_midway,
    status,
    tokenize,
)
from e2e.test_key_lifecycle import life as life  # the module's fixture: a vault of its own
from helpers import Pki

CARDS = 300


def old_cards(life: Lifecycle, before: int) -> int:
    with sqlite3.connect(life.vault_db) as db:
        (n,) = db.execute(
            "SELECT count(*) FROM payment_methods p JOIN data_keys d"
            " ON d.id = p.data_key_id WHERE d.created < ?", (before,)
        ).fetchone()  # fmt: skip
    return int(n)


def test_reencrypt_data_moves_every_card_to_fresh_data_keys_under_load(
    life: Lifecycle, pki: Pki
) -> None:
    with ThreadPoolExecutor(8) as pool, client(pki) as http:
        cards = list(pool.map(lambda i: tokenize(http, life, NUMBERS[i % 4])["id"], range(CARDS)))
        named = http.post(
            f"{life.url}/v1/payment_methods",
            data={"type": "card", "card[number]": NUMBERS[0], "card[exp_month]": "12",
                  "card[exp_year]": "2034", "billing_details[name]": "Jenny Rosen"},
            headers={"authorization": f"Bearer {life.sk}"},
        ).json()["id"]  # fmt: skip
    # One card's stored number altered in the database: it can never be opened again.
    tampered = cards.pop()
    with sqlite3.connect(life.vault_db) as db:
        (ct,) = db.execute(
            "SELECT number_ct FROM payment_methods WHERE id = ?", (tampered,)
        ).fetchone()
        db.execute(
            "UPDATE payment_methods SET number_ct = ? WHERE id = ?",
            (bytes(ct[:-1]) + bytes([ct[-1] ^ 1]), tampered),
        )
        (before_ct,) = db.execute(
            "SELECT number_ct FROM payment_methods WHERE id = ?", (named,)
        ).fetchone()
    time.sleep(1.1)  # every data key so far was made strictly before ``before``
    before = int(time.time())
    total = old_cards(life, before)
    assert total == CARDS + 1

    with Traffic(life, pki, cards) as traffic:
        lines = killed_midway(life, CARDS // 3, "pan", "--data", "--before", str(before))
        assert lines[0]["event"] == "start"
        assert lines[0]["data_before"] == before
        assert 0 < old_cards(life, before) < total
        run = lines[-1]["run"]

        r = keys_cli(life, "reencrypt", "pan", "--data", "--before", str(before),
                     "--rate", "5000", "--batch-size", "50")  # fmt: skip
        assert r.returncode == 0, r.stderr
        events = [json.loads(line) for line in r.stdout.splitlines()]
        assert events[0]["resumed"] is True
        assert [e for e in events if e.get("path", "").endswith("reencrypt_data")] == [events[0]]
        ends = [i for i, e in enumerate(events) if e["event"] == "done"]
        assert len(ends) == 2  # the card data, then the stored keys
        assert {e["run"] for e in events[1 : ends[0] + 1]} == {run}
    assert traffic.errors == []
    assert len(traffic.made) > 0

    # Only the altered card is left under an old data key: it cannot be opened.
    assert old_cards(life, before) == 1
    job = status(life)["keys"]["pan"]["data_job"]
    assert (job["finished"] is not None, job["data_before"], job["unreadable"]) == (
        True, before, 1,
    )  # fmt: skip
    with sqlite3.connect(life.vault_db) as db:
        (after_ct,) = db.execute(
            "SELECT number_ct FROM payment_methods WHERE id = ?", (named,)
        ).fetchone()
    assert after_ct != before_ct
    with client(pki) as http, ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda pm: forward(http, life, pm).status_code,
                              [*cards, named, *traffic.made]))  # fmt: skip
        # The name, sealed again with the number under the new key, still opens.
        got = http.get(
            f"{life.url}/v1/payment_methods/{named}",
            headers={"authorization": f"Bearer {life.sk}"},
        ).json()
    assert codes == [200] * (len(cards) + 1 + len(traffic.made))
    assert got["billing_details"]["name"] == "Jenny Rosen"

    audit = "".join(
        p.read_text(errors="replace") for p in (life.dir / "audit").rglob("*") if p.is_file()
    )
    assert "keys.reencrypt_data.batch" in audit
    assert tampered in audit  # named in the batch that skipped it
    completed = [
        json.loads(line) for line in audit.splitlines() if '"keys.reencrypt_data.completed"' in line
    ]
    assert completed[-1]["detail"]["unreadable"] == 1
    # Again: nothing left to re-seal but the altered card; the run ends all the same.
    r = keys_cli(life, "reencrypt", "pan", "--data", "--before", str(before))
    assert r.returncode == 0, r.stderr
    assert old_cards(life, before) == 1
