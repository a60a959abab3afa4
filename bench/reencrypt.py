"""The re-encryption job: stored keys moved per second, and what it costs live traffic.

Starts a key service and a vault (SQLite), stores ``--keys`` data keys (one per card:
the vault is seeded with ``datakeys.max_uses = 1``), restarts the vault with the default
data-key policy, rotates ``pan`` and measures:

* the tokenize rate with the job idle (``--seconds``, ``--concurrency`` clients), before
  the job and after it (their spread is the machine's noise);
* the tokenize rate while ``cardvault keys reencrypt pan`` runs at its default rate;
* keys moved per second by that run, and by an unthrottled run after another rotation.

Goal: the job at its default rate costs live traffic at most 10 %.

    .venv/bin/python bench/reencrypt.py               # 10,000 keys
    .venv/bin/python bench/reencrypt.py --keys 2000 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
    url: str, ca: Path, sk: str, *, seconds: float, concurrency: int, total: int | None = None
) -> tuple[int, int, float]:
    """Tokenize for ``seconds`` (or until ``total`` cards): ``(ok, errors, elapsed)``."""
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


def moved_per_second(events: list[dict[str, Any]]) -> tuple[int, float]:
    batches = [e for e in events if e["event"] in ("batch", "done")]
    moved = sum(int(e.get("moved", 0)) for e in batches)
    start = next(e["t"] for e in events if e["event"] == "start")
    elapsed = max(batches[-1]["t"] - start, 1e-9) if batches else 1e-9
    return moved, moved / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=10.0)
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
                    load(url, pki.ca, sk, seconds=3600, concurrency=32, total=args.keys)
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
                idle_ok, idle_err, idle_s = asyncio.run(
                    load(url, pki.ca, sk, seconds=args.seconds, concurrency=args.concurrency)
                )
                events: list[dict[str, Any]] = []
                job = keys_cli(env, d, "reencrypt", "pan")
                reader = follow(job, events)
                while not events:
                    time.sleep(0.05)
                busy_ok, busy_err, busy_s = asyncio.run(
                    load(url, pki.ca, sk, seconds=args.seconds, concurrency=args.concurrency)
                )
                job_running_at_end = job.poll() is None
                code = job.wait(3600)
                reader.join(10)
                moved, default_rate = moved_per_second(events)
                # Idle again: the spread between the two idle windows is the noise.
                idle2_ok, _, idle2_s = asyncio.run(
                    load(url, pki.ca, sk, seconds=args.seconds, concurrency=args.concurrency)
                )
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
        idle_rate, busy_rate = (idle_ok / idle_s + idle2_ok / idle2_s) / 2, busy_ok / busy_s
        cost = 100 * (1 - busy_rate / idle_rate) if idle_rate else 0.0
        print(f"stored keys                     {args.keys}")
        print(
            f"job at default rate             {moved} keys, {default_rate:,.0f} keys/s (exit {code})"
        )
        print(
            f"job unthrottled (no traffic)    {fast_moved} keys, {fast_rate:,.0f} keys/s (exit {fast_code})"
        )
        print(f"tokenize idle (before, after)   {idle_ok / idle_s:,.0f}/s, {idle2_ok / idle2_s:,.0f}/s "
              f"({idle_err} errors)")  # fmt: skip
        print(f"tokenize while the job runs     {busy_rate:,.0f}/s ({busy_err} errors)"
              + ("" if job_running_at_end else "  [the job ended before the window did]"))  # fmt: skip
        print(f"cost to live traffic            {cost:.1f} %  (goal <= 10 %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
