"""The fuzz harnesses: each one fuzzed for a bounded time (``-m fuzz``), and the checks
they make, tested on planted defects so that they are known to catch them whatever the
state of the code they fuzz.

``CARDVAULT_FUZZ_SECONDS`` (default 20) sets how long each harness runs here; run them for
longer with ``bench/fuzz.py``. A failure names the temporary directory that holds the
crashing inputs and the fuzzer's log; reproduce one with
``.venv/bin/python tests/fuzz/fuzz_<harness>.py --reproduce FILE``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _harness
import fuzz_allowlist
import fuzz_audit
import fuzz_cards
import fuzz_params
import pytest

HERE = Path(__file__).resolve().parent
HARNESSES = sorted(p.stem.removeprefix("fuzz_") for p in HERE.glob("fuzz_*.py"))
SECONDS = int(os.environ.get("CARDVAULT_FUZZ_SECONDS", "20"))
MODULES = {
    "params": fuzz_params,
    "cards": fuzz_cards,
    "allowlist": fuzz_allowlist,
    "audit": fuzz_audit,
}


def test_every_harness_has_a_seed_corpus_and_a_dictionary() -> None:
    assert set(HARNESSES) == set(MODULES)
    for harness in HARNESSES:
        assert len(list((HERE / "corpus" / harness).iterdir())) >= 10, harness
        assert (HERE / "dict" / f"{harness}.dict").is_file(), harness


# --- fuzzing ---------------------------------------------------------------------------


def _reproduce(harness: str, crash: Path) -> str:
    try:
        done = subprocess.run(
            [sys.executable, str(HERE / f"fuzz_{harness}.py"), "--reproduce", str(crash)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"{crash}: did not finish in 60 s when run again"
    return done.stdout.strip() or _harness.mask_digits(done.stderr.strip()[-2000:])


@pytest.mark.fuzz
@pytest.mark.parametrize("harness", HARNESSES)
def test_fuzz(harness: str, tmp_path: Path) -> None:
    """Fuzz for SECONDS on a writable copy of the corpus; crash files go to tmp_path."""
    corpus = tmp_path / "corpus"
    shutil.copytree(HERE / "corpus" / harness, corpus)
    artifacts = tmp_path / "crashes"
    artifacts.mkdir()
    log = tmp_path / "fuzz.log"
    cmd = [
        sys.executable,
        str(HERE / f"fuzz_{harness}.py"),
        f"-max_total_time={SECONDS}",
        "-rss_limit_mb=1024",
        "-timeout=5",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/",
        f"-dict={HERE / 'dict' / f'{harness}.dict'}",
        str(corpus),
    ]
    started = time.monotonic()
    with open(log, "wb") as fh:
        done = subprocess.run(
            cmd, cwd=tmp_path, stdout=fh, stderr=subprocess.STDOUT, timeout=SECONDS + 120
        )
    crashes = sorted(artifacts.iterdir())
    if done.returncode == 0 and not crashes:
        return
    found = "\n".join(_reproduce(harness, crash) for crash in crashes) or "(no crash file)"
    pytest.fail(
        f"fuzz_{harness} failed after {time.monotonic() - started:.0f} s "
        f"(exit {done.returncode}).\n"
        f"Crashing inputs are in {artifacts}; the fuzzer's log is {log}.\n"
        f"Reproduce: {sys.executable} {HERE / f'fuzz_{harness}.py'} --reproduce FILE\n{found}",
        pytrace=False,
    )


# --- the seeds are clean -----------------------------------------------------------------


@pytest.mark.parametrize("harness", sorted(MODULES))
def test_seeds_give_no_finding(harness: str) -> None:
    module = MODULES[harness]
    module.load()
    for seed in sorted((HERE / "corpus" / harness).iterdir()):
        module.TestOneInput(seed.read_bytes())


# --- the checks catch planted defects ----------------------------------------------------


def _kind(module: Any, data: bytes) -> str | None:
    module.load()
    try:
        module.TestOneInput(data)
    except Exception as exc:
        return _harness.kind_of(exc)
    return None


def _raise(exc: BaseException) -> Any:
    def target(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return target


@pytest.mark.parametrize(
    ("planted", "kind"),
    [
        (lambda body, ct: {"foo": [None] * 100_000}, "amplification"),
        (lambda body, ct: {"a": "x" * 10_000}, "amplification"),
        (lambda body, ct: {"a": "\ud800"}, "unencodable"),
        (lambda body, ct: {"\udc80": "x"}, "unencodable"),
        (lambda body, ct: ["x"], "result-type"),
        (_raise(RecursionError("maximum recursion depth exceeded")), "RecursionError"),
        (_raise(ValueError("invalid literal for int()")), "ValueError"),
        (lambda body, ct: time.sleep(0.15) or {}, "slow"),
    ],
    ids=["list", "string", "surrogate-value", "surrogate-key", "not-dict", "recursion",
         "value-error", "slow"],
)  # fmt: skip
def test_params_harness_catches(monkeypatch: pytest.MonkeyPatch, planted: Any, kind: str) -> None:
    import cardvault.vault.params as params

    monkeypatch.setattr(params, "parse_body", planted)
    assert _kind(fuzz_params, b"fabc[100000000]=x") == kind


def test_params_harness_accepts_4xx_and_catches_query_amplification(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import cardvault.vault.params as params
    from cardvault.errors import InvalidRequestError

    monkeypatch.setattr(params, "parse_body", _raise(InvalidRequestError("no")))
    assert _kind(fuzz_params, b"fa=1") is None
    monkeypatch.setattr(params, "parse_form", lambda pairs: {"a": [None] * 50})
    assert _kind(fuzz_params, b"qa[49]=x") == "amplification"


def test_audit_harness_catches_any_exception_but_record_invalid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from cardvault.audit.record import AuditRecord, RecordInvalid

    assert _kind(fuzz_audit, b"l" + b"[" * 100) is None
    monkeypatch.setattr(AuditRecord, "from_line", _raise(RecordInvalid("bad")))
    assert _kind(fuzz_audit, b"l{}") is None
    monkeypatch.setattr(AuditRecord, "from_line", _raise(RecursionError("deep")))
    assert _kind(fuzz_audit, b"l" + b"[" * 100) == "RecursionError"


def test_audit_harness_reseals_a_line_to_reach_past_the_hash() -> None:
    from cardvault.audit.record import AuditRecord

    line = (HERE / "corpus" / "audit" / "line-00").read_bytes()[1:]
    original = AuditRecord.from_line(line)
    edited = line.replace(original.time.encode(), original.time[:-2].encode() + b"9Z")
    assert edited != line
    assert _kind(fuzz_audit, b"l" + edited) is None  # refused: the hash no longer matches
    resealed = AuditRecord.from_line(fuzz_audit._reseal(edited.rstrip(b"\n")))
    assert resealed.time != original.time
    assert _kind(fuzz_audit, b"r" + edited) is None


def test_cards_harness_catches_a_redactor_that_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    import cardvault.cards.luhn as luhn

    seed = (HERE / "corpus" / "cards" / "str-log-line").read_bytes()
    assert _kind(fuzz_cards, seed) is None
    monkeypatch.setattr(luhn, "redact_card_numbers", lambda text: text)
    assert _kind(fuzz_cards, seed) == "unredacted"


def test_cards_harness_catches_a_parser_the_scrubber_disagrees_with(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import cardvault.cards.luhn as luhn

    seed = (HERE / "corpus" / "cards" / "str-visa").read_bytes()
    monkeypatch.setattr(luhn, "holds_card_number", lambda text: False)
    monkeypatch.setattr(luhn, "find_card_numbers", lambda text: iter(()))
    monkeypatch.setattr(luhn, "redact_card_numbers", lambda text: text)
    assert _kind(fuzz_cards, seed) == "parser-scrubber-disagree"


def test_cards_reference_reads_the_grammar_the_parser_accepts() -> None:
    visa = (HERE / "corpus" / "cards" / "str-visa").read_bytes()[1:].decode()
    spaced = " ".join(visa[i : i + 4] for i in range(0, 16, 4))
    assert fuzz_cards.reference_runs(visa) == [(0, 16)]
    assert fuzz_cards.reference_runs(f"x{spaced}.") == [(1, 20)]
    assert fuzz_cards.reference_runs(spaced.replace(" ", "  ")) == []
    assert fuzz_cards.reference_runs(visa[:-1] + "0") == []
    assert fuzz_cards.reference_runs("1 " + visa) == []  # 17 digits: not a card by the rule


def test_allowlist_harness_catches_a_matcher_that_accepts_another_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import cardvault.vault.forwarding.allowlist as allowlist

    fuzz_allowlist.load()
    assert _kind(fuzz_allowlist, b"https://localhost:8445/v1/authorizations") is None
    assert _kind(fuzz_allowlist, b"https://user@localhost:8445/v1/authorizations") is None
    first = fuzz_allowlist._allowlist.destinations[0]
    monkeypatch.setattr(allowlist, "match_url", lambda *args, **kwargs: first)
    assert _kind(fuzz_allowlist, b"https://user@localhost:8445/v1/authorizations") == (
        "accepted-mismatch"
    )
    monkeypatch.setattr(allowlist, "match_url", _raise(KeyError("x")))
    assert _kind(fuzz_allowlist, b"https://localhost:8445/v1/authorizations") == "KeyError"


def test_mask_digits_hides_long_runs_only() -> None:
    masked = _harness.mask_digits("card 4242-4242-4242-4242 at 12:30, order 1234567")
    assert masked == "card 42<12 digits masked>42 at 12:30, order 1234567"
