"""Rate limits shared through Redis: two vault processes on one PostgreSQL database give
a key its rate once, not once per process; in memory they give it twice (which shows the
test can tell). Redis is a redis-server of the test's own, killed and restarted here."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from cardvault.transport.tls import client_context
from helpers import Pki, cardvault_process, free_ports, wait_for_port
from redis_support import RedisServer, redis_server
from stack import Stack, run_stack, vault_database

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

RATE, BURST = 5.0, 5.0
SECONDS = 4.0


@dataclass
class Deployment:
    stack: Stack
    redis: RedisServer
    #: Two vault processes with backend "redis", and two with "memory", on one database.
    shared: list[str]
    memory: list[str]
    ca_file: Path
    #: The logs of the shared processes.
    logs: list[Path]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Deployment]:
    d = tmp_path_factory.mktemp("shared-limits")
    with contextlib.ExitStack() as exits:
        redis = exits.enter_context(redis_server(d / "redis"))
        dsn = exits.enter_context(vault_database("postgres", d / "db"))
        limits = (
            f"secret_rate = {RATE}\nsecret_burst = {BURST}\n"
            f'backend = "redis"\nredis_url = "{redis.url}"\n'
        )
        stack = exits.enter_context(
            contextlib.contextmanager(run_stack)(
                tmp_path_factory,
                pki,
                "postgres",
                dsn,
                limits=limits,
                vault_env={"CARDVAULT_STORE_REPLICA": "vault-a"},
            )
        )
        # Three more processes on the stack's settings: the same database and key
        # service, each with its own port, audit directory and replica name; two of
        # them keep their buckets in memory.
        ports = free_ports(3)
        started = []
        for name, port, backend in zip(
            ("vault-b", "vault-c", "vault-d"), ports, ("redis", "memory", "memory"), strict=True
        ):
            env = {
                "CARDVAULT_SERVER_PORT": str(port),
                "CARDVAULT_AUDIT_DIRECTORY": str(d / name / "audit"),
                "CARDVAULT_STORE_REPLICA": name,
                "CARDVAULT_LIMITS_BACKEND": backend,
            }
            proc = exits.enter_context(
                cardvault_process(
                    ["vault", "serve", "--config", str(stack.vault_config)],
                    env=env,
                    log=d / f"{name}.log",
                )
            )
            started.append((port, proc))
        for port, proc in started:
            wait_for_port(port, proc)
        urls = [f"https://localhost:{port}" for port in ports]
        yield Deployment(
            stack,
            redis,
            [stack.url, urls[0]],
            urls[1:],
            pki.ca_file,
            [stack.vault_log, d / "vault-b.log"],
        )


def hammer(
    urls: list[str], key: str, ca_file: Path, seconds: float, threads_per_url: int = 3
) -> tuple[Counter[int], float, float]:
    """Requests with ``key`` to every URL at once for ``seconds``, as fast as they are
    answered: the count of each status, the seconds it took, the slowest answer."""
    statuses: Counter[int] = Counter()
    slowest = [0.0]
    lock = threading.Lock()
    ctx = client_context(ca_file)
    start = time.monotonic()
    deadline = start + seconds

    def worker(url: str) -> None:
        with httpx.Client(verify=ctx, trust_env=False, timeout=10) as http:
            while time.monotonic() < deadline:
                began = time.monotonic()
                r = http.get(
                    f"{url}/v1/payment_methods?limit=1",
                    headers={"authorization": f"Bearer {key}"},
                )
                took = time.monotonic() - began
                with lock:
                    statuses[r.status_code] += 1
                    slowest[0] = max(slowest[0], took)

    threads = [
        threading.Thread(target=worker, args=(url,)) for url in urls for _ in range(threads_per_url)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return statuses, time.monotonic() - start, slowest[0]


def warm_up(d: Deployment, urls: list[str]) -> None:
    """One request to each process with another account's key (connections, caches)."""
    hammer(urls, d.stack.accounts[1]["sk"], d.ca_file, 0.2, threads_per_url=1)


def test_two_processes_on_redis_give_a_key_its_rate_once(deployment: Deployment) -> None:
    d = deployment
    warm_up(d, d.shared + d.memory)
    key = d.stack.accounts[0]["sk"]

    shared, elapsed, _ = hammer(d.shared, key, d.ca_file, SECONDS)
    once = BURST + RATE * elapsed
    assert set(shared) == {200, 429}, shared
    assert 0.75 * once <= shared[200] <= 1.15 * once + 2, (shared, once)

    # The same key on two processes with buckets in memory: each gives it the rate.
    alone, elapsed, _ = hammer(d.memory, key, d.ca_file, SECONDS)
    once = BURST + RATE * elapsed
    assert set(alone) == {200, 429}, alone
    assert alone[200] >= 1.6 * once, (alone, once)


def test_when_redis_dies_each_process_limits_alone_until_it_is_back(
    deployment: Deployment,
) -> None:
    d = deployment
    key = d.stack.accounts[1]["sk"]
    d.redis.kill()
    try:
        down, elapsed, slowest = hammer(d.shared, key, d.ca_file, 2.0)
    finally:
        d.redis.start()
    # Fail open to each process's own bucket: no error, no answer waiting on Redis past
    # its timeout, and a limit all the same (each process's).
    once = BURST + RATE * elapsed
    assert set(down) == {200, 429}, down
    assert 0.75 * once <= down[200] <= 2 * (1.15 * once + 2), (down, once)
    assert slowest < 2.0

    # Back: after the background ping finds it (within a second), shared again.
    time.sleep(1.5)
    warm_up(d, d.shared)
    back, elapsed, _ = hammer(d.shared, d.stack.accounts[0]["sk"], d.ca_file, 2.0)
    once = BURST + RATE * elapsed
    assert 0.75 * once <= back[200] <= 1.15 * once + 2, (back, once)
    logs = "".join(p.read_text(errors="replace") for p in d.logs)
    assert "Redis does not answer" in logs
    assert "Redis answers again" in logs
