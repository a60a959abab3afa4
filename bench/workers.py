"""Benchmark scaling out: tokenizations/s of a vault run as 1, 2 … worker processes.

For each worker count in ``--workers`` (default ``1,2``) the script starts a real vault
(``cardvault vault serve --workers N``) on a PostgreSQL database of its own, created for
the run and dropped afterwards: the production profile (JSON access log at info level),
synchronous commit, and only the per-key rate limit for secret keys raised
(``limits.secret_rate``/``secret_burst``) so that it does not throttle the load. All of
them share one real key service (development profile and seal, SQLite) and run for the
whole measurement; the ones not being measured are idle.

The load comes from ``wrk`` (Debian's package; the script installs it with apt-get when
it is missing and it runs as root), a load generator written in C, so that the client
takes little of the cores the vault, the key service and PostgreSQL share: ``wrk -t
THREADS -c CONNECTIONS -d SECONDS`` over HTTPS keep-alive (wrk does not verify the
vault's certificate; it is the load generator, on this machine, against our own
listener; the script's own first requests to each vault verify it against the
deployment CA). A Lua script sends, round robin, the same form-encoded tokenizations of
published test cards as ``tokenization.py`` (Visa, Mastercard, Amex) with the account's
test secret key in the Authorization header, or the vault's ``POST /v1/noop``. Its
``response`` hook counts the answers by status and the 200s whose body is not a payment
method, and its ``done`` hook prints those counts, wrk's errors and wrk's whole latency
distribution (every distinct latency and its count), so that rounds add up exactly.

After a warm-up (``--warmup`` seconds of each endpoint per vault, counted for the stored
rows only), ``--rounds`` rounds each run, for every worker count in turn, a no-op phase
and a tokenization phase of ``--seconds`` each, then (unless ``--no-ceiling``) the
database's commit ceiling: ``pgbench`` (PostgreSQL's own client, in C) at the same
concurrency, each transaction one durable single-row INSERT into ``payment_methods`` of
a database of its own with the vault's schema, the row a copy of one the vault stored
(foreign keys and indexes included) under a new id. Alternating spreads the drift of a
shared machine over every case alike.

Printed per worker count and endpoint: requests/s, the ratio to the no-op, p50/p99 from
wrk's distribution, answers that were not 200 and wrk's errors (any failed tokenization,
warm-up included, makes the run invalid), and CPU time per answered request, from
``/proc`` before and after each phase: the vault (its parent and every worker), the
PostgreSQL backends of its database (db), those and PostgreSQL's own processes (pg: the
postmaster, checkpointer, WAL writer …; not other databases' backends), the key service
and wrk; the machine's interrupt time (the loopback network's work), and its busy time
none of these used (other jobs: read a round they disturbed with care; ``--wait-quiet``
waits for a quiet machine before each round). Per round, each rate and the share of the
machine other jobs took. Then the tokenizations/s of each worker count against the
first (the goal for 2 workers on a 2-core machine is >= 1.4), each worker's share of the
tokenizations (the ``worker`` field of the access log) and of the vault's CPU, each audit
chain's records, the database's transactions per tokenization (``pg_stat_database``: the
vault inserts the rows of concurrent tokenizations in one statement), rows stored
against the 200s the vault logged and wrk counted, and the commit ceiling: commits/s,
p50/p99 (pgbench's per-transaction log) and the CPU of every PostgreSQL process per
commit (those that exited during the phase included, through the postmaster's reaped
children's time).

    .venv/bin/python bench/workers.py --workers 1,2 --rounds 3 --seconds 10 --wait-quiet 120
    .venv/bin/python bench/workers.py --workers 1 --rounds 1 --seconds 2 --warmup 1 --keep

Needs PostgreSQL at ``CARDVAULT_TEST_POSTGRES_DSN`` (default
``postgresql://postgres@127.0.0.1:5432/postgres``, a role that may create databases) and
``/proc`` (Linux); PostgreSQL's CPU is counted only when it runs on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import json
import os
import platform
import re
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.client import HTTPSConnection
from pathlib import Path
from typing import Any

from _common import cardvault_process, free_port, run_cardvault, wait_for_port
from _deploy import Pki, create_account, keyd_config, make_pki, vault_config
from tokenization import ADMIN_DSN, admin, card_bodies

from cardvault.transport.tls import client_context

NOOP = "POST /v1/noop"
TOKENIZE = "POST /v1/payment_methods"
#: wrk's per-request timeout.
WRK_TIMEOUT_S = 10
#: A 200 to a tokenization must hold this (the new payment method's id).
CREATED = '"pm_'
#: The ids of the commit ceiling's rows.
CEILING_PREFIX = "pm_ceiling"
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- what /proc says -------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    comm: str
    ppid: int
    cpu: float  # user + system, seconds, all threads
    reaped: float  # user + system of its children that exited and were waited for


def processes() -> dict[int, Proc]:
    """Every process of the machine that can still be read."""
    found: dict[int, Proc] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        head, _, rest = text.rpartition(")")
        f = rest.split()
        comm = head.partition("(")[2]
        found[int(entry.name)] = Proc(
            comm,
            int(f[1]),
            (int(f[11]) + int(f[12])) / _CLK_TCK,
            (int(f[13]) + int(f[14])) / _CLK_TCK,
        )
    return found


def cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def tree(procs: dict[int, Proc], root: int) -> set[int]:
    """``root`` and its descendants."""
    found = {root} if root in procs else set()
    grew = True
    while grew:
        grew = False
        for pid, p in procs.items():
            if p.ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return found


@dataclass(frozen=True)
class Machine:
    """The whole machine's CPU time so far, in seconds (``/proc/stat``)."""

    busy: float  # not idle and not waiting for I/O; steal included
    total: float
    irq: float  # hardware and software interrupts: the loopback network's work is here
    steal: float  # taken by the hypervisor


def machine() -> Machine:
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    values += [0] * (8 - len(values))
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return Machine(
        (total - idle) / _CLK_TCK,
        total / _CLK_TCK,
        (values[5] + values[6]) / _CLK_TCK,
        values[7] / _CLK_TCK,
    )


@dataclass
class Usage:
    """Machine time added up over phases, in seconds."""

    busy: float = 0.0
    total: float = 0.0
    irq: float = 0.0
    steal: float = 0.0

    def add(self, a: Machine, b: Machine) -> None:
        self.busy += b.busy - a.busy
        self.total += b.total - a.total
        self.irq += b.irq - a.irq
        self.steal += b.steal - a.steal

    @property
    def percent(self) -> str:
        return f"{100 * self.busy / self.total:.0f}%" if self.total else "-"


def other_jobs(m: Usage, ours: float) -> float:
    """The machine's busy time that ``ours`` did not use, interrupts and steal aside."""
    return max(0.0, m.busy - m.irq - m.steal - ours)


@dataclass
class Snapshot:
    when: float
    procs: dict[int, Proc]
    #: PostgreSQL's processes and their titles (``postgres: 15/main: role db host state``).
    postgres: dict[int, str]
    machine: Machine
    children: float  # this process's reaped children (wrk, pgbench)


def snapshot() -> Snapshot:
    procs = processes()
    postgres = {pid: cmdline(pid) for pid, p in procs.items() if p.comm == "postgres"}
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return Snapshot(
        time.perf_counter(), procs, postgres, machine(), usage.ru_utime + usage.ru_stime
    )


def cpu_between(a: Snapshot, b: Snapshot, pids_b: set[int]) -> float:
    """CPU time the processes ``pids_b`` (as found in ``b``) used since ``a``: all of it
    for one that started since."""
    total = 0.0
    for pid in pids_b:
        after = b.procs[pid].cpu
        before = a.procs.get(pid)
        total += after - (before.cpu if before is not None and before.cpu <= after else 0.0)
    return total


def cluster_cpu(a: Snapshot, b: Snapshot) -> float:
    """The CPU every PostgreSQL process used between ``a`` and ``b``, those that exited
    included: the postmaster waits for each of its children, so their time moves into
    its reaped children's time; that counts their whole life, so the part already seen
    in ``a`` is taken off."""
    live = cpu_between(a, b, set(b.postgres))
    masters = [pid for pid in b.postgres if b.procs[pid].ppid not in b.postgres]
    reaped = sum(b.procs[m].reaped - a.procs[m].reaped for m in masters if m in a.procs)
    gone = sum(a.procs[pid].cpu for pid in a.postgres if pid not in b.procs)
    return live + max(0.0, reaped - gone)


def database_pids(s: Snapshot, database: str) -> set[int]:
    """The backends (and autovacuum workers) of ``database``."""
    return {pid for pid, title in s.postgres.items() if f" {database} " in f"{title} "}


def background_pids(s: Snapshot) -> set[int]:
    """PostgreSQL's own processes, serving no client: the postmaster, the checkpointer,
    the WAL writer … (a backend's title names its client's address, ``host(port)`` or
    ``[local]``; an autovacuum worker's names its database)."""
    return {
        pid
        for pid, title in s.postgres.items()
        if s.procs[pid].ppid not in s.postgres
        or (
            title.strip()
            and "(" not in title
            and "[local]" not in title
            and "autovacuum worker" not in title
        )
    }


# --- wrk -----------------------------------------------------------------------------


def find_wrk() -> str:
    """wrk's path; installed with apt-get when missing and this process is root."""
    wrk = shutil.which("wrk")
    if wrk is None and os.geteuid() == 0 and shutil.which("apt-get"):
        print("wrk is missing: apt-get install wrk", file=sys.stderr, flush=True)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "wrk"]
        if subprocess.run(install, env=env, check=False).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, check=False)
            subprocess.run(install, env=env, check=False)
        wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not on PATH: install it (Debian: apt-get install wrk)")
    return wrk


def find_pgbench() -> str | None:
    found = shutil.which("pgbench")
    if found:
        return found
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pgbench"),
        key=lambda p: [int(n) for n in re.findall(r"\d+", p)],
    )
    return candidates[-1] if candidates else None


def lua_string(text: str) -> str:
    if not text.isascii() or not text.isprintable():
        raise ValueError("printable ASCII only")
    return json.dumps(text)  # for printable ASCII a JSON string is a Lua string


def wrk_script(path: str, headers: dict[str, str], bodies: list[str], check: str | None) -> str:
    """The Lua script of one endpoint: its requests round robin; the answers counted by
    status, and the 200s without ``check`` in their body; the counts, wrk's errors and
    its latency distribution printed by ``done``."""
    header_table = ", ".join(f"[{lua_string(k)}] = {lua_string(v)}" for k, v in headers.items())
    body_list = ", ".join(lua_string(b) for b in bodies)
    return (
        "-- Written by bench/workers.py for one run.\n"
        f"local path = {lua_string(path)}\n"
        f"local headers = {{{header_table}}}\n"
        f"local bodies = {{{body_list}}}\n"
        f"local check = {lua_string(check) if check is not None else 'nil'}\n"
        "local requests = {}\n"
        "local sent = 0\n"
        "local threads = {}\n"
        "statuses = {}  -- globals: done() reads them from each thread\n"
        "unexpected = 0\n\n"
        "function setup(thread)\n  table.insert(threads, thread)\nend\n\n"
        "function init(args)\n"
        "  for i, body in ipairs(bodies) do\n"
        '    requests[i] = wrk.format("POST", path, headers, body)\n'
        "  end\n"
        "end\n\n"
        "function request()\n"
        "  sent = sent + 1\n"
        "  return requests[(sent - 1) % #requests + 1]\n"
        "end\n\n"
        "function response(status, headers, body)\n"
        "  local key = tostring(status)\n"
        "  statuses[key] = (statuses[key] or 0) + 1\n"
        "  if status == 200 and check and not string.find(body, check, 1, true) then\n"
        "    unexpected = unexpected + 1\n"
        "  end\n"
        "end\n\n"
        "function done(summary, latency, requests)\n"
        "  local total, odd = {}, 0\n"
        "  for _, thread in ipairs(threads) do\n"
        '    for status, n in pairs(thread:get("statuses") or {}) do\n'
        "      total[status] = (total[status] or 0) + n\n"
        "    end\n"
        '    odd = odd + (thread:get("unexpected") or 0)\n'
        "  end\n"
        "  for status, n in pairs(total) do\n"
        '    io.write(string.format("bench-status %s %d\\n", status, n))\n'
        "  end\n"
        '  io.write(string.format("bench-unexpected %d\\n", odd))\n'
        "  local e = summary.errors\n"
        '  io.write(string.format("bench-summary %d %d %d %d %d %d %d\\n", '
        "summary.requests, summary.duration, e.connect, e.read, e.write, e.status, "
        "e.timeout))\n"
        "  for i = 1, #latency do\n"
        "    local value, count = latency(i)\n"
        '    io.write(string.format("bench-latency %d %d\\n", value, count))\n'
        "  end\n"
        "end\n"
    )


@dataclass
class WrkRun:
    requests: int = 0
    duration_s: float = 0.0
    statuses: Counter[str] = field(default_factory=Counter)
    unexpected: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latency_us: Counter[int] = field(default_factory=Counter, repr=False)
    exit_code: int | None = None

    @property
    def ok(self) -> int:
        return self.statuses.get("200", 0) - self.unexpected

    @property
    def failed(self) -> int:
        """Answers other than a proper 200, and requests without an answer."""
        return sum(n for s, n in self.statuses.items() if s != "200") + self.unexpected


def parse_wrk(output: str) -> WrkRun:
    run = WrkRun()
    for line in output.splitlines():
        parts = line.split()
        if not parts or not parts[0].startswith("bench-"):
            continue
        if parts[0] == "bench-status" and len(parts) == 3:
            run.statuses[parts[1]] += int(parts[2])
        elif parts[0] == "bench-unexpected" and len(parts) == 2:
            run.unexpected = int(parts[1])
        elif parts[0] == "bench-latency" and len(parts) == 3:
            run.latency_us[int(parts[1])] += int(parts[2])
        elif parts[0] == "bench-summary" and len(parts) == 8:
            numbers = [int(p) for p in parts[1:]]
            run.requests, run.duration_s = numbers[0], numbers[1] / 1e6
            # ``status`` (non-2xx/3xx) is already in the statuses.
            for name, n in zip(
                ("connect", "read", "write", "status", "timeout"), numbers[2:], strict=True
            ):
                if n and name != "status":
                    run.errors[name] += n
    return run


def percentile_ms(histogram: Counter[int], q: float) -> float:
    """Nearest-rank percentile of a latency histogram in µs, in ms."""
    total = sum(histogram.values())
    if not total:
        return float("nan")
    rank = max(1, min(total, round(q / 100 * total + 0.5)))
    seen = 0
    for value in sorted(histogram):
        seen += histogram[value]
        if seen >= rank:
            return value / 1000
    return max(histogram) / 1000


# --- one vault per worker count -----------------------------------------------------


@dataclass
class Phase:
    """One endpoint of one case, its measured phases added up."""

    label: str
    seconds: float = 0.0
    answered: int = 0
    failed: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latency_us: Counter[int] = field(default_factory=Counter, repr=False)
    per_round: list[float] = field(default_factory=list)
    #: Per round, the share of the machine's time other jobs used.
    per_round_other: list[float] = field(default_factory=list)
    wall: float = 0.0
    vault_cpu: float = 0.0
    worker_cpu: dict[int, float] = field(default_factory=dict)  # by worker pid
    #: The run's database's backends.
    db_cpu: float = 0.0
    #: Those and PostgreSQL's own processes (not other databases' backends).
    pg_cpu: float = 0.0
    keyd_cpu: float = 0.0
    client_cpu: float = 0.0
    machine: Usage = field(default_factory=Usage)

    @property
    def per_second(self) -> float:
        return self.answered / self.seconds if self.seconds else 0.0

    @property
    def other_cpu(self) -> float:
        """The machine's busy time that none of the measured processes used, interrupts
        and steal aside: other jobs."""
        return other_jobs(
            self.machine, self.vault_cpu + self.pg_cpu + self.keyd_cpu + self.client_cpu
        )

    def us_per(self, cpu: float) -> str:
        return f"{1e6 * cpu / self.answered:,.0f}" if self.answered else "-"


@dataclass
class Case:
    workers: int
    directory: Path
    database: str
    dsn: str
    port: int = 0
    config: Path | None = None
    secret_key: str = ""
    proc: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    scripts: dict[str, Path] = field(default_factory=dict)
    noop: Phase = field(default_factory=lambda: Phase(NOOP))
    tokenize: Phase = field(default_factory=lambda: Phase(TOKENIZE))
    #: Tokenizations wrk (and the first check) saw answered 200, warm-up included.
    tokenized_seen: int = 0
    #: wrk's tokenization runs, warm-up included, and their connections.
    tokenize_runs: int = 0
    connections: int = 0
    warmup_failed: Counter[str] = field(default_factory=Counter)
    vault_pids: set[int] = field(default_factory=set)
    restarts: int = 0
    xact_before: tuple[int, int] = (0, 0)
    xact_after: tuple[int, int] = (0, 0)
    rows: int | None = None
    row_bytes: float | None = None
    exit_code: int | None = None
    log_answers: Counter[tuple[str, str, str]] = field(default_factory=Counter)
    audit_records: dict[str, int] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.workers} worker" + ("s" if self.workers != 1 else "")

    @property
    def logged_200(self) -> int:
        return sum(n for (w, ep, s), n in self.log_answers.items() if ep == TOKENIZE and s == "200")

    @property
    def logged_failed(self) -> int:
        return sum(n for (w, ep, s), n in self.log_answers.items() if ep == TOKENIZE and s != "200")

    @property
    def abandoned(self) -> int:
        """Tokenizations the access log records as 400 that no client saw: when wrk
        stops it closes its connections with requests in flight, and the vault logs a
        request whose client has left as 400 (``cardvault.transport.asgi``). Counted so
        only when wrk saw no 400 at all and there are no more than its runs could have
        left behind."""
        logged = sum(
            n for (w, ep, s), n in self.log_answers.items() if ep == TOKENIZE and s == "400"
        )
        seen = self.tokenize.statuses.get("400", 0) + self.warmup_failed.get("400", 0)
        return logged if seen == 0 and logged <= self.tokenize_runs * self.connections else 0

    @property
    def valid(self) -> bool:
        return (
            self.tokenize.answered > 0
            and self.tokenize.failed == 0
            and not self.tokenize.errors
            and not self.warmup_failed
            and self.logged_failed == self.abandoned
            and self.rows == self.logged_200
            and self.rows is not None
            and self.rows >= self.tokenized_seen
            and self.restarts == 0
            and self.exit_code == 0
        )


async def _pg_fetch(dsn: str, sql: str, *args: Any) -> list[Any]:
    import asyncpg

    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def pg_fetch(dsn: str, sql: str, *args: Any) -> list[Any]:
    return asyncio.run(_pg_fetch(dsn, sql, *args))


def transactions(database: str) -> tuple[int, int]:
    """The database's committed and rolled-back transactions so far."""
    rows = pg_fetch(
        ADMIN_DSN,
        "SELECT xact_commit, xact_rollback FROM pg_stat_database WHERE datname = $1",
        database,
    )
    return (int(rows[0][0]), int(rows[0][1])) if rows else (0, 0)


def verified_post(
    case: Case, ca: Path, path: str, body: str, headers: dict[str, str]
) -> tuple[int, bytes]:
    """One request from this process, the vault's certificate verified against the CA."""
    conn = HTTPSConnection("localhost", case.port, context=client_context(ca), timeout=60)
    try:
        conn.request("POST", path, body=body.encode(), headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def start_case(
    case: Case, pki: Pki, keyd_port: int, bodies: list[str], stack: contextlib.ExitStack
) -> None:
    case.directory.mkdir()
    asyncio.run(admin(f"CREATE DATABASE {case.database}"))
    case.port = free_port()
    case.log = case.directory / "vault.log"
    case.config = vault_config(
        case.directory,
        pki,
        case.port,
        keyd_port,
        case.dsn,
        limits={"secret_rate": 1e6, "secret_burst": 1e6},
    )
    case.secret_key = create_account(case.config, case.log)["secret"]
    form = {"authorization": f"Bearer {case.secret_key}",
            "content-type": "application/x-www-form-urlencoded"}  # fmt: skip
    for label, path, headers, payloads, check in (
        (NOOP, "/v1/noop", {}, [""], None),
        (TOKENIZE, "/v1/payment_methods", form, bodies, CREATED),
    ):
        script = case.directory / ("noop.lua" if label == NOOP else "tokenize.lua")
        script.write_text(wrk_script(path, headers, payloads, check))
        case.scripts[label] = script
    case.xact_before = transactions(case.database)
    command = ["vault", "serve", "--config", str(case.config), "--workers", str(case.workers)]
    case.proc = stack.enter_context(cardvault_process(command, log=case.log))
    wait_for_port(case.port, case.proc, log=case.log)
    print(
        f"{case.label}: vault pid {case.proc.pid}, database {case.database}, log {case.log}",
        file=sys.stderr,
        flush=True,
    )
    status, payload = verified_post(case, pki.ca, "/v1/noop", "", {})
    if status != 200:
        raise RuntimeError(f"{NOOP} answered {status}: {payload[:300]!r}")
    status, payload = verified_post(case, pki.ca, "/v1/payment_methods", bodies[0], form)
    created = json.loads(payload)
    if status != 200 or not str(created.get("id", "")).startswith("pm_"):
        raise RuntimeError(f"{TOKENIZE} answered {status}: {payload[:300]!r}")
    if created["card"]["last4"] != "4242" or created["livemode"]:
        raise RuntimeError(f"{TOKENIZE} answered an unexpected object")
    case.tokenized_seen += 1


def stop_case(case: Case) -> None:
    """SIGTERM: the workers finish the requests in flight, the parent exits 0."""
    if case.proc is not None and case.exit_code is None:
        case.proc.terminate()
        case.exit_code = case.proc.wait(60)


def count_log(case: Case) -> None:
    """The vault's access lines by worker, request and status, and each audit chain's
    records."""
    assert case.log is not None
    for line in case.log.read_text(errors="replace").splitlines():
        if '"event": "request"' not in line and '"event":"request"' not in line:
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("event") == "request" and "status" in entry:
            key = (
                str(entry.get("worker", "the vault")),
                f"{entry.get('method')} {entry.get('path')}",
                str(entry["status"]),
            )
            case.log_answers[key] += 1
    for chain in sorted((case.directory / "audit").rglob("*.jsonl")):
        with open(chain, "rb") as fh:
            name = str(chain.parent.relative_to(case.directory / "audit")) or "."
            case.audit_records[f"{name}/{chain.name}"] = sum(1 for _ in fh)


# --- the measurement ----------------------------------------------------------------


@dataclass
class Ceiling:
    database: str
    dsn: str
    script: Path | None = None
    seconds: float = 0.0
    commits: int = 0
    failed: int = 0
    latency_us: Counter[int] = field(default_factory=Counter, repr=False)
    per_round: list[float] = field(default_factory=list)
    per_round_other: list[float] = field(default_factory=list)
    cluster_cpu: float = 0.0
    client_cpu: float = 0.0
    machine: Usage = field(default_factory=Usage)
    row_bytes: float | None = None
    command: list[str] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.commits / self.seconds if self.seconds else 0.0


def wait_quiet(limit: float, threshold: float = 0.15) -> None:
    """Wait, at most ``limit`` seconds, until the machine has been less than
    ``threshold`` busy for 3 s (the vaults are idle meanwhile)."""
    deadline = time.monotonic() + limit
    while True:
        a = machine()
        time.sleep(3)
        b = machine()
        busy = (b.busy - a.busy) / (b.total - a.total) if b.total > a.total else 0.0
        if busy < threshold:
            return
        if time.monotonic() >= deadline:
            print(
                f"  the machine is still {100 * busy:.0f}% busy after {limit:g} s: going on",
                file=sys.stderr,
                flush=True,
            )
            return


def measure(
    wrk: str,
    case: Case,
    label: str,
    args: argparse.Namespace,
    keyd_pid: int,
    *,
    seconds: float,
    into: Phase | None,
) -> WrkRun:
    command = [
        wrk,
        "-t",
        str(args.threads),
        "-c",
        str(args.connections),
        "-d",
        f"{int(seconds)}s",
        "--timeout",
        f"{WRK_TIMEOUT_S}s",
        "-s",
        str(case.scripts[label]),
        f"https://localhost:{case.port}",
    ]
    assert case.proc is not None
    before = snapshot()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    after = snapshot()
    run = parse_wrk(result.stdout)
    run.exit_code = result.returncode
    if result.returncode != 0 or not run.duration_s:
        raise RuntimeError(
            f"wrk exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    vault_after = tree(after.procs, case.proc.pid)
    if case.vault_pids and vault_after != case.vault_pids:
        case.restarts += 1
        print(
            f"  {case.label}: the vault's processes changed: {sorted(vault_after)}", file=sys.stderr
        )
    case.vault_pids = vault_after
    if label == TOKENIZE:
        case.tokenized_seen += run.ok
        case.tokenize_runs += 1
        case.connections = args.connections
    if into is None:
        if run.failed or run.errors:
            case.warmup_failed.update(run.statuses - Counter({"200": run.statuses.get("200", 0)}))
            case.warmup_failed.update(run.errors)
            if run.unexpected:
                case.warmup_failed["200 without a payment method"] += run.unexpected
        return run
    into.seconds += run.duration_s
    into.answered += run.ok
    into.failed += run.failed
    into.statuses.update(run.statuses)
    into.errors.update(run.errors)
    into.latency_us.update(run.latency_us)
    into.wall += after.when - before.when
    for pid in vault_after - {case.proc.pid}:
        into.worker_cpu[pid] = into.worker_cpu.get(pid, 0.0) + cpu_between(before, after, {pid})
    ours = database_pids(after, case.database)
    vault = cpu_between(before, after, vault_after)
    db = cpu_between(before, after, ours)
    pg = cpu_between(before, after, ours | background_pids(after))
    keyd = cpu_between(before, after, {keyd_pid}) if keyd_pid in after.procs else 0.0
    client = after.children - before.children
    usage = Usage()
    usage.add(before.machine, after.machine)
    into.vault_cpu += vault
    into.db_cpu += db
    into.pg_cpu += pg
    into.keyd_cpu += keyd
    into.client_cpu += client
    into.machine.add(before.machine, after.machine)
    into.per_round.append(run.ok / run.duration_s)
    other = other_jobs(usage, vault + pg + keyd + client)
    into.per_round_other.append(other / usage.total if usage.total else 0.0)
    return run


def prepare_ceiling(
    ceiling: Ceiling, source: Case, directory: Path, pgbench: str, args: argparse.Namespace
) -> None:
    """A database with the vault's schema and one account, its data key and one
    payment method copied from ``source``'s database; the pgbench script that inserts
    that row again under new ids, one per transaction."""
    from cardvault.storage.postgres.vault import PostgresVaultStore

    asyncio.run(admin(f"CREATE DATABASE {ceiling.database}"))

    async def copy() -> str:
        import asyncpg

        store = PostgresVaultStore(ceiling.dsn)
        try:
            await store.migrate()
        finally:
            await store.close()
        src = await asyncpg.connect(source.dsn, timeout=10)
        dst = await asyncpg.connect(ceiling.dsn, timeout=10)
        try:
            pm = await src.fetchrow("SELECT * FROM payment_methods ORDER BY id LIMIT 1")
            if pm is None:
                raise RuntimeError("no payment method to copy for the commit ceiling")
            keys = {pm["data_key_id"], pm["cvc_data_key_id"]} - {None}
            for table, where, values in (
                ("accounts", "id = $1", [pm["account_id"]]),
                ("data_keys", "id = ANY($1::text[])", [sorted(keys)]),
                ("payment_methods", "id = $1", [pm["id"]]),
            ):
                records = await src.fetch(f"SELECT * FROM {table} WHERE {where}", *values)  # noqa: S608
                await dst.copy_records_to_table(
                    table,
                    records=[tuple(r.values()) for r in records],
                    columns=list(records[0].keys()),
                )
            await dst.execute("CREATE SEQUENCE ceiling_ids")
            # The row as literals (text, integers, booleans, bytea in hex, NULL), its id
            # from the sequence: the statement the vault sends for one row, less binding.
            columns, values = await dst.fetchrow(
                "SELECT string_agg(quote_ident(key), ', ' ORDER BY key), "
                "string_agg(CASE WHEN key = 'id' THEN $2 ELSE quote_nullable(value) END, "
                "', ' ORDER BY key) "
                "FROM payment_methods t, jsonb_each_text(to_jsonb(t)) WHERE t.id = $1",
                pm["id"],
                f"'{CEILING_PREFIX}' || nextval('ceiling_ids')",
            )
            # Quoted by PostgreSQL's quote_ident and quote_nullable.
            return f"INSERT INTO payment_methods ({columns}) VALUES ({values});\n"  # noqa: S608
        finally:
            await src.close()
            await dst.close()

    ceiling.script = directory / "ceiling.sql"
    ceiling.script.write_text(asyncio.run(copy()))
    ceiling.command = [
        pgbench, "-n", "-M", "prepared", "-c", str(args.connections), "-j", "1",
        "-T", str(int(args.seconds)), "-f", str(ceiling.script), "-l",
    ]  # fmt: skip


def measure_ceiling(ceiling: Ceiling, directory: Path, n: int) -> None:
    prefix = directory / f"pgbench-{n}"
    command = [*ceiling.command, f"--log-prefix={prefix}", ceiling.dsn]
    before = snapshot()
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=directory)
    after = snapshot()
    if result.returncode != 0:
        raise RuntimeError(
            f"pgbench exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
        )
    found = re.search(r"number of transactions actually processed: (\d+)", result.stdout)
    tps = re.search(r"tps = ([\d.]+) \(without initial connection time\)", result.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", result.stdout)
    if found is None or tps is None:
        raise RuntimeError(f"pgbench printed no result:\n{result.stdout}")
    commits = int(found.group(1))
    ceiling.commits += commits
    ceiling.seconds += commits / float(tps.group(1))
    ceiling.failed += int(failed.group(1)) if failed else 0
    ceiling.per_round.append(float(tps.group(1)))
    for log in glob.glob(f"{prefix}.*"):
        with open(log) as fh:
            for line in fh:
                parts = line.split()
                # client transaction latency_us script epoch epoch_us
                if len(parts) >= 3 and parts[2].isdigit():
                    ceiling.latency_us[int(parts[2])] += 1
        os.unlink(log)
    cluster = cluster_cpu(before, after)
    client = after.children - before.children
    usage = Usage()
    usage.add(before.machine, after.machine)
    ceiling.per_round_other.append(
        other_jobs(usage, cluster + client) / usage.total if usage.total else 0.0
    )
    ceiling.cluster_cpu += cluster
    ceiling.client_cpu += client
    ceiling.machine.add(before.machine, after.machine)


def run(
    args: argparse.Namespace, directory: Path, wrk: str, pgbench: str | None
) -> tuple[list[Case], Ceiling | None, int | None]:
    pki = make_pki(directory)
    keyd_port = free_port()
    keyd_log = directory / "keyd.log"
    kconf = keyd_config(directory, pki, keyd_port)
    run_cardvault(["keyservice", "init", "--config", str(kconf)], log=directory / "init.log")
    bodies = [b.decode() for b in card_bodies() if b is not None]
    tag = secrets.token_hex(4)
    base = ADMIN_DSN.rsplit("/", 1)[0]
    cases = [
        Case(n, directory / f"w{n}", f"bench_workers_{n}_{tag}", f"{base}/bench_workers_{n}_{tag}")
        for n in args.workers
    ]
    ceiling = (
        Ceiling(f"bench_ceiling_{tag}", f"{base}/bench_ceiling_{tag}")
        if pgbench is not None and not args.no_ceiling
        else None
    )
    keyd_code = None
    try:
        with contextlib.ExitStack() as stack:
            keyd = stack.enter_context(
                cardvault_process(["keyservice", "serve", "--config", str(kconf)], log=keyd_log)
            )
            wait_for_port(keyd_port, keyd, log=keyd_log)
            for case in cases:
                start_case(case, pki, keyd_port, bodies, stack)
            for case in cases:
                for label in (NOOP, TOKENIZE):
                    measure(wrk, case, label, args, keyd.pid, seconds=args.warmup, into=None)
                if case.warmup_failed:
                    print(
                        f"  {case.label} warm-up failures: {dict(case.warmup_failed)}",
                        file=sys.stderr,
                    )
            if ceiling is not None:
                assert pgbench is not None
                prepare_ceiling(ceiling, cases[0], directory, pgbench, args)
            for r in range(args.rounds):
                if args.wait_quiet:
                    wait_quiet(args.wait_quiet)
                for case in cases:
                    for phase in (case.noop, case.tokenize):
                        measure(
                            wrk, case, phase.label, args, keyd.pid, seconds=args.seconds, into=phase
                        )
                        print(
                            f"  round {r + 1}: {case.label:<9} {phase.label:<26} "
                            f"{phase.per_round[-1]:>8,.0f} req/s, other jobs "
                            f"{100 * phase.per_round_other[-1]:.0f}% of the machine",
                            file=sys.stderr,
                            flush=True,
                        )
                if ceiling is not None:
                    measure_ceiling(ceiling, directory, r)
                    print(
                        f"  round {r + 1}: commit ceiling {ceiling.per_round[-1]:>8,.0f} "
                        f"commits/s, other jobs {100 * ceiling.per_round_other[-1]:.0f}% of "
                        "the machine",
                        file=sys.stderr,
                        flush=True,
                    )
            for case in cases:
                stop_case(case)
            time.sleep(1.0)  # the backends' statistics are written when they exit
            for case in cases:
                case.xact_after = transactions(case.database)
                count_log(case)
                rows = pg_fetch(
                    case.dsn,
                    "SELECT count(*), avg(pg_column_size(p)) FROM payment_methods p",
                )
                case.rows, case.row_bytes = int(rows[0][0]), float(rows[0][1] or 0)
            if ceiling is not None:
                rows = pg_fetch(
                    ceiling.dsn,
                    "SELECT avg(pg_column_size(p)) FROM payment_methods p WHERE id LIKE $1",
                    f"{CEILING_PREFIX}%",
                )
                ceiling.row_bytes = float(rows[0][0] or 0)
            keyd.terminate()
            keyd_code = keyd.wait(15)
    finally:
        # The vaults have stopped (the ExitStack stops any still running).
        for name in [c.database for c in cases] + ([ceiling.database] if ceiling else []):
            asyncio.run(admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    return cases, ceiling, keyd_code


# --- the report ---------------------------------------------------------------------


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for n, row in enumerate([header, *rows]):
        print(
            "  ".join(
                [row[0].ljust(widths[0])]
                + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
            )
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))


def report(cases: list[Case], ceiling: Ceiling | None, args: argparse.Namespace) -> None:
    header = (
        "workers", "endpoint", "ok", "req/s", "vs noop", "p50 ms", "p99 ms", "non-200",
        "vault cores", "vault µs", "db µs", "pg µs", "keyd µs", "wrk µs", "irq µs",
        "other µs", "machine",
    )  # fmt: skip
    rows = []
    for case in cases:
        for p in (case.noop, case.tokenize):
            rows.append(
                (
                    str(case.workers),
                    p.label,
                    f"{p.answered:,}",
                    f"{p.per_second:,.0f}",
                    f"{p.per_second / case.noop.per_second:.2f}" if case.noop.per_second else "-",
                    f"{percentile_ms(p.latency_us, 50):.2f}",
                    f"{percentile_ms(p.latency_us, 99):.2f}",
                    str(p.failed + sum(p.errors.values())),
                    f"{p.vault_cpu / p.wall:.2f}" if p.wall else "-",
                    p.us_per(p.vault_cpu),
                    p.us_per(p.db_cpu),
                    p.us_per(p.pg_cpu),
                    p.us_per(p.keyd_cpu),
                    p.us_per(p.client_cpu),
                    p.us_per(p.machine.irq),
                    p.us_per(p.other_cpu),
                    p.machine.percent,
                )
            )
    print()
    table(header, rows)

    print(
        "\nper round (in the order they ran), req/s or commits/s and, in brackets, the share "
        "of the machine's time other jobs used:"
    )
    round_rows = []
    cells = [
        (f"{case.workers} {p.label}", p.per_round, p.per_round_other)
        for case in cases
        for p in (case.noop, case.tokenize)
    ]
    if ceiling is not None:
        cells.append(("commit ceiling", ceiling.per_round, ceiling.per_round_other))
    for name, rates, shares_other in cells:
        round_rows.append(
            (
                name,
                *(f"{v:,.0f} ({100 * o:.0f}%)" for v, o in zip(rates, shares_other, strict=True)),
            )
        )
    for case in cases[1:]:
        for p, q, what in (
            (case.tokenize, cases[0].tokenize, "tokenizations"),
            (case.noop, cases[0].noop, "no-ops"),
        ):
            round_rows.append(
                (
                    f"{what} {case.workers} / {cases[0].workers}",
                    *(
                        f"{a / b:.2f}" if b else "-"
                        for a, b in zip(p.per_round, q.per_round, strict=True)
                    ),
                )
            )
    table(("case", *(f"round {i + 1}" for i in range(args.rounds))), round_rows)

    first = cases[0]
    print()
    for case in cases[1:]:
        tok = (
            case.tokenize.per_second / first.tokenize.per_second if first.tokenize.per_second else 0
        )
        noop = case.noop.per_second / first.noop.per_second if first.noop.per_second else 0
        goal = ""
        if case.workers == 2 and first.workers == 1:
            goal = f" ({'meets' if tok >= 1.4 else 'BELOW'} the goal of 1.4)"
        print(
            f"{case.workers} workers / {first.workers}: tokenizations/s {tok:.2f}{goal}; "
            f"no-op/s {noop:.2f}"
        )

    for case in cases:
        print(f"\n== {case.label} (vault exited with {case.exit_code})")
        t = case.tokenize
        if t.answered and t.vault_cpu and t.pg_cpu:
            print(
                f"CPU per tokenization: vault {t.us_per(t.vault_cpu)} µs "
                f"({t.answered / t.vault_cpu:,.0f} tokenizations/s per vault core), "
                f"PostgreSQL {t.us_per(t.pg_cpu)} µs ({t.answered / t.pg_cpu:,.0f} "
                f"per database core; its backends {t.us_per(t.db_cpu)} µs), key service "
                f"{t.us_per(t.keyd_cpu)} µs, wrk {t.us_per(t.client_cpu)} µs, interrupts "
                f"{t.us_per(t.machine.irq)} µs; other jobs {t.us_per(t.other_cpu)} µs; "
                f"steal {t.us_per(t.machine.steal)} µs"
            )
        if case.workers > 1 and t.worker_cpu:
            total = sum(t.worker_cpu.values())
            shares = ", ".join(
                f"pid {pid} {100 * cpu / total:.0f}%" for pid, cpu in sorted(t.worker_cpu.items())
            )
            print(f"workers' share of the vault's CPU during the tokenization phases: {shares}")
        per_worker: Counter[str] = Counter()
        for (w, ep, s), n in case.log_answers.items():
            if ep == TOKENIZE and s == "200":
                per_worker[w] += n
        total_logged = sum(per_worker.values())
        if total_logged:
            shares = ", ".join(
                f"{w} {n:,} ({100 * n / total_logged:.0f}%)" for w, n in sorted(per_worker.items())
            )
            print(f"tokenizations answered 200, by worker (access log, whole run): {shares}")
        others = {
            f"{w} {ep} {s}": n for (w, ep, s), n in sorted(case.log_answers.items()) if s != "200"
        }
        print(f"answers other than 200 in the access log: {others or 'none'}")
        if case.abandoned:
            print(
                f"  of which {case.abandoned} {TOKENIZE} 400: requests wrk left in flight when "
                "it stopped (no client saw them; the vault logs a request whose client has "
                "left as 400); not failures"
            )
        print(f"audit records by chain: {case.audit_records or 'none found'}")
        commits = case.xact_after[0] - case.xact_before[0]
        rollbacks = case.xact_after[1] - case.xact_before[1]
        if case.logged_200:
            print(
                f"database transactions: {commits:,} committed, {rollbacks:,} rolled back, "
                f"for {case.logged_200:,} tokenizations: {commits / case.logged_200:.3f} per "
                f"tokenization (read-only ones and the run's own checks included)"
            )
        for p in (case.noop, case.tokenize):
            if p.failed or p.errors:
                print(f"{p.label}: statuses {dict(p.statuses)}, wrk errors {dict(p.errors)}")
        if case.warmup_failed:
            print(f"{TOKENIZE} failures during the warm-up: {dict(case.warmup_failed)}")
        if case.restarts:
            print(f"THE VAULT'S PROCESSES CHANGED during {case.restarts} phase(s)")
        stored = "matches" if case.rows == case.logged_200 else "DOES NOT MATCH"
        print(
            f"rows stored: {case.rows:,} ({case.row_bytes:,.0f} bytes each on average) for "
            f"{case.logged_200:,} tokenizations the vault logged as 200 ({stored}); wrk and "
            f"the first check saw {case.tokenized_seen:,} (wrk does not count the answers in "
            "flight when it stops)"
        )
        if not case.valid:
            print("RUN INVALID: a tokenization failed, or the stored rows do not match")

    if ceiling is not None:
        print(
            f"\n== commit ceiling: {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(ceiling.command))} "
            f"(one durable single-row INSERT per transaction into payment_methods, a row the "
            f"vault stored, {ceiling.row_bytes or 0:,.0f} bytes, copied under new ids)"
        )
        us = f"{1e6 * ceiling.cluster_cpu / ceiling.commits:,.0f}" if ceiling.commits else "-"
        client = f"{1e6 * ceiling.client_cpu / ceiling.commits:,.0f}" if ceiling.commits else "-"
        busy = ceiling.machine.percent
        print(
            f"{ceiling.commits:,} commits in {ceiling.seconds:.1f} s = {ceiling.per_second:,.0f}"
            f"/s; p50 {percentile_ms(ceiling.latency_us, 50):.2f} ms, p99 "
            f"{percentile_ms(ceiling.latency_us, 99):.2f} ms; failed {ceiling.failed}; "
            f"PostgreSQL cluster {us} µs per commit, pgbench {client} µs; machine {busy}"
        )
        for case in cases:
            commits = case.xact_after[0] - case.xact_before[0]
            if case.tokenize.per_second and commits:
                rows_per_commit = case.logged_200 / commits
                print(
                    f"{case.label}: {case.tokenize.per_second:,.0f} tokenizations/s at "
                    f"{rows_per_commit:.2f} tokenizations per database transaction = "
                    f"{case.tokenize.per_second / rows_per_commit:,.0f} transactions/s, "
                    f"{100 * case.tokenize.per_second / rows_per_commit / ceiling.per_second:.0f}% "
                    "of the ceiling"
                )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--seconds", type=int, default=10, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every phase")
    parser.add_argument(
        "--warmup", type=int, default=2, help="seconds of each endpoint per vault first"
    )
    parser.add_argument("--connections", type=int, default=32, help="wrk's and pgbench's")
    parser.add_argument("--threads", type=int, default=1, help="wrk's threads")
    parser.add_argument(
        "--no-ceiling", action="store_true", help="do not measure the commit ceiling"
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="S",
        help="before each round, wait up to S seconds for the machine to be less than 15%% busy",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    try:
        args.workers = [int(n) for n in args.workers.split(",") if n.strip()]
    except ValueError:
        parser.error("--workers takes comma-separated numbers")
    if not args.workers or min(args.workers) < 1 or len(set(args.workers)) != len(args.workers):
        parser.error("--workers takes distinct positive numbers")
    if args.wait_quiet < 0:
        parser.error("--wait-quiet cannot be negative")
    if min(args.seconds, args.rounds, args.warmup, args.connections, args.threads) < 1:
        parser.error("--seconds, --rounds, --warmup, --connections and --threads must be >= 1")
    if args.threads > args.connections:
        parser.error("--threads cannot exceed --connections")
    wrk = find_wrk()
    pgbench = None if args.no_ceiling else find_pgbench()
    if pgbench is None and not args.no_ceiling:
        print("pgbench not found: the commit ceiling is not measured", file=sys.stderr)

    load_before = os.getloadavg()
    directory = Path(tempfile.mkdtemp(prefix="cardvault-workers-"))
    try:
        cases, ceiling, keyd_code = run(args, directory, wrk, pgbench)
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)
    load_after = os.getloadavg()

    version = pg_fetch(ADMIN_DSN, "SHOW server_version")[0][0]
    sync = pg_fetch(ADMIN_DSN, "SHOW synchronous_commit")[0][0]
    wrk_version = subprocess.run([wrk, "-v"], capture_output=True, text=True, check=False)
    print(
        f"\nvault workers on PostgreSQL, load from wrk ({(wrk_version.stdout or wrk_version.stderr).split(' [')[0].strip()}): "
        f"{args.connections} HTTPS keep-alive connections, {args.threads} thread(s); "
        f"{args.rounds} rounds of {args.seconds} s per worker count and endpoint, no-op "
        f"and tokenization alternating, after {args.warmup} s of each; one run\n"
        "vault: production profile, JSON access log at info level, rate limit raised, "
        f"each worker count on a database of its own; PostgreSQL {version}, "
        f"synchronous_commit = {sync}\n"
        f"{platform.python_implementation()} {platform.python_version()}; {os.cpu_count()} "
        "CPUs shared by wrk, the vaults, the key service and PostgreSQL; load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (the run's own load "
        "included)\n"
        "vault cores: the vault's CPU (parent and workers) over the phase's time; µs: CPU "
        "time per answered request of the vault, the run's database's backends (db), those "
        "and PostgreSQL's own processes (pg), the key service and wrk, the machine's interrupt time (irq: "
        "the loopback network's work is there) and its busy time none of those used (other: "
        "other jobs); machine: % of all cores busy"
    )
    report(cases, ceiling, args)
    print(
        f"\nkey service exited with {keyd_code}" + (f"; files in {directory}" if args.keep else "")
    )
    ok = all(c.valid for c in cases) and keyd_code == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
