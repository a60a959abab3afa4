"""The local stack for end-to-end suites: the key service and the vault as real
processes over real TLS, on SQLite or on a PostgreSQL database of the test's own."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from helpers import Pki, cardvault_process, cli, free_ports, wait_for_port

__all__ = ["Stack", "create_account", "run_stack", "vault_database"]


@dataclass
class Stack:
    dir: Path
    url: str
    vault_config: Path
    keyd_port: int
    vault_log: Path
    keyd_log: Path
    accounts: list[dict[str, str]]
    backend: str
    dsn: str
    #: The vault's process id (for its memory, or a signal).
    vault_pid: int = 0
    #: The running processes by service (``keyservice``, ``vault``): see :meth:`stop`
    #: and :meth:`start`.
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    #: The environment each service is started with (added to this process's).
    env: dict[str, dict[str, str]] = field(default_factory=dict)
    #: Stops every process started, when the stack ends.
    exits: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def audit_dir(self) -> Path:
        return self.dir / "audit"

    @property
    def vault_port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def stop(self, service: str, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Send ``sig`` to ``service`` (``keyservice`` or ``vault``) and wait for it to
        exit; its exit status (``-9`` after SIGKILL). For a crash (SIGKILL), an outage,
        or a clean stop before the service is started again with :meth:`start`."""
        proc = self.processes[service]
        if proc.poll() is None:
            os.kill(proc.pid, sig)
        return proc.wait(timeout)

    def start(self, service: str) -> subprocess.Popen[bytes]:
        """Start ``service`` again on its settings, its log appended to the first one's,
        after it stopped, was killed or exited by itself (as a supervisor would); returns
        once it listens. The process is stopped when the stack ends."""
        running = self.processes.get(service)
        assert running is None or running.poll() is not None, f"{service} is still running"
        config, port, log = {
            "keyservice": (self.dir / "keyd.toml", self.keyd_port, self.keyd_log),
            "vault": (self.vault_config, self.vault_port, self.vault_log),
        }[service]
        proc = self.exits.enter_context(
            cardvault_process(
                [service, "serve", "--config", str(config)], env=self.env.get(service), log=log
            )
        )
        self.processes[service] = proc
        if service == "vault":
            self.vault_pid = proc.pid
        wait_for_port(port, proc)
        return proc

    @property
    def db(self) -> Path:
        return Path(self.dsn.removeprefix("sqlite://"))

    def sql(self, query: str, *args: object) -> list[tuple[object, ...]]:
        """Run one statement on the vault's own database, behind the vault's back."""
        if self.backend == "sqlite":
            with sqlite3.connect(self.db) as db:
                return db.execute(query, args).fetchall()
        import asyncio

        import asyncpg

        async def run() -> list[tuple[object, ...]]:
            conn = await asyncpg.connect(self.dsn)
            try:
                pg = query
                for i in range(1, len(args) + 1):
                    pg = pg.replace("?", f"${i}", 1)
                return [tuple(r) for r in await conn.fetch(pg, *args)]
            finally:
                await conn.close()

        return asyncio.run(run())


def create_account(config: Path, *, live: bool = False) -> dict[str, str]:
    r = cli(
        "accounts", "create", "--config", str(config), "--name", "t", *(["--live"] if live else [])
    )
    assert r.returncode == 0, r.stderr
    found = dict(re.findall(r"^(\S+(?: \(\w+\))?)\s+(\S+)$", r.stdout, re.M))
    return {
        "account": found["account"],
        "pk": found["publishable (test)"],
        "sk": found["secret (test)"],
        **(
            {"sk_live": found["secret (live)"], "pk_live": found["publishable (live)"]}
            if live
            else {}
        ),
    }


@contextlib.contextmanager
def vault_database(backend: str, d: Path) -> Iterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{d / 'vault.db'}"
        return
    import asyncio

    import asyncpg

    name = f"vault_e2e_{secrets.token_hex(4)}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    asyncio.run(admin(f"CREATE DATABASE {name}"))
    try:
        yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    finally:
        asyncio.run(admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def run_stack(
    tmp_path_factory: pytest.TempPathFactory,
    pki: Pki,
    backend: str,
    dsn: str,
    *,
    limits: str = "publishable_rate = 2.0\npublishable_burst = 30.0\n",
    vault_toml: str = "",
    vault_env: dict[str, str] | None = None,
    prepare: Callable[[Path], object] | None = None,
) -> Iterator[Stack]:
    """The key service and the vault as real processes on ``dsn``, with two accounts
    (the first with live keys too). ``limits`` is the vault's ``[limits]`` table and
    ``vault_toml`` is appended to its settings (tables of their own, such as
    ``[server.limits]``); ``vault_env`` is added to the vault's environment. ``prepare``
    is called with the stack's directory once the settings are written, before anything
    else is (to put a file system of its own under the audit directory, say)."""
    d = tmp_path_factory.mktemp("stack")
    if not pki.cert("keyd")[0].exists():
        pki.ca.issue("keyd", dns=["localhost"], ips=["127.0.0.1"])
    kport, vport = free_ports(2)
    kcert, kkey = pki.cert("keyd")
    kconf = d / "keyd.toml"
    kconf.write_text(
        'profile = "development"\n[server]\n'
        f'port = {kport}\ncert_file = "{kcert}"\nkey_file = "{kkey}"\nclient_ca_file = "{pki.ca_file}"\n'
        f'[store]\nurl = "sqlite:///{d / "keyd.db"}"\n'
        f'[seal]\ntype = "dev"\ndev_key_file = "{d / "root.key"}"\n'
    )
    assert cli("keyservice", "init", "--config", str(kconf)).returncode == 0
    vcert, vkey = pki.cert("vault")
    vconf = d / "vault.toml"
    vconf.write_text(
        'profile = "development"\n[server]\n'
        f'port = {vport}\ncert_file = "{vcert}"\nkey_file = "{vkey}"\n'
        f'[store]\nurl = "{dsn}"\n'
        f'[audit]\ndirectory = "{d / "audit"}"\n'
        f'[keyservice]\nurl = "https://localhost:{kport}"\nca_file = "{pki.ca_file}"\n'
        f'cert_file = "{vcert}"\nkey_file = "{vkey}"\n'
        "[limits]\n" + limits + vault_toml
    )
    if prepare is not None:
        prepare(d)
    accounts = [create_account(vconf, live=True), create_account(vconf)]
    with contextlib.ExitStack() as exits:
        stack = Stack(
            d,
            f"https://localhost:{vport}",
            vconf,
            kport,
            d / "vault.log",
            d / "keyd.log",
            accounts,
            backend,
            dsn,
            env={"vault": vault_env or {}},
            exits=exits,
        )
        # The key service first: the vault asks it for keys from its first request.
        for service in ("keyservice", "vault"):
            stack.start(service)
        yield stack


def tokenize(http: Any, stack: Stack, number: str = "4242424242424242") -> str:
    """A card (a published test card by default) stored for the stack's first account
    through ``http`` (an ``httpx.Client`` trusting the stack's CA); its ``pm_`` id."""
    form = {
        "type": "card",
        "card[number]": number,
        "card[exp_month]": "12",
        "card[exp_year]": "2034",
        "card[cvc]": "123",
        "billing_details[name]": "Jenny Rosen",
    }
    key = stack.accounts[1]["sk"]
    r = http.post(stack.url + "/v1/payment_methods", data=form, auth=(key, ""))
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
