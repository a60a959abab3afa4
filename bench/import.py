"""Benchmark bulk import: ``cardvault import`` cards/s beside the raw insert rate of rows
of the same size into the same database, and the vault's peak RSS.

Starts a real key service (development profile and seal, SQLite) and, per backend, a
real vault process (production profile) on a SQLite file or on a PostgreSQL database
made for the run (``CARDVAULT_TEST_POSTGRES_DSN``, default
postgresql://postgres@127.0.0.1:5432/postgres) and dropped afterwards. The file: ``--rows``
JSON lines (default 100,000) of the published test cards
(src/cardvault/cards/test_cards.json) under distinct external ids, encrypted to the
vault's import key before the clock starts. The import runs through the command line
and the admin API over mutual TLS, as an operator would run it.

Printed per backend:

* **import**: rows / wall second of the whole command (upload, check pass, import
  pass) and of the import pass alone (from the ``checked`` event to ``done``);
* **raw**: rows / second inserting the same number of rows, copied from the imported
  ``payment_methods`` (so of the same size) under new ids, into a table of the same
  definition in the same database: ``executemany`` in transactions of ``--batch-size``
  rows with the vault's own pragmas (SQLite, WAL, ``synchronous=FULL``); ``COPY`` in
  the same batches (PostgreSQL, ``CREATE TABLE … (LIKE payment_methods INCLUDING
  ALL)``, so with its indexes);
* the ratio import pass / raw (the goal is >= 0.5), and the vault's peak RSS
  (``VmHWM``; the goal is <= 200 MiB for 1M rows).

    .venv/bin/python bench/import.py                       # 100,000 rows, both backends
    .venv/bin/python bench/import.py --rows 5000 --backend sqlite
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from _common import cardvault_process, free_port, run_cardvault, wait_for_port
from _deploy import keyd_config, vault_config

from cardvault import pgp
from cardvault.transport.certs import init_ca

ADMIN_DSN = os.environ.get(
    "CARDVAULT_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _luhn(number: str) -> bool:
    total = 0
    for i, digit in enumerate(reversed(number)):
        d = int(digit) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def test_numbers() -> list[str]:
    """The published test cards that test mode takes (Visa, Mastercard …)."""
    data = json.loads(resources.files("cardvault.cards").joinpath("test_cards.json").read_text())
    found: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
        elif isinstance(node, str) and node.isdigit() and 13 <= len(node) <= 19 and _luhn(node):
            found.append(node)  # the file also lists numbers that fail on purpose

    walk(data)
    return sorted(set(found))


@dataclass
class Outcome:
    backend: str
    rows: int
    imported: int
    wall_s: float
    import_pass_s: float
    raw_s: float
    peak_rss_kib: int

    def line(self) -> str:
        command = self.rows / self.wall_s
        passed = self.rows / self.import_pass_s
        raw = self.rows / self.raw_s
        return (
            f"{self.backend:<9} {self.rows:>9,} {command:>12,.0f} {passed:>12,.0f} "
            f"{raw:>12,.0f} {passed / raw:>7.2f} {self.peak_rss_kib / 1024:>9.1f}"
        )


def write_file(path: Path, rows: int, numbers: list[str]) -> None:
    with path.open("w") as fh:
        for i in range(rows):
            fh.write(json.dumps({
                "id": f"bench_{i}", "object": "card", "number": numbers[i % len(numbers)],
                "exp_month": 1 + i % 12, "exp_year": 2031 + i % 5, "name": f"Holder {i}",
                "address_zip": "10115", "metadata": {"source": "bench"},
            }) + "\n")  # fmt: skip


async def pg(dsn: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def raw_sqlite(db: Path, rows: int, batch: int) -> float:
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        (ddl,) = conn.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = 'payment_methods'"
        ).fetchone()
        conn.execute(ddl.replace("payment_methods", "bench_raw", 1))
        cur = conn.execute("SELECT * FROM payment_methods LIMIT ?", (rows,))
        source = [(f"raw_{i:012d}", *r[1:]) for i, r in enumerate(cur.fetchall())]
        # Only placeholders are joined in, one per column of the copied definition.
        insert = "INSERT INTO bench_raw VALUES (" + ",".join("?" * len(source[0])) + ")"  # noqa: S608
        started = time.perf_counter()
        for at in range(0, len(source), batch):
            conn.execute("BEGIN")
            conn.executemany(insert, source[at : at + batch])
            conn.execute("COMMIT")
        return time.perf_counter() - started
    finally:
        conn.close()


async def raw_postgres(dsn: str, rows: int, batch: int) -> float:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        await conn.execute("CREATE TABLE bench_raw (LIKE payment_methods INCLUDING ALL)")
        records = await conn.fetch("SELECT * FROM payment_methods LIMIT $1", rows)
        columns = list(records[0].keys())
        source = [(f"raw_{i:012d}", *tuple(r)[1:]) for i, r in enumerate(records)]
        started = time.perf_counter()
        for at in range(0, len(source), batch):
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "bench_raw", records=source[at : at + batch], columns=columns
                )
        return time.perf_counter() - started
    finally:
        await conn.close()


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def run_backend(
    backend: str, work: Path, ca: Any, keyd_port: int, args: argparse.Namespace
) -> Outcome:
    work.mkdir()
    log = work / "vault.log"
    port, admin_port = free_port(), free_port()
    dsn = None
    if backend == "sqlite":
        store_url = f"sqlite:///{work / 'vault.db'}"
    else:
        name = f"bench_import_{secrets.token_hex(4)}"
        asyncio.run(pg(ADMIN_DSN, f"CREATE DATABASE {name}"))
        dsn = ADMIN_DSN.rsplit("/", 1)[0] + f"/{name}"
        store_url = dsn
    try:
        config = vault_config(work, args.pki, port, keyd_port, store_url)
        with config.open("a") as fh:
            fh.write(f'[admin]\nport = {admin_port}\nclient_ca_file = "{ca.cert_path}"\n')
        created = subprocess.run(
            [sys.executable, "-m", "cardvault", "accounts", "create", "--config", str(config)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        account = next(w for w in created.stdout.split() if w.startswith("acct_"))
        env = {
            **os.environ,
            "CARDVAULT_VAULT_ADMIN_URL": f"https://localhost:{admin_port}",
            "CARDVAULT_CA_BUNDLE": str(ca.cert_path),
            "CARDVAULT_ADMIN_CERT": str(args.admin[0]),
            "CARDVAULT_ADMIN_KEY": str(args.admin[1]),
        }
        env.pop("CARDVAULT_STACK", None)
        with cardvault_process(["vault", "serve", "--config", str(config)], log=log) as proc:
            wait_for_port(admin_port, proc, log=log)
            key = json.loads(
                subprocess.run(
                    [sys.executable, "-m", "cardvault", "import-key", "create"],
                    capture_output=True, text=True, check=True, env=env,
                ).stdout
            )  # fmt: skip
            plain = work / "cards.jsonl"
            write_file(plain, args.rows, args.numbers)
            source = work / "cards.jsonl.gpg"
            with source.open("wb") as fh:
                pgp.encrypt(key["public_key"], key["fingerprint"], plain, fh.write)
            plain.unlink()
            print(f"{backend}: importing {args.rows:,} rows (vault pid {proc.pid})",
                  file=sys.stderr, flush=True)  # fmt: skip
            started = time.perf_counter()
            checked_at = done_at = started
            summary: dict[str, Any] = {}
            job = subprocess.Popen(
                [sys.executable, "-m", "cardvault", "import", str(source), "--account", account,
                 "--batch-size", str(args.batch_size), "--out", str(work / "mapping.csv")],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            )  # fmt: skip
            assert job.stdout is not None
            for raw in job.stdout:
                event = json.loads(raw)
                if event["event"] == "checked":
                    checked_at = time.perf_counter()
                elif event["event"] == "done":
                    done_at = time.perf_counter()
                    summary = event
            job.wait()
            wall = time.perf_counter() - started
            if job.returncode != 0 or summary.get("imported") != args.rows:
                stderr = job.stderr.read() if job.stderr else ""
                raise RuntimeError(f"the import failed: {summary} {stderr}")
            rss = peak_rss_kib(proc.pid)
        if dsn is None:
            raw_s = raw_sqlite(work / "vault.db", args.rows, args.batch_size)
        else:
            raw_s = asyncio.run(raw_postgres(dsn, args.rows, args.batch_size))
        return Outcome(
            backend, args.rows, int(summary["imported"]), wall, done_at - checked_at, raw_s, rss
        )
    finally:
        if dsn is not None and not args.keep:
            asyncio.run(
                pg(ADMIN_DSN, f"DROP DATABASE IF EXISTS {dsn.rsplit('/', 1)[1]} WITH (FORCE)")
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--keep", action="store_true", help="keep the work directory and database")
    args = p.parse_args()
    args.numbers = [n for n in test_numbers() if n[0] in "45"][:8]
    directory = Path(tempfile.mkdtemp(prefix="cv-bench-import-"))
    try:
        ca = init_ca(directory / "pki")
        keyd = ca.issue("keyd", dns=["localhost"], ips=["127.0.0.1"])
        vault = ca.issue("vault", dns=["localhost"], ips=["127.0.0.1"], client_identity="vault")
        admin = ca.issue("admin", client_identity="admin")
        from _deploy import Pki

        args.pki = Pki(ca.cert_path, (keyd.cert_path, keyd.key_path),
                       (vault.cert_path, vault.key_path))  # fmt: skip
        args.admin = (admin.cert_path, admin.key_path)
        keyd_port = free_port()
        klog = directory / "keyd.log"
        kconf = keyd_config(directory, args.pki, keyd_port)
        run_cardvault(["keyservice", "init", "--config", str(kconf)], log=klog)
        outcomes = []
        with cardvault_process(["keyservice", "serve", "--config", str(kconf)], log=klog) as kp:
            wait_for_port(keyd_port, kp, log=klog)
            backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
            for backend in backends:
                outcomes.append(run_backend(backend, directory / backend, ca, keyd_port, args))
        print(f"rows {args.rows:,}, batch {args.batch_size}, cards {len(args.numbers)} distinct; "
              f"cpus {os.cpu_count()}")  # fmt: skip
        print(f"{'backend':<9} {'rows':>9} {'command/s':>12} {'import/s':>12} {'raw/s':>12} "
              f"{'ratio':>7} {'RSS MiB':>9}")  # fmt: skip
        for outcome in outcomes:
            print(outcome.line())
    finally:
        if args.keep:
            print(f"kept {directory}", file=sys.stderr)
        else:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
