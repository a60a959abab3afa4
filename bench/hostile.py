"""Benchmark hostile input: normal tokenizations during a flood of amplification requests.

Issue 17 asks that under a flood of the amplification request (bounded in count and
time) the vault's RSS stays under 200 MiB and a normal tokenization still answers within
1 s. This script measures both; it asserts nothing.

Starts a real key service (development profile and seal, SQLite) and a real vault
(production profile, JSON access log at info level, SQLite with group commit) in a
temporary directory, with the per-key rate limits raised for secret and publishable
keys alike (``limits.secret_rate``/``secret_burst``/``publishable_rate``/
``publishable_burst`` = 1,000,000) so that the flood reaches the parser, and creates one
account (its test-mode publishable and secret keys).

* Phase A, baseline: after a 1 s warm-up, normal tokenizations (``POST
  /v1/payment_methods``, the published test card 4242424242424242, the publishable key,
  form-encoded as the card element sends it) one at a time for ``--seconds`` from this
  process, with httpx over one HTTPS keep-alive connection verified against the
  deployment CA.
* Phase B, flood: the same tokenizations while ``wrk -t 1 -c CONNECTIONS -d SECONDS``
  (``--connections``, ``--seconds``) floods the vault over HTTPS keep-alive (wrk does not
  verify certificates) with the amplification requests, rotated by a Lua script
  (``--flood`` picks them): ``foo[100000000]=x``, ``card[5105105105105100]=1`` and
  ``a[99999999][b]=1`` as ``POST /v1/payment_methods`` bodies with the publishable key,
  and ``GET /v1/payment_methods?foo[50000000]=x`` with the secret key. The Lua script
  counts wrk's answers by status; ``--max-requests`` stops it after that many answers.

A thread samples the vault's ``VmRSS`` (``/proc/<pid>/status``) every 50 ms through
both phases and 1 s after the flood. Printed: per phase the tokenizations answered 200
(and any that were not), p50/p99/max latency, p99 against the baseline's, the vault's
RSS at the phase's start and its peak; the flood's requests/s, its answers by status
(all should be 400) and wrk's errors; the vault's RSS at the end and its ``VmHWM``
(the process's peak, start-up included); the vault's access log by request and status
with the slowest answer of each, and its lines at warning or above; rows stored against
tokenizations answered.

To measure an older tree, put its ``src`` first on ``PYTHONPATH`` (the vault and key
service children inherit it). Code from before the parser's fix (48b3490) grows by
~800 MB per ``foo[100000000]=x``, appends 10**8 empty dicts for ``a[99999999][b]=1``
(several GB) and allocates until the OOM killer on ``card[5105105105105100]=1``: leave
those two out and bound the flood, e.g.
``--flood form-index,query-index --connections 1 --max-requests 4 --seconds 5``.

    .venv/bin/python bench/hostile.py
    .venv/bin/python bench/hostile.py --seconds 5 --connections 64 --keep

Needs ``wrk`` on PATH (Debian: ``apt-get install wrk``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import httpx
from _common import Result, cardvault_process, free_port, run_cardvault, wait_for_port
from _deploy import create_account, keyd_config, make_pki, vault_config

import cardvault
from cardvault.transport.tls import client_context

WARMUP_S = 1.0
SAMPLE_S = 0.05
SETTLE_S = 1.0
#: wrk's per-request timeout (it also sizes wrk's latency histogram: keep it modest).
WRK_TIMEOUT_S = 10
#: The published Visa test card: the only card number a tokenization here sends.
TOKENIZE_FORM = urlencode(
    {
        "type": "card",
        "card[number]": "4242424242424242",
        "card[exp_month]": "12",
        "card[exp_year]": "2034",
    }
).encode()
#: The amplification requests of issue 17: (method, path and query, key kind, body).
#: 5105105105105100 is a published Mastercard test number, used here as a list index.
FLOODS: dict[str, tuple[str, str, str, str | None]] = {
    "form-index": ("POST", "/v1/payment_methods", "publishable", "foo[100000000]=x"),
    "card-index": ("POST", "/v1/payment_methods", "publishable", "card[5105105105105100]=1"),
    "nested-index": ("POST", "/v1/payment_methods", "publishable", "a[99999999][b]=1"),
    "query-index": ("GET", "/v1/payment_methods?foo[50000000]=x", "secret", None),
}


# --- the deployment -----------------------------------------------------------------


# --- the vault's memory -------------------------------------------------------------


def status_kib(pid: int, name: str) -> int | None:
    """A ``/proc/<pid>/status`` field in KiB (VmRSS, VmHWM), or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(rf"^{name}:\s+(\d+) kB$", text, re.M)
    return int(found.group(1)) if found else None


class RssSampler(threading.Thread):
    """Samples the vault's VmRSS every ``SAMPLE_S`` until stopped or the process ends."""

    def __init__(self, pid: int) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.samples: list[tuple[float, int]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            kib = status_kib(self.pid, "VmRSS")
            if kib is None:
                return
            self.samples.append((time.perf_counter(), kib))
            self._stop_event.wait(SAMPLE_S)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def peak(self, start: float, end: float) -> int | None:
        within = [kib for t, kib in list(self.samples) if start <= t <= end]
        return max(within) if within else None


# --- the flood ----------------------------------------------------------------------


def lua_string(text: str) -> str:
    if not text.isascii() or not text.isprintable():
        raise ValueError("printable ASCII only")
    return json.dumps(text)  # for printable ASCII a JSON string is a Lua string


def wrk_script(floods: list[str], keys: dict[str, str], max_requests: int) -> str:
    """The Lua script: rotate the chosen requests, count answers by status, stop the
    thread after ``max_requests`` answers (0: no limit), print the counts in ``done``."""
    requests = []
    for name in floods:
        method, path, kind, body = FLOODS[name]
        headers = [f'["Authorization"] = {lua_string("Bearer " + keys[kind])}']
        if body is not None:
            headers.append('["Content-Type"] = "application/x-www-form-urlencoded"')
        requests.append(
            f"    wrk.format({lua_string(method)}, {lua_string(path)}, "
            f"{{{', '.join(headers)}}}, {lua_string(body) if body is not None else 'nil'}),"
        )
    return (
        "-- Written by bench/hostile.py for one run.\n"
        "local requests = {}\n"
        "local sent = 0\n"
        "local answered = 0\n"
        f"local max_requests = {int(max_requests)}\n"
        "statuses = {}  -- global: done() reads it from each thread\n"
        "local threads = {}\n\n"
        "function setup(thread)\n  table.insert(threads, thread)\nend\n\n"
        "function init(args)\n  requests = {\n" + "\n".join(requests) + "\n  }\nend\n\n"
        "function request()\n"
        "  sent = sent + 1\n"
        "  return requests[(sent - 1) % #requests + 1]\n"
        "end\n\n"
        "function response(status, headers, body)\n"
        "  local key = tostring(status)\n"
        "  statuses[key] = (statuses[key] or 0) + 1\n"
        "  answered = answered + 1\n"
        "  if max_requests > 0 and answered >= max_requests then wrk.thread:stop() end\n"
        "end\n\n"
        "function done(summary, latency, requests)\n"
        "  local total = {}\n"
        "  for _, thread in ipairs(threads) do\n"
        '    for status, n in pairs(thread:get("statuses") or {}) do\n'
        "      total[status] = (total[status] or 0) + n\n"
        "    end\n"
        "  end\n"
        "  for status, n in pairs(total) do\n"
        '    io.write(string.format("hostile-status %s %d\\n", status, n))\n'
        "  end\n"
        "  local e = summary.errors\n"
        '  io.write(string.format("hostile-summary %d %d %d %d %d %d %d\\n", '
        "summary.requests, summary.duration, e.connect, e.read, e.write, e.status, "
        "e.timeout))\n"
        "end\n"
    )


@dataclass
class Flood:
    command: list[str]
    requests: int = 0
    duration_s: float = 0.0
    statuses: Counter[str] = field(default_factory=Counter)
    errors: dict[str, int] = field(default_factory=dict)
    exit_code: int | None = None

    @property
    def per_second(self) -> float:
        return self.requests / self.duration_s if self.duration_s else 0.0


def parse_wrk(output: str, flood: Flood) -> None:
    for line in output.splitlines():
        parts = line.split()
        if parts[:1] == ["hostile-status"] and len(parts) == 3:
            flood.statuses[parts[1]] += int(parts[2])
        elif parts[:1] == ["hostile-summary"] and len(parts) == 8:
            numbers = [int(p) for p in parts[1:]]
            flood.requests = numbers[0]
            flood.duration_s = numbers[1] / 1e6
            flood.errors = dict(
                zip(
                    ("connect", "read", "write", "non-2xx/3xx", "timeout"), numbers[2:], strict=True
                )
            )


# --- the tokenizations --------------------------------------------------------------


@dataclass
class Phase:
    name: str
    latencies: list[float] = field(default_factory=list)
    failures: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0
    rss_start_kib: int | None = None
    rss_peak_kib: int | None = None
    flood: Flood | None = None

    def percentile(self, q: float) -> float:
        """Nearest rank, in milliseconds (as bench/_common.py)."""
        return Result(self.name, 1, 1.0, self.latencies).percentile(q)


def tokenize_until(
    client: httpx.Client, url: str, publishable: str, done: Callable[[], bool], into: Phase
) -> None:
    """One tokenization at a time until ``done()``; latencies of the 200s, the rest
    counted by status or exception."""
    headers = {
        "authorization": f"Bearer {publishable}",
        "content-type": "application/x-www-form-urlencoded",
    }
    while not done():
        started = time.perf_counter()
        try:
            response = client.post(url, content=TOKENIZE_FORM, headers=headers)
        except httpx.HTTPError as exc:
            into.failures[type(exc).__name__] += 1
            continue
        if response.status_code == 200:
            into.latencies.append(time.perf_counter() - started)
        else:
            into.failures[str(response.status_code)] += 1
            if len(into.examples) < 3:
                # The vault's error bodies never hold card data.
                into.examples.append(f"{response.status_code}: {response.text[:300]}")


@dataclass
class Answers:
    """The vault's access lines for one method, path and status."""

    count: int = 0
    slowest_ms: float = 0.0


def vault_log_counts(log: Path) -> tuple[dict[str, Answers], Counter[str]]:
    """From the vault's JSON log: access lines by method, path and status (the path
    without its query), and lines at warning or above by level and event (start-up's "no
    allowlist" warning is one)."""
    answers: dict[str, Answers] = {}
    alarms: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict):
            continue
        if entry.get("event") == "request" and "status" in entry:
            key = f"{entry.get('method')} {entry.get('path')} {entry['status']}"
            a = answers.setdefault(key, Answers())
            a.count += 1
            a.slowest_ms = max(a.slowest_ms, float(entry.get("duration_ms") or 0.0))
        elif entry.get("level") in ("warning", "error", "critical"):
            alarms[f"{entry['level']}: {str(entry.get('event'))[:80]}"] += 1
    return answers, alarms


@dataclass
class Outcome:
    baseline: Phase
    flood: Phase
    rss_after_kib: int | None
    hwm_kib: int | None
    rows: int | None
    answered: int
    vault_exit: int | None
    vault_alive_after_flood: bool
    log_answers: dict[str, Answers]
    log_alarms: Counter[str]


def run(args: argparse.Namespace, directory: Path, wrk: str) -> tuple[Outcome, int | None]:
    pki = make_pki(directory)
    keyd_port, port = free_port(), free_port()
    keyd_log, log = directory / "keyd.log", directory / "vault.log"
    kconf = keyd_config(directory, pki, keyd_port)
    run_cardvault(["keyservice", "init", "--config", str(kconf)], log=directory / "init.log")
    with cardvault_process(["keyservice", "serve", "--config", str(kconf)], log=keyd_log) as keyd:
        wait_for_port(keyd_port, keyd, log=keyd_log)
        config = vault_config(
            directory, pki, port, keyd_port, f"sqlite:///{directory / 'vault.db'}"
        )
        keys = create_account(config, log)
        lua = directory / "flood.lua"
        lua.write_text(wrk_script(args.flood, keys, args.max_requests))
        base = f"https://localhost:{port}"
        url = f"{base}/v1/payment_methods"
        with cardvault_process(["vault", "serve", "--config", str(config)], log=log) as proc:
            wait_for_port(port, proc, log=log)
            print(f"vault pid {proc.pid}, files in {directory}", file=sys.stderr, flush=True)
            sampler = RssSampler(proc.pid)
            sampler.start()
            answered = 0
            # The client verifies the vault's certificate against the deployment CA.
            with httpx.Client(
                verify=client_context(pki.ca), trust_env=False, timeout=60.0
            ) as client:
                first = client.post(
                    url,
                    content=TOKENIZE_FORM,
                    headers={
                        "authorization": f"Bearer {keys['publishable']}",
                        "content-type": "application/x-www-form-urlencoded",
                    },
                )
                created = first.json()
                if first.status_code != 200 or not str(created.get("id", "")).startswith("pm_"):
                    raise RuntimeError(f"a tokenization answered {first.status_code}: {created}")
                answered += 1
                warm = Phase("warm-up")
                until = time.perf_counter() + WARMUP_S
                tokenize_until(
                    client, url, keys["publishable"], lambda: time.perf_counter() >= until, warm
                )
                answered += len(warm.latencies)

                baseline = Phase("A baseline")
                baseline.rss_start_kib = status_kib(proc.pid, "VmRSS")
                baseline.started = time.perf_counter()
                until = baseline.started + args.seconds
                tokenize_until(
                    client,
                    url,
                    keys["publishable"],
                    lambda: time.perf_counter() >= until,
                    baseline,
                )
                baseline.ended = time.perf_counter()
                answered += len(baseline.latencies)
                print(
                    f"  baseline: {len(baseline.latencies)} tokenizations",
                    file=sys.stderr,
                    flush=True,
                )

                # wrk does not verify the vault's certificate (it has no option to): it
                # is the load generator, on this machine, against our own listener.
                command = [
                    wrk,
                    "-t",
                    "1",
                    "-c",
                    str(args.connections),
                    "-d",
                    f"{args.seconds}s",
                    "--timeout",
                    f"{WRK_TIMEOUT_S}s",
                    "-s",
                    str(lua),
                    base,
                ]
                flooded = Phase("B flood", flood=Flood(command))
                flooded.rss_start_kib = status_kib(proc.pid, "VmRSS")
                flooded.started = time.perf_counter()
                wrk_out = directory / "wrk.out"
                with open(wrk_out, "wb") as out:
                    wrk_proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
                    try:
                        tokenize_until(
                            client,
                            url,
                            keys["publishable"],
                            lambda: wrk_proc.poll() is not None or proc.poll() is not None,
                            flooded,
                        )
                        wrk_code = wrk_proc.wait(args.seconds + 60)
                    finally:
                        if wrk_proc.poll() is None:
                            wrk_proc.kill()
                            wrk_proc.wait()
                flooded.ended = time.perf_counter()
                answered += len(flooded.latencies)
                assert flooded.flood is not None
                flooded.flood.exit_code = wrk_code
                parse_wrk(wrk_out.read_text(errors="replace"), flooded.flood)

            time.sleep(SETTLE_S)
            sampler.stop()
            for phase in (baseline, flooded):
                phase.rss_peak_kib = sampler.peak(phase.started, phase.ended)
            alive = proc.poll() is None
            rss_after = status_kib(proc.pid, "VmRSS")
            hwm = status_kib(proc.pid, "VmHWM")
            proc.terminate()
            vault_exit = proc.wait(30)
        rows = None
        with sqlite3.connect(directory / "vault.db") as db:
            (rows,) = db.execute("SELECT count(*) FROM payment_methods").fetchone()
        keyd.terminate()
        keyd_exit = keyd.wait(15)
    statuses, alarms = vault_log_counts(log)
    outcome = Outcome(
        baseline, flooded, rss_after, hwm, int(rows), answered, vault_exit, alive, statuses, alarms
    )
    return outcome, keyd_exit


# --- the report ---------------------------------------------------------------------


def mib(kib: int | None) -> str:
    return f"{kib / 1024:.1f}" if kib is not None else "-"


def print_outcome(o: Outcome, args: argparse.Namespace) -> None:
    header = (
        "phase",
        "tokenizations",
        "not 200",
        "p50 ms",
        "p99 ms",
        "max ms",
        "p99 vs A",
        "RSS start MiB",
        "RSS peak MiB",
        "flood req/s",
        "flood statuses",
    )
    base_p99 = o.baseline.percentile(99) if o.baseline.latencies else None
    rows = []
    for p in (o.baseline, o.flood):
        ok = bool(p.latencies)
        flood = p.flood
        rows.append(
            (
                p.name,
                f"{len(p.latencies):,}",
                str(sum(p.failures.values())),
                f"{p.percentile(50):.2f}" if ok else "-",
                f"{p.percentile(99):.2f}" if ok else "-",
                f"{1000 * max(p.latencies):.2f}" if ok else "-",
                f"{p.percentile(99) / base_p99:.2f}" if ok and base_p99 else "-",
                mib(p.rss_start_kib),
                mib(p.rss_peak_kib),
                (f"{flood.per_second:,.{0 if flood.per_second >= 100 else 1}f}" if flood else "-"),
                (
                    " ".join(f"{s}:{n:,}" for s, n in sorted(flood.statuses.items())) or "none"
                    if flood
                    else "-"
                ),
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for n, row in enumerate([header, *rows]):
        print(
            "  ".join(
                [row[0].ljust(widths[0])]
                + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:-1], strict=True)]
                + [row[-1].ljust(widths[-1])]
            ).rstrip()
        )
        if n == 0:
            print("  ".join("-" * w for w in widths))
    f = o.flood.flood
    assert f is not None
    errors = ", ".join(f"{k} {v:,}" for k, v in f.errors.items()) or "none reported"
    print(f"\nflood: {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(f.command))}")
    print(
        f"flood: {f.requests:,} requests in {f.duration_s:.1f} s = {f.per_second:,.1f} req/s; "
        f"answers by status: {dict(sorted(f.statuses.items())) or 'none'}; wrk errors: {errors}"
        f"; wrk exited with {f.exit_code}"
    )
    for p in (o.baseline, o.flood):
        if p.failures:
            print(f"{p.name}: tokenizations not answered 200: {dict(p.failures)}")
            for example in p.examples:
                print(f"  {example}")
    print(
        f"vault RSS {SETTLE_S:g} s after the flood: {mib(o.rss_after_kib)} MiB; "
        f"VmHWM (its peak over the whole run, start-up included): {mib(o.hwm_kib)} MiB"
    )
    print(
        "vault access log, whole run (wrk does not count the answers to requests it has "
        "in flight when it stops):"
    )
    for key, a in sorted(o.log_answers.items()):
        print(f"  {key}: {a.count:,}, slowest {a.slowest_ms:,.1f} ms")
    alarms = "; ".join(f"{k} ×{n}" for k, n in sorted(o.log_alarms.items())) or "none"
    print(f"vault log lines at warning or above: {alarms}")
    if not o.vault_alive_after_flood:
        print("THE VAULT DIED during the flood")
    stored = "matches" if o.rows == o.answered else "DOES NOT MATCH"
    print(
        f"rows stored: {o.rows:,} for {o.answered:,} tokenizations answered 200, warm-up "
        f"included ({stored}); vault exited with {o.vault_exit}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=int, default=10, help="length of each phase (and of the flood)"
    )
    parser.add_argument("--connections", type=int, default=32, help="wrk's connections")
    parser.add_argument(
        "--flood",
        default=",".join(FLOODS),
        help=f"comma-separated requests the flood rotates, of: {', '.join(FLOODS)}",
    )
    parser.add_argument(
        "--max-requests",
        type=int,
        default=0,
        help="stop the flood after this many answers (0: only --seconds bounds it)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if args.seconds < 1 or args.connections < 1 or args.max_requests < 0:
        parser.error("--seconds and --connections must be positive")
    args.flood = [name.strip() for name in args.flood.split(",") if name.strip()]
    unknown = [name for name in args.flood if name not in FLOODS]
    if unknown or not args.flood:
        parser.error(f"--flood takes names of: {', '.join(FLOODS)}")
    wrk = shutil.which("wrk")
    if wrk is None:
        print("wrk is not on PATH: install it (Debian: apt-get install wrk)", file=sys.stderr)
        return 2

    directory = Path(tempfile.mkdtemp(prefix="cardvault-hostile-"))
    try:
        outcome, keyd_exit = run(args, directory, wrk)
    finally:
        if not args.keep:
            shutil.rmtree(directory, ignore_errors=True)

    source = Path(cardvault.__file__).resolve().parent.parent
    print(
        f"\nhostile input: tokenizations one at a time over HTTPS keep-alive (httpx, verified), "
        f"{args.seconds} s alone (A) after a {WARMUP_S:g} s warm-up, then {args.seconds} s "
        f"during a flood from wrk, {args.connections} connections, rotating "
        f"{', '.join(args.flood)}"
        + (f", at most {args.max_requests:,} answers" if args.max_requests else "")
        + f" (B); one run\nvault: cardvault from {source}, production profile, JSON access "
        "log at info level, SQLite with group commit, rate limits raised; RSS sampled every "
        f"{1000 * SAMPLE_S:g} ms\n{platform.python_implementation()} "
        f"{platform.python_version()}, {os.cpu_count()} CPUs shared by the client, wrk, the "
        "vault and the key service\n"
    )
    print_outcome(outcome, args)
    print(f"key service exited with {keyd_exit}" + (f"; files in {directory}" if args.keep else ""))
    # Not a threshold: a run whose processes failed measured nothing worth reading.
    flood = outcome.flood.flood
    broken = (
        not outcome.vault_alive_after_flood
        or outcome.vault_exit != 0
        or keyd_exit != 0
        or flood is None
        or flood.exit_code != 0
    )
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
