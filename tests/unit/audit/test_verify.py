"""verify_log and `cardvault audit`: each kind of tampering is found at its record.

Every log here is 12 records with a checkpoint every 5, closed, so line n holds record n:
records 1-5, checkpoint 6, records 7-11, checkpoint 12, records 13-14, checkpoint 15
(written on close, and copied to audit.head).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cardvault.audit import AuditCorrupt, ProblemKind, export, verify_log
from cardvault.audit.signing import key_id, sign_checkpoint
from cardvault.cli.audit import app
from cardvault.crypto import SigningKey

from ._support import make_log, read_lines, rechain, records, reseal, unchanged, write_lines

Tamper = Callable[[Path], None]
WIDE = {"COLUMNS": "200"}


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return make_log(tmp_path / "vault", 12, checkpoint_every=5)


def result_of(path: Path) -> Any:
    return verify_log(path, path.with_name("audit.pub"))


def test_an_untouched_log_verifies(log: Path) -> None:
    result = result_of(log)
    assert result.ok and result.problem is None
    assert (result.records, result.last_seq, result.checkpoints) == (15, 15, 3)
    assert (result.signed_seq, result.head_seq, result.unsigned) == (14, 15, 0)


def test_the_cli_accepts_an_untouched_log(log: Path) -> None:
    outcome = CliRunner().invoke(app, ["verify", str(log)], env=WIDE)
    assert outcome.exit_code == 0, outcome.output
    assert "ok" in outcome.output


def test_an_empty_log_verifies(tmp_path: Path) -> None:
    make_log(tmp_path, 0)
    result = result_of(tmp_path / "audit.jsonl")
    assert result.ok and result.last_seq == 0


# --- tampering ------------------------------------------------------------------------


def edit_field(path: Path) -> None:
    lines = read_lines(path)
    lines[2] = lines[2].replace(b'"result":"ok"', b'"result":"no"')
    write_lines(path, lines)


def edit_and_rehash(path: Path) -> None:
    values = records(path)
    values[2]["object"] = "pm_forged"
    lines = [unchanged(v) for v in values]
    lines[2] = reseal(values[2])
    write_lines(path, lines)


def rewrite_from_record_3(path: Path) -> None:
    # Edit record 3 and recompute every later prev and hash: only a signature catches it.
    values = records(path)
    values[2]["result"] = "denied"
    write_lines(path, rechain(values, 2))


def delete_record_3(path: Path) -> None:
    lines = read_lines(path)
    del lines[2]
    write_lines(path, lines)


def delete_first_record(path: Path) -> None:
    write_lines(path, read_lines(path)[1:])


def insert_forged_record(path: Path) -> None:
    # A forged record after record 3 with a correct seq, prev and hash of its own.
    values = records(path)
    forged = {**values[2], "seq": 4, "prev": values[2]["hash"], "object": "pm_forged"}
    lines = [unchanged(v) for v in values]
    lines.insert(3, reseal(forged))
    write_lines(path, lines)


def insert_record_with_other_seq(path: Path) -> None:
    values = records(path)
    forged = {**values[2], "seq": 50, "prev": "ab" * 32}
    lines = [unchanged(v) for v in values]
    lines.insert(3, reseal(forged))
    write_lines(path, lines)


def duplicate_record_3(path: Path) -> None:
    lines = read_lines(path)
    lines.insert(3, lines[2])
    write_lines(path, lines)


def swap_records_3_and_4(path: Path) -> None:
    lines = read_lines(path)
    lines[2], lines[3] = lines[3], lines[2]
    write_lines(path, lines)


def move_record_2_after_4(path: Path) -> None:
    lines = read_lines(path)
    write_lines(path, [lines[0], lines[2], lines[3], lines[1], *lines[4:]])


def truncate_after_last_checkpoint(path: Path) -> None:
    write_lines(path, read_lines(path)[:13])


def truncate_to_9_records(path: Path) -> None:
    write_lines(path, read_lines(path)[:9])


def truncate_last_line_partially(path: Path) -> None:
    lines = read_lines(path)
    lines[-1] = lines[-1][:50]
    write_lines(path, lines)


def resign_checkpoint_with_another_key(path: Path) -> None:
    # The attacker signs checkpoint 6 with their own key, names it, and re-chains.
    attacker = SigningKey.generate()
    values = records(path)
    detail = values[5]["detail"]
    detail["signature"] = sign_checkpoint(attacker, detail["head"], detail["seq"])
    detail["key_id"] = key_id(attacker.public_key)
    write_lines(path, rechain(values, 5))


def forge_checkpoint_signature(path: Path) -> None:
    # Same, but claiming the service's key id.
    attacker = SigningKey.generate()
    values = records(path)
    detail = values[5]["detail"]
    detail["signature"] = sign_checkpoint(attacker, detail["head"], detail["seq"])
    write_lines(path, rechain(values, 5))


def garbage_line_5(path: Path) -> None:
    lines = read_lines(path)
    lines[4] = b"this is not a record\n"
    write_lines(path, lines)


def deeply_nested_line_3(path: Path) -> None:
    # 100,000 "[" where record 3 was: json.loads alone raises RecursionError on it.
    lines = read_lines(path)
    lines[2] = b"[" * 100_000 + b"\n"
    write_lines(path, lines)


def deeply_nested_object_line_3(path: Path) -> None:
    lines = read_lines(path)
    lines[2] = b'{"seq":' * 50_000 + b"3" + b"}" * 50_000 + b"\n"
    write_lines(path, lines)


def remove_head(path: Path) -> None:
    path.with_name("audit.head").unlink()


def head_from_another_log(path: Path) -> None:
    other = make_log(path.parent.parent / "other", 3)
    shutil.copy(other.with_name("audit.head"), path.with_name("audit.head"))


CASES: list[tuple[Tamper, ProblemKind, int | None]] = [
    (edit_field, ProblemKind.EDITED, 3),
    (edit_and_rehash, ProblemKind.EDITED, 3),
    (rewrite_from_record_3, ProblemKind.BAD_SIGNATURE, 6),
    (delete_record_3, ProblemKind.DELETED, 3),
    (delete_first_record, ProblemKind.DELETED, 1),
    (insert_forged_record, ProblemKind.INSERTED, 4),
    (insert_record_with_other_seq, ProblemKind.INSERTED, 4),
    (duplicate_record_3, ProblemKind.INSERTED, 4),
    (swap_records_3_and_4, ProblemKind.REORDERED, 3),
    (move_record_2_after_4, ProblemKind.REORDERED, 2),
    (truncate_after_last_checkpoint, ProblemKind.TRUNCATED, 14),
    (truncate_to_9_records, ProblemKind.TRUNCATED, 10),
    (truncate_last_line_partially, ProblemKind.TRUNCATED, 15),
    (resign_checkpoint_with_another_key, ProblemKind.BAD_SIGNATURE, 6),
    (forge_checkpoint_signature, ProblemKind.BAD_SIGNATURE, 6),
    (garbage_line_5, ProblemKind.MALFORMED, 5),
    (deeply_nested_line_3, ProblemKind.MALFORMED, 3),
    (deeply_nested_object_line_3, ProblemKind.MALFORMED, 3),
    (remove_head, ProblemKind.HEAD_MISSING, None),
    (head_from_another_log, ProblemKind.HEAD_MISMATCH, None),
]


@pytest.mark.parametrize(("tamper", "kind", "line"), CASES, ids=[c[0].__name__ for c in CASES])
def test_tampering_is_found_at_the_right_record(
    log: Path, tamper: Tamper, kind: ProblemKind, line: int | None
) -> None:
    tamper(log)
    problem = result_of(log).problem
    assert problem is not None
    assert (problem.kind, problem.line) == (kind, line), str(problem)


@pytest.mark.parametrize(("tamper", "kind", "line"), CASES, ids=[c[0].__name__ for c in CASES])
def test_the_cli_exits_non_zero_on_tampering(
    log: Path, tamper: Tamper, kind: ProblemKind, line: int | None
) -> None:
    tamper(log)
    outcome = CliRunner().invoke(app, ["verify", str(log)], env=WIDE)
    assert outcome.exit_code == 1, outcome.output
    assert str(kind) in outcome.output
    if line is not None:
        assert f"line {line}:" in outcome.output


@pytest.mark.parametrize("tamper", [deeply_nested_line_3, deeply_nested_object_line_3])
def test_a_deeply_nested_line_is_reported_at_its_record(log: Path, tamper: Tamper) -> None:
    tamper(log)
    problem = result_of(log).problem
    assert problem is not None
    assert (problem.kind, problem.line, problem.seq) == (ProblemKind.MALFORMED, 3, 3)
    assert "nested deeper than a record" in problem.message
    assert "record 3" in str(problem)


def test_the_command_reports_a_deeply_nested_line_without_a_traceback(log: Path) -> None:
    # The installed command, as an operator runs it: a clean message and exit 1.
    deeply_nested_line_3(log)
    outcome = subprocess.run(
        [sys.executable, "-m", "cardvault", "audit", "verify", str(log)],
        capture_output=True,
        text=True,
        env={**os.environ, **WIDE},
        timeout=120,
    )
    assert outcome.returncode == 1, outcome.stdout + outcome.stderr
    assert "Traceback" not in outcome.stderr and "RecursionError" not in outcome.stderr
    assert "malformed: line 3:" in outcome.stdout
    assert "record 3" in outcome.stdout


def test_a_deeply_nested_head_is_a_head_mismatch(log: Path) -> None:
    log.with_name("audit.head").write_bytes(b"[" * 100_000 + b"\n")
    problem = result_of(log).problem
    assert problem is not None and problem.kind is ProblemKind.HEAD_MISMATCH


def test_export_refuses_a_deeply_nested_line(log: Path) -> None:
    deeply_nested_line_3(log)
    with pytest.raises(AuditCorrupt, match=r"line 3 .*nested deeper than a record"):
        list(export(log))
    outcome = CliRunner().invoke(app, ["export", str(log)])
    assert outcome.exit_code == 1
    assert not isinstance(outcome.exception, RecursionError)
    assert "line 3" in outcome.output


def test_problems_name_the_missing_records(log: Path) -> None:
    lines = read_lines(log)
    write_lines(log, lines[:2] + lines[4:])
    problem = result_of(log).problem
    assert problem is not None and problem.seq == 3
    assert "records 3 to 4 are missing" in problem.message


def test_a_log_re_signed_in_full_fails_against_the_published_key(log: Path) -> None:
    # Someone with the file re-signs everything with their own key and replaces
    # audit.pub beside it. Only a copy of the published key kept elsewhere shows it.
    published = log.parent.parent / "published.pub"
    shutil.copy(log.with_name("audit.pub"), published)
    attacker = SigningKey.generate()
    values = records(log)
    lines: list[bytes] = []
    for value in values:
        if lines:
            value["prev"] = json.loads(lines[-1])["hash"]
        if value["action"] == "audit.checkpoint":
            head = value["prev"]
            value["detail"].update(
                head=head,
                signature=sign_checkpoint(attacker, head, value["seq"] - 1),
                key_id=key_id(attacker.public_key),
            )
        lines.append(reseal(value))
    write_lines(log, lines)
    log.with_name("audit.head").write_bytes(lines[-1])
    log.with_name("audit.pub").write_bytes(attacker.public_key.pem())
    assert result_of(log).ok  # self-consistent: the files beside it prove nothing
    problem = verify_log(log, published).problem
    assert problem is not None and problem.kind is ProblemKind.BAD_SIGNATURE
    outcome = CliRunner().invoke(
        app, ["verify", str(log), "--public-key", str(published)], env=WIDE
    )
    assert outcome.exit_code == 1


# --- --state ------------------------------------------------------------------------


def test_state_verifies_every_zone(tmp_path: Path) -> None:
    make_log(tmp_path / "vault", 4)
    make_log(tmp_path / "keyservice", 2)
    (tmp_path / "ca").mkdir()  # a zone without an audit log is not an error
    outcome = CliRunner().invoke(app, ["verify", "--state", str(tmp_path)], env=WIDE)
    assert outcome.exit_code == 0, outcome.output
    assert "vault/audit.jsonl" in outcome.output
    assert "keyservice/audit.jsonl" in outcome.output


def test_state_fails_when_one_zone_is_tampered(tmp_path: Path) -> None:
    make_log(tmp_path / "vault", 4)
    keyservice = make_log(tmp_path / "keyservice", 4)
    delete_record_3(keyservice)
    outcome = CliRunner().invoke(app, ["verify", "--state", str(tmp_path)], env=WIDE)
    assert outcome.exit_code == 1
    assert "deleted" in outcome.output


def test_state_without_logs_fails(tmp_path: Path) -> None:
    outcome = CliRunner().invoke(app, ["verify", "--state", str(tmp_path)], env=WIDE)
    assert outcome.exit_code == 1


# --- a set of chains (a deployment's processes) -------------------------------------------


def test_a_set_is_every_log_at_any_depth_each_with_its_key(tmp_path: Path) -> None:
    make_log(tmp_path / "host-a" / "vault" / "w0", 3)
    make_log(tmp_path / "host-a" / "vault" / "w1", 2)
    make_log(tmp_path / "host-b" / "vault", 4)
    outcome = CliRunner().invoke(app, ["verify", str(tmp_path), "--json"], env=WIDE)
    assert outcome.exit_code == 0, outcome.output
    report = json.loads(outcome.output)
    assert report["ok"] is True
    chains = {Path(c["log"]).relative_to(tmp_path).as_posix(): c for c in report["chains"]}
    assert set(chains) == {
        "host-a/vault/w0/audit.jsonl",
        "host-a/vault/w1/audit.jsonl",
        "host-b/vault/audit.jsonl",
    }
    assert [c["records"] for c in chains.values()] == [4, 3, 5]  # each with its checkpoint
    assert len({c["key_id"] for c in chains.values()}) == 3


def test_a_set_fails_when_one_chain_is_tampered(tmp_path: Path) -> None:
    good = make_log(tmp_path / "w0", 4)
    tampered = make_log(tmp_path / "w1", 4)
    delete_record_3(tampered)
    args = ["verify", str(good), str(tampered), "--json"]
    outcome = CliRunner().invoke(app, args, env=WIDE)
    assert outcome.exit_code == 1
    chains = {c["log"]: c for c in json.loads(outcome.output)["chains"]}
    assert chains[str(good)]["problem"] is None
    assert chains[str(tampered)]["kind"] == "deleted"


def test_two_chains_signed_by_one_key_fail_as_a_set(tmp_path: Path) -> None:
    first = make_log(tmp_path / "w0", 3)
    (tmp_path / "w1").mkdir()
    for name in ("audit.key", "audit.pub"):
        (tmp_path / "w1" / name).write_bytes(first.with_name(name).read_bytes())
    make_log(tmp_path / "w1", 3)
    # Each verifies alone ...
    for log in (first, tmp_path / "w1" / "audit.jsonl"):
        assert CliRunner().invoke(app, ["verify", str(log)], env=WIDE).exit_code == 0
    # ... but as a set either could stand in for the other.
    outcome = CliRunner().invoke(app, ["verify", str(tmp_path), "--json"], env=WIDE)
    assert outcome.exit_code == 1
    kinds = {c["log"]: c["kind"] for c in json.loads(outcome.output)["chains"]}
    assert kinds[str(first)] == kinds[str(tmp_path / "w1" / "audit.jsonl")] == "shared_key"
    assert len(kinds) == 2


def test_public_key_and_head_are_for_one_log(tmp_path: Path) -> None:
    log = make_log(tmp_path / "w0", 2)
    make_log(tmp_path / "w1", 2)
    key = log.with_name("audit.pub")
    assert (
        CliRunner().invoke(app, ["verify", str(tmp_path), "--public-key", str(key)]).exit_code == 2
    )
    assert CliRunner().invoke(app, ["verify", str(log), "--public-key", str(key)]).exit_code == 0


def test_verify_fails_without_a_public_key(log: Path) -> None:
    log.with_name("audit.pub").unlink()
    outcome = CliRunner().invoke(app, ["verify", str(log)], env=WIDE)
    assert outcome.exit_code == 1
    assert "cannot read" in outcome.output


def test_verify_needs_exactly_one_of_path_and_state(log: Path) -> None:
    assert CliRunner().invoke(app, ["verify"]).exit_code == 2
    both = ["verify", str(log), "--state", str(log.parent)]
    assert CliRunner().invoke(app, both).exit_code == 2


# --- export -------------------------------------------------------------------------


def test_export_yields_every_record(log: Path) -> None:
    exported = list(export(log))
    assert exported == records(log)


def test_export_cli_writes_json_lines_that_still_verify(log: Path, tmp_path: Path) -> None:
    outcome = CliRunner().invoke(app, ["export", str(log)])
    assert outcome.exit_code == 0
    assert outcome.output.encode() == log.read_bytes()

    shipped = tmp_path / "shipped"
    shipped.mkdir()
    out = shipped / "audit.jsonl"
    assert CliRunner().invoke(app, ["export", str(log), "--out", str(out)]).exit_code == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    for name in ("audit.pub", "audit.head"):
        shutil.copy(log.with_name(name), shipped / name)
    assert verify_log(out, shipped / "audit.pub").ok


def test_export_refuses_a_line_that_is_not_json(log: Path) -> None:
    garbage_line_5(log)
    outcome = CliRunner().invoke(app, ["export", str(log)])
    assert outcome.exit_code == 1


def test_base64_signatures_are_64_bytes(log: Path) -> None:
    head = json.loads(log.with_name("audit.head").read_bytes())
    assert len(base64.b64decode(head["detail"]["signature"])) == 64
