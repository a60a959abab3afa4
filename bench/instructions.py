"""Instructions per request of the vault's app, counted by callgrind: a figure that does
not move with the load on a shared machine.

Timed benchmarks on this project's 2-core machines drift by 10-20 % between runs, which
hides any single change worth less than that. This script runs the vault's ASGI
application *in this process* (no TLS, no HTTP parsing: only the application, its
store, its audit log and its access log, configured as in production) against a real
key service, and drives ``--concurrency`` concurrent requests on one event loop. Under
``valgrind --tool=callgrind`` it runs twice, with ``--small`` and ``--large``
requests, and prints ``(large - small) / (large - small requests)``: the instructions
one more request costs, start-up excluded, repeatable to about 1 %. Instructions are
not time (cache misses and system calls, fsync included, are not in them), so confirm a
gain with ``tokenization.py``; but they tell whether a change did anything at all.

    .venv/bin/python bench/instructions.py                    # tokenize and noop
    .venv/bin/python bench/instructions.py --endpoint tokenize --small 100 --large 300
    .venv/bin/python bench/instructions.py --endpoint forward   # and the acquirer

``--endpoint forward`` runs the deployment of ``forward.py`` instead (its allowlist and
the simulated acquirer, ``examples/acquirer``, over HTTPS, in a process of its own that
callgrind does not count): 20 payment methods of the published test card (no CVC) are
made first, then each request is ``POST /v1/forwarding/requests`` with ``card_number``
and ``card_expiry``, as ``forward.py`` sends it. The forward's count includes the
vault's side of the outbound request (aiohttp, TLS both ways), not the acquirer's.

Without valgrind on the machine, ``--no-valgrind`` prints CPU time per request instead
(noisy, as above). ``--profile FILE`` runs one endpoint's ``--large`` requests without
valgrind under cProfile and writes its statistics to FILE, for ``pstats`` (where the
instructions go, by Python function; cProfile's own cost inflates small functions).
The work is done by the same script run as ``--child``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import itertools
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _deploy import create_account, keyd_config, make_pki, vault_config
from tokenization import card_bodies

HERE = Path(__file__).resolve().parent
ENDPOINTS = {
    "tokenize": "/v1/payment_methods",
    "noop": "/v1/noop",
    "forward": "/v1/forwarding/requests",
}
#: What ``--endpoint both`` runs (the forward needs the acquirer: asked for by name).
BOTH = ("tokenize", "noop")
WARMUP = 300


def _exchange(body: bytes) -> tuple[Any, Any, list[int]]:
    """An ASGI ``receive`` that delivers ``body`` once, and a ``send`` that keeps the
    status."""
    delivered = False
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    return receive, send, statuses


async def _drive(app: Any, path: str, bodies: list[bytes], key: str, count: int, c: int) -> int:
    """``count`` POSTs to ``path`` from ``c`` concurrent tasks; the statuses must be 200."""
    done = 0
    cycle = itertools.cycle(bodies)

    async def worker() -> None:
        nonlocal done
        while done < count:
            done += 1
            body = next(cycle)
            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "https",
                "path": path,
                "raw_path": path.encode(),
                "query_string": b"",
                "root_path": "",
                "headers": [
                    (b"host", b"localhost"),
                    (b"authorization", b"Bearer " + key.encode()),
                    (b"content-type", b"application/x-www-form-urlencoded"),
                    (b"content-length", str(len(body)).encode()),
                ],
                "client": ("127.0.0.1", 50000),
                "server": ("127.0.0.1", 443),
                "extensions": {},
            }
            receive, send, statuses = _exchange(body)
            await app(scope, receive, send)
            if statuses != [200]:
                raise RuntimeError(f"{path} answered {statuses}")

    await asyncio.gather(*(worker() for _ in range(c)))
    return count


def child(args: argparse.Namespace) -> None:
    """Set up the deployment, warm up, then run ``--count`` requests and exit."""
    from _common import cardvault_process, free_port, run_cardvault, wait_for_port

    work = Path(tempfile.mkdtemp(prefix="cardvault-instructions-"))
    try:
        if args.endpoint == "forward":
            _forward_child(args, work)
            return
        pki = make_pki(work)
        keyd_port = free_port()
        kconf = keyd_config(work, pki, keyd_port)
        keyd_log = work / "keyd.log"
        run_cardvault(["keyservice", "init", "--config", str(kconf)], log=keyd_log)
        with cardvault_process(
            ["keyservice", "serve", "--config", str(kconf)], log=keyd_log
        ) as keyd:
            wait_for_port(keyd_port, keyd, log=keyd_log)
            (work / "vault").mkdir()
            config = vault_config(
                work / "vault", pki, free_port(), keyd_port, f"sqlite:///{work / 'vault' / 'v.db'}"
            )
            key = create_account(config, work / "accounts.log")["secret"]
            _measure(args, work, config, key)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _forward_child(args: argparse.Namespace, work: Path) -> None:
    """The forward case: ``forward.py``'s deployment, its acquirer and key service."""
    from _common import cardvault_process, run_cardvault, wait_for_port
    from forward import create_account as create_secret_key
    from forward import python_process, write_deployment

    deployment = write_deployment(work)
    keyd_log = work / "keyd.log"
    run_cardvault(["keyservice", "init", "--config", str(deployment.keyd_config)], log=keyd_log)
    key = create_secret_key(deployment.vault_config, work / "accounts.log")
    with (
        python_process(deployment.acquirer_args, log=work / "acquirer.log") as acquirer,
        cardvault_process(
            ["keyservice", "serve", "--config", str(deployment.keyd_config)], log=keyd_log
        ) as keyd,
    ):
        wait_for_port(deployment.keyd_port, keyd, log=keyd_log)
        wait_for_port(deployment.acquirer_port, acquirer, log=work / "acquirer.log")
        _measure(args, work, deployment.vault_config, key, deployment=deployment)


def _measure(
    args: argparse.Namespace, work: Path, config: Path, key: str, deployment: Any = None
) -> None:
    """Build the vault's app from ``config`` in this process, warm up, then time
    ``--count`` requests to ``--endpoint``."""
    from cardvault.audit.recorder import open_audit_log
    from cardvault.config import load_settings
    from cardvault.logging import configure_logging
    from cardvault.vault import app as vault_app
    from cardvault.vault.settings import VaultSettings

    settings = load_settings(VaultSettings, config)
    # The production configuration: JSON lines at info, to a file.
    with open(work / "vault.log", "w") as log:
        configure_logging(profile="production", level="info", fmt="json", stream=log)
        service = vault_app.build_vault(settings)
        assert service is not None
        app = vault_app.build_listeners(settings, service)[0].app
        bodies = card_bodies() if args.endpoint == "tokenize" else [b""]
        path = ENDPOINTS[args.endpoint]

        async def run() -> None:
            nonlocal bodies
            directory, _ = settings.audit.resolved(settings.store.url)
            service.audit.log = await open_audit_log(directory, settings.audit)
            await service.store.migrate()
            if deployment is not None:
                bodies = await _forward_bodies(app, key, deployment, settings.store.url)
            await _drive(app, path, bodies, key, WARMUP, args.concurrency)
            profiler = cProfile.Profile() if args.profile else None
            started = time.process_time()
            if profiler is not None:
                profiler.enable()
            await _drive(app, path, bodies, key, args.count, args.concurrency)
            if profiler is not None:
                profiler.disable()
                profiler.dump_stats(args.profile)
            cpu = time.process_time() - started
            print(f"cpu_us_per_request {1e6 * cpu / args.count:.1f}", flush=True)
            await service.audit.close()
            await service.keys.keys.close()
            await service.forwarder.outbound.close()
            await service.store.close()

        import uvloop

        uvloop.run(run())


async def _forward_bodies(app: Any, key: str, deployment: Any, store_url: str) -> list[bytes]:
    """20 payment methods of ``forward.py``'s test card, made through the app, and a
    forward's body for each."""
    import sqlite3

    from forward import TOKENIZE_BODY, forward_body_list

    await _drive(app, ENDPOINTS["tokenize"], [TOKENIZE_BODY], key, 20, 1)
    with sqlite3.connect(store_url.removeprefix("sqlite:///")) as db:
        pms = [str(row[0]) for row in db.execute("SELECT id FROM payment_methods")]
    return forward_body_list(deployment, pms)


def _count(
    endpoint: str, n: int, concurrency: int, valgrind: bool, profile: str | None = None
) -> float:
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        "--endpoint",
        endpoint,
        "--count",
        str(n),
        "--concurrency",
        str(concurrency),
        *(["--profile", str(Path(profile).resolve())] if profile else []),
    ]
    if valgrind:
        command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", *command]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"{endpoint} x{n} failed ({result.returncode}):\n{output[-3000:]}")
    if valgrind:
        found = re.search(r"Collected : (\d+)", output)
    else:
        found = re.search(r"cpu_us_per_request ([\d.]+)", output)
    if found is None:
        raise RuntimeError(f"no figure in the output of {endpoint} x{n}:\n{output[-3000:]}")
    return float(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--endpoint", choices=[*ENDPOINTS, "both", "all"], default="both")
    parser.add_argument("--small", type=int, default=100)
    parser.add_argument("--large", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--no-valgrind", action="store_true")
    parser.add_argument("--profile", metavar="FILE", help="cProfile one endpoint into FILE")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return 0
    valgrind = not args.no_valgrind and not args.profile
    if args.profile and args.endpoint not in ENDPOINTS:
        parser.error("--profile takes one endpoint")
    if valgrind and shutil.which("valgrind") is None:
        parser.error("valgrind is not installed (or use --no-valgrind)")
    if args.large <= args.small:
        parser.error("--large must be more than --small")
    endpoints = {"both": list(BOTH), "all": list(ENDPOINTS)}.get(args.endpoint, [args.endpoint])
    figures: dict[str, float] = {}
    for endpoint in endpoints:
        if valgrind:
            small = _count(endpoint, args.small, args.concurrency, True)
            large = _count(endpoint, args.large, args.concurrency, True)
            figures[endpoint] = (large - small) / (args.large - args.small)
            unit = "instructions"
        else:
            figures[endpoint] = _count(endpoint, args.large, args.concurrency, False, args.profile)
            unit = "µs of CPU"
        print(f"{endpoint:>8}: {figures[endpoint]:>12,.0f} {unit} per request", flush=True)
    if "noop" in figures and "tokenize" in figures:
        print(f"   ratio: {figures['noop'] / figures['tokenize']:.3f} (noop / tokenize)")
    if "forward" in figures and "tokenize" in figures:
        print(f"   ratio: {figures['forward'] / figures['tokenize']:.3f} (forward / tokenize)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
