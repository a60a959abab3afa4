"""AuditLog: durable appends, group commit, checkpoints, re-opening, and failing closed."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import errno
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cardvault.audit import (
    CHECKPOINT_ACTION,
    GENESIS,
    AuditCorrupt,
    AuditLog,
    AuditRecord,
    AuditUnavailable,
    verify_log,
)
from cardvault.audit.signing import load_public_key, verify_checkpoint
from cardvault.scan import scan_paths

from ._support import (
    append_many,
    crash,
    entry,
    generated_card_number,
    make_log,
    read_lines,
    records,
)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def verified(directory: Path) -> None:
    result = verify_log(directory / "audit.jsonl", directory / "audit.pub")
    assert result.problem is None, str(result.problem)


def test_append_returns_the_record_once_its_line_is_on_disk(tmp_path: Path) -> None:
    async def main() -> None:
        log = await AuditLog.open(tmp_path)
        record = await log.append(
            "keyservice.datakey.unwrap",
            actor="spiffe://cardvault/vault",
            origin="10.0.0.7",
            object_id="dk_1a2b3c",
            result="ok",
            request_id="req_x1",
            detail={"kek_version": 3},
        )
        # Durable before append returned: the line is already in the file.
        assert read_lines(tmp_path / "audit.jsonl") == [record.line()]
        assert (record.seq, record.prev) == (1, GENESIS)
        assert record.to_dict()["object"] == "dk_1a2b3c"
        await log.close()

    run(main())
    verified(tmp_path)


def test_files_are_private_and_the_public_key_is_published(tmp_path: Path) -> None:
    make_log(tmp_path, 3)
    for name in ("audit.jsonl", "audit.key", "audit.head", "audit.tail"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    public = load_public_key(tmp_path / "audit.pub")
    private = serialization.load_pem_private_key((tmp_path / "audit.key").read_bytes(), None)
    assert isinstance(private, Ed25519PrivateKey)
    assert private.public_key().public_bytes_raw() == public.raw


def test_records_carry_the_injected_time(tmp_path: Path) -> None:
    moment = dt.datetime(2025, 6, 1, 14, 0, 0, 123456, tzinfo=dt.timezone(dt.timedelta(hours=2)))

    async def main() -> None:
        async with await AuditLog.open(tmp_path, clock=lambda: moment) as log:
            await append_many(log, 1)

    run(main())
    assert records(tmp_path / "audit.jsonl")[0]["time"] == "2025-06-01T12:00:00.123456Z"


def test_concurrent_appends_make_one_chain_with_far_fewer_fsyncs(tmp_path: Path) -> None:
    async def main() -> tuple[list[Any], int, int]:
        log = await AuditLog.open(tmp_path, checkpoint_every=100_000)
        real, writes = log._file.write, 0

        def counted(data: bytes) -> None:
            nonlocal writes
            writes += 1
            real(data)

        log._file.write = counted  # type: ignore[method-assign]
        results = await asyncio.gather(
            *(log.append("vault.payment_method.create", **entry(i)) for i in range(1000))
        )
        fsyncs = log.fsyncs
        await log.close()
        return results, fsyncs, writes

    results, fsyncs, writes = run(main())
    assert sorted(r.seq for r in results) == list(range(1, 1001))
    assert fsyncs < 50, fsyncs  # group commit: many records share each fsync
    # ... and each write: the lines of a flush go to the file together.
    assert writes <= fsyncs + 1, (writes, fsyncs)  # (+1: the checkpoint made on close)
    verified(tmp_path)
    # Every caller got its own record back.
    by_request = {r.request_id: r.object_id for r in results}
    assert by_request["req_000123"] == "pm_000123"


def test_a_checkpoint_follows_every_n_records_and_its_signature_verifies(tmp_path: Path) -> None:
    make_log(tmp_path, 25, checkpoint_every=10)
    values = records(tmp_path / "audit.jsonl")
    checkpoints = [v for v in values if v["action"] == CHECKPOINT_ACTION]
    # After records 1-10 (seq 11), 12-21 (seq 22), and on close after 23-27 (seq 28).
    assert [c["seq"] for c in checkpoints] == [11, 22, 28]
    public = load_public_key(tmp_path / "audit.pub")
    for c in checkpoints:
        d = c["detail"]
        assert d["head"] == c["prev"] and d["seq"] == c["seq"] - 1
        assert d["key_id"].startswith("ed25519:")
        assert verify_checkpoint(public, d["head"], d["seq"], d["signature"])
        assert not verify_checkpoint(public, d["head"], d["seq"] + 1, d["signature"])
    # audit.head is the newest checkpoint, byte for byte.
    assert (tmp_path / "audit.head").read_bytes() == read_lines(tmp_path / "audit.jsonl")[-1]
    verified(tmp_path)


def test_a_checkpoint_is_written_after_the_interval_without_closing(tmp_path: Path) -> None:
    async def main() -> None:
        log = await AuditLog.open(tmp_path, checkpoint_interval=0.05)
        await append_many(log, 2)
        deadline = time.monotonic() + 5
        while not (tmp_path / "audit.head").exists() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert records(tmp_path / "audit.jsonl")[-1]["action"] == CHECKPOINT_ACTION
        # Nothing new to sign: no further checkpoints pile up.
        await asyncio.sleep(0.2)
        assert len(read_lines(tmp_path / "audit.jsonl")) == 3
        await log.close()

    run(main())
    assert len(read_lines(tmp_path / "audit.jsonl")) == 3  # close had nothing to sign
    verified(tmp_path)


def test_a_log_used_from_one_event_loop_after_another_still_flushes_and_signs(
    tmp_path: Path,
) -> None:
    log = AuditLog(tmp_path, checkpoint_interval=0.2)

    async def first() -> None:
        await append_many(log, 1)  # arms the checkpoint timer on this loop, which ends

    async def second() -> None:
        record = await asyncio.wait_for(
            log.append("vault.payment_method.create", **entry(5)), timeout=5
        )
        assert record.seq == 2
        deadline = time.monotonic() + 5
        while records(tmp_path / "audit.jsonl")[-1]["action"] != CHECKPOINT_ACTION:
            assert time.monotonic() < deadline, "no checkpoint on the second loop"
            await asyncio.sleep(0.02)
        await log.close()

    run(first())
    run(second())
    verified(tmp_path)


def test_reopening_continues_the_chain_with_the_same_key(tmp_path: Path) -> None:
    async def main() -> None:
        log = await AuditLog.open(tmp_path)
        first_key = log.key_id
        await append_many(log, 3)
        await log.close()
        log = await AuditLog.open(tmp_path)
        assert log.key_id == first_key
        assert log.seq == 4  # three records and the closing checkpoint
        record = await log.append("vault.payment_method.delete", **entry(9))
        assert record.seq == 5
        assert record.prev == records(tmp_path / "audit.jsonl")[3]["hash"]
        await log.close()

    run(main())
    assert [r["seq"] for r in records(tmp_path / "audit.jsonl")] == [1, 2, 3, 4, 5, 6]
    verified(tmp_path)


def test_reopening_after_a_crash_signs_the_unsigned_tail(tmp_path: Path) -> None:
    async def write_and_crash() -> None:
        log = await AuditLog.open(tmp_path)
        await append_many(log, 3)
        crash(log)  # no closing checkpoint: the three records are unsigned

    run(write_and_crash())
    path = tmp_path / "audit.jsonl"
    assert [r["action"] for r in records(path)] == ["vault.payment_method.create"] * 3

    async def main() -> None:
        log = await AuditLog.open(tmp_path)
        await log.close()

    run(main())
    last = records(path)[-1]
    assert (last["seq"], last["action"]) == (4, CHECKPOINT_ACTION)
    assert last["detail"]["seq"] == 3  # the checkpoint signs the records of before the crash
    verified(tmp_path)


@pytest.mark.parametrize(
    "damage",
    [
        "partial-line",
        "edited-last",
        "unlinked-tail",
        "cut-before-head",
        "empty-with-head",
        "deep-last-line",
        "deep-head",
    ],
)
def test_reopening_refuses_a_damaged_tail(tmp_path: Path, damage: str) -> None:
    make_log(tmp_path, 5, checkpoint_every=3)
    path = tmp_path / "audit.jsonl"
    lines = read_lines(path)
    if damage == "partial-line":
        path.write_bytes(b"".join(lines) + lines[2][:40])
    elif damage == "edited-last":
        lines[-1] = lines[-1].replace(b'"result":"ok"', b'"result":"no"')
        path.write_bytes(b"".join(lines))
    elif damage == "unlinked-tail":
        del lines[-2]
        path.write_bytes(b"".join(lines))
    elif damage == "cut-before-head":
        path.write_bytes(b"".join(lines[:-2]))
    elif damage == "deep-last-line":
        # Nesting that makes json.loads raise RecursionError: refused as corrupt instead.
        path.write_bytes(b"".join(lines[:-1]) + b"[" * 100_000 + b"\n")
    elif damage == "deep-head":
        (tmp_path / "audit.head").write_bytes(b"[" * 100_000 + b"\n")
    else:
        path.write_bytes(b"")
    before = path.read_bytes()
    with pytest.raises(AuditCorrupt):
        AuditLog(tmp_path)
    assert path.read_bytes() == before  # refused without writing anything


def test_opening_refuses_a_public_key_that_is_not_the_signing_key(tmp_path: Path) -> None:
    make_log(tmp_path, 1)
    other = Ed25519PrivateKey.generate().public_key()
    (tmp_path / "audit.pub").write_bytes(
        other.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(AuditCorrupt):
        AuditLog(tmp_path)


def test_a_second_writer_cannot_open_the_same_log(tmp_path: Path) -> None:
    async def main() -> None:
        log = await AuditLog.open(tmp_path)
        with pytest.raises(AuditUnavailable):
            AuditLog(tmp_path)
        await log.close()
        await (await AuditLog.open(tmp_path)).close()  # free again once closed

    run(main())


def test_opening_fails_closed_when_the_directory_cannot_be_made(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(AuditUnavailable):
        AuditLog(tmp_path / "file" / "state")


# --- failing closed -----------------------------------------------------------------


class FailingWrites:
    """Stands in for the log file's write: writes ``partial`` bytes, then fails."""

    def __init__(self, real: Any, partial: int = 37, code: int = errno.ENOSPC) -> None:
        self.real, self.partial, self.code, self.calls = real, partial, code, 0

    def __call__(self, data: bytes) -> None:
        self.calls += 1
        self.real(data[: self.partial])
        raise OSError(self.code, os.strerror(self.code))


def test_append_raises_and_leaves_nothing_when_the_write_fails(tmp_path: Path) -> None:
    async def main() -> None:
        log = await AuditLog.open(tmp_path)
        await append_many(log, 2)
        before = (tmp_path / "audit.jsonl").read_bytes()
        real = log._file.write
        log._file.write = FailingWrites(real)  # type: ignore[method-assign]
        with pytest.raises(AuditUnavailable) as info:
            await log.append("vault.payment_method.create", **entry(7))
        assert isinstance(info.value.__cause__, OSError)
        # Cut back: not even the 37 bytes that did reach the file remain.
        assert (tmp_path / "audit.jsonl").read_bytes() == before
        # The disk has room again: the chain continues from the last durable record.
        log._file.write = real  # type: ignore[method-assign]
        record = await log.append("vault.payment_method.create", **entry(8))
        assert record.seq == 3
        await log.close()

    run(main())
    verified(tmp_path)


def test_every_caller_in_a_failed_batch_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        log = await AuditLog.open(tmp_path)
        log._file.write = FailingWrites(log._file.write)  # type: ignore[method-assign]
        outcomes = await asyncio.gather(
            *(log.append("vault.payment_method.create", **entry(i)) for i in range(50)),
            return_exceptions=True,
        )
        assert all(isinstance(o, AuditUnavailable) for o in outcomes)
        assert len({id(o) for o in outcomes}) == 50  # one exception each
        await log.close()

    run(main())
    assert (tmp_path / "audit.jsonl").read_bytes() == b""


def test_append_raises_when_fsync_fails(tmp_path: Path) -> None:
    async def main() -> None:
        log = await AuditLog.open(tmp_path)

        def broken_sync() -> None:
            raise OSError(errno.EIO, "I/O error")

        log._file.sync = broken_sync  # type: ignore[method-assign]
        with pytest.raises(AuditUnavailable):
            await log.append("vault.payment_method.create", **entry(1))
        assert (tmp_path / "audit.jsonl").read_bytes() == b""

    run(main())


def test_a_failed_fsync_refuses_every_record_it_would_have_covered_and_the_chain_resumes(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        log = await AuditLog.open(tmp_path)
        await append_many(log, 3)
        durable = (tmp_path / "audit.jsonl").read_bytes()
        real = log._file.sync
        failures = 0

        def fails_once() -> None:
            nonlocal failures
            if failures == 0:
                failures += 1
                raise OSError(errno.EIO, "I/O error")
            real()

        log._file.sync = fails_once  # type: ignore[method-assign]
        outcomes = await asyncio.gather(
            *(log.append("vault.payment_method.create", **entry(i)) for i in range(40)),
            return_exceptions=True,
        )
        # Written before the failed fsync or chained on records that were: all refused,
        # and none of their lines is left behind.
        assert all(isinstance(o, AuditUnavailable) for o in outcomes), outcomes
        assert (tmp_path / "audit.jsonl").read_bytes() == durable
        assert log.seq == 3
        record = await log.append("vault.payment_method.create", **entry(99))
        assert record.seq == 4
        assert record.prev == records(tmp_path / "audit.jsonl")[2]["hash"]
        await log.close()

    run(main())
    verified(tmp_path)


def test_a_log_that_cannot_be_cut_back_refuses_all_later_appends(tmp_path: Path) -> None:
    async def main() -> None:
        log = await AuditLog.open(tmp_path)
        await append_many(log, 1)
        log._file.write = FailingWrites(log._file.write)  # type: ignore[method-assign]

        def no_truncate(size: int) -> None:
            raise OSError(errno.EIO, "I/O error")

        log._file.truncate = no_truncate  # type: ignore[method-assign]
        with pytest.raises(AuditUnavailable):
            await log.append("vault.payment_method.create", **entry(2))
        size = (tmp_path / "audit.jsonl").stat().st_size
        # Broken: refused at once, nothing more reaches the file, not even at close.
        with pytest.raises(AuditUnavailable):
            await log.append("vault.payment_method.create", **entry(3))
        await log.close()
        assert (tmp_path / "audit.jsonl").stat().st_size == size

    run(main())
    # The partial line is still there, so a restart refuses to fork the chain from it.
    with pytest.raises(AuditCorrupt):
        AuditLog(tmp_path)


def test_append_after_close_raises(tmp_path: Path) -> None:
    async def main() -> None:
        log = await AuditLog.open(tmp_path)
        await log.close()
        await log.close()  # idempotent
        with pytest.raises(AuditUnavailable):
            await log.append("vault.payment_method.create", **entry(1))

    run(main())


def test_refused_values_raise_value_error_and_write_nothing(tmp_path: Path) -> None:
    card = generated_card_number()

    async def main() -> None:
        log = await AuditLog.open(tmp_path)
        with pytest.raises(ValueError, match="card number"):
            await log.append("vault.payment_method.create", **{**entry(1), "object_id": card})
        with pytest.raises(ValueError, match="key material"):
            await log.append(
                "keyservice.datakey.create",
                **{**entry(1), "detail": {"data_key": base64.b64encode(os.urandom(32)).decode()}},
            )
        await log.close()

    run(main())
    assert (tmp_path / "audit.jsonl").read_bytes() == b""


def test_the_files_hold_no_card_data_or_key_material(tmp_path: Path) -> None:
    async def main() -> None:
        log = await AuditLog.open(tmp_path, checkpoint_every=7)
        for i in range(30):
            await log.append(
                "vault.payment_method.create",
                actor="key_" + "a1b2c3d4",
                origin="192.0.2.10",
                object_id=f"pm_{i}",
                result="ok" if i % 3 else "card_declined",
                request_id=f"req_{i}",
                detail={"brand": "visa", "last4": "4242", "exp_year": 2030},
            )
        await log.close()

    run(main())
    key = serialization.load_pem_private_key((tmp_path / "audit.key").read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    canaries = [
        raw.hex(),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
    ]
    files = [tmp_path / n for n in ("audit.jsonl", "audit.head", "audit.pub", "audit.tail")]
    assert scan_paths(files, canaries=canaries) == []
    # The scan is able to fail: a record that did hold the key (made here without the
    # checks append runs) is found.
    leaked = AuditRecord.seal(
        seq=99, time="2025-01-01T00:00:00.000000Z", actor="x", origin=None,
        action="leak", object_id=None, result="ok", request_id=None,
        detail={"info": canaries[1]}, prev=GENESIS,
    )  # fmt: skip
    (tmp_path / "copy.jsonl").write_bytes((tmp_path / "audit.jsonl").read_bytes() + leaked.line())
    found = scan_paths([tmp_path / "copy.jsonl"], canaries=canaries)
    # (#3, the base64url form, is the same text when the key's base64 has no + or /.)
    assert ("canary", "canary #2") in [(f.kind, f.masked) for f in found]
    verified(tmp_path)


def test_records_name_the_checkpoint_key_and_mark_its_actor(tmp_path: Path) -> None:
    make_log(tmp_path, 1)
    value = json.loads((tmp_path / "audit.head").read_bytes())
    assert value["actor"] == "audit" and value["origin"] is None
    assert set(value["detail"]) == {"head", "seq", "signature", "key_id"}
