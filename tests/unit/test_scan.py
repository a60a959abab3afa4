"""The scanner finds card numbers, canaries and CVCs in every encoding, and nothing else.

Card numbers are generated (random digits and a Luhn check digit) or taken from the
published test cards; none is typed here.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cardvault import scan as scan_module
from cardvault.audit import AuditLog
from cardvault.cards import luhn_valid, testcards
from cardvault.cli.scan import app
from cardvault.scan import (
    CHUNK_SIZE,
    Encoding,
    Finding,
    FindingKind,
    scan_bytes,
    scan_paths,
)

RNG_SEED = 20250601
# The packaged copy of shared/testdata/test_cards.json (tests/unit/cards checks that it is
# a verbatim copy), so that the test does not depend on where the checkout sits.
TEST_CARDS = Path(testcards.__file__).with_name("test_cards.json")


def generated_card_number(rng: random.Random, length: int = 16) -> str:
    body = "4" + "".join(rng.choice("0123456789") for _ in range(length - 2))
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


@pytest.fixture
def rng() -> random.Random:
    return random.Random(RNG_SEED)


@pytest.fixture
def card(rng: random.Random) -> str:
    return generated_card_number(rng)


def masked(number: str) -> str:
    return number[:6] + "*" * (len(number) - 10) + number[-4:]


def assert_no_value(findings: list[Finding], value: str) -> None:
    for f in findings:
        assert value not in str(f) and value not in repr(f)
        assert value[6:12] not in f.masked  # the middle digits never show


def noise(rng: random.Random, size: int) -> bytes:
    """Random bytes with no chance of holding anything the scanner looks for."""
    return rng.randbytes(size)


def b64_at(value: bytes, align: int) -> bytes:
    """``value`` base64-encoded inside other data, starting at byte ``align`` of a group."""
    return base64.b64encode(b"\x01\x02"[:align] + value + b"\x03\x04")


ENCODERS: dict[str, tuple[Encoding, Callable[[bytes], bytes]]] = {
    "ascii": (Encoding.ASCII, lambda v: v),
    "utf-16-le": (Encoding.UTF16_LE, lambda v: v.decode().encode("utf-16-le")),
    "utf-16-be": (Encoding.UTF16_BE, lambda v: v.decode().encode("utf-16-be")),
    "hex": (Encoding.HEX, lambda v: v.hex().encode()),
    "HEX": (Encoding.HEX, lambda v: v.hex().upper().encode()),
    "base64-0": (Encoding.BASE64, lambda v: b64_at(v, 0)),
    "base64-1": (Encoding.BASE64, lambda v: b64_at(v, 1)),
    "base64-2": (Encoding.BASE64, lambda v: b64_at(v, 2)),
    "base64url": (Encoding.BASE64, lambda v: base64.urlsafe_b64encode(b"\xfb\xff" + v)),
}


# --- card numbers -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ENCODERS))
@pytest.mark.parametrize("pad", [0, 1])
def test_finds_a_card_number_in_each_encoding_inside_binary_data(
    tmp_path: Path, rng: random.Random, card: str, name: str, pad: int
) -> None:
    encoding, encode = ENCODERS[name]
    before = noise(rng, 5000 + pad)  # pad: odd and even offsets
    path = tmp_path / "blob.bin"
    path.write_bytes(before + b"|" + encode(card.encode()) + b"|" + noise(rng, 3000))
    findings = scan_paths([path])
    assert [(f.kind, f.encoding, f.masked) for f in findings] == [
        (FindingKind.CARD_NUMBER, encoding, masked(card))
    ]
    assert len(before) <= findings[0].offset <= len(before) + 4
    assert_no_value(findings, card)


@pytest.mark.parametrize("separator", [" ", "-"])
def test_finds_a_card_number_written_in_groups(card: str, separator: str) -> None:
    grouped = separator.join(card[i : i + 4] for i in range(0, 16, 4))
    for data in (grouped.encode(), grouped.encode("utf-16-le"), base64.b64encode(grouped.encode())):
        findings = scan_bytes(b"number: " + data + b"\n")
        assert [f.masked for f in findings] == [masked(card)]


@pytest.mark.parametrize("length", [13, 15, 19])
def test_finds_card_numbers_of_every_length(rng: random.Random, length: int) -> None:
    number = generated_card_number(rng, length)
    assert [f.masked for f in scan_bytes(f"x={number};".encode())] == [masked(number)]


def test_finds_the_published_test_cards() -> None:
    cards = json.loads(TEST_CARDS.read_text())["cards"]
    data = "\n".join(f'{{"number":"{c["number"]}"}}' for c in cards).encode()
    findings = scan_bytes(data)
    assert len(findings) == len(cards)
    assert {f.masked for f in findings} == {masked(c["number"]) for c in cards}


def test_a_card_number_glued_into_a_long_digit_run_is_reported_without_digits(
    rng: random.Random, card: str
) -> None:
    # Which window of a long run is the card cannot be known, so no digit is shown.
    run = "9" * 10 + card + "8" * 10
    findings = scan_bytes(run.encode())
    assert [(f.kind, f.masked) for f in findings] == [(FindingKind.CARD_NUMBER, "36-digit run")]


def test_ignores_numbers_that_fail_luhn_or_start_with_zero(card: str) -> None:
    wrong = card[:-1] + str((int(card[-1]) + 1) % 10)
    zeros = "0" * 64  # the audit log's genesis hash
    assert scan_bytes(f"{wrong}, {zeros}, 1234567890".encode()) == []


def test_ignores_digit_runs_inside_hex_digests(rng: random.Random) -> None:
    # Random SHA-256-like hex holds Luhn-valid 13-digit runs now and then; build one.
    digits = generated_card_number(rng, 13)
    digest = "abcdef" + digits + "".join(rng.choice("0123456789abcdef") for _ in range(45))
    assert scan_bytes(f'"hash":"{digest}"'.encode()) == []


def test_finds_a_card_number_across_a_chunk_boundary(
    tmp_path: Path, rng: random.Random, card: str
) -> None:
    chunk = 8192  # the smallest chunk the scanner uses: twice the overlap
    step = chunk - 4096  # each later chunk starts this far after the one before
    for name, (encoding, encode) in ENCODERS.items():
        # "|", not a space: a digit in the noise after a single space would continue
        # the digit run (card numbers may be written in space-separated groups).
        encoded = b"|" + encode(card.encode()) + b"|"
        for cut in (chunk, chunk + step, chunk + 2 * step):
            for shift in (-len(encoded) // 2, -1, 1 - len(encoded)):
                path = tmp_path / f"{name}-{cut}-{shift}.bin"
                head = noise(rng, cut + shift)
                path.write_bytes(head + encoded + noise(rng, 3 * chunk))
                findings = scan_paths([path], chunk_size=chunk)
                assert [(f.encoding, f.masked) for f in findings] == [(encoding, masked(card))], (
                    name,
                    cut,
                    shift,
                )


def test_finds_a_card_number_across_the_default_chunk_boundary(
    tmp_path: Path, rng: random.Random, card: str
) -> None:
    path = tmp_path / "big.bin"
    path.write_bytes(noise(rng, CHUNK_SIZE - 7) + card.encode() + noise(rng, CHUNK_SIZE))
    findings = scan_paths([path])
    assert [(f.offset, f.masked) for f in findings] == [(CHUNK_SIZE - 7, masked(card))]


def _row_id(i: int) -> str:
    # Letters only: SQLite stores a row's values back to back, so an id ending in digits
    # would run into the card number (found too, as an "N-digit run").
    return f"pm_{'ghijklmnop'[i % 10]}{'qrstuvwxyz'[i // 10]}"


@pytest.mark.parametrize("encoding", ["UTF-8", "UTF-16le", "UTF-16be"])
def test_finds_a_card_number_in_a_sqlite_database(tmp_path: Path, card: str, encoding: str) -> None:
    path = tmp_path / "leak.db"
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA encoding = '{encoding}'")
    db.execute("CREATE TABLE pm (id TEXT PRIMARY KEY, number TEXT, brand TEXT)")
    db.executemany(
        "INSERT INTO pm VALUES (?, ?, ?)",
        [(_row_id(i), card if i == 7 else None, "visa") for i in range(50)],
    )
    db.commit()
    db.close()
    findings = scan_paths([tmp_path])
    assert [f.kind for f in findings] == [FindingKind.CARD_NUMBER]
    assert findings[0].masked == masked(card)


def test_random_bytes_yield_nothing(tmp_path: Path, rng: random.Random) -> None:
    path = tmp_path / "ciphertext.bin"
    path.write_bytes(noise(rng, 3 * CHUNK_SIZE))
    assert scan_paths([path], canaries=["CANARY-0123456789"], cvcs=["123"]) == []


def test_an_audit_log_is_clean(tmp_path: Path) -> None:
    # Hex hashes, the all-zero genesis hash and base64 signatures: nothing to report.
    async def write() -> None:
        async with await AuditLog.open(tmp_path, checkpoint_every=50) as log:
            for i in range(300):
                await log.append(
                    "vault.payment_method.create",
                    actor="key_abc",
                    origin="127.0.0.1",
                    object_id=f"pm_{i}",
                    result="ok",
                    request_id=f"req_{i}",
                    detail={"n": i},
                )

    asyncio.run(write())
    assert scan_paths([tmp_path], ignore=["audit.key"]) == []


# --- canaries ---------------------------------------------------------------------------

CANARY = "cv-canary-7f3a9c0e"


@pytest.mark.parametrize("name", list(ENCODERS))
def test_finds_a_canary_in_each_encoding(rng: random.Random, name: str) -> None:
    encoding, encode = ENCODERS[name]
    data = noise(rng, 777) + encode(CANARY.encode()) + noise(rng, 555)
    findings = scan_bytes(data, canaries=["other-canary-123", CANARY])
    assert [(f.kind, f.encoding, f.masked) for f in findings] == [
        (FindingKind.CANARY, encoding, "canary #2")
    ]
    assert_no_value(findings, CANARY)


def test_finds_every_occurrence_of_a_canary(tmp_path: Path) -> None:
    (tmp_path / "a.log").write_text(f"one {CANARY} two {CANARY}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.log").write_text(f"three {CANARY}\n")
    findings = scan_paths([tmp_path], canaries=[CANARY])
    assert [(f.path.name, f.offset) for f in findings] == [
        ("a.log", 4),
        ("a.log", 4 + len(CANARY) + 5),
        ("b.log", 6),
    ]


@pytest.mark.parametrize("bad", ["short", "naïve-canary", "with\nnewline"])
def test_refuses_canaries_that_would_match_by_chance_or_cannot_be_encoded(bad: str) -> None:
    with pytest.raises(ValueError):
        scan_bytes(b"", canaries=[bad])


# --- CVCs -------------------------------------------------------------------------------

SHAPED = [
    b'{"card":{"cvc":"314"}}',
    b'{"cvc": 314}',
    b"cvc=314&exp_month=12",
    b"card[cvc]=314",
    b"card%5Bcvc%5D=314",
    b"'cvv2': '314'",
    b"security_code: 314",
    b'"card_cvc":"314"',
]


@pytest.mark.parametrize("text", SHAPED, ids=[t.decode() for t in SHAPED])
def test_finds_a_cvc_in_a_shaped_context(text: bytes) -> None:
    findings = scan_bytes(b"log line " + text + b"\n", cvcs=["314"])
    assert [(f.kind, f.masked) for f in findings] == [(FindingKind.CVC, "***")]
    assert "314" not in str(findings[0])


@pytest.mark.parametrize("name", list(ENCODERS))
def test_finds_a_shaped_cvc_in_each_encoding(name: str) -> None:
    encoding, encode = ENCODERS[name]
    # At an even offset: ASCII text in UTF-16 at an odd offset reads the same in both
    # byte orders, and the scanner can only guess which one was meant.
    findings = scan_bytes(b"xx" + encode(b'{"cvc":"314"}') + b" xx", cvcs=["314"])
    assert [(f.kind, f.encoding) for f in findings] == [(FindingKind.CVC, encoding)]


def test_ignores_bare_cvcs_and_other_values() -> None:
    data = b'port 314, {"id": 314}, {"cvc":"999"}, cvc_count=314x'
    assert scan_bytes(data, cvcs=["314"]) == []


def test_refuses_a_cvc_that_is_not_three_or_four_digits() -> None:
    with pytest.raises(ValueError):
        scan_bytes(b"", cvcs=["12"])


# --- paths ------------------------------------------------------------------------------


def test_ignore_globs_leave_paths_out(tmp_path: Path) -> None:
    (tmp_path / "keep.log").write_text(CANARY)
    (tmp_path / "skip.tmp").write_text(CANARY)
    (tmp_path / "vendor").mkdir()
    (tmp_path / "vendor" / "x.log").write_text(CANARY)
    findings = scan_paths([tmp_path], canaries=[CANARY], ignore=["*.tmp", "*/vendor"])
    assert [f.path.name for f in findings] == ["keep.log"]


def test_symbolic_links_inside_a_tree_are_not_followed(tmp_path: Path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text(CANARY)
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "link.txt").symlink_to(outside)
    assert scan_paths([tree], canaries=[CANARY]) == []


def test_an_unreadable_file_is_a_finding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "locked.db").write_bytes(b"whatever")

    def refuse(*args: object, **kwargs: object) -> list[Finding]:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("cardvault.scan._scan_file", refuse)
    findings = scan_paths([tmp_path])
    assert [(f.kind, f.path.name) for f in findings] == [(FindingKind.UNREADABLE, "locked.db")]


def test_a_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        scan_paths([tmp_path / "nope"])


# --- the command ------------------------------------------------------------------------


def test_cli_exits_0_when_clean(tmp_path: Path, rng: random.Random) -> None:
    (tmp_path / "clean.bin").write_bytes(noise(rng, 4096))
    outcome = CliRunner().invoke(app, [str(tmp_path), "--canary", CANARY, "--cvc", "314"])
    assert outcome.exit_code == 0, outcome.output


def test_cli_exits_1_and_prints_masked_findings(tmp_path: Path, card: str) -> None:
    (tmp_path / "app.log").write_text(f'charged {card} with {{"cvc":"314"}} and {CANARY}\n')
    canaries = tmp_path / "canaries.txt"
    canaries.write_text(f"# planted by the test\n{CANARY}\n")
    outcome = CliRunner().invoke(
        app, [str(tmp_path / "app.log"), "--canary-file", str(canaries), "--cvc", "314"]
    )
    assert outcome.exit_code == 1
    assert masked(card) in outcome.output
    assert "canary #1" in outcome.output and "cvc" in outcome.output
    assert card not in outcome.output and CANARY not in outcome.output


def test_cli_exits_2_on_bad_arguments(tmp_path: Path) -> None:
    assert CliRunner().invoke(app, [str(tmp_path / "nope")]).exit_code == 2
    assert CliRunner().invoke(app, [str(tmp_path), "--canary", "short"]).exit_code == 2


def test_a_file_gone_between_listing_and_reading_is_no_finding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, card: str
) -> None:
    # A live service's state: its SQLite journal is listed, then removed before it is
    # opened. Nothing of it is at rest, so it is no finding; the rest is still scanned.
    (tmp_path / "app.log").write_text(f"charged {card}\n")
    real_files = scan_module._files

    def listed_then_removed(paths: Any, ignore: list[str]) -> Any:
        yield tmp_path / "shop.db-journal", None
        yield from real_files(paths, ignore)

    monkeypatch.setattr(scan_module, "_files", listed_then_removed)
    findings = scan_paths([tmp_path])
    assert [(f.path.name, f.kind) for f in findings] == [("app.log", FindingKind.CARD_NUMBER)]
