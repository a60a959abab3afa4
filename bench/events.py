"""Benchmark events and webhooks: deliveries per second to a local HTTPS sink, and what
one subscribed webhook endpoint costs tokenization (issue 24's goal: at least 0.9 of
the rate without one).

Starts real processes in a temporary directory: a key service (development profile and
seal, SQLite), a vault (production profile: JSON logs at info, as in production) on
SQLite, and a sink: an HTTPS server (uvicorn over a certificate of the run's own CA) that
answers every POST 200 and counts the events it gets by ``id``. The vault's non-default
settings: the per-key rate limit raised so that it does not throttle, and ``[webhooks]``
``allowed_hosts = ["localhost"]`` with the run's CA (the sink is on loopback). Delivery
runs at its defaults (``poll_interval`` 1 s, ``timeout`` 10 s).

Two accounts of the same vault: ONE has one webhook endpoint, subscribed to
``payment_method.created`` and pointing at the sink; NONE has none. The cases, each
``POST /v1/payment_methods`` (Stripe's published Visa test card, form-encoded, the
account's secret key) driven by ``wrk -t 1 -c N`` with a Lua script (bench/forward.py's)
that counts the answers by status:

* TOKENIZE, no endpoint: NONE's key. Its events are written and dispatched (to no one).
* TOKENIZE, one endpoint: ONE's key. Every card's event becomes a delivery to the sink
  while the load runs: the delivery's CPU is in the same process as the API's.

After a 1 s warm-up of each case, ``--rounds`` rounds, each case ``--seconds``/rounds per
round (rounded to whole seconds: wrk takes no fraction), their order alternating (NONE,
ONE, then ONE, NONE …) so that drift on the shared machine hits both alike. After every
ONE run the benchmark waits until the sink has every event that run made (at most
``--drain-timeout`` s) before the next run starts, so that no case pays for another's
backlog; the time that takes, from the end of the load, gives the drain rate
(deliveries per second with the API idle) when the load left a backlog.

Reported: tokenizations per second in each case and their ratio (the goal), the CPU of
the vault per tokenization in each, deliveries per second during the load (do they keep
up?) and when draining, and the delivery lag (events not yet delivered when a run ended).
wrk does not verify certificates: acceptable for a load generator against a local
listener; the vault verifies the sink's.

    .venv/bin/python bench/events.py --seconds 20 --rounds 4
    .venv/bin/python bench/events.py --concurrency 32 --seconds 60 --keep
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from _common import cardvault_process, free_port, run_cardvault, wait_for_port
from forward import (
    TOKENIZE_BODY,
    WRK_SCRIPT,
    WrkCase,
    create_account,
    python_process,
    run_wrk,
    write_bodies,
)

from cardvault.transport.certs import init_ca
from cardvault.transport.tls import client_context

ROOT = Path(__file__).resolve().parents[1]
NONE = "TOKENIZE, no endpoint"
ONE = "TOKENIZE, one endpoint"
WARMUP_S = 1.0


# --- the sink -----------------------------------------------------------------------


def sink_main(port: int, cert: str, key: str) -> None:
    """The sink process: every POST answered 200, its event id counted; ``GET /stats``
    answers ``{"unique", "posts", "times"}`` (the wall-clock second of each first
    arrival)."""
    import orjson
    import uvicorn

    seen: set[str] = set()
    times: list[float] = []
    posts = [0]

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["method"] == "POST":
            posts[0] += 1
            try:
                event_id = str(orjson.loads(body)["id"])
            except (ValueError, KeyError, TypeError):
                event_id = ""
            if event_id and event_id not in seen:
                seen.add(event_id)
                times.append(time.time())
            answer = b"ok"
        else:
            answer = orjson.dumps({"unique": len(seen), "posts": posts[0], "times": times})
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(answer)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": answer})

    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        ssl_certfile=cert,
        ssl_keyfile=key,
        log_level="warning",
        access_log=False,
    )


# --- the deployment -----------------------------------------------------------------


@dataclass
class Deployment:
    directory: Path
    ca: Path
    keyd_port: int
    vault_port: int
    sink_port: int
    keyd_config: Path
    vault_config: Path
    sink_args: list[str]

    @property
    def vault_url(self) -> str:
        return f"https://localhost:{self.vault_port}"

    @property
    def sink_url(self) -> str:
        return f"https://localhost:{self.sink_port}"


def write_deployment(directory: Path) -> Deployment:
    ca = init_ca(directory / "pki")
    keyd = ca.issue("keyd", dns=["localhost"], ips=["127.0.0.1"])
    vault = ca.issue("vault", dns=["localhost"], ips=["127.0.0.1"], client_identity="vault")
    sink = ca.issue("sink", dns=["localhost"], ips=["127.0.0.1"])
    keyd_port, vault_port, sink_port = free_port(), free_port(), free_port()
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
    vault_config = directory / "vault.toml"
    vault_config.write_text(
        'profile = "production"\n'
        "[server]\n"
        f'host = "127.0.0.1"\nport = {vault_port}\n'
        f'cert_file = "{vault.cert_path}"\nkey_file = "{vault.key_path}"\n'
        f'[store]\nurl = "sqlite:///{vault_dir / "vault.db"}"\n'
        "[keyservice]\n"
        f'url = "https://localhost:{keyd_port}"\nca_file = "{ca.cert_path}"\n'
        f'cert_file = "{vault.cert_path}"\nkey_file = "{vault.key_path}"\n'
        "[limits]\nsecret_rate = 1000000.0\nsecret_burst = 1000000.0\n"
        # The sink is on loopback, with a certificate of this run's CA.
        f'[webhooks]\nallowed_hosts = ["localhost"]\nca_file = "{ca.cert_path}"\n'
    )
    sink_args = [
        str(Path(__file__).resolve()),
        "--sink",
        str(sink_port),
        str(sink.cert_path),
        str(sink.key_path),
    ]
    return Deployment(
        directory, ca.cert_path, keyd_port, vault_port, sink_port, keyd_config, vault_config,
        sink_args,
    )  # fmt: skip


# --- the measurement ----------------------------------------------------------------


@dataclass
class CaseTotals:
    label: str
    seconds: float = 0.0
    made: int = 0
    errors: int = 0
    vault_cpu: float = 0.0
    p50s: list[float] = field(default_factory=list)

    @property
    def per_second(self) -> float:
        return self.made / self.seconds if self.seconds else 0.0


@dataclass
class Delivery:
    """What the sink got, run by run of the ONE case."""

    during: list[tuple[int, float]] = field(default_factory=list)  # (delivered, seconds)
    lags: list[int] = field(default_factory=list)  # events not delivered when a run ended
    drains: list[tuple[int, float]] = field(default_factory=list)  # (backlog, seconds)
    unfinished: int = 0


def sink_stats(http: httpx.Client, deployment: Deployment) -> dict[str, Any]:
    r = http.get(f"{deployment.sink_url}/stats")
    r.raise_for_status()
    return dict(r.json())


def wait_for_sink(
    http: httpx.Client, deployment: Deployment, expected: int, timeout: float
) -> tuple[int, float]:
    """Until the sink has ``expected`` events (or ``timeout``): what it has, and when
    (wall clock) its last one came."""
    deadline = time.monotonic() + timeout
    while True:
        stats = sink_stats(http, deployment)
        if stats["unique"] >= expected or time.monotonic() > deadline:
            last = stats["times"][-1] if stats["times"] else time.time()
            return int(stats["unique"]), float(last)
        time.sleep(0.2)


def run_case(
    case: WrkCase, script: Path, *, concurrency: int, seconds: float, vault_pid: int
) -> tuple[int, int, float, float, float]:
    """``(made, errors, seconds, vault CPU seconds, p50 ms)`` of one wrk run."""
    out, cpu, _ = run_wrk(
        case, script, concurrency=concurrency, seconds=seconds, pids={"vault": vault_pid}
    )
    statuses = {int(k): v for k, v in out["statuses"].items()}
    made = statuses.get(200, 0)
    errors = out["errors"] + sum(n for s, n in statuses.items() if s != 200)
    return made, errors, out["duration_us"] / 1e6, cpu["vault"], out["p50_us"] / 1000


def measure(
    deployment: Deployment,
    keys: dict[str, str],
    *,
    vault_pid: int,
    http: httpx.Client,
    concurrency: int,
    seconds: float,
    rounds: int,
    drain_timeout: float,
) -> tuple[dict[str, CaseTotals], Delivery]:
    d = deployment.directory
    script = d / "bench.lua"
    script.write_text(WRK_SCRIPT)
    bodies = write_bodies(d / "wrk-tokenize.txt", [TOKENIZE_BODY])
    form = "Content-Type: application/x-www-form-urlencoded"
    url = f"{deployment.vault_url}/v1/payment_methods"
    cases = {
        label: WrkCase(label, url, bodies, [f"Authorization: Bearer {keys[label]}", form],
                       "vault", (200,))
        for label in (NONE, ONE)
    }  # fmt: skip
    expected = 0
    for label in (NONE, ONE):
        made, *_ = run_case(
            cases[label], script, concurrency=concurrency, seconds=WARMUP_S, vault_pid=vault_pid
        )
        if label == ONE:
            expected += made
    wait_for_sink(http, deployment, expected, drain_timeout)
    totals = {label: CaseTotals(label) for label in (NONE, ONE)}
    delivery = Delivery()
    # wrk takes whole seconds only ("6.7s" is refused): each round's share is rounded.
    per_round = float(max(1, round(seconds / rounds)))
    for n in range(rounds):
        order = (NONE, ONE) if n % 2 == 0 else (ONE, NONE)
        for label in order:
            before = sink_stats(http, deployment)["unique"] if label == ONE else 0
            made, errors, took, cpu, p50 = run_case(
                cases[label], script, concurrency=concurrency, seconds=per_round,
                vault_pid=vault_pid,
            )  # fmt: skip
            ended = time.time()
            t = totals[label]
            t.seconds += took
            t.made += made
            t.errors += errors
            t.vault_cpu += cpu
            t.p50s.append(p50)
            if label == ONE:
                expected += made
                now = sink_stats(http, deployment)["unique"]
                delivery.during.append((now - before, took))
                backlog = expected - now
                delivery.lags.append(backlog)
                got, last = wait_for_sink(http, deployment, expected, drain_timeout)
                if got < expected:
                    delivery.unfinished += expected - got
                elif backlog > 0:
                    delivery.drains.append((backlog, max(last - ended, 1e-3)))
            print(
                f"  round {n + 1}/{rounds} {label:<24} {made / took:>8,.0f} tokenizations/s"
                + (f", lag at end {delivery.lags[-1]:,}" if label == ONE else ""),
                file=sys.stderr,
                flush=True,
            )
    return totals, delivery


def report(
    totals: dict[str, CaseTotals], delivery: Delivery, args: argparse.Namespace, elapsed: float
) -> None:
    print(
        f"\nbench/events.py: {platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs; wrk -t 1 -c {args.concurrency}; {args.rounds} alternating "
        f"rounds, {args.seconds:g} s per case in all; {elapsed:.0f} s elapsed\n"
    )
    header = ("case", "tokenizations/s", "p50 ms (median)", "vault CPU µs/req", "errors")
    rows = []
    for t in totals.values():
        p50 = sorted(t.p50s)[len(t.p50s) // 2] if t.p50s else float("nan")
        cpu = t.vault_cpu / t.made * 1e6 if t.made else float("nan")
        rows.append((t.label, f"{t.per_second:,.0f}", f"{p50:.2f}", f"{cpu:,.0f}", str(t.errors)))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    ratio = totals[ONE].per_second / totals[NONE].per_second if totals[NONE].per_second else 0
    verdict = "met" if ratio >= 0.9 else "NOT met"
    print(f"\none endpoint / none: {ratio:.2f} (goal >= 0.90: {verdict})")
    delivered = sum(n for n, _ in delivery.during)
    during_s = sum(s for _, s in delivery.during)
    print(
        f"deliveries during the load: {delivered:,} in {during_s:.1f} s = "
        f"{delivered / during_s if during_s else 0:,.0f}/s, against "
        f"{totals[ONE].per_second:,.0f} events/s made"
    )
    print(f"undelivered when each run ended: {', '.join(f'{n:,}' for n in delivery.lags)}")
    if delivery.drains:
        backlog = sum(n for n, _ in delivery.drains)
        drain_s = sum(s for _, s in delivery.drains)
        print(
            f"drain with the API idle: {backlog:,} deliveries in {drain_s:.1f} s = "
            f"{backlog / drain_s:,.0f}/s"
        )
        # What the vault sustains when every event must also be delivered: the cards
        # of the ONE runs over their load time and the drain after.
        sustained = totals[ONE].made / (totals[ONE].seconds + drain_s)
        print(
            f"tokenize and deliver, sustained: {sustained:,.0f}/s "
            f"({sustained / totals[NONE].per_second:.2f} of no endpoint)"
            if totals[NONE].per_second
            else ""
        )
    if delivery.unfinished:
        print(f"NOT delivered within --drain-timeout: {delivery.unfinished:,}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="per case, all rounds")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--drain-timeout", type=float, default=120.0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--sink", nargs=3, metavar=("PORT", "CERT", "KEY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sink:
        sink_main(int(args.sink[0]), args.sink[1], args.sink[2])
        return 0
    if not (1 <= args.rounds <= 100 and 1 <= args.concurrency <= 1024 and args.seconds > 0):
        parser.error("--rounds 1..100, --concurrency 1..1024, --seconds > 0")
    started = time.monotonic()
    temp = Path(tempfile.mkdtemp(prefix="cardvault-bench-events-"))
    deployment = write_deployment(temp)
    run_cardvault(["keyservice", "init", "--config", str(deployment.keyd_config)],
                  log=temp / "keyd.log")  # fmt: skip
    keys = {
        ONE: create_account(deployment.vault_config, temp / "vault.log"),
        NONE: create_account(deployment.vault_config, temp / "vault.log"),
    }
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(python_process(deployment.sink_args, log=temp / "sink.log"))
        wait_for_port(deployment.sink_port, sink, log=temp / "sink.log")
        keyd = stack.enter_context(
            cardvault_process(["keyservice", "serve", "--config", str(deployment.keyd_config)],
                              log=temp / "keyd.log")
        )  # fmt: skip
        wait_for_port(deployment.keyd_port, keyd, log=temp / "keyd.log")
        vault = stack.enter_context(
            cardvault_process(["vault", "serve", "--config", str(deployment.vault_config)],
                              log=temp / "vault.log")
        )  # fmt: skip
        wait_for_port(deployment.vault_port, vault, log=temp / "vault.log")
        http = stack.enter_context(
            httpx.Client(verify=client_context(deployment.ca), trust_env=False, timeout=30)
        )
        made = http.post(
            f"{deployment.vault_url}/v1/webhook_endpoints",
            data={
                "url": f"{deployment.sink_url}/hooks",
                "enabled_events[]": "payment_method.created",
            },
            auth=(keys[ONE], ""),
        )
        if made.status_code != 200:
            raise RuntimeError(f"the webhook endpoint was refused: {made.text}")
        print(f"vault pid {vault.pid}; logs in {temp}", file=sys.stderr, flush=True)
        totals, delivery = measure(
            deployment, keys, vault_pid=vault.pid, http=http, concurrency=args.concurrency,
            seconds=args.seconds, rounds=args.rounds, drain_timeout=args.drain_timeout,
        )  # fmt: skip
    report(totals, delivery, args, time.monotonic() - started)
    if not args.keep:
        import shutil

        shutil.rmtree(temp, ignore_errors=True)
    else:
        print(f"kept: {temp}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
