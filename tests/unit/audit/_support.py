"""Helpers for the audit tests: make logs, read and rewrite their lines like an attacker."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path
from typing import Any

from cardvault.audit import AuditLog, AuditRecord
from cardvault.audit.record import record_hash
from cardvault.cards import luhn_valid


def generated_card_number(rng: random.Random | None = None, length: int = 16) -> str:
    """Random digits after a 4 with the Luhn check digit appended (never typed by hand)."""
    rng = rng or random.Random()
    body = "4" + "".join(rng.choice("0123456789") for _ in range(length - 2))
    return next(body + d for d in "0123456789" if luhn_valid(body + d))


def entry(i: int) -> dict[str, Any]:
    return {
        "actor": "spiffe://cardvault/vault",
        "origin": "127.0.0.1",
        "object_id": f"pm_{i:06d}",
        "result": "ok",
        "request_id": f"req_{i:06d}",
        "detail": {"n": i, "livemode": False},
    }


async def append_many(log: AuditLog, count: int, *, start: int = 0) -> list[AuditRecord]:
    return [
        await log.append("vault.payment_method.create", **entry(i))
        for i in range(start, start + count)
    ]


def make_log(directory: Path, count: int, *, checkpoint_every: int = 1000) -> Path:
    """A closed log of ``count`` records (plus checkpoints); returns the log's path."""

    async def main() -> None:
        log = await AuditLog.open(directory, checkpoint_every=checkpoint_every)
        await append_many(log, count)
        await log.close()

    asyncio.run(main())
    return directory / "audit.jsonl"


def crash(log: AuditLog) -> None:
    """Let go of ``log`` as a process killed now would: its files closed as they are,
    with no closing checkpoint, and its timer never run."""
    if log._timer is not None:
        log._timer.cancel()
    log._closed = True
    log._file.close()
    log._tail.close()


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def write_lines(path: Path, lines: list[bytes]) -> None:
    path.write_bytes(b"".join(lines))


def records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in read_lines(path)]


def reseal(value: dict[str, Any]) -> bytes:
    """The line for ``value`` with its hash recomputed, as the log would write it."""
    fields = {k: v for k, v in value.items() if k != "hash"}
    fields["hash"] = record_hash(fields)
    return (json.dumps(fields, separators=(",", ":")) + "\n").encode()


def unchanged(value: dict[str, Any]) -> bytes:
    """The line for ``value`` exactly as it is (hash untouched)."""
    return (json.dumps(value, separators=(",", ":")) + "\n").encode()


def rechain(values: list[dict[str, Any]], start: int) -> list[bytes]:
    """Lines for ``values`` with prev and hash recomputed from index ``start`` on: what an
    attacker without the signing key can do after changing record ``start``."""
    out: list[bytes] = []
    for index, value in enumerate(values):
        if index < start:
            out.append(unchanged(value))
            continue
        if index > 0:
            value = {**value, "prev": json.loads(out[-1])["hash"]}
        out.append(reseal(value))
    return out
