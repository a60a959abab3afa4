"""Opening a log checks it like `verify` does, refuses what the service cannot vouch for,
and `cardvault audit repair` is the only way back, recorded in the log itself."""

from __future__ import annotations

import asyncio
import errno
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cardvault.audit import CHECKPOINT_ACTION, AuditCorrupt, AuditLog, verify_log
from cardvault.audit.recorder import open_audit_log
from cardvault.audit.repair import REPAIR_ACTION, Repair
from cardvault.audit.signing import load_or_create_signing_key
from cardvault.audit.tailfile import LogEnd, TailMark, encode_mark, mark_key, read_mark
from cardvault.cli.audit import app
from cardvault.config import AuditSettings
from cardvault.errors import AuditUnavailableError, ConfigurationError

from ._support import append_many, crash, entry, read_lines, rechain, records, reseal, write_lines


def run(coro: object) -> object:
    return asyncio.run(coro)  # type: ignore[arg-type]


def make(directory: Path, count: int, *, crashed: bool = False, every: int = 10) -> Path:
    """A log of ``count`` records with a checkpoint every ``every``: closed (its last
    record a checkpoint) or ``crashed`` (its last records unsigned)."""

    async def main() -> None:
        log = await AuditLog.open(directory, checkpoint_every=every)
        await append_many(log, count)
        if crashed:
            crash(log)
        else:
            await log.close()

    run(main())
    return directory / "audit.jsonl"


def reopen(directory: Path) -> None:
    async def main() -> None:
        await (await AuditLog.open(directory)).close()

    run(main())


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def verifies(directory: Path) -> bool:
    path = directory / "audit.jsonl"
    return verify_log(path, directory / "audit.pub").ok


# --- what start-up continues --------------------------------------------------------


def test_records_written_before_a_crash_are_adopted_and_signed(tmp_path: Path) -> None:
    path = make(tmp_path, 25, crashed=True)
    unsigned = records(path)[-5:]  # after the checkpoint (record 22)
    assert all(r["action"] != CHECKPOINT_ACTION for r in unsigned)
    reopen(tmp_path)
    last = records(path)[-1]
    assert last["action"] == CHECKPOINT_ACTION and last["detail"]["seq"] == unsigned[-1]["seq"]
    assert verifies(tmp_path)


def test_a_crash_between_the_mark_and_the_write_leaves_an_end_the_mark_allows(
    tmp_path: Path,
) -> None:
    # The mark is replaced before each write: a crash right after it leaves a mark that
    # names a longer log than the one on disk, and the shorter end is still allowed.
    make(tmp_path, 5)
    key = mark_key(load_or_create_signing_key(tmp_path))
    mark = read_mark(tmp_path / "audit.tail", key)
    assert mark is not None and mark.durable == mark.writing
    end = mark.writing
    later = LogEnd(
        end.size + 300, "0" * 64, end.seq + 1, "1" * 64, end.checkpoint_seq, end.checkpoint_hash
    )
    (tmp_path / "audit.tail").write_bytes(encode_mark(TailMark(end, later), key))
    reopen(tmp_path)
    assert verifies(tmp_path)


def test_a_log_without_a_mark_is_walked_and_adopted_when_every_record_is_signed(
    tmp_path: Path,
) -> None:
    make(tmp_path, 15)
    (tmp_path / "audit.tail").unlink()  # a log from before the mark
    reopen(tmp_path)
    assert (tmp_path / "audit.tail").stat().st_size == 1024
    assert verifies(tmp_path)


# --- what start-up refuses ----------------------------------------------------------


def _delete_head(d: Path) -> None:
    (d / "audit.head").unlink()


def _forge_unsigned_tail(d: Path) -> None:
    # Change the last (unsigned) record and recompute its hash: the chain still verifies.
    path = d / "audit.jsonl"
    values = records(path)
    values[-1]["result"] = "denied"
    write_lines(path, [*read_lines(path)[:-1], reseal(values[-1])])


def _append_forged_record(d: Path) -> None:
    path = d / "audit.jsonl"
    values = records(path)
    forged = {**values[-1], "seq": values[-1]["seq"] + 1, "object": "pm_forged000"}
    write_lines(path, read_lines(path) + rechain([values[-1], forged], 1)[1:])


def _flip_a_byte(d: Path) -> None:
    path = d / "audit.jsonl"
    data = bytearray(path.read_bytes())
    at = data.index(b"pm_000004")  # record 5, well before the last checkpoint
    data[at + 8] ^= 0x01
    path.write_bytes(bytes(data))


def _delete_a_line(d: Path) -> None:
    path = d / "audit.jsonl"
    lines = read_lines(path)
    del lines[6]
    write_lines(path, lines)


def _swap_two_lines(d: Path) -> None:
    path = d / "audit.jsonl"
    lines = read_lines(path)
    lines[3], lines[4] = lines[4], lines[3]
    write_lines(path, lines)


def _cut_the_end(d: Path) -> None:
    path = d / "audit.jsonl"
    write_lines(path, read_lines(path)[:-2])


Damage = Callable[[Path], None]
CASES: list[tuple[str, Damage, str]] = [
    ("head deleted", _delete_head, "head_missing"),
    ("unsigned record forged, hash recomputed", _forge_unsigned_tail, "edited"),
    ("forged record appended", _append_forged_record, "unvouched"),
    ("byte flipped mid-log", _flip_a_byte, "edited: line 5"),
    ("line deleted mid-log", _delete_a_line, "deleted: line 7"),
    ("two lines swapped mid-log", _swap_two_lines, "reordered: line 4"),
    ("end cut off", _cut_the_end, "truncated"),
]


@pytest.mark.parametrize(("damage", "found"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_start_up_refuses_and_names_the_problem(tmp_path: Path, damage: Damage, found: str) -> None:
    make(tmp_path, 25, crashed=True)  # 25 records and 2 checkpoints: records 23-27 unsigned
    damage(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(AuditCorrupt) as info:
        AuditLog(tmp_path)
    message = str(info.value)
    assert found in message
    assert f"cardvault audit repair {tmp_path / 'audit.jsonl'}" in message
    assert snapshot(tmp_path) == before  # refused without writing anything


def test_a_crashed_log_without_a_mark_is_refused(tmp_path: Path) -> None:
    make(tmp_path, 25, crashed=True)
    (tmp_path / "audit.tail").unlink()
    with pytest.raises(AuditCorrupt, match=r"unvouched: records 23 to 27 follow"):
        AuditLog(tmp_path)


def test_a_mark_not_written_by_the_service_is_refused(tmp_path: Path) -> None:
    make(tmp_path, 5)
    mark = bytearray((tmp_path / "audit.tail").read_bytes())
    mark[20] ^= 0x01
    (tmp_path / "audit.tail").write_bytes(bytes(mark))
    with pytest.raises(AuditCorrupt, match="mark_invalid"):
        AuditLog(tmp_path)


# --- repair -------------------------------------------------------------------------


def repair_records(path: Path) -> list[dict[str, object]]:
    return [r for r in records(path) if r["action"] == REPAIR_ACTION]


@pytest.mark.parametrize(("damage", "found"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_repair_records_itself_and_the_log_verifies_only_with_its_record(
    tmp_path: Path, damage: Damage, found: str
) -> None:
    path = make(tmp_path, 25, crashed=True)
    damage(tmp_path)
    original = path.read_bytes()
    with Repair(path) as job:
        plan = job.plan()
        assert plan.needed and plan.kind == found.split(":")[0]
        record = job.apply(plan, actor="os-user:tester")
    result = verify_log(path, tmp_path / "audit.pub")
    assert result.ok, result.problem
    assert result.signed_seq == record.seq  # the repair record is signed
    (repaired,) = repair_records(path)
    detail = repaired["detail"]
    assert isinstance(detail, dict) and detail["found"] == plan.kind
    # What was cut is kept, whole, and named in the signed record.
    if plan.cut_lines:
        cut = tmp_path / str(detail["cut_file"])
        assert original.endswith(cut.read_bytes())
        assert detail["cut_lines"] == plan.cut_lines
    if damage is _delete_head:
        assert detail["head_was"] == "missing" and plan.cut_lines == 0
    # The service continues the repaired log.
    reopen(tmp_path)
    assert verifies(tmp_path)
    # Without the repair record the log no longer verifies.
    lines = read_lines(path)
    index = next(i for i, line in enumerate(lines) if REPAIR_ACTION.encode() in line)
    write_lines(path, lines[:index] + lines[index + 1 :])
    assert not verifies(tmp_path)


def test_repair_cuts_an_unvouched_tail_unless_told_to_adopt_it(tmp_path: Path) -> None:
    path = make(tmp_path, 25, crashed=True)
    _append_forged_record(tmp_path)
    with Repair(path) as job:
        plan = job.plan()
        assert (plan.unvouched, plan.cut_lines, plan.adopted) == (1, 1, 0)
        adopting = job.plan(adopt_unsigned=True)
        assert (adopting.unvouched, adopting.cut_lines, adopting.adopted) == (1, 0, 1)
        job.apply(adopting, actor="os-user:tester")
    (repaired,) = repair_records(path)
    assert repaired["detail"]["unsigned_adopted"] == 1  # type: ignore[index]
    assert any(r["object"] == "pm_forged000" for r in records(path))
    assert verifies(tmp_path)


def test_repair_refuses_a_log_the_service_holds(tmp_path: Path) -> None:
    from cardvault.audit import AuditUnavailable

    async def main() -> None:
        log = await AuditLog.open(tmp_path)
        await append_many(log, 1)
        with pytest.raises(AuditUnavailable):
            Repair(tmp_path / "audit.jsonl")
        await log.close()

    run(main())


def test_the_repair_command_shows_its_plan_then_repairs_and_records_it(tmp_path: Path) -> None:
    zone = tmp_path / "vault"
    path = make(zone, 25)
    _delete_head(zone)
    before = snapshot(zone)
    runner = CliRunner()
    shown = runner.invoke(app, ["repair", str(path)], env={"COLUMNS": "200"})
    assert shown.exit_code == 1, shown.output
    assert "head_missing" in shown.output and "--yes" in shown.output
    assert snapshot(zone) == before
    done = runner.invoke(app, ["repair", str(path), "--yes"], env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    assert "verify: ok" in done.output
    assert (zone / "audit.head").exists()
    assert verify_log(path, zone / "audit.pub").ok
    admin = tmp_path / "vault-admin" / "audit.jsonl"
    assert REPAIR_ACTION in [json.loads(line)["action"] for line in admin.read_text().splitlines()]
    again = runner.invoke(app, ["repair", str(path)])
    assert again.exit_code == 0 and "nothing to repair" in again.output


def test_repair_leaves_a_good_log_alone(tmp_path: Path) -> None:
    path = make(tmp_path, 3)
    before = snapshot(tmp_path)
    with Repair(path) as job:
        plan = job.plan()
        assert not plan.needed
        with pytest.raises(ValueError):
            job.apply(plan, actor="os-user:tester")
    assert snapshot(tmp_path) == before
    assert entry(0)  # (the support module's records are what the log holds)


# -- a disk that is full at start-up is "try again", not a configuration error --------------


@pytest.mark.parametrize(
    ("err", "raised"),
    [
        (errno.ENOSPC, AuditUnavailableError),  # exit 74: the supervisor tries again
        (errno.EIO, AuditUnavailableError),
        (errno.EACCES, ConfigurationError),  # exit 2: an operator must act
    ],
)
def test_opening_on_a_full_disk_is_unavailable_not_misconfigured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, err: int, raised: type[Exception]
) -> None:
    # Before: every I/O failure at open was a ConfigurationError (exit 2), which the
    # systemd units do not restart: a vault whose audit disk filled up stayed down after
    # the space came back.
    def fail(_directory: Path) -> None:
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr("cardvault.audit.log.load_or_create_signing_key", fail)
    with pytest.raises(raised):
        asyncio.run(open_audit_log(tmp_path / "audit", AuditSettings()))
