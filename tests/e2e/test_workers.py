"""Several vault processes on one PostgreSQL database: ``[server] workers`` (real
processes, real TLS, a real database).

A parent process binds the ports and supervises the workers; each worker is a vault
of its own (replica ``<name>/w<i>``, audit log ``<audit>/w<i>/``). These tests check
that both workers serve the ports and share the load, that a killed worker is replaced
while the port keeps answering, that SIGTERM drains a request in flight and exits 0,
that SQLite refuses several workers and a crash loop stops the parent, that the
periodic jobs are led by one process and taken over when it is killed, and that an
Idempotency-Key raced over both workers, or retried while workers are killed, makes one
payment method and never loses an acknowledged one.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest

from cardvault.transport.tls import client_context
from helpers import Pki, cli, free_ports
from stack import Stack, run_stack, vault_database

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

FORM = {
    "type": "card",
    "card[number]": "4242424242424242",
    "card[exp_month]": "12",
    "card[exp_year]": "2034",
}
#: Rate limits out of the way: these tests are about processes, not buckets.
LIMITS = "secret_rate = 100000.0\nsecret_burst = 100000.0\nidempotency_lease = 60\n"
WORKERS_ENV = {
    "CARDVAULT_SERVER_WORKERS": "2",
    "CARDVAULT_SERVER_STOP_GRACE": "15",
    # The kill -9 test restarts each worker about five times within a minute.
    "CARDVAULT_SERVER_WORKER_RESTARTS": "50",
    "CARDVAULT_JOBS_INTERVAL": "0.5",
    "CARDVAULT_LOGGING_FORMAT": "json",
    "CARDVAULT_LOGGING_LEVEL": "debug",
}
JOBS_LOCK = 7303


# -- looking at the processes ----------------------------------------------------------------


def children(pid: int) -> list[int]:
    """The live (not zombie) child processes of ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)


def log_lines(stack: Stack) -> list[dict[str, Any]]:
    """The JSON lines of the vault's log (the parent's and every worker's)."""
    lines = []
    for raw in stack.vault_log.read_text(errors="replace").splitlines():
        if raw.startswith("{"):
            with contextlib.suppress(ValueError):
                lines.append(json.loads(raw))
    return lines


def listening(stack: Stack) -> int:
    """How many times a worker started serving the public listener."""
    return sum(
        1
        for line in log_lines(stack)
        if line.get("event") == "listening"
        and line.get("listener") == "public"
        and str(line.get("worker", "")).startswith("w")
    )


def wait_until(what: str, check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.05)


def wait_serving(stack: Stack, starts: int) -> None:
    """Until workers have started serving ``starts`` times in all, and two are alive."""
    wait_until(f"{starts} worker starts", lambda: listening(stack) >= starts)
    wait_until("two workers", lambda: len(children(stack.vault_pid)) == 2)


def chain(stack: Stack, worker: int) -> list[dict[str, Any]]:
    path = stack.audit_dir / f"w{worker}" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def lock_holders(stack: Stack) -> list[int]:
    """The pids of the vault processes holding the periodic jobs' lock."""
    rows = stack.sql(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE l.locktype = 'advisory' AND l.objid = ? AND l.granted "
        "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        JOBS_LOCK,
    )
    return [int(str(name).split()[1]) for (name,) in rows]


def payment_methods(stack: Stack, account: str) -> list[tuple[str, dict[str, str]]]:
    rows = stack.sql("SELECT id, metadata FROM payment_methods WHERE account_id = ?", account)
    return [(str(pm_id), json.loads(str(meta))) for pm_id, meta in rows]


# -- a client that opens a connection per request (so the kernel spreads them) ------------------


class Client:
    def __init__(self, stack: Stack, pki: Pki) -> None:
        self.stack = stack
        self.http = httpx.Client(
            base_url=stack.url,
            verify=client_context(pki.ca_file),
            trust_env=False,
            timeout=15,
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        self.auth = {"authorization": f"Bearer {stack.accounts[0]['sk']}"}

    def tokenize(self, key: str, tag: str) -> httpx.Response:
        return self.http.post(
            "/v1/payment_methods",
            data={**FORM, "metadata[tag]": tag},
            headers={**self.auth, "idempotency-key": key},
        )

    def close(self) -> None:
        self.http.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Stack]:
    with vault_database("postgres", tmp_path_factory.mktemp("db")) as dsn:
        for stack in run_stack(
            tmp_path_factory, pki, "postgres", dsn, limits=LIMITS, vault_env=WORKERS_ENV
        ):
            wait_serving(stack, 2)
            yield stack


@pytest.fixture
def client(stack: Stack, pki: Pki) -> Iterator[Client]:
    made = Client(stack, pki)
    yield made
    made.close()


# -- the tests ---------------------------------------------------------------------------------


def test_two_workers_serve_the_ports_and_share_the_load(stack: Stack, client: Client) -> None:
    workers = children(stack.vault_pid)
    assert len(workers) == 2
    tag = secrets.token_hex(4)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda n: client.tokenize(f"{tag}-{n}", f"{tag}-{n}"), range(60)))
    assert [r.status_code for r in answers] == [200] * 60
    # Each worker has its own chain, which says which worker and replica it is, and
    # both recorded some of the cards.
    created = {}
    for worker in (0, 1):
        records = chain(stack, worker)
        loaded = next(r for r in records if r["action"] == "config.loaded")["detail"]
        assert loaded["worker"] == worker and loaded["workers"] == 2
        assert str(loaded["replica"]).endswith(f"/w{worker}")
        created[worker] = {r["object"] for r in records if r["action"] == "payment_method.created"}
    ids = {r.json()["id"] for r in answers}
    assert created[0] and created[1], "one worker served every request"
    assert ids <= created[0] | created[1]
    assert not created[0] & created[1]
    # The single-process layout is not used by workers.
    assert not (stack.audit_dir / "audit.jsonl").exists()
    served = Counter(
        line["worker"]
        for line in log_lines(stack)
        if line.get("event") == "request" and line.get("path") == "/v1/payment_methods"
    )
    assert served["w0"] > 0 and served["w1"] > 0


def test_an_idempotency_key_raced_over_both_workers_makes_one_payment_method(
    stack: Stack, client: Client
) -> None:
    account = stack.accounts[0]["account"]
    for round_ in range(6):
        key = tag = f"race-{round_}-{secrets.token_hex(4)}"
        start = threading.Barrier(16)

        def one(_: int, key: str = key, tag: str = tag, start: threading.Barrier = start) -> Any:
            start.wait()
            return client.tokenize(key, tag)

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, range(16)))
        statuses = Counter(r.status_code for r in answers)
        assert set(statuses) <= {200, 409}, statuses
        assert statuses[200] >= 1
        for r in answers:
            if r.status_code == 409:
                assert r.json()["error"]["code"] == "idempotency_key_in_use"
        ids = {r.json()["id"] for r in answers if r.status_code == 200}
        assert len(ids) == 1
        stored = [pm for pm, meta in payment_methods(stack, account) if meta.get("tag") == tag]
        assert stored == list(ids)
        again = client.tokenize(key, tag)
        assert again.status_code == 200 and again.json()["id"] in ids
        assert again.headers.get("idempotent-replayed") == "true"


def test_the_periodic_jobs_run_on_one_process_and_another_takes_over_its_kill(
    stack: Stack,
) -> None:
    wait_until("one holder of the jobs' lock", lambda: len(lock_holders(stack)) == 1)
    leader = lock_holders(stack)[0]
    assert leader in children(stack.vault_pid)
    # Over a few runs, the lock stays with one process and only that worker runs them.
    mark = len(log_lines(stack))
    for _ in range(10):
        assert lock_holders(stack) == [leader]
        time.sleep(0.2)
    runs = Counter(
        line["worker"]
        for line in log_lines(stack)[mark:]
        if line.get("event") == "periodic jobs ran"
    )
    assert len(runs) == 1 and sum(runs.values()) >= 2, runs

    starts = listening(stack)
    os.kill(leader, signal.SIGKILL)
    wait_until(
        "another process leads the jobs",
        lambda: (held := lock_holders(stack)) != [] and held[0] != leader,
        timeout=15,
    )
    holders = lock_holders(stack)
    assert len(holders) == 1
    assert holders[0] in children(stack.vault_pid)
    wait_serving(stack, starts + 1)


def test_a_killed_worker_is_replaced_and_the_port_keeps_answering(
    stack: Stack, client: Client
) -> None:
    starts = listening(stack)
    before = children(stack.vault_pid)
    victim = before[0]
    os.kill(victim, signal.SIGKILL)
    # The survivor answers the new connections meanwhile. (One that reached the dead
    # worker's socket in the instant before the parent closed it is reset, as its
    # connections in flight were: the retry goes to the survivor.)
    tag = secrets.token_hex(4)
    resets = 0
    for n in range(20):
        try:
            r = client.tokenize(f"{tag}-{n}", f"{tag}-{n}")
        except httpx.TransportError:
            resets += 1
            r = client.tokenize(f"{tag}-{n}", f"{tag}-{n}")
        assert r.status_code == 200, r.text
    assert resets <= 2
    wait_serving(stack, starts + 1)
    after = children(stack.vault_pid)
    assert victim not in after and before[1] in after
    # The replacement kept the worker's number: its chain goes on, with a new start.
    restarts = [
        line
        for line in log_lines(stack)
        if line.get("event") == "worker stopped; starting it again"
    ]
    assert restarts and restarts[-1]["how"] == "killed by SIGKILL"


def test_kill_9_workers_while_a_client_retries_loses_and_duplicates_nothing(
    stack: Stack, client: Client, tmp_path: Path
) -> None:
    """Concurrency 16, a unique Idempotency-Key (and tag) per logical request; one
    worker is killed ten times at random moments; every failed request is retried with
    its key until it is answered. Then: every acknowledged card is stored, none twice,
    and every chain verifies."""
    account = stack.accounts[0]["account"]
    run = secrets.token_hex(4)
    acknowledged: dict[str, str] = {}
    unexpected: list[str] = []
    retries = Counter[str]()
    done = threading.Event()
    lock = threading.Lock()
    counter = iter(range(1_000_000))

    def logical(tag: str) -> None:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                r = client.tokenize(tag, tag)
            except httpx.TransportError as exc:
                retries[type(exc).__name__] += 1
            else:
                if r.status_code == 200:
                    with lock:
                        acknowledged[tag] = r.json()["id"]
                    return
                if r.status_code not in (409, 503):
                    unexpected.append(f"{r.status_code} {r.text[:200]}")
                    return
                retries[str(r.status_code)] += 1
            time.sleep(random.uniform(0.02, 0.1))
        unexpected.append(f"{tag} not answered in time")

    def client_loop() -> None:
        while not done.is_set():
            with lock:
                n = next(counter)
            logical(f"chaos-{run}-{n}")

    def killer() -> None:
        starts = listening(stack)
        for _ in range(10):
            time.sleep(random.uniform(0.2, 1.0))
            victim = random.choice(children(stack.vault_pid))
            os.kill(victim, signal.SIGKILL)
            starts += 1
            wait_serving(stack, starts)

    with ThreadPoolExecutor(16) as pool:
        clients = [pool.submit(client_loop) for _ in range(16)]
        try:
            killer()
        finally:
            time.sleep(0.5)
            done.set()
        for c in clients:
            c.result()

    assert unexpected == []
    assert len(acknowledged) >= 100, len(acknowledged)
    assert sum(retries.values()) > 0, "no request was ever cut off by a kill"
    stored = [(pm, meta["tag"]) for pm, meta in payment_methods(stack, account)]
    ours = [(pm, tag) for pm, tag in stored if tag.startswith(f"chaos-{run}-")]
    by_tag = Counter(tag for _pm, tag in ours)
    duplicates = {tag: n for tag, n in by_tag.items() if n > 1}
    assert duplicates == {}
    lost = {tag: pm for tag, pm in acknowledged.items() if (pm, tag) not in set(ours)}
    assert lost == {}
    # Nothing was stored that the client does not know of (every request was answered).
    assert {tag for _pm, tag in ours} == set(acknowledged)

    # Stopped cleanly, every worker's chain verifies (the killed starts' included).
    assert stack.stop("vault", signal.SIGTERM, timeout=40) == 0
    verified = cli("audit", "verify", "--json", str(stack.audit_dir))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    chains = json.loads(verified.stdout)["chains"]
    names = {Path(c["log"]).parent.name for c in chains}
    assert {"w0", "w1"} <= names
    assert all(c["problem"] is None for c in chains)


# -- stopping, refusing, crash-looping ------------------------------------------------------------


def test_sigterm_drains_a_request_in_flight_and_exits_0(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> None:
    with vault_database("postgres", tmp_path_factory.mktemp("db")) as dsn:
        for stack in run_stack(
            tmp_path_factory, pki, "postgres", dsn, limits=LIMITS, vault_env=WORKERS_ENV
        ):
            wait_serving(stack, 2)
            workers = children(stack.vault_pid)
            body = urlencode({**FORM, "metadata[tag]": "drained"}).encode()
            head = (
                "POST /v1/payment_methods HTTP/1.1\r\nHost: localhost\r\n"
                f"Authorization: Bearer {stack.accounts[0]['sk']}\r\n"
                "Content-Type: application/x-www-form-urlencoded\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            ctx = client_context(pki.ca_file)
            with (
                socket.create_connection(("127.0.0.1", stack.vault_port), timeout=20) as raw,
                ctx.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                tls.sendall(head + body[:10])  # the request is in flight, its body half sent
                time.sleep(0.5)
                os.kill(stack.vault_pid, signal.SIGTERM)
                time.sleep(1.0)
                assert stack.processes["vault"].poll() is None  # waiting for the request
                tls.sendall(body[10:])
                answer = _read_response(tls)
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["metadata"] == {"tag": "drained"}
            assert stack.processes["vault"].wait(30) == 0
            assert [pid for pid in workers if pid in children(os.getpid()) or _alive(pid)] == []
            stops = [r for w in (0, 1) for r in chain(stack, w) if r["action"] == "service.stop"]
            assert len(stops) == 2


def _read_response(tls: ssl.SSLSocket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = tls.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        chunk = tls.recv(65536)
        if not chunk:
            break
        rest += chunk
    return head + b"\r\n\r\n" + rest


def _alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _vault_toml(directory: Path, pki: Pki, store: str, *, extra: str = "") -> Path:
    port, redirect = free_ports(2)
    cert, key = pki.cert("vault")
    config = directory / "vault.toml"
    config.write_text(
        'profile = "development"\n[server]\n'
        f'port = {port}\nredirect_port = {redirect}\ncert_file = "{cert}"\nkey_file = "{key}"\n'
        f"{extra}"
        f'[store]\nurl = "{store}"\n'
        f'[audit]\ndirectory = "{directory / "audit"}"\n'
        f'[keyservice]\nurl = "https://localhost:1"\nca_file = "{pki.ca_file}"\n'
        f'cert_file = "{cert}"\nkey_file = "{key}"\n'
    )
    return config


@pytest.mark.parametrize("how", ["option", "setting"])
def test_several_workers_on_sqlite_are_refused_with_the_reason(
    tmp_path: Path, pki: Pki, how: str
) -> None:
    if how == "option":
        config = _vault_toml(tmp_path, pki, f"sqlite:///{tmp_path / 'vault.db'}")
        result = cli("vault", "serve", "--config", str(config), "--workers", "2")
    else:
        config = _vault_toml(
            tmp_path, pki, f"sqlite:///{tmp_path / 'vault.db'}", extra="workers = 3\n"
        )
        result = cli("vault", "serve", "--config", str(config))
    assert result.returncode == 2
    message = " ".join(result.stderr.split())
    assert "needs a PostgreSQL store" in message
    assert "SQLite store has one writer, in one process" in message
    assert not (tmp_path / "vault.db").exists()


def test_a_crash_looping_worker_stops_the_parent_with_status_1(tmp_path: Path, pki: Pki) -> None:
    # A database that does not exist: every worker fails its start-up at once.
    missing = f"postgresql://postgres@127.0.0.1:5432/cardvault_missing_{secrets.token_hex(4)}"
    config = _vault_toml(tmp_path, pki, missing, extra="workers = 2\nworker_restarts = 2\n")
    log = tmp_path / "vault.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cardvault", "vault", "serve", "--config", str(config)],
            stdout=out,
            stderr=out,
            env={**os.environ, "CARDVAULT_LOGGING_FORMAT": "json"},
        )
    try:
        assert proc.wait(60) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert "a worker is crash-looping: every worker is stopped" in text
    assert text.count('"event": "worker started"') >= 3
    assert children(proc.pid) == []


def test_up_runs_the_vault_on_postgresql_with_two_workers(
    tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    refused = cli("up", "--state", str(tmp_path / "refused"), "--vault-workers", "2")
    assert refused.returncode == 2
    assert "needs --database-url" in " ".join(refused.stderr.split())

    from cardvault.client import Client as SDK

    state = tmp_path / "state"
    names = ("vault", "redirect", "keyservice", "admin", "acquirer", "shop")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    with vault_database("postgres", tmp_path_factory.mktemp("db")) as dsn:
        args = [
            sys.executable, "-m", "cardvault", "up", "--state", str(state),
            "--vault-port", str(ports["vault"]), "--redirect-port", str(ports["redirect"]),
            "--keyservice-port", str(ports["keyservice"]), "--admin-port", str(ports["admin"]),
            "--acquirer-port", str(ports["acquirer"]), "--shop-port", str(ports["shop"]),
            "--vault-workers", "2", "--database-url", dsn,
        ]  # fmt: skip
        with (tmp_path / "up.log").open("wb") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=log)
        try:
            wait_until("stack.json", lambda: (state / "stack.json").exists(), timeout=90)
            info = json.loads((state / "stack.json").read_text())
            assert info["vault"]["store"] == "postgresql" and info["vault"]["workers"] == 2
            assert dsn not in (state / "stack.json").read_text()
            wait_until("two vault workers", lambda: len(children(info["vault"]["pid"])) == 2)
            with SDK(
                info["keys"]["secret"], base_url=info["vault"]["url"], ca_bundle=info["ca_bundle"]
            ) as vault:
                for _ in range(6):
                    pm = vault.post("/v1/payment_methods", FORM)
                    assert pm["card"]["last4"] == "4242"

            async def count() -> int:
                import asyncpg

                conn = await asyncpg.connect(dsn)
                try:
                    return int(await conn.fetchval("SELECT count(*) FROM payment_methods"))
                finally:
                    await conn.close()

            import asyncio

            assert asyncio.run(count()) == 6
            for worker in ("w0", "w1"):
                assert (state / "vault" / worker / "audit.jsonl").exists()
            assert not (state / "vault" / "vault.db").exists()
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
