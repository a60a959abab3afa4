"""Benchmark forwarding: the latency a forward adds over calling the acquirer directly.

Starts real processes in a temporary directory: a key service (development profile and
seal, SQLite), the simulated acquirer (``examples/acquirer``, HTTPS), and a vault
(production profile: JSON logs at the default info level, as in production) on SQLite
with a one-destination forwarding allowlist pointing at the acquirer. A fresh deployment
CA issues every certificate. The only non-default vault setting is the per-key rate
limit (``limits.secret_rate``/``secret_burst``), raised so that it does not throttle.
Each service has its own directory, so each keeps its audit log next to its store (the
default); the report counts the vault's audit records per forward.

Three cases, measured in the same run against the same acquirer process:

* DIRECT: ``POST /v1/authorizations`` to the acquirer, a JSON body with the published
  test card 4242424242424242 and no CVC;
* FORWARD: ``POST /v1/forwarding/requests`` to the vault (form-encoded, as Stripe's
  libraries send it, with a test secret key), naming one of ``--payment-methods``
  payment methods made beforehand (the same card, no CVC, so no forward consumes a
  CVC), ``replacements`` ``card_number`` and ``card_expiry``, and a body with an empty
  ``card`` object the vault fills in. The acquirer receives the same JSON as DIRECT.
* PASSTHROUGH: the DIRECT request sent through ``bench/_passthrough.py``, a bare HTTPS
  hop on the vault's transport (uvicorn, uvloop, cardvault's TLS context in; one pooled
  aiohttp session out) with nothing of the vault in it: no framework, authentication,
  logging, crypto or storage. PASSTHROUGH − DIRECT is the floor: what any Python hop
  adds on this machine, which the vault's own work comes on top of.

The acquirer declines a card without a CVC (``402 incorrect_cvc``): that is the answer
both cases get, counted; latency does not depend on it. Every forward must be a 200
whose ``response_details.status`` is the acquirer's 200 or 402.

The load is aiohttp over HTTPS keep-alive (one ``TCPConnector(limit=N)`` per case and
concurrency level), each of N workers waiting for its previous answer. Per concurrency
level: a 1 s warm-up of each case, then ``--rounds`` DIRECT/PASSTHROUGH/FORWARD rounds sharing
``--seconds`` per case, so that drift on the shared machine hits both alike. The
forward's added latency is FORWARD minus DIRECT at the same percentile.

    .venv/bin/python bench/forward.py --seconds 10
    .venv/bin/python bench/forward.py --concurrency 32 --seconds 30 --keep
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
from _common import cardvault_process, free_port, run_cardvault, wait_for_port

from cardvault.transport.certs import init_ca
from cardvault.transport.tls import client_context

ROOT = Path(__file__).resolve().parents[1]
DIRECT = "DIRECT acquirer"
PASSTHROUGH = "PASSTHROUGH bare hop"
FORWARD = "FORWARD via vault"
WARMUP_S = 1.0
#: Stripe's published Visa test card: the only card number this benchmark sends.
TEST_CARD = "4242424242424242"
DIRECT_BODY = json.dumps(
    {
        "amount": 1000,
        "currency": "usd",
        "card": {"number": TEST_CARD, "exp_month": 12, "exp_year": 2034},
    },
    separators=(",", ":"),
).encode()
FORWARD_TEMPLATE = '{"amount":1000,"currency":"usd","card":{}}'
ACQUIRER_ANSWERS = (200, 402)
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- the deployment -----------------------------------------------------------------


@dataclass
class Deployment:
    directory: Path
    ca: Path
    keyd_port: int
    acquirer_port: int
    vault_port: int
    passthrough_port: int
    keyd_config: Path
    vault_config: Path
    acquirer_args: list[str]

    @property
    def acquirer_url(self) -> str:
        return f"https://localhost:{self.acquirer_port}/v1/authorizations"

    @property
    def vault_url(self) -> str:
        return f"https://localhost:{self.vault_port}"

    @property
    def passthrough_url(self) -> str:
        return f"https://localhost:{self.passthrough_port}/v1/authorizations"

    @property
    def passthrough_args(self) -> list[str]:
        pki = self.directory / "pki"
        return [
            str(ROOT / "bench" / "_passthrough.py"),
            "--port", str(self.passthrough_port),
            "--cert", str(pki / "vault.pem"),
            "--key", str(pki / "vault.key"),
            "--ca", str(self.ca),
            "--target", self.acquirer_url,
        ]  # fmt: skip


def write_deployment(directory: Path) -> Deployment:
    """Certificates, the key service's and the vault's configurations, the allowlist."""
    ca = init_ca(directory / "pki")
    keyd = ca.issue("keyd", dns=["localhost"], ips=["127.0.0.1"])
    vault = ca.issue("vault", dns=["localhost"], ips=["127.0.0.1"], client_identity="vault")
    acquirer = ca.issue("acquirer", dns=["localhost"], ips=["127.0.0.1"])
    keyd_port, acquirer_port, vault_port = free_port(), free_port(), free_port()
    passthrough_port = free_port()
    # One directory per service: each keeps its audit log next to its SQLite store.
    keyd_dir, vault_dir = directory / "keyd", directory / "vault"
    keyd_dir.mkdir(mode=0o700)
    vault_dir.mkdir(mode=0o700)

    keyd_config = directory / "keyd.toml"
    keyd_config.write_text(
        'profile = "development"\n'
        "[server]\n"
        f'host = "127.0.0.1"\nport = {keyd_port}\n'
        f'cert_file = "{keyd.cert_path}"\nkey_file = "{keyd.key_path}"\n'
        f'client_ca_file = "{ca.cert_path}"\n'
        f'[store]\nurl = "sqlite:///{keyd_dir / "keyd.db"}"\n'
        f'[seal]\ntype = "dev"\ndev_key_file = "{keyd_dir / "root.key"}"\n'
    )
    allowlist = directory / "allowlist.toml"
    allowlist.write_text(
        "[[destination]]\n"
        'name = "acquirer"\n'
        f'url = "https://localhost:{acquirer_port}/v1/authorizations"\n'
        'methods = ["POST"]\n'
        'replacements = ["card_number", "card_expiry"]\n'
        'accounts = ["*"]\n'
        f'ca_file = "{ca.cert_path}"\n'
        "[destination.placements]\n"
        'card_number = { json = "/card/number" }\n'
        'card_expiry = { json_month = "/card/exp_month", json_year = "/card/exp_year" }\n'
    )
    vault_config = directory / "vault.toml"
    vault_config.write_text(
        # The production profile: JSON log lines at the default level (info).
        'profile = "production"\n'
        "[server]\n"
        f'host = "127.0.0.1"\nport = {vault_port}\n'
        f'cert_file = "{vault.cert_path}"\nkey_file = "{vault.key_path}"\n'
        f'[store]\nurl = "sqlite:///{vault_dir / "vault.db"}"\n'
        "[keyservice]\n"
        f'url = "https://localhost:{keyd_port}"\nca_file = "{ca.cert_path}"\n'
        f'cert_file = "{vault.cert_path}"\nkey_file = "{vault.key_path}"\n'
        f'[forwarding]\nallowlist_file = "{allowlist}"\n'
        # The only non-default: the per-key rate limit must not throttle the load.
        "[limits]\nsecret_rate = 1000000.0\nsecret_burst = 1000000.0\n"
    )
    acquirer_args = [
        str(ROOT / "examples" / "acquirer" / "__main__.py"),
        "--host", "127.0.0.1",
        "--port", str(acquirer_port),
        "--cert", str(acquirer.cert_path),
        "--key", str(acquirer.key_path),
        "--state", str(directory / "acquirer"),
    ]  # fmt: skip
    return Deployment(
        directory,
        ca.cert_path,
        keyd_port,
        acquirer_port,
        vault_port,
        passthrough_port,
        keyd_config,
        vault_config,
        acquirer_args,
    )


@contextlib.contextmanager
def python_process(args: list[str], *, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``python ARGS`` (the acquirer) as a child process; SIGTERM it afterwards."""
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, *args],
            stdout=fh,
            stderr=fh,
            cwd=ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def create_account(config: Path, log: Path) -> str:
    """A new account; its test-mode secret key."""
    result = subprocess.run(
        [sys.executable, "-m", "cardvault", "accounts", "create", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    with open(log, "a") as fh:
        fh.write(result.stderr)
    found = re.search(r"^secret \(test\)\s+(sk_test_\S+)\s*$", result.stdout, re.M)
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"accounts create failed ({result.returncode}):\n{result.stderr}")
    return found.group(1)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


# --- the load -----------------------------------------------------------------------


@dataclass
class Totals:
    """One case's measured phases at one concurrency level, added up."""

    label: str
    concurrency: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list, repr=False)
    acquirer_status: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    #: CPU seconds used during the measured phases, by process.
    cpu: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))

    @property
    def ok(self) -> int:
        return len(self.latencies)

    @property
    def per_second(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile of the successful requests' latencies, in ms."""
        ordered = sorted(self.latencies)
        if not ordered:
            return float("nan")
        rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
        return ordered[rank - 1] * 1000

    def cpu_us_per_request(self, process: str) -> float:
        return self.cpu[process] / self.ok * 1e6 if self.ok else float("nan")


@dataclass
class Case:
    """How to send one request of a case and judge its answer.

    ``check`` gets the HTTP status and body and returns the acquirer's status, or raises
    ``ValueError`` with a short description that holds no card data."""

    label: str
    url: str
    headers: dict[str, str]
    bodies: Iterator[bytes]
    check: Callable[[int, bytes], int]


def check_direct(status: int, body: bytes) -> int:
    if status not in ACQUIRER_ANSWERS:
        raise ValueError(f"acquirer answered {status}")
    return status


def check_forward(status: int, body: bytes) -> int:
    if status != 200:
        # The vault's error bodies never hold card data.
        raise ValueError(f"vault answered {status}: {body[:300].decode(errors='replace')}")
    answered = json.loads(body)["response_details"]["status"]
    if answered not in ACQUIRER_ANSWERS:
        raise ValueError(f"acquirer answered {answered} through the vault")
    return int(answered)


async def load(
    session: aiohttp.ClientSession,
    case: Case,
    *,
    concurrency: int,
    seconds: float,
    into: Totals | None,
    pids: dict[str, int],
) -> None:
    """``concurrency`` workers, each sending its next request when the previous one is
    answered, for ``seconds``. Counted into ``into`` (None: warm-up)."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    failures: Counter[str] = Counter()
    examples: list[str] = []

    async def worker(until: float) -> None:
        while True:
            started = time.perf_counter()
            if started >= until:
                return
            try:
                async with session.post(
                    case.url, data=next(case.bodies), headers=case.headers
                ) as response:
                    payload = await response.read()
                    status = response.status
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures[type(exc).__name__] += 1
                continue
            elapsed = time.perf_counter() - started
            try:
                statuses[case.check(status, payload)] += 1
            except (ValueError, KeyError, TypeError) as exc:
                failures[str(status)] += 1
                if len(examples) < 3:
                    examples.append(str(exc))
                continue
            latencies.append(elapsed)

    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    client0 = time.process_time()
    began = time.perf_counter()
    await asyncio.gather(*(worker(began + seconds) for _ in range(concurrency)))
    # Requests in flight at the deadline finish and count; the elapsed time includes them.
    elapsed = time.perf_counter() - began
    if into is not None:
        into.seconds += elapsed
        into.latencies += latencies
        into.acquirer_status.update(statuses)
        into.failures.update(failures)
        into.examples += examples[: max(0, 3 - len(into.examples))]
        for name, pid in pids.items():
            into.cpu[name] += cpu_seconds(pid) - cpu0[name]
        into.cpu["client"] += time.process_time() - client0
    elif failures:
        listed = ", ".join(f"{k}: {v}" for k, v in failures.items())
        print(f"  warm-up {case.label}: failures {listed}; {examples}", file=sys.stderr)


async def make_payment_methods(
    session: aiohttp.ClientSession, base: str, secret_key: str, count: int
) -> list[str]:
    """``count`` payment methods for the test card, without a CVC."""
    form = urlencode(
        {
            "type": "card",
            "card[number]": TEST_CARD,
            "card[exp_month]": "12",
            "card[exp_year]": "2034",
        }
    ).encode()
    headers = {
        "authorization": f"Bearer {secret_key}",
        "content-type": "application/x-www-form-urlencoded",
    }

    async def one() -> str:
        async with session.post(f"{base}/v1/payment_methods", data=form, headers=headers) as r:
            created = await r.json()
            if r.status != 200 or not str(created.get("id", "")).startswith("pm_"):
                raise RuntimeError(f"POST /v1/payment_methods answered {r.status}: {created}")
            return str(created["id"])

    ids: list[str] = []
    for start in range(0, count, 32):
        ids += await asyncio.gather(*(one() for _ in range(min(32, count - start))))
    return ids


def forward_bodies(deployment: Deployment, payment_methods: list[str]) -> Iterator[bytes]:
    bodies = [
        urlencode(
            {
                "payment_method": pm,
                "url": deployment.acquirer_url,
                "replacements[0]": "card_number",
                "replacements[1]": "card_expiry",
                "request[headers][0][name]": "Content-Type",
                "request[headers][0][value]": "application/json",
                "request[body]": FORWARD_TEMPLATE,
            }
        ).encode()
        for pm in payment_methods
    ]
    return itertools.cycle(bodies)


async def drive(
    deployment: Deployment,
    secret_key: str,
    *,
    pids: dict[str, int],
    seconds: float,
    rounds: int,
    levels: list[int],
    payment_methods: int,
) -> list[tuple[Totals, Totals, Totals]]:
    ssl_context = client_context(deployment.ca)
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=32, ssl=ssl_context)
    ) as session:
        pms = await make_payment_methods(session, deployment.vault_url, secret_key, payment_methods)
    print(f"  {len(pms)} payment methods made", file=sys.stderr, flush=True)

    direct = Case(
        DIRECT,
        deployment.acquirer_url,
        {"content-type": "application/json"},
        itertools.repeat(DIRECT_BODY),
        check_direct,
    )
    passthrough = Case(
        PASSTHROUGH,
        deployment.passthrough_url,
        {"content-type": "application/json"},
        itertools.repeat(DIRECT_BODY),
        check_direct,
    )
    forward = Case(
        FORWARD,
        f"{deployment.vault_url}/v1/forwarding/requests",
        {
            "authorization": f"Bearer {secret_key}",
            "content-type": "application/x-www-form-urlencoded",
        },
        forward_bodies(deployment, pms),
        check_forward,
    )
    cases = (direct, passthrough, forward)
    results: list[tuple[Totals, Totals, Totals]] = []
    for concurrency in levels:
        # One client session per case, so that neither shares the other's connections.
        sessions = {
            case.label: aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=concurrency, ssl=ssl_context)
            )
            for case in cases
        }
        try:
            for case in cases:
                await load(
                    sessions[case.label],
                    case,
                    concurrency=concurrency,
                    seconds=WARMUP_S,
                    into=None,
                    pids=pids,
                )
            totals = {case.label: Totals(case.label, concurrency) for case in cases}
            for _ in range(rounds):
                for case in cases:
                    await load(
                        sessions[case.label],
                        case,
                        concurrency=concurrency,
                        seconds=seconds / rounds,
                        into=totals[case.label],
                        pids=pids,
                    )
                    t = totals[case.label]
                    print(
                        f"  {case.label:<18} c={concurrency:<3} {t.per_second:>8,.0f} req/s, "
                        f"p50 {t.percentile(50):.2f} ms so far",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            for session in sessions.values():
                await session.close()
        results.append((totals[DIRECT], totals[PASSTHROUGH], totals[FORWARD]))
    return results


# --- the report ---------------------------------------------------------------------


def audit_actions(directory: Path) -> Counter[str]:
    """The vault's audit records by action (``audit.jsonl`` next to its SQLite store)."""
    actions: Counter[str] = Counter()
    path = directory / "vault" / "audit.jsonl"
    if not path.exists():
        return actions
    for line in path.read_text(errors="replace").splitlines():
        try:
            actions[str(json.loads(line).get("action"))] += 1
        except ValueError:
            continue
    return actions


def print_report(
    results: list[tuple[Totals, Totals, Totals]],
    args: argparse.Namespace,
    rows: int | None,
    audit: Counter[str],
) -> bool:
    cpus = os.cpu_count()
    print(
        f"\nforwarding vs calling the acquirer directly; HTTPS keep-alive from the load "
        f"generator to each server; {args.seconds:g} s per case and concurrency level, in "
        f"{args.rounds} alternating DIRECT/PASSTHROUGH/FORWARD rounds after a {WARMUP_S:g} s warm-up "
        f"of each; one run\n"
        f"{platform.python_implementation()} {platform.python_version()}; the acquirer, "
        f"the vault, the key service and the load generator share {cpus} CPUs\n"
        f"FORWARD includes: TLS and HTTP into the vault, key check and rate limit, the "
        f"payment method read and decrypted, the request built twice (real, redacted), "
        f"TLS and HTTP to the acquirer on the vault's pooled connection, the response "
        f"masked, a durable SQLite commit of the redacted forwarding record, and the "
        f"vault's audit-log records (each fsynced before the vault goes on; counted "
        f"below)\n"
    )
    header = ("case", "conc", "req/s", "p50 ms", "p99 ms", "answers", "hop CPU µs/req",
              "acquirer CPU µs/req", "client CPU µs/req")  # fmt: skip
    table: list[tuple[str, ...]] = []
    for direct, passthrough, forward in results:
        for t in (direct, passthrough, forward):
            answers = " ".join(f"{s}:{n}" for s, n in sorted(t.acquirer_status.items()))
            if t.failures:
                answers += " FAILED " + " ".join(f"{k}:{v}" for k, v in t.failures.items())
            table.append(
                (
                    t.label,
                    str(t.concurrency),
                    f"{t.per_second:,.0f}",
                    f"{t.percentile(50):.2f}",
                    f"{t.percentile(99):.2f}",
                    answers,
                    f"{t.cpu_us_per_request('vault'):,.0f}"
                    if t is forward
                    else f"{t.cpu_us_per_request('passthrough'):,.0f}"
                    if t is passthrough
                    else "-",
                    f"{t.cpu_us_per_request('acquirer'):,.0f}",
                    f"{t.cpu_us_per_request('client'):,.0f}",
                )
            )
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in table:
        print(line(row))

    print("\nadded by the vault (FORWARD − DIRECT, same run; goal ≤ 1 ms at p50):")
    for direct, _, forward in results:
        p50 = forward.percentile(50) - direct.percentile(50)
        p99 = forward.percentile(99) - direct.percentile(99)
        verdict = "within" if p50 <= 1.0 else "above"
        print(
            f"  concurrency {direct.concurrency:>3}: p50 {p50:+.2f} ms ({verdict} the goal), "
            f"p99 {p99:+.2f} ms; throughput {forward.per_second / direct.per_second:.2f}× "
            f"direct"
        )
    print("the floor: a bare Python HTTPS hop (PASSTHROUGH − DIRECT, same run):")
    for direct, passthrough, forward in results:
        floor = passthrough.percentile(50) - direct.percentile(50)
        own = forward.percentile(50) - passthrough.percentile(50)
        print(
            f"  concurrency {direct.concurrency:>3}: p50 {floor:+.2f} ms, "
            f"p99 {passthrough.percentile(99) - direct.percentile(99):+.2f} ms; "
            f"throughput {passthrough.per_second / direct.per_second:.2f}× direct; "
            f"the vault's own work above it: p50 {own:+.2f} ms"
        )
    forwards = sum(f.ok + sum(f.failures.values()) for _, _, f in results)
    valid = all(not t.failures and t.ok for triple in results for t in triple)
    if rows is not None:
        print(
            f"\nforwarding records stored: {rows:,} (measured forwards {forwards:,}, plus warm-ups)"
        )
        forward_audit = {a: n for a, n in audit.items() if a.startswith("forward.")}
        if rows and forward_audit:
            listed = ", ".join(f"{a} {n / rows:.2f}" for a, n in sorted(forward_audit.items()))
            print(f"audit records per stored forward: {listed}")
    print(
        "Every process is single-threaded Python sharing the same cores, and each worker "
        "waits for its answer (a closed loop): above concurrency 1, latency is about "
        "concurrency / throughput, so the added p50 there measures the vault's "
        "throughput, and p99 is mostly queueing for CPU."
    )
    if not valid:
        print("\nINVALID RUN: some requests failed (see 'answers'):")
        for triple in results:
            for t in triple:
                for example in t.examples:
                    print(f"  {t.label} c={t.concurrency}: {example}")
    return valid


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per case")
    parser.add_argument(
        "--concurrency",
        default="1,32",
        help="comma-separated numbers of keep-alive connections (default 1,32)",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds of the three cases per concurrency (5)"
    )
    parser.add_argument(
        "--payment-methods", type=int, default=200, help="payment methods forwarded (200)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    levels = [int(part) for part in args.concurrency.split(",") if part.strip()]

    directory = Path(tempfile.mkdtemp(prefix="cardvault-bench-forward-"))
    deployment = write_deployment(directory)
    keyd_log, vault_log = directory / "keyd.log", directory / "vault.log"
    acquirer_log = directory / "acquirer.log"
    passthrough_log = directory / "passthrough.log"
    run_cardvault(["keyservice", "init", "--config", str(deployment.keyd_config)], log=keyd_log)
    secret_key = create_account(deployment.vault_config, vault_log)

    codes: dict[str, int | None] = {}
    rows: int | None = None
    with (
        python_process(deployment.acquirer_args, log=acquirer_log) as acquirer,
        python_process(deployment.passthrough_args, log=passthrough_log) as passthrough,
        cardvault_process(
            ["keyservice", "serve", "--config", str(deployment.keyd_config)], log=keyd_log
        ) as keyd,
    ):
        wait_for_port(deployment.acquirer_port, acquirer, log=acquirer_log)
        wait_for_port(deployment.passthrough_port, passthrough, log=passthrough_log)
        wait_for_port(deployment.keyd_port, keyd, log=keyd_log)
        with cardvault_process(
            ["vault", "serve", "--config", str(deployment.vault_config)], log=vault_log
        ) as vault:
            wait_for_port(deployment.vault_port, vault, log=vault_log)
            print(
                f"vault pid {vault.pid}, acquirer pid {acquirer.pid}, key service pid "
                f"{keyd.pid}; logs in {directory}",
                file=sys.stderr,
                flush=True,
            )
            try:
                import uvloop

                loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
            except ImportError:
                loop_factory = None
            with asyncio.Runner(loop_factory=loop_factory) as runner:
                results = runner.run(
                    drive(
                        deployment,
                        secret_key,
                        pids={
                            "vault": vault.pid,
                            "acquirer": acquirer.pid,
                            "passthrough": passthrough.pid,
                        },
                        seconds=args.seconds,
                        rounds=args.rounds,
                        levels=levels,
                        payment_methods=args.payment_methods,
                    )
                )
            vault.terminate()
            codes["vault"] = vault.wait(30)
        keyd.terminate()
        codes["key service"] = keyd.wait(15)
        acquirer.terminate()
        codes["acquirer"] = acquirer.wait(15)
        passthrough.terminate()
        codes["passthrough"] = passthrough.wait(15)

    with contextlib.closing(sqlite3.connect(directory / "vault" / "vault.db")) as db:
        (rows,) = db.execute("SELECT count(*) FROM forwarding_requests").fetchone()
    valid = print_report(results, args, int(rows), audit_actions(directory))
    print(
        "exit codes: " + ", ".join(f"{name} {code}" for name, code in codes.items())
        + (f"; kept: {directory}" if args.keep else "")
    )  # fmt: skip
    if not args.keep:
        shutil.rmtree(directory)
    return 0 if valid and all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
