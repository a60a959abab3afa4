"""Benchmark the key service over mutual TLS: no-op vs datakey vs unwrap.

Starts a real key service process (development profile, development seal, SQLite store,
a fresh deployment CA in a temporary directory), then measures operations per second
and latency with keep-alive connections, at concurrency 1 and 32, for a fixed time per
case. ``POST /v1/noop`` is the same server's cheapest authenticated endpoint, so the
"vs noop" column is the cost of the key operation itself over the TLS, HTTP, identity
and logging overhead every request pays.

    .venv/bin/python bench/keyservice.py --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
from _common import (
    Result,
    Send,
    cardvault_process,
    free_port,
    measure,
    print_table,
    run_cardvault,
    wait_for_port,
)

from cardvault.transport.certs import init_ca
from cardvault.transport.tls import client_context

NOOP = "POST /v1/noop"
DATAKEY = "POST /v1/keys/pan/datakey"
UNWRAP = "POST /v1/keys/pan/unwrap"


def write_config(directory: Path, port: int) -> tuple[Path, Path, tuple[Path, Path]]:
    """A CA, a server certificate, a ``vault`` client certificate and a dev-seal config."""
    ca = init_ca(directory / "pki")
    server = ca.issue("keyservice", dns=["localhost"], ips=["127.0.0.1"])
    client = ca.issue("vault", client_identity="vault")
    config = directory / "keyservice.toml"
    config.write_text(
        'profile = "development"\n'
        "[server]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f'cert_file = "{server.cert_path}"\nkey_file = "{server.key_path}"\n'
        f'client_ca_file = "{ca.cert_path}"\n'
        "[store]\n"
        f'url = "sqlite:///{directory / "keyd.db"}"\n'
        "[seal]\n"
        f'type = "dev"\ndev_key_file = "{directory / "root.key"}"\n'
    )
    return config, ca.cert_path, (client.cert_path, client.key_path)


class Caller:
    """POSTs to the key service on one session; any status but 200 stops the run."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        async with self.session.post(self.base + path, json=body) as response:
            data = await response.json()
            if response.status != 200:
                raise RuntimeError(f"{path} answered {response.status}: {data}")
            return data  # type: ignore[no-any-return]

    def sender(self, path: str, body: dict[str, Any] | None = None) -> Send:
        async def send() -> None:
            await self.post(path, body)

        return send


async def run_cases(
    base: str, ca: Path, client_cert: tuple[Path, Path], *, seconds: float, levels: list[int]
) -> list[Result]:
    ssl_context = client_context(ca, client_cert=client_cert)
    results: list[Result] = []
    for concurrency in levels:
        connector = aiohttp.TCPConnector(limit=concurrency, ssl=ssl_context)
        async with aiohttp.ClientSession(connector=connector) as session:
            caller = Caller(session, base)
            # One wrapped key for every unwrap, checked once to round-trip.
            issued = await caller.post("/v1/keys/pan/datakey")
            body = {"ciphertext": issued["ciphertext"]}
            unwrapped = await caller.post("/v1/keys/pan/unwrap", body)
            if unwrapped["plaintext"] != issued["plaintext"]:
                raise RuntimeError("unwrap did not return the data key's plaintext")
            if len(base64.b64decode(issued["plaintext"])) != 32:
                raise RuntimeError("datakey did not return a 32-byte key")

            cases = [
                (NOOP, caller.sender("/v1/noop")),
                (DATAKEY, caller.sender("/v1/keys/pan/datakey")),
                (UNWRAP, caller.sender("/v1/keys/pan/unwrap", body)),
            ]
            for label, send in cases:
                result = await measure(label, send, concurrency=concurrency, seconds=seconds)
                print(
                    f"  {label:<28} c={concurrency:<3} {result.ops_per_second:>8,.0f} ops/s",
                    file=sys.stderr,
                    flush=True,
                )
                results.append(result)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured time per case")
    parser.add_argument(
        "--concurrency",
        default="1,32",
        help="comma-separated numbers of keep-alive connections (default 1,32)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    levels = [int(part) for part in args.concurrency.split(",") if part.strip()]

    directory = Path(tempfile.mkdtemp(prefix="cardvault-bench-"))
    log = directory / "keyservice.log"
    port = free_port()
    config, ca, client_cert = write_config(directory, port)
    run_cardvault(["keyservice", "init", "--config", str(config)], log=log)

    with cardvault_process(["keyservice", "serve", "--config", str(config)], log=log) as proc:
        wait_for_port(port, proc, log=log)
        base = f"https://127.0.0.1:{port}"
        try:
            import uvloop

            loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
        except ImportError:
            loop_factory = None
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            results = runner.run(
                run_cases(base, ca, client_cert, seconds=args.seconds, levels=levels)
            )
        proc.terminate()
        code = proc.wait(15)

    print(
        f"\nkey service over mutual TLS, keep-alive; {args.seconds:g} s per case after a "
        f"0.5 s warm-up; one run\n"
        f"{platform.python_implementation()} {platform.python_version()}, "
        f"{os.cpu_count()} CPUs shared by the client and the server process\n"
    )
    print_table(results, baseline=NOOP)
    print(f"\nserver exited with {code}" + (f"; log: {log}" if args.keep else ""))
    if not args.keep:
        shutil.rmtree(directory)
    return 0 if code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
