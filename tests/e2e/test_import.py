"""``cardvault import`` with real processes (keyd, the vault, the command line over
mutual TLS): a PGP-encrypted file round trip, resumed and run twice, and the hostile
files, each refused whole with nothing imported.

A vault of its own (the ``life`` fixture of test_key_lifecycle). ROWS rows here; the
issue's 100,000-row round trip is bench/import.py (it takes minutes, the whole suite's
budget does not have them). Card numbers: only the published test cards (test mode
takes only those), repeated under distinct external ids."""

from __future__ import annotations

import json
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cardvault import pgp
from e2e.test_key_lifecycle import NUMBERS, Lifecycle, client, environment, tokenize
from e2e.test_key_lifecycle import life as life  # the module's fixture: a vault of its own
from helpers import Pki
from hostile.hostile_support import card_numbers_in

ROWS = 3000
BATCH = 400


def run(life: Lifecycle, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cardvault", *args],
        capture_output=True, text=True, timeout=300, env=environment(life), cwd=life.dir,
    )  # fmt: skip


def events(r: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]


def account_id(life: Lifecycle) -> str:
    with sqlite3.connect(life.vault_db) as db:
        (acct,) = db.execute("SELECT id FROM accounts ORDER BY created LIMIT 1").fetchone()
    return str(acct)


def count_pms(life: Lifecycle) -> int:
    with sqlite3.connect(life.vault_db) as db:
        (n,) = db.execute("SELECT count(*) FROM payment_methods").fetchone()
    return int(n)


@pytest.fixture(scope="module")
def import_key(life: Lifecycle) -> dict[str, Any]:
    r = run(life, "import-key", "create")
    assert r.returncode == 0, r.stderr
    key = json.loads(r.stdout)
    assert key["public_key"].startswith("-----BEGIN PGP PUBLIC KEY BLOCK")
    assert "PRIVATE" not in r.stdout
    return dict(key)


def encrypted(key: dict[str, Any], plain: Path) -> Path:
    target = plain.with_name(plain.name + ".gpg")
    with target.open("wb") as fh:
        pgp.encrypt(key["public_key"], key["fingerprint"], plain, fh.write)
    return target


def jsonl_rows(count: int, prefix: str = "cus_") -> list[dict[str, Any]]:
    return [
        {"id": f"{prefix}{i}", "object": "card", "number": NUMBERS[i % len(NUMBERS)],
         "exp_month": 1 + i % 12, "exp_year": 2031 + i % 5, "name": f"Holder {i}",
         "address_zip": "10115", "metadata": {"source": "stripe"}}
        for i in range(count)
    ]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict[str, Any]], extra: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + extra)
    return path


def test_an_encrypted_file_is_imported_resumable_and_idempotent(
    life: Lifecycle, pki: Pki, import_key: dict[str, Any], tmp_path: Path
) -> None:
    acct = account_id(life)
    rows = jsonl_rows(ROWS)
    # Two bad rows: a number that fails the Luhn check, and an expired card.
    rows[10]["number"] = "4242424242424241"
    rows[20]["exp_year"] = 2001
    source = encrypted(import_key, write_jsonl(tmp_path / "cards.jsonl", rows))
    before = count_pms(life)

    r = run(life, "import", str(source), "--account", acct, "--batch-size", str(BATCH))
    assert r.returncode == 0, r.stderr
    seen = events(r)
    kinds = [e["event"] for e in seen]
    assert kinds[0] == "upload" and "checked" in kinds and kinds[-1] == "done"
    done = seen[-1]
    assert done["rows"] == ROWS
    assert done["imported"] == ROWS - 2
    assert done["invalid"] == 2
    assert done["invalid_by_reason"] == {"incorrect_number": 1, "invalid_expiry_year": 1}
    # Only four distinct cards: every row after the first four repeats a fingerprint.
    assert done["duplicates_by_fingerprint"] == ROWS - 2 - len(NUMBERS)
    invalid = [e for e in seen if e["event"] == "invalid"]
    assert sorted(e["line"] for e in invalid) == [11, 21]
    assert any("424242******4241" in e["detail"] for e in invalid)
    assert count_pms(life) == before + ROWS - 2
    # Nothing of a card number in any output.
    for text in (r.stdout, r.stderr):
        assert card_numbers_in(text.replace("424242******4241", "")) == []

    mapping = Path(done["mapping"])
    assert stat.S_IMODE(mapping.stat().st_mode) == 0o600
    text = mapping.read_text()
    assert card_numbers_in(text) == []
    lines = text.splitlines()
    assert lines[0] == "external_id,payment_method"
    assert len(lines) == 1 + ROWS - 2
    ext, pm = lines[1].split(",")
    assert ext == "cus_0"

    # The imported card is the API's: same fingerprint as a card tokenized by the API.
    with client(pki) as http:
        got = http.get(f"{life.url}/v1/payment_methods/{pm}",
                       headers={"authorization": f"Bearer {life.sk}"}).json()  # fmt: skip
        made = tokenize(http, life, NUMBERS[0])
    assert got["card"]["fingerprint"] == made["card"]["fingerprint"]
    assert got["billing_details"]["name"] == "Holder 0"
    assert got["billing_details"]["address"]["postal_code"] == "10115"
    assert got["metadata"] == {"source": "stripe"}

    # One audit record per batch, not per row.
    audit = "".join(p.read_text() for p in sorted((life.dir / "audit").glob("*")) if p.is_file())
    assert audit.count('"import.batch"') == -(-ROWS // BATCH)
    assert audit.count('"payment_method.created"') == 1  # the API's one above

    # The same file again: nothing is created twice.
    count = count_pms(life)
    again = run(life, "import", str(source), "--account", acct, "--batch-size", str(BATCH))
    assert again.returncode == 0, again.stderr
    assert events(again)[-1]["imported"] == ROWS - 2
    assert count_pms(life) == count

    # Another file with some of the same ids and cards: those are already imported.
    overlap = encrypted(import_key, write_jsonl(tmp_path / "more.jsonl", jsonl_rows(30)[:5]))
    r = run(life, "import", str(overlap), "--account", acct)
    assert r.returncode == 0, r.stderr
    assert events(r)[-1]["already_imported"] == 5
    assert count_pms(life) == count

    # `cardvault scan` finds nothing in the state directory (the spool is gone too).
    scan = run(life, "scan", str(life.dir / "audit"), str(life.dir / "import-spool"))
    assert scan.returncode == 0, scan.stdout + scan.stderr


def test_a_plain_csv_with_quotes_and_line_breaks_is_imported_in_test_mode(
    life: Lifecycle, import_key: dict[str, Any], tmp_path: Path
) -> None:
    acct = account_id(life)
    plain = tmp_path / "processor.csv"
    plain.write_text(
        "Token,Card Number,Exp Month,Exp Year,Holder,CVV,Note\r\n"
        f'csv_1,{NUMBERS[0]},12,2034,"Rosen, ""Jenny""",123,"two\nlines"\r\n'
        f"csv_2,{NUMBERS[1]},1,2035,,,\r\n"
    )
    r = run(life, "import", str(plain), "--account", acct, "--format", "csv",
            "--map", "Token=external_id", "--map", "Card Number=number",
            "--map", "Exp Month=exp_month", "--map", "Exp Year=exp_year",
            "--map", "Holder=name")  # fmt: skip
    assert r.returncode == 0, r.stderr
    done = events(r)[-1]
    assert (done["rows"], done["imported"], done["invalid"]) == (2, 2, 0)
    checked = next(e for e in events(r) if e["event"] == "checked")
    assert checked["ignored_columns"] == ["CVV", "Note"]
    with sqlite3.connect(life.vault_db) as db:
        (cvc,) = db.execute(
            "SELECT count(*) FROM payment_methods p JOIN import_links l ON l.pm_id = p.id "
            "WHERE l.external_id LIKE 'csv_%' AND p.cvc_ct IS NOT NULL"
        ).fetchone()
    assert cvc == 0  # the CVV column is never read


def test_a_plain_file_is_refused_for_live_mode(life: Lifecycle, tmp_path: Path) -> None:
    plain = write_jsonl(tmp_path / "live.jsonl", jsonl_rows(1))
    r = run(life, "import", str(plain), "--account", account_id(life), "--live")
    assert r.returncode == 2
    assert "test mode only" in r.stderr


def _hostile(tmp_path: Path, key: dict[str, Any], name: str) -> Path:
    good = jsonl_rows(50, prefix=f"{name}_")
    if name == "truncated":
        whole = encrypted(key, write_jsonl(tmp_path / "t.jsonl", good * 1))
        data = whole.read_bytes()
        whole.write_bytes(data[: len(data) - 40])
        return whole
    if name == "wrong_key":
        other = pgp.new_key("someone else", key_length=2048)
        return encrypted(
            {"public_key": other.public_key, "fingerprint": other.fingerprint},
            write_jsonl(tmp_path / "w.jsonl", good),
        )
    if name == "long_line":
        # A line far past the 16 KiB limit (a sparse run of spaces), after good rows.
        return encrypted(key, write_jsonl(tmp_path / "l.jsonl", good, " " * 5_000_000 + "\n"))
    if name == "invalid_utf8":
        path = write_jsonl(tmp_path / "u.jsonl", good)
        with path.open("ab") as fh:
            fh.write(b'{"id": "bad\xff", "number": "4242424242424242"}\n')
        return encrypted(key, path)
    if name == "duplicate_ids":
        return encrypted(key, write_jsonl(tmp_path / "d.jsonl", [*good, good[3]]))
    raise AssertionError(name)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("truncated", "corrupt"),
        ("wrong_key", "wrong_key"),
        ("long_line", "line_too_long"),
        ("invalid_utf8", "invalid_utf8"),
        ("duplicate_ids", "duplicate_external_id"),
    ],
)
def test_a_hostile_file_is_refused_whole_with_nothing_imported(
    life: Lifecycle, import_key: dict[str, Any], tmp_path: Path, name: str, reason: str
) -> None:
    source = _hostile(tmp_path, import_key, name)
    before = count_pms(life)
    r = run(life, "import", str(source), "--account", account_id(life))
    assert r.returncode == 1, r.stdout + r.stderr
    said = " ".join(r.stderr.split())
    assert f"import_refused ({reason})" in said
    assert "nothing imported" in said
    assert count_pms(life) == before
    with sqlite3.connect(life.vault_db) as db:
        (links,) = db.execute(
            "SELECT count(*) FROM import_links WHERE external_id LIKE ?", (f"{name}_%",)
        ).fetchone()
    assert links == 0
    assert card_numbers_in(r.stdout + r.stderr) == []
