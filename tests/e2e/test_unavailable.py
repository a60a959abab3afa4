"""Try again later, over real HTTPS against real processes: the vault answers 503 with
its code and ``Retry-After`` when its PostgreSQL connections are cut or refused, and
when the key service is sealed or stopped; never a 500, and it answers 200 again once
they are back, without a restart.

PostgreSQL connections are ended with ``pg_terminate_backend`` on the test's own
database, or refused with ``ALLOW_CONNECTIONS false``; the server is never stopped.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from cardvault.transport.tls import client_context
from helpers import Pki, cardvault_process, wait_for_port
from stack import Stack, create_account, run_stack, vault_database

PG_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"

FORM = {
    "type": "card",
    "card[number]": "4242424242424242",
    "card[exp_month]": "12",
    "card[exp_year]": "2034",
}


def create(http: httpx.Client, stack: Stack, secret: str) -> httpx.Response:
    return http.post(
        f"{stack.url}/v1/payment_methods",
        data=FORM,
        headers={"authorization": f"Bearer {secret}"},
    )


def assert_503(r: httpx.Response, code: str, retry_after: str) -> None:
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == code, r.text
    assert r.json()["error"]["type"] == "api_error"
    assert r.headers["retry-after"] == retry_after


@pytest.fixture(scope="module")
def http(pki: Pki) -> Iterator[httpx.Client]:
    with httpx.Client(verify=client_context(pki.ca_file), trust_env=False, timeout=30) as c:
        yield c


# -- the vault's PostgreSQL -----------------------------------------------------------------


@pytest.fixture(scope="module")
def pg_stack(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Stack]:
    with vault_database("postgres", tmp_path_factory.mktemp("db")) as dsn:
        yield from run_stack(
            tmp_path_factory,
            pki,
            "postgres",
            dsn,
            limits="secret_rate = 100000.0\nsecret_burst = 100000.0\n",
        )


def _admin(sql: str, *args: object) -> object:
    import asyncpg

    async def run() -> object:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()

    return asyncio.run(run())


def _database(stack: Stack) -> str:
    return stack.dsn.rsplit("/", 1)[1]


def _terminate(stack: Stack) -> int:
    ended = _admin(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
        "WHERE datname = $1 AND pid <> pg_backend_pid()",
        _database(stack),
    )
    assert isinstance(ended, int)
    return ended


@pytest.mark.postgres
def test_a_database_refusing_the_vault_is_503_database_unavailable_until_it_is_back(
    http: httpx.Client, pg_stack: Stack
) -> None:
    secret = pg_stack.accounts[0]["sk"]
    assert create(http, pg_stack, secret).status_code == 200
    name = _database(pg_stack)
    _admin(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS false")
    try:
        _terminate(pg_stack)
        refused = create(http, pg_stack, secret)
        listed = http.get(
            f"{pg_stack.url}/v1/payment_methods", headers={"authorization": f"Bearer {secret}"}
        )
    finally:
        _admin(f"ALTER DATABASE {name} WITH ALLOW_CONNECTIONS true")
    assert_503(refused, "database_unavailable", "2")
    assert_503(listed, "database_unavailable", "2")
    # Back: the vault's pool connects again by itself.
    assert create(http, pg_stack, secret).status_code == 200


@pytest.mark.postgres
def test_creates_while_the_vaults_connections_are_terminated_repeatedly_are_200_or_503(
    http: httpx.Client, pg_stack: Stack
) -> None:
    secret = pg_stack.accounts[0]["sk"]
    assert create(http, pg_stack, secret).status_code == 200
    stop = threading.Event()
    terminations = 0

    def terminator() -> None:
        nonlocal terminations
        while not stop.is_set():
            terminations += _terminate(pg_stack)
            time.sleep(0.01)

    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def client_loop() -> None:
        while not stop.is_set():
            r = create(http, pg_stack, secret)
            with lock:
                answers.append(r)

    killer = threading.Thread(target=terminator)
    killer.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            loops = [pool.submit(client_loop) for _ in range(8)]
            deadline = time.monotonic() + 20
            # Three seconds at least; longer until a request was caught by an outage.
            started = time.monotonic()
            while time.monotonic() < deadline:
                time.sleep(0.2)
                with lock:
                    caught = any(r.status_code == 503 for r in answers)
                if caught and time.monotonic() - started > 3:
                    break
            stop.set()
            for loop in loops:
                loop.result()
    finally:
        stop.set()
        killer.join()
    statuses = {r.status_code for r in answers}
    assert terminations > 0
    assert statuses <= {200, 503}, [r.text for r in answers if r.status_code not in (200, 503)]
    unavailable = [r for r in answers if r.status_code == 503]
    assert unavailable, f"no request met an outage in {len(answers)} ({terminations} ended)"
    for r in unavailable:
        assert_503(r, "database_unavailable", "2")
    # Once the connections are left alone, the next create works.
    assert create(http, pg_stack, secret).status_code == 200


# -- the key service ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sqlite_stack(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Stack]:
    with vault_database("sqlite", tmp_path_factory.mktemp("db")) as dsn:
        yield from run_stack(tmp_path_factory, pki, "sqlite", dsn)


def _pids_running(config: Path) -> list[int]:
    """The processes whose command line names ``config`` (this test's key service)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            args = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(config).encode() in args and b"keyservice" in args:
            found.append(int(entry))
    return found


def _stop(pid: int) -> None:
    os.kill(pid, 15)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(pid, 9)


def test_the_key_service_sealed_or_stopped_is_503_with_retry_after_then_works(
    http: httpx.Client, sqlite_stack: Stack, pki: Pki
) -> None:
    stack = sqlite_stack
    config = stack.dir / "keyd.toml"
    # An account the vault has asked the key service nothing for yet: its first create
    # needs the key service (its fingerprint key, and the first data key).
    secret = create_account(stack.vault_config)["sk"]
    keyd_url = f"https://localhost:{stack.keyd_port}"
    with httpx.Client(
        verify=client_context(pki.ca_file, client_cert=pki.cert("admin")), trust_env=False
    ) as admin:
        assert admin.post(f"{keyd_url}/v1/seal").status_code == 200
    assert_503(create(http, stack, secret), "keyservice_sealed", "30")

    (pid,) = _pids_running(config)
    _stop(pid)
    assert_503(create(http, stack, secret), "keyservice_unavailable", "2")

    # Started again (the development seal unseals it at start): the vault answers 200.
    with cardvault_process(
        ["keyservice", "serve", "--config", str(config)], log=stack.dir / "keyd-again.log"
    ) as keyd:
        wait_for_port(stack.keyd_port, keyd)
        r = create(http, stack, secret)
        assert r.status_code == 200, r.text
