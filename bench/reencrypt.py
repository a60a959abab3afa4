"""The re-encryption job: stored keys moved per second, and what it costs live traffic.

Starts a key service and a vault (SQLite), stores about ``--keys`` data keys (the vault
is seeded with ``datakeys.max_uses = 1``, and each card and its event take a pan data
key each, so ``--keys / 2`` cards), restarts the vault with the default data-key
policy, rotates ``pan`` and measures:

* the tokenize rate (``--concurrency`` clients, without pause) while
  ``cardvault keys reencrypt pan`` runs at its default rate, in alternating windows of
  ``--window`` seconds: the job paused (SIGSTOP to the command, so no batch is asked
  for) and the job running (SIGCONT). Alternating short windows within one stretch of
  load keeps the machine's drift (other jobs on a shared machine, the database growing)
  out of the comparison: each running window is compared with the mean of the paused
  windows on either side, and the median of those ratios is the cost. The first half
  second of each window is left out (a batch asked for just before a pause is still
  being served);
* keys moved per second by that run (its own pace, pauses left out), and by an
  unthrottled run with no traffic after another rotation.

Goal: the job at its default rate costs live traffic at most 10 %.

    .venv/bin/python bench/reencrypt.py               # 10,000 keys
    .venv/bin/python bench/reencrypt.py --keys 4000 --pairs 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
from _common import cardvault_process, free_port, run_cardvault, wait_for_port
from _deploy import create_account, keyd_config, make_pki, vault_config

from cardvault.transport.certs import load_ca
from cardvault.transport.tls import client_context

NUMBERS = ["4242424242424242", "5555555555554444", "4000056655665556", "5200828282828210"]


async def load(
    url: str,
    ca: Path,
    sk: str,
    *,
    seconds: float,
    concurrency: int,
    total: int | None = None,
    stamps: list[float] | None = None,
) -> tuple[int, int, float]:
    """Tokenize for ``seconds`` (or until ``total`` cards): ``(ok, errors, elapsed)``;
    the time of every success appended to ``stamps``."""
    ok = errors = 0
    started = time.monotonic()
    deadline = started + seconds
    async with httpx.AsyncClient(
        verify=client_context(ca), timeout=30, limits=httpx.Limits(max_connections=concurrency)
    ) as http:

        async def worker(i: int) -> None:
            nonlocal ok, errors
            n = i
            while time.monotonic() < deadline and (total is None or ok + errors < total):
                r = await http.post(
                    f"{url}/v1/payment_methods",
                    data={"type": "card", "card[number]": NUMBERS[n % 4],
                          "card[exp_month]": "12", "card[exp_year]": "2034"},
                    headers={"authorization": f"Bearer {sk}"},
                )  # fmt: skip
                if r.status_code == 200:
                    ok += 1
                    if stamps is not None:
                        stamps.append(time.monotonic())
                else:
                    errors += 1
                n += concurrency

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return ok, errors, time.monotonic() - started


def keys_cli(env: dict[str, str], cwd: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "cardvault", "keys", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
    )  # fmt: skip


def follow(job: subprocess.Popen[str], events: list[dict[str, Any]]) -> threading.Thread:
    def read() -> None:
        assert job.stdout is not None
        for line in job.stdout:
            events.append({**json.loads(line), "t": time.monotonic()})

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def moved_in(events: list[dict[str, Any]], spans: list[tuple[float, float]]) -> tuple[int, float]:
    """Keys moved by batches that ended inside ``spans``, per second of those spans."""
    inside = [e for e in events if e["event"] == "batch" and any(a <= e["t"] < b for a, b in spans)]
    moved = sum(int(e.get("moved", 0)) for e in inside)
    return moved, moved / max(sum(b - a for a, b in spans), 1e-9)


def moved_per_second(events: list[dict[str, Any]]) -> tuple[int, float]:
    batches = [e for e in events if e["event"] in ("batch", "done")]
    moved = sum(int(e.get("moved", 0)) for e in batches)
    start = next(e["t"] for e in events if e["event"] == "start")
    elapsed = max(batches[-1]["t"] - start, 1e-9) if batches else 1e-9
    return moved, moved / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--window", type=float, default=4.0, help="seconds per window")
    parser.add_argument("--pairs", type=int, default=8, help="running windows")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-reencrypt-") as tmp:
        d = Path(tmp)
        pki = make_pki(d)
        ca = load_ca(d / "pki")  # the CA make_pki made
        admin = ca.issue("admin", client_identity="admin")
        kport, vport, aport = free_port(), free_port(), free_port()
        kconf = keyd_config(d, pki, kport)
        run_cardvault(["keyservice", "init", "--config", str(kconf)], log=d / "init.log")
        base = vault_config(d, pki, vport, kport, f"sqlite:///{d / 'vault.db'}").read_text()
        admin_table = f'[admin]\nport = {aport}\nclient_ca_file = "{pki.ca}"\n'
        seed_conf, run_conf = d / "vault-seed.toml", d / "vault.toml"
        seed_conf.write_text(base + admin_table + "[datakeys]\nmax_uses = 1\n")
        run_conf.write_text(base + admin_table)
        sk = create_account(run_conf, d / "account.log")["secret"]
        env = {
            **os.environ,
            "CARDVAULT_KEYSERVICE_URL": f"https://localhost:{kport}",
            "CARDVAULT_VAULT_ADMIN_URL": f"https://localhost:{aport}",
            "CARDVAULT_CA_BUNDLE": str(pki.ca),
            "CARDVAULT_ADMIN_CERT": str(admin.cert_path),
            "CARDVAULT_ADMIN_KEY": str(admin.key_path),
        }
        env.pop("CARDVAULT_STACK", None)
        url = f"https://localhost:{vport}"
        with cardvault_process(
            ["keyservice", "serve", "--config", str(kconf)], log=d / "keyd.log"
        ) as keyd:
            wait_for_port(kport, keyd, log=d / "keyd.log")
            with cardvault_process(
                ["vault", "serve", "--config", str(seed_conf)], log=d / "vault.log"
            ) as vault:
                wait_for_port(vport, vault, log=d / "vault.log")
                t0 = time.monotonic()
                ok, errors, _ = asyncio.run(
                    load(url, pki.ca, sk, seconds=3600, concurrency=32, total=args.keys // 2)
                )
                print(f"seeded {ok} cards ({errors} errors) in {time.monotonic() - t0:.1f} s",
                      file=sys.stderr)  # fmt: skip
                vault.terminate()
                vault.wait(30)
            with cardvault_process(
                ["vault", "serve", "--config", str(run_conf)], log=d / "vault.log"
            ) as vault:
                wait_for_port(vport, vault, log=d / "vault.log")
                asyncio.run(
                    load(url, pki.ca, sk, seconds=2, concurrency=args.concurrency)
                )  # warm-up
                rotate = keys_cli(env, d, "rotate", "pan")
                assert rotate.wait(60) == 0, rotate.stderr.read() if rotate.stderr else ""
                events: list[dict[str, Any]] = []
                job = keys_cli(env, d, "reencrypt", "pan")
                reader = follow(job, events)
                while not any(e["event"] == "batch" for e in events):
                    time.sleep(0.05)
                stamps: list[float] = []
                span = args.window * (2 * args.pairs + 1) + 2
                traffic = threading.Thread(
                    target=lambda: asyncio.run(
                        load(url, pki.ca, sk, seconds=span, concurrency=args.concurrency,
                             stamps=stamps)
                    )
                )  # fmt: skip
                traffic.start()
                time.sleep(1.0)  # the clients' connections made before the first window
                windows: list[tuple[str, float, float]] = []
                for i in range(2 * args.pairs + 1):
                    state = "running" if i % 2 else "paused"
                    if job.poll() is not None:
                        break
                    job.send_signal(signal.SIGCONT if i % 2 else signal.SIGSTOP)
                    start = time.monotonic()
                    time.sleep(args.window)
                    windows.append((state, start + 0.5, time.monotonic()))
                job.send_signal(signal.SIGCONT)
                traffic.join()
                code = job.wait(3600)
                reader.join(10)
                running = [(a, b) for state, a, b in windows if state == "running"]
                moved, default_rate = moved_in(events, running)
                # Unthrottled, with no traffic: the job's own ceiling.
                rotate = keys_cli(env, d, "rotate", "pan")
                assert rotate.wait(60) == 0
                fast_events: list[dict[str, Any]] = []
                fast = keys_cli(
                    env, d, "reencrypt", "pan", "--rate", "1000000", "--batch-size", "500"
                )
                fast_reader = follow(fast, fast_events)
                fast_code = fast.wait(3600)
                fast_reader.join(10)
                fast_moved, fast_rate = moved_per_second(fast_events)
        rates = [(state, sum(1 for t in stamps if a <= t < b) / (b - a)) for state, a, b in windows]
        costs = [
            100 * (1 - rate / ((rates[i - 1][1] + rates[i + 1][1]) / 2))
            for i, (state, rate) in enumerate(rates)
            if state == "running" and i + 1 < len(rates)
        ]
        print(f"stored keys (about)             {args.keys}")
        print(f"job at default rate             {moved} keys in the running windows, "
              f"{default_rate:,.0f} keys/s (exit {code})")  # fmt: skip
        print(
            f"job unthrottled (no traffic)    {fast_moved} keys, {fast_rate:,.0f} keys/s (exit {fast_code})"
        )
        print("tokenize per window (/s)        "
              + ", ".join(f"{state[0]} {rate:,.0f}" for state, rate in rates))  # fmt: skip
        print("cost per running window (%)     " + ", ".join(f"{c:.1f}" for c in costs))
        if costs:
            print(f"cost to live traffic            {statistics.median(costs):.1f} % median "
                  f"of {len(costs)} (goal <= 10 %)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
