"""Benchmark forwarding: the latency a forward adds over calling the acquirer directly.

Starts real processes in a temporary directory: a key service (development profile and
seal, SQLite), the simulated acquirer (``examples/acquirer``, HTTPS), and a vault
(production profile: JSON logs at the default info level, as in production) on SQLite
with a one-destination forwarding allowlist pointing at the acquirer. A fresh deployment
CA issues every certificate. The only non-default vault setting is the per-key rate
limit (``limits.secret_rate``/``secret_burst``), raised so that it does not throttle.
Each service has its own directory, so each keeps its audit log next to its store (the
default); the report counts the vault's audit records per forward.

The cases, measured in the same run against the same processes:

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
* TOKENIZE: ``POST /v1/payment_methods`` to the same vault (the same card, form-encoded,
  the secret key): the vault's CPU per forward is compared with its CPU per
  tokenization, measured here in the same run.
* NOOP and BARE NOOP (the wrk client only): the vault's ``POST /v1/noop`` and the same
  request to ``bench/_bare_noop.py``, stock uvicorn + Starlette over the vault's TLS
  context with nothing else: the cost of the vault's request pipeline.

The acquirer declines a card without a CVC (``402 incorrect_cvc``): that is the answer
both cases get, counted; latency does not depend on it. Every forward must be a 200
whose ``response_details.status`` is the acquirer's 200 or 402.

Two load generators, one after the other:

* python: aiohttp over HTTPS keep-alive (one ``TCPConnector(limit=N)`` per case and
  concurrency level), each of N workers waiting for its previous answer. Per concurrency
  level: a 1 s warm-up of each case, then ``--rounds`` DIRECT/PASSTHROUGH/FORWARD/TOKENIZE
  rounds sharing ``--seconds`` per case, so that drift on the shared machine hits all
  alike.
* wrk (``--clients``; Debian's ``wrk`` on PATH): ``wrk -t 1 -c N`` with a Lua script
  that rotates the same bodies and counts the answers by status, so that the load
  generator's own CPU (C, one thread) hides less of the servers'. Per concurrency level,
  a 1 s warm-up of each case, then ``--rounds`` rounds of every case sharing
  ``--wrk-seconds`` per case; p50 and p99 are the median of the rounds' (wrk's
  percentiles cannot be merged). wrk does not verify certificates: acceptable for a
  load generator against local listeners. Its answers are not parsed, only counted.

The forward's added latency is FORWARD minus DIRECT at the same percentile; the report
ends with the goals of issue 21, for each client. With ``--before-src DIR`` (the ``src``
of another tree, e.g. a worktree of an earlier commit) a second vault, with its own key
service, runs that tree's code beside this one's, and its FORWARD, TOKENIZE and NOOP
cases run in the same rounds: a before/after comparison in one run.

    .venv/bin/python bench/forward.py --seconds 10
    .venv/bin/python bench/forward.py --before-src /tmp/cv-before/src
    .venv/bin/python bench/forward.py --clients wrk --wrk-seconds 10
    .venv/bin/python bench/forward.py --concurrency 32 --seconds 30 --keep
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
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
from typing import Any
from urllib.parse import urlencode

import aiohttp
from _common import cardvault_process, free_port, run_cardvault, wait_for_port

from cardvault.transport.certs import init_ca
from cardvault.transport.tls import client_context

ROOT = Path(__file__).resolve().parents[1]
DIRECT = "DIRECT acquirer"
PASSTHROUGH = "PASSTHROUGH bare hop"
FORWARD = "FORWARD via vault"
TOKENIZE = "TOKENIZE vault"
NOOP = "NOOP vault"
BARE_NOOP = "NOOP bare Starlette"
#: The process whose CPU is each case's "hop CPU" (filled as the cases are made).
HOPS = {PASSTHROUGH: "passthrough", BARE_NOOP: "bare"}
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
TOKENIZE_BODY = urlencode(
    {
        "type": "card",
        "card[number]": TEST_CARD,
        "card[exp_month]": "12",
        "card[exp_year]": "2034",
    }
).encode()
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
    bare_port: int
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
    def bare_args(self) -> list[str]:
        pki = self.directory / "pki"
        return [
            str(ROOT / "bench" / "_bare_noop.py"),
            "--port", str(self.bare_port),
            "--cert", str(pki / "vault.pem"),
            "--key", str(pki / "vault.key"),
        ]  # fmt: skip

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
    passthrough_port, bare_port = free_port(), free_port()
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
        bare_port,
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


def check_tokenize(status: int, body: bytes) -> int:
    if status != 200:
        raise ValueError(f"vault answered {status}: {body[:300].decode(errors='replace')}")
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
    return itertools.cycle(forward_body_list(deployment, payment_methods))


def forward_body_list(deployment: Deployment, payment_methods: list[str]) -> list[bytes]:
    return [
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


@dataclass
class Vault:
    """A vault the cases measure: this tree's (``vault``) or, with ``--before-src``,
    another tree's (``before``), each with its own key service, store and account."""

    name: str
    deployment: Deployment
    secret_key: str
    pms: list[str] = field(default_factory=list)

    def label(self, case: str) -> str:
        """``FORWARD``, ``TOKENIZE`` or ``NOOP``: the case's label for this vault."""
        own = {"FORWARD": FORWARD, "TOKENIZE": TOKENIZE, "NOOP": NOOP}[case]
        label = own if self.name == "vault" else f"{case} {self.name}"
        HOPS[label] = self.name
        return label


def python_cases(deployment: Deployment, vaults: list[Vault]) -> list[Case]:
    cases = [
        Case(
            DIRECT,
            deployment.acquirer_url,
            {"content-type": "application/json"},
            itertools.repeat(DIRECT_BODY),
            check_direct,
        ),
        Case(
            PASSTHROUGH,
            deployment.passthrough_url,
            {"content-type": "application/json"},
            itertools.repeat(DIRECT_BODY),
            check_direct,
        ),
    ]
    for vault in vaults:
        keyed = {
            "authorization": f"Bearer {vault.secret_key}",
            "content-type": "application/x-www-form-urlencoded",
        }
        url = vault.deployment.vault_url
        cases += [
            Case(
                vault.label("FORWARD"),
                f"{url}/v1/forwarding/requests",
                keyed,
                forward_bodies(vault.deployment, vault.pms),
                check_forward,
            ),
            Case(
                vault.label("TOKENIZE"),
                f"{url}/v1/payment_methods",
                keyed,
                itertools.repeat(TOKENIZE_BODY),
                check_tokenize,
            ),
        ]
    return cases


async def drive(
    deployment: Deployment,
    vaults: list[Vault],
    *,
    pids: dict[str, int],
    seconds: float,
    rounds: int,
    levels: list[int],
) -> list[dict[str, Totals]]:
    # One bundle of every deployment's CA (a "before" vault has its own).
    bundle = deployment.directory / "client-cas.pem"
    cas = dict.fromkeys([deployment.ca, *(vault.deployment.ca for vault in vaults)])
    bundle.write_bytes(b"".join(ca.read_bytes() for ca in cas))
    ssl_context = client_context(bundle)
    cases = python_cases(deployment, vaults)
    results: list[dict[str, Totals]] = []
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
                        f"  python {case.label:<20} c={concurrency:<3} {t.per_second:>8,.0f} "
                        f"req/s, p50 {t.percentile(50):.2f} ms so far",
                        file=sys.stderr,
                        flush=True,
                    )
        finally:
            for session in sessions.values():
                await session.close()
        results.append(totals)
    return results


# --- the wrk client -----------------------------------------------------------------

#: The Lua script of every wrk case. Arguments: a file of bodies (one per line, sent in
#: turn; an empty line is an empty body), then "name: value" headers. Prints one line,
#: ``WRK_RESULT {json}``: requests, duration, p50/p99 in µs, socket errors, statuses.
WRK_SCRIPT = r"""
local bodies, count, i = {}, 0, 0
local headers = {}
statuses = {}

function init(args)
  for line in io.lines(args[1]) do
    count = count + 1
    bodies[count] = line
  end
  for k = 2, #args do
    local name, value = args[k]:match("^([^:]+):%s*(.*)$")
    headers[name] = value
  end
end

function request()
  i = i % count + 1
  return wrk.format("POST", nil, headers, bodies[i])
end

function response(status, hdrs, body)
  statuses[status] = (statuses[status] or 0) + 1
end

local threads = {}
function setup(thread)
  table.insert(threads, thread)
end

function done(summary, latency, requests)
  local counts = {}
  for _, t in ipairs(threads) do
    for s, c in pairs(t:get("statuses")) do
      counts[tostring(s)] = (counts[tostring(s)] or 0) + c
    end
  end
  local parts = {}
  for s, c in pairs(counts) do
    table.insert(parts, string.format('"%s":%d', s, c))
  end
  local e = summary.errors
  io.write(string.format(
    'WRK_RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p99_us":%d,' ..
    '"errors":%d,"statuses":{%s}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, table.concat(parts, ",")))
end
"""


@dataclass
class WrkCase:
    label: str
    url: str
    bodies: Path
    headers: list[str]
    #: The process whose CPU is this case's "hop CPU".
    hop: str | None
    #: The statuses that count as answered.
    ok: tuple[int, ...]


@dataclass
class WrkTotals:
    """One wrk case's measured rounds at one concurrency level."""

    label: str
    concurrency: int
    seconds: float = 0.0
    requests: int = 0
    p50s: list[float] = field(default_factory=list)
    p99s: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    cpu: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float:
        """The median of the rounds' p50 (``q`` 50) or p99 (99), in ms."""
        values = sorted(self.p50s if q == 50 else self.p99s)
        return values[len(values) // 2] if values else float("nan")

    def cpu_us_per_request(self, process: str) -> float:
        return self.cpu[process] / self.requests * 1e6 if self.requests else float("nan")


def write_bodies(path: Path, bodies: list[bytes]) -> Path:
    path.write_bytes(b"".join(body + b"\n" for body in bodies))
    return path


def wrk_cases(deployment: Deployment, vaults: list[Vault]) -> list[WrkCase]:
    d = deployment.directory
    as_json = ["Content-Type: application/json"]
    direct = write_bodies(d / "wrk-direct.txt", [DIRECT_BODY])
    noop = write_bodies(d / "wrk-noop.txt", [b""])
    cases = [
        WrkCase(DIRECT, deployment.acquirer_url, direct, as_json, None, ACQUIRER_ANSWERS),
        WrkCase(PASSTHROUGH, deployment.passthrough_url, direct, as_json, "passthrough",
                ACQUIRER_ANSWERS),
    ]  # fmt: skip
    for vault in vaults:
        keyed = [f"Authorization: Bearer {vault.secret_key}",
                 "Content-Type: application/x-www-form-urlencoded"]  # fmt: skip
        url = vault.deployment.vault_url
        forwards = forward_body_list(vault.deployment, vault.pms)
        cases += [
            WrkCase(vault.label("FORWARD"), f"{url}/v1/forwarding/requests",
                    write_bodies(d / f"wrk-forward-{vault.name}.txt", forwards), keyed,
                    vault.name, (200,)),
            WrkCase(vault.label("TOKENIZE"), f"{url}/v1/payment_methods",
                    write_bodies(d / "wrk-tokenize.txt", [TOKENIZE_BODY]), keyed, vault.name,
                    (200,)),
            WrkCase(vault.label("NOOP"), f"{url}/v1/noop", noop, keyed, vault.name, (200,)),
        ]  # fmt: skip
    cases.append(
        WrkCase(BARE_NOOP, f"https://localhost:{deployment.bare_port}/v1/noop", noop,
                ["Content-Type: application/x-www-form-urlencoded"], "bare", (200,))
    )  # fmt: skip
    return cases


def run_wrk(
    case: WrkCase, script: Path, *, concurrency: int, seconds: float, pids: dict[str, int]
) -> tuple[dict[str, Any], dict[str, float], float]:
    """One wrk run: its result, the CPU seconds each process used, the elapsed time."""
    command = [
        "wrk", "-t", "1", "-c", str(concurrency), "-d", f"{seconds:g}s", "--timeout", "10s",
        "-s", str(script), case.url, "--", str(case.bodies), *case.headers,
    ]  # fmt: skip
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    began = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - began
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    found = re.search(r"^WRK_RESULT (\{.*\})$", result.stdout, re.M)
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"wrk failed ({result.returncode}): {result.stdout}{result.stderr}")
    return json.loads(found.group(1)), cpu, elapsed


def drive_wrk(
    deployment: Deployment,
    vaults: list[Vault],
    *,
    pids: dict[str, int],
    seconds: float,
    rounds: int,
    levels: list[int],
) -> list[dict[str, WrkTotals]]:
    script = deployment.directory / "bench.lua"
    script.write_text(WRK_SCRIPT)
    cases = wrk_cases(deployment, vaults)
    results: list[dict[str, WrkTotals]] = []
    for concurrency in levels:
        for case in cases:
            run_wrk(case, script, concurrency=concurrency, seconds=WARMUP_S, pids=pids)
        totals = {case.label: WrkTotals(case.label, concurrency) for case in cases}
        for _ in range(rounds):
            for case in cases:
                out, cpu, _ = run_wrk(
                    case, script, concurrency=concurrency, seconds=seconds / rounds, pids=pids
                )
                t = totals[case.label]
                t.seconds += out["duration_us"] / 1e6
                statuses = {int(k): v for k, v in out["statuses"].items()}
                t.statuses.update(statuses)
                t.requests += sum(n for s, n in statuses.items() if s in case.ok)
                t.errors += out["errors"] + sum(n for s, n in statuses.items() if s not in case.ok)
                t.p50s.append(out["p50_us"] / 1000)
                t.p99s.append(out["p99_us"] / 1000)
                for name, used in cpu.items():
                    t.cpu[name] += used
                print(
                    f"  wrk {case.label:<22} c={concurrency:<3} {t.per_second:>8,.0f} req/s, "
                    f"p50 {t.p50s[-1]:.2f} ms",
                    file=sys.stderr,
                    flush=True,
                )
        results.append(totals)
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


def print_table(header: tuple[str, ...], table: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in table:
        print(line(row))


def results_table(results: list[dict[str, Totals]] | list[dict[str, WrkTotals]]) -> None:
    header = ("case", "conc", "req/s", "p50 ms", "p99 ms", "answers", "hop CPU µs/req",
              "acquirer CPU µs/req", "client CPU µs/req")  # fmt: skip
    table: list[tuple[str, ...]] = []
    for level in results:
        for t in level.values():
            if isinstance(t, Totals):
                answers = " ".join(f"{s}:{n}" for s, n in sorted(t.acquirer_status.items()))
                if t.failures:
                    answers += " FAILED " + " ".join(f"{k}:{v}" for k, v in t.failures.items())
                client = f"{t.cpu_us_per_request('client'):,.0f}"
            else:
                answers = " ".join(f"{s}:{n}" for s, n in sorted(t.statuses.items()))
                if t.errors:
                    answers += f" ERRORS {t.errors}"
                client = "-"
            hop = HOPS.get(t.label)
            table.append(
                (
                    t.label,
                    str(t.concurrency),
                    f"{t.per_second:,.0f}",
                    f"{t.percentile(50):.2f}",
                    f"{t.percentile(99):.2f}",
                    answers,
                    f"{t.cpu_us_per_request(hop):,.0f}" if hop else "-",
                    f"{t.cpu_us_per_request('acquirer'):,.0f}",
                    client,
                )
            )
    print_table(header, table)


def print_goals(
    name: str, results: list[dict[str, Totals]] | list[dict[str, WrkTotals]], vault: Vault
) -> None:
    """Issue 21's goals for ``vault``, from one client's figures; each line says met or
    not."""

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    print(f"\ngoals, {vault.name} ({name} client; the floor is PASSTHROUGH − DIRECT, same run):")
    forward_label, tokenize_label = vault.label("FORWARD"), vault.label("TOKENIZE")
    noop_label = vault.label("NOOP")
    for level in results:
        direct, passthrough = level[DIRECT], level[PASSTHROUGH]
        forward = level[forward_label]
        c = direct.concurrency
        added = forward.percentile(50) - direct.percentile(50)
        floor = passthrough.percentile(50) - direct.percentile(50)
        p99 = forward.percentile(99) - direct.percentile(99)
        line = (
            f"  c={c:<3} added p50 {added:+.2f} ms, floor {floor:+.2f} ms, the vault's own "
            f"{added - floor:+.2f} ms (p99 added {p99:+.2f} ms)"
        )
        if c == 1:
            line += f": added p50 <= floor + 1.5 ms {verdict(added <= floor + 1.5)}"
        print(line)
        ratio = forward.per_second / direct.per_second
        floor_ratio = passthrough.per_second / direct.per_second
        line = (
            f"  c={c:<3} forward throughput {ratio:.2f}× direct (the bare hop {floor_ratio:.2f}×)"
        )
        if c >= 32:
            line += f": >= 0.5× direct {verdict(ratio >= 0.5)}"
        print(line)
        if tokenize_label in level:
            tokenize = level[tokenize_label]
            per_forward = forward.cpu_us_per_request(vault.name)
            per_token = tokenize.cpu_us_per_request(vault.name)
            cpu_ratio = per_forward / per_token
            print(
                f"  c={c:<3} vault CPU per forward {per_forward:,.0f} µs, per tokenization "
                f"{per_token:,.0f} µs: {cpu_ratio:.2f}×, <= 2× {verdict(cpu_ratio <= 2)}"
            )
        if noop_label in level and BARE_NOOP in level:
            noop, bare = level[noop_label], level[BARE_NOOP]
            noop_ratio = noop.per_second / bare.per_second
            print(
                f"  c={c:<3} vault no-op {noop.per_second:,.0f} req/s "
                f"({noop.cpu_us_per_request(vault.name):,.0f} µs CPU), bare no-op "
                f"{bare.per_second:,.0f} req/s ({bare.cpu_us_per_request('bare'):,.0f} µs): "
                f"{noop_ratio:.2f}×, >= 0.5× {verdict(noop_ratio >= 0.5)}"
            )


def print_report(
    python: list[dict[str, Totals]],
    wrk: list[dict[str, WrkTotals]],
    vaults: list[Vault],
    args: argparse.Namespace,
    rows: int | None,
    audit: Counter[str],
) -> bool:
    cpus = os.cpu_count()
    print(
        f"\nforwarding vs calling the acquirer directly; HTTPS keep-alive from the load "
        f"generator to each server; one run\n"
        f"{platform.python_implementation()} {platform.python_version()}; the acquirer, "
        f"the vault, the key service, the bare servers and the load generator share {cpus} "
        f"CPUs\n"
        f"FORWARD includes: TLS and HTTP into the vault, key check and rate limit, the "
        f"payment method read and decrypted, the request built (real, masked), "
        f"TLS and HTTP to the acquirer on the vault's pooled connection, the response "
        f"masked, the forwarding record and the vault's audit records (all durable before "
        f"the card leaves and before the answer; counted below)"
    )
    if python:
        print(
            f"\npython client: {args.seconds:g} s per case and concurrency level, in "
            f"{args.rounds} alternating rounds after a {WARMUP_S:g} s warm-up of each"
        )
        results_table(python)
    if wrk:
        print(
            f"\nwrk client (-t 1): {args.wrk_seconds:g} s per case and concurrency level, in "
            f"{args.rounds} alternating rounds after a {WARMUP_S:g} s warm-up of each; p50 and "
            f"p99 are the median of the rounds'"
        )
        results_table(wrk)
    for vault in vaults:
        if python:
            print_goals("python", python, vault)
        if wrk:
            print_goals("wrk", wrk, vault)
    forwards = sum(level[FORWARD].ok + sum(level[FORWARD].failures.values()) for level in python)
    forwards += sum(level[FORWARD].requests + level[FORWARD].errors for level in wrk)
    valid = all(not t.failures and t.ok for level in python for t in level.values())
    valid = valid and all(not t.errors and t.requests for level in wrk for t in level.values())
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
        for level in python:
            for t in level.values():
                for example in t.examples:
                    print(f"  {t.label} c={t.concurrency}: {example}")
    return valid


async def payment_methods_for(deployment: Deployment, secret_key: str, count: int) -> list[str]:
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=32, ssl=client_context(deployment.ca))
    ) as session:
        pms = await make_payment_methods(session, deployment.vault_url, secret_key, count)
    print(f"  {len(pms)} payment methods made", file=sys.stderr, flush=True)
    return pms


@contextlib.contextmanager
def python_path(src: Path | None) -> Iterator[None]:
    """``PYTHONPATH`` set to ``src`` (the children started meanwhile inherit it)."""
    if src is None:
        yield
        return
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(src.resolve())
    try:
        yield
    finally:
        if old is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = old


def before_deployment(directory: Path, main: Deployment) -> Deployment:
    """A second deployment (its own CA, key service and vault) whose allowlist names the
    main deployment's acquirer, trusted through the main CA: the forwards of both vaults
    reach the same acquirer process with the same request."""
    other = write_deployment(directory)
    allowlist = directory / "allowlist.toml"
    text = allowlist.read_text()
    text = text.replace(f"localhost:{other.acquirer_port}/", f"localhost:{main.acquirer_port}/")
    allowlist.write_text(text.replace(f'ca_file = "{other.ca}"', f'ca_file = "{main.ca}"'))
    return dataclasses.replace(other, acquirer_port=main.acquirer_port)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="measured time per case, python client"
    )
    parser.add_argument(
        "--wrk-seconds", type=float, default=5.0, help="measured time per case, wrk client (5)"
    )
    parser.add_argument(
        "--clients",
        default="python,wrk" if shutil.which("wrk") else "python",
        help="load generators, comma-separated: python, wrk (default: both when wrk is on PATH)",
    )
    parser.add_argument(
        "--concurrency",
        default="1,32",
        help="comma-separated numbers of keep-alive connections (default 1,32)",
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="rounds of the cases per concurrency (5)"
    )
    parser.add_argument(
        "--payment-methods", type=int, default=200, help="payment methods forwarded (200)"
    )
    parser.add_argument(
        "--before-src",
        type=Path,
        help="also measure the vault of another tree (its src directory, e.g. a worktree of "
        "an earlier commit): its own key service, store and account, the same acquirer, "
        "its cases labelled 'before', in the same rounds (with CARDVAULT_BENCH_PROFILE, "
        "both vaults would write the one file: profile without it)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    levels = [int(part) for part in args.concurrency.split(",") if part.strip()]
    clients = {part.strip() for part in args.clients.split(",") if part.strip()}
    if clients - {"python", "wrk"}:
        parser.error("--clients takes python and wrk")
    if "wrk" in clients and shutil.which("wrk") is None:
        parser.error("wrk is not on PATH (apt-get install wrk)")

    directory = Path(tempfile.mkdtemp(prefix="cardvault-bench-forward-"))
    deployment = write_deployment(directory)
    keyd_log, vault_log = directory / "keyd.log", directory / "vault.log"
    acquirer_log = directory / "acquirer.log"
    passthrough_log = directory / "passthrough.log"
    bare_log = directory / "bare.log"
    run_cardvault(["keyservice", "init", "--config", str(deployment.keyd_config)], log=keyd_log)
    vaults = [Vault("vault", deployment, create_account(deployment.vault_config, vault_log))]
    if args.before_src is not None:
        (directory / "before").mkdir()
        other = before_deployment(directory / "before", deployment)
        with python_path(args.before_src):
            run_cardvault(
                ["keyservice", "init", "--config", str(other.keyd_config)],
                log=other.directory / "keyd.log",
            )
            key = create_account(other.vault_config, other.directory / "vault.log")
        vaults.append(Vault("before", other, key))

    codes: dict[str, int | None] = {}
    rows: int | None = None
    python: list[dict[str, Totals]] = []
    wrk: list[dict[str, WrkTotals]] = []
    with contextlib.ExitStack() as stack:
        acquirer = stack.enter_context(python_process(deployment.acquirer_args, log=acquirer_log))
        passthrough = stack.enter_context(
            python_process(deployment.passthrough_args, log=passthrough_log)
        )
        bare = stack.enter_context(python_process(deployment.bare_args, log=bare_log))
        wait_for_port(deployment.acquirer_port, acquirer, log=acquirer_log)
        wait_for_port(deployment.passthrough_port, passthrough, log=passthrough_log)
        wait_for_port(deployment.bare_port, bare, log=bare_log)
        servers: dict[str, tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]] = {}
        for vault in vaults:
            d = vault.deployment
            with python_path(args.before_src if vault.name == "before" else None):
                keyd = stack.enter_context(
                    cardvault_process(
                        ["keyservice", "serve", "--config", str(d.keyd_config)],
                        log=d.directory / "keyd.log",
                    )
                )
                wait_for_port(d.keyd_port, keyd, log=d.directory / "keyd.log")
                server = stack.enter_context(
                    cardvault_process(
                        ["vault", "serve", "--config", str(d.vault_config)],
                        log=d.directory / "vault.log",
                    )
                )
                wait_for_port(d.vault_port, server, log=d.directory / "vault.log")
            servers[vault.name] = (server, keyd)
            print(
                f"{vault.name}: vault pid {server.pid}, key service pid {keyd.pid}; acquirer "
                f"pid {acquirer.pid}; logs in {d.directory}",
                file=sys.stderr,
                flush=True,
            )
        pids = {
            "acquirer": acquirer.pid,
            "passthrough": passthrough.pid,
            "bare": bare.pid,
            **{name: server.pid for name, (server, _) in servers.items()},
        }
        try:
            import uvloop

            loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
        except ImportError:
            loop_factory = None
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            for vault in vaults:
                vault.pms = runner.run(
                    payment_methods_for(vault.deployment, vault.secret_key, args.payment_methods)
                )
            if "python" in clients:
                python = runner.run(
                    drive(
                        deployment,
                        vaults,
                        pids=pids,
                        seconds=args.seconds,
                        rounds=args.rounds,
                        levels=levels,
                    )
                )
        if "wrk" in clients:
            wrk = drive_wrk(
                deployment,
                vaults,
                pids=pids,
                seconds=args.wrk_seconds,
                rounds=args.rounds,
                levels=levels,
            )
        for name, (server, keyd) in servers.items():
            server.terminate()
            codes[name] = server.wait(30)
            keyd.terminate()
            codes[f"key service ({name})"] = keyd.wait(15)
        for name, proc in (("acquirer", acquirer), ("passthrough", passthrough), ("bare", bare)):
            proc.terminate()
            codes[name] = proc.wait(15)

    with contextlib.closing(sqlite3.connect(directory / "vault" / "vault.db")) as db:
        (rows,) = db.execute("SELECT count(*) FROM forwarding_requests").fetchone()
    valid = print_report(python, wrk, vaults, args, int(rows), audit_actions(directory))
    print(
        "exit codes: " + ", ".join(f"{name} {code}" for name, code in codes.items())
        + (f"; kept: {directory}" if args.keep else "")
    )  # fmt: skip
    if not args.keep:
        shutil.rmtree(directory)
    return 0 if valid and all(code == 0 for code in codes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
