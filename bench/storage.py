"""Benchmark the vault store's writes: payment methods inserted by concurrent writers.

Inserts ``--rows`` payment-method records (default 20,000) from ``--writers``
concurrent tasks (default 32), each awaiting its previous insert, into a fresh store:

* SQLite with group commit (the default: concurrent writes share a transaction),
* SQLite with ``group_commit=False`` (one transaction, so one fsync, per insert),
* PostgreSQL (one autocommit statement per insert over a pool of 16 connections), in a
  database created for the run and dropped afterwards.

Every insert is durable when it returns (SQLite ``synchronous=FULL``; PostgreSQL
synchronous commit). Read the ``vs`` column (the ratio to SQLite without group commit,
from the same run), not the absolute figures.

    .venv/bin/python bench/storage.py
    .venv/bin/python bench/storage.py --rows 5000 --writers 8 --no-postgres
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import platform
import secrets
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cardvault.storage import (
    Account,
    DataKeyRecord,
    PaymentMethodRecord,
    PostgresVaultStore,
    SQLiteVaultStore,
    VaultStore,
)

ADMIN_DSN = os.environ.get(
    "CARDVAULT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
ACCOUNT = "acct_bench"
NOW = 1_760_000_000


@dataclass
class Outcome:
    label: str
    rows: int
    seconds: float
    latencies: list[float]
    commits: int | None

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
        return ordered[rank - 1] * 1000


def records(n: int) -> list[PaymentMethodRecord]:
    return [
        PaymentMethodRecord(
            id=f"pm_{secrets.token_urlsafe(18)}",
            account_id=ACCOUNT,
            livemode=False,
            created=NOW + i // 100,
            data_key_id="dk_bench",
            number_ct=secrets.token_bytes(60),  # about the size of a sealed card number
            brand="visa",
            last4="4242",
            exp_month=12,
            exp_year=2034,
            funding="credit",
            fingerprint=secrets.token_hex(8),
            metadata={"order_id": str(i)},
            billing_details={"email": "jenny@example.com"},
        )
        for i in range(n)
    ]


async def run(label: str, open_store: Callable[[], VaultStore], rows: int, writers: int) -> Outcome:
    batch = records(rows)
    store = open_store()
    try:
        await store.migrate()
        await store.create_account(Account(ACCOUNT, "Bench", NOW))
        await store.insert_data_key(DataKeyRecord("dk_bench", "pan", 1, b"\0" * 40, NOW))
        before = store.commits if isinstance(store, SQLiteVaultStore) else None
        pending = iter(batch)
        latencies: list[float] = []

        async def writer() -> None:
            for record in pending:
                started = time.perf_counter()
                await store.insert_payment_method(record)
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(writer() for _ in range(writers)))
        seconds = time.perf_counter() - began
        listed = await store.list_payment_methods(ACCOUNT, False, limit=rows + 1)
        if len(listed) != rows:
            raise RuntimeError(f"{label}: {len(listed)} rows stored, expected {rows}")
        commits = None
        if isinstance(store, SQLiteVaultStore) and before is not None:
            commits = store.commits - before
        return Outcome(label, rows, seconds, latencies, commits)
    finally:
        await store.close()


async def admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(ADMIN_DSN, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def print_table(outcomes: list[Outcome], baseline: str) -> None:
    base = next(o.rows_per_second for o in outcomes if o.label == baseline)
    header = ("backend", "rows", "seconds", "rows/s", "vs no-group", "commits", "p50 ms", "p99 ms")
    table = [
        (
            o.label,
            f"{o.rows:,}",
            f"{o.seconds:.2f}",
            f"{o.rows_per_second:,.0f}",
            f"{o.rows_per_second / base:.1f}x",
            "-" if o.commits is None else f"{o.commits:,}",
            f"{o.percentile(50):.2f}",
            f"{o.percentile(99):.2f}",
        )
        for o in outcomes
    ]
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    for n, row in enumerate([header, *table]):
        print(
            "  ".join(
                [row[0].ljust(widths[0])]
                + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--writers", type=int, default=32)
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()

    print(
        f"{args.rows:,} payment methods, {args.writers} concurrent writers; "
        f"Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}, "
        f"{os.cpu_count()} CPUs"
    )
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="cardvault-bench-") as tmp:
        for label, group in (("sqlite group commit", True), ("sqlite no group commit", False)):
            path = Path(tmp) / f"{group}.db"
            outcomes.append(
                asyncio.run(
                    run(
                        label,
                        functools.partial(SQLiteVaultStore, path, group_commit=group),
                        args.rows,
                        args.writers,
                    )
                )
            )
    if not args.no_postgres:
        name = f"bench_storage_{secrets.token_hex(4)}"
        asyncio.run(admin(f"CREATE DATABASE {name}"))
        try:
            dsn = ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
            outcomes.append(
                asyncio.run(
                    run(
                        "postgresql (pool 16)",
                        lambda: PostgresVaultStore(dsn),
                        args.rows,
                        args.writers,
                    )
                )
            )
        finally:
            asyncio.run(admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    print_table(outcomes, baseline="sqlite no group commit")


if __name__ == "__main__":
    main()
