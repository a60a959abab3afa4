"""``cardvault up``: the local stack in one command.

The stack: the key service (mTLS only), the vault (public HTTPS listener, HTTP redirect
port, mTLS admin API), the simulated acquirer and the example shop, each a real child
process. Each zone gets its own state directory and certificate; the acquirer and the
shop run only when cardvault runs from its repository (they live in ``examples/``).

``up`` supervises its children (:class:`_Stack`): a child that exits, whatever the
cause (a crash, the OOM killer's SIGKILL, a vault whose audit log failed and exited 74),
is reported on the terminal and started again with the same command line, and
``stack.json`` is rewritten with its new process id and its count of restarts. Every
child is restarted, the key service and the examples too: each keeps its state on disk,
and the development key service unseals itself on start. A child that exits
``--restarts`` times within :data:`RESTART_WINDOW` seconds is in a crash loop: ``up``
gives up, says so, stops the stack and exits 1. Restarts wait a little longer each time
(:func:`_backoff`), so a loop cannot spin. On Ctrl-C (or SIGTERM) every child gets
SIGTERM, and one still running ``--stop-grace`` seconds later is killed (SIGKILL, its
whole process group); a second Ctrl-C kills at once. Children die with ``up``
(``PR_SET_PDEATHSIG``) even if ``up`` itself is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final

import typer
from rich.console import Console

from cardvault.cli.zones import acquirer_entry, prepare, shop_entry
from cardvault.client import Client, TransportError
from cardvault.files import open_private_append, write_private
from cardvault.transport.certs import CA_CERT_FILE

out = Console()
err = Console(stderr=True)

STACK_FILE = "stack.json"
#: Restarts of one child allowed within this many seconds (``--restarts``) before ``up``
#: decides it is in a crash loop and gives up.
RESTART_WINDOW: Final = 60.0
RESTARTS: Final = 5
#: Seconds a child has after SIGTERM before it is killed (``--stop-grace``).
STOP_GRACE: Final = 10.0
#: The exit status the services use when their audit log failed
#: (cardvault.audit.recorder.AUDIT_FAILED_EXIT; not imported, to keep `up` light).
_AUDIT_FAILED: Final = 74


def _demo_keys(state: Path, vault_config: str) -> dict[str, str]:
    """The demo account's test keys, created on the first run on the vault's store and
    kept in the shop's zone (made again when the stack moves to another store)."""
    from cardvault.config import load_settings
    from cardvault.vault.settings import VaultSettings

    settings = load_settings(VaultSettings, Path(vault_config))
    store = _store_id(settings.store.url)
    path = state / "shop" / "keys.json"
    if path.exists():
        keys: dict[str, str] = json.loads(path.read_text())
        if keys.get("store", "sqlite") == store:
            return keys
    from cardvault.vault.admin import administer

    made = administer(settings, lambda admin: admin.create_account("demo"))
    keys = {"account": made.id, **{kind: key for kind, _mode, key in made.keys}}
    if store != "sqlite":
        keys["store"] = store
    write_private(path, json.dumps(keys).encode())
    return keys


def _store_id(url: str) -> str:
    """Which store the demo keys belong to: ``sqlite`` (the stack's own), or a digest of
    a PostgreSQL URL (which may hold a password)."""
    if url.startswith("sqlite:"):
        return "sqlite"
    import hashlib

    return "postgresql:" + hashlib.sha256(url.encode()).hexdigest()[:16]


def _allow_origin(vault_config: str, account: str, origin: str) -> None:
    """Add ``origin`` to the demo account's allowed origins (kept: any others), so that
    the shop's checkout may frame the card element. Run before the vault starts."""
    from cardvault.config import load_settings
    from cardvault.vault.admin import administer
    from cardvault.vault.settings import VaultSettings

    administer(
        load_settings(VaultSettings, Path(vault_config)),
        lambda admin: admin.allow_origin(account, origin),
    )


def _child_log(log_path: str) -> Any:
    """A child's log file, created 0600 before anything is written to it."""
    return os.fdopen(open_private_append(Path(log_path)), "ab")


def _cardvault(*args: str) -> list[str]:
    """The command line of ``cardvault ARGS``, run by this interpreter."""
    return [sys.executable, "-m", "cardvault", *args]


def _script(entry: Path, *args: str) -> list[str]:
    """The command line of the example program at ``entry``, run by this interpreter."""
    return [sys.executable, str(entry), *args]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child, before exec
    """Ask the kernel to send this process SIGTERM when ``up`` dies (Linux), so that no
    child outlives an ``up`` that was killed outright."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _spawn(argv: list[str], log_path: str) -> subprocess.Popen[bytes]:
    """Start ``argv`` in a session (and process group) of its own, its output appended
    to ``log_path``."""
    log = _child_log(log_path)
    try:
        return subprocess.Popen(
            argv,
            stdout=log,
            stderr=log,
            start_new_session=True,
            preexec_fn=_die_with_parent,  # (safe: up starts no threads)
        )
    finally:
        log.close()


def _wait_healthy(
    url: str,
    ca: str,
    proc: subprocess.Popen[bytes],
    deadline: float,
    client_cert: tuple[str, str] | None = None,
) -> None:
    with Client(
        base_url=url,
        ca_bundle=ca,
        client_cert=client_cert,
        max_retries=0,
        timeout=2,
        connect_timeout=1,
    ) as client:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the process serving {url} exited with status {proc.returncode}"
                )
            try:
                client.health()
                return
            except TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} did not answer in time") from None
                time.sleep(0.1)


@dataclass
class _Child:
    """One service of the stack: its process, and the command line and log it was started
    with (what starting it again takes), and its restarts."""

    name: str
    argv: list[str]
    log: str
    proc: subprocess.Popen[bytes]
    #: When it was restarted (``time.monotonic()``), within the restart window.
    restarted: deque[float] = field(default_factory=deque)
    #: Restarts since ``up`` started.
    restarts: int = 0
    #: When a restart is due, while it waits for one.
    restart_at: float | None = None
    #: How it last ended, in words.
    last_exit: str | None = None


def describe_exit(returncode: int) -> str:
    """How a child ended, in words (a signal by name; 74 and 2 by what they mean)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (as the kernel's OOM killer does)" if returncode == -signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    if returncode == _AUDIT_FAILED:
        return f"exited with status {returncode} (its audit log failed)"
    if returncode == 2:
        return f"exited with status {returncode} (a configuration error, or a log it refuses)"
    return f"exited with status {returncode}"


def _backoff(recent: int) -> float:
    """Seconds before a restart, after ``recent`` restarts in the window: 0, 0.5, 1, 2 …
    up to 8."""
    return 0.0 if recent == 0 else min(0.5 * 2 ** (recent - 1), 8.0)


class _Stack:
    """The stack's child processes, in the order they started, and their supervision.

    :meth:`start` starts each child; :meth:`watch` then runs until a signal asks the
    stack to stop or a child is in a crash loop, restarting each child that exits
    (:meth:`_exited`); :meth:`shutdown` stops every child. ``on_change`` is called after
    each restart (``up`` rewrites ``stack.json``).
    """

    def __init__(
        self,
        state: Path,
        *,
        restarts: int = RESTARTS,
        window: float = RESTART_WINDOW,
        on_change: Callable[[], object] | None = None,
    ) -> None:
        self.state = state
        self.children: list[_Child] = []
        self.stopping = False
        #: A second Ctrl-C: kill what is left without waiting.
        self.hurry = False
        #: The child whose crash loop stopped the stack, if one did.
        self.gave_up: _Child | None = None
        self.max_restarts = restarts
        self.window = window
        self.on_change = on_change

    def catch_signals(self) -> None:
        """SIGINT (Ctrl-C) and SIGTERM ask the stack to stop: :meth:`watch` then returns.
        A second one makes :meth:`shutdown` kill without waiting."""
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGTERM, self.stop)

    def stop(self, *_: Any) -> None:
        if self.stopping:
            self.hurry = True
        self.stopping = True

    def start(self, name: str, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        """Start the child ``name``; it is watched by :meth:`watch` and stopped by
        :meth:`shutdown`."""
        child = _Child(name, argv, log, _spawn(argv, log))
        self.children.append(child)
        return child.proc

    def watch(self, every: float = 0.2) -> None:
        """Look at every child five times a second until the stack is asked to stop (or
        gives up on a crash loop), restarting those that exited."""
        while not self.stopping:
            now = time.monotonic()
            for child in self.children:
                if child.restart_at is not None:
                    if now >= child.restart_at:
                        self._restart(child)
                elif child.proc.poll() is not None:
                    self._exited(child)
                if self.stopping:
                    break
            time.sleep(every)

    def _exited(self, child: _Child) -> None:
        """What a child's exit means: it is reported and restarted, unless it has been
        restarted ``max_restarts`` times within the window (a crash loop): then the stack
        gives up and stops."""
        now = time.monotonic()
        while child.restarted and now - child.restarted[0] > self.window:
            child.restarted.popleft()
        child.last_exit = describe_exit(child.proc.returncode)
        recent = len(child.restarted)
        if recent >= self.max_restarts:
            err.print(
                f"[red]{child.name} {child.last_exit}, after {recent} restarts in "
                f"{self.window:g} s: it is crash-looping, so up gives up and stops the stack. "
                f"Its log: {child.log}[/]",
                highlight=False,
            )
            self.gave_up = child
            self.stopping = True
            return
        delay = _backoff(recent)
        when = f"in {delay:g} s" if delay else "now"
        err.print(
            f"[yellow]{child.name} {child.last_exit}: restarting it {when} (restart "
            f"{recent + 1} of at most {self.max_restarts} in {self.window:g} s). "
            f"Its log: {child.log}[/]",
            highlight=False,
        )
        child.restart_at = now + delay

    def _restart(self, child: _Child) -> None:
        child.restart_at = None
        child.proc = _spawn(child.argv, child.log)
        child.restarted.append(time.monotonic())
        child.restarts += 1
        err.print(f"{child.name} restarted (pid {child.proc.pid})", highlight=False)
        if self.on_change is not None:
            self.on_change()

    def shutdown(self, grace: float = STOP_GRACE) -> None:
        """Send SIGTERM to every child still running, give them ``grace`` seconds in all,
        then kill (SIGKILL, the whole process group) each one still running, and reap
        them all. A second Ctrl-C meanwhile kills at once."""
        running = [c for c in self.children if c.proc.poll() is None and c.restart_at is None]
        for child in running:
            _signal_group(child.proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while (
            any(c.proc.poll() is None for c in running)
            and time.monotonic() < deadline
            and not self.hurry
        ):
            time.sleep(0.05)
        for child in running:
            if child.proc.poll() is None:
                err.print(
                    f"[yellow]{child.name} did not stop within {grace:g} s of SIGTERM: killed[/]",
                    highlight=False,
                )
                _signal_group(child.proc, signal.SIGKILL)
            child.proc.wait()


def _signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    """``sig`` to the child's process group (it leads one: started in a new session),
    or to the child alone if the group is gone."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)


def _check_ports(ports: list[int]) -> None:
    """Exit 2 when two services were given one port, 1 when a port is in use."""
    if len(set(ports)) != len(ports):
        taken = sorted({port for port in ports if ports.count(port) > 1})
        err.print(
            f"[red]{'ports' if len(taken) > 1 else 'port'} {', '.join(map(str, taken))} "
            "given to more than one service[/]: each service needs a port of its own "
            "(see --help)"
        )
        raise typer.Exit(2)
    for port in ports:
        _check_port_free(port)


def _init_keyservice(state: Path, config: str) -> None:
    """``cardvault keyservice init``, on the first run only (no development root key yet)."""
    if (state / "keyservice" / "root.key").exists():
        return
    init = subprocess.run(
        _cardvault("keyservice", "init", "--config", config),
        capture_output=True,
        text=True,
        check=False,
    )
    if init.returncode != 0:
        raise RuntimeError(f"key service init failed: {init.stderr.strip()}")


def _start_services(
    stack: _Stack, info: dict[str, Any], *, acquirer: Path | None, acquirer_port: int
) -> None:
    """Start the key service, the vault and the simulated acquirer (when there is one),
    and wait until each answers. Adds the demo account's keys to ``info``."""
    ks, vault, acq = info["keyservice"], info["vault"], info["acquirer"]
    _init_keyservice(stack.state, ks["config"])
    ks_proc = stack.start(
        "keyservice", _cardvault("keyservice", "serve", "--config", ks["config"]), ks["log"]
    )
    info["keys"] = _demo_keys(stack.state, vault["config"])
    if "shop" in info:
        _allow_origin(vault["config"], info["keys"]["account"], info["shop"]["url"])
    vault_proc = stack.start(
        "vault", _cardvault("vault", "serve", "--config", vault["config"]), vault["log"]
    )
    acq_proc = None
    if acquirer is not None:
        acq_proc = stack.start(
            "acquirer",
            _script(
                acquirer, "--host", "127.0.0.1", "--port", str(acquirer_port),
                "--cert", acq["cert"], "--key", acq["key"], "--state", acq["state"],
            ),
            acq["log"],
        )  # fmt: skip
    else:
        err.print("[yellow]examples/acquirer not found: running without the simulated acquirer[/]")
    identity = info["identities"]["admin"]
    deadline = time.monotonic() + 30
    _wait_healthy(
        ks["url"], info["ca_bundle"], ks_proc, deadline, (identity["cert"], identity["key"])
    )
    _wait_healthy(vault["url"], info["ca_bundle"], vault_proc, deadline)
    if acq_proc is not None:
        _wait_healthy(acq["url"], info["ca_bundle"], acq_proc, deadline)


def _shop_webhook(state: Path, info: dict[str, Any]) -> None:
    """The demo account's webhook endpoint for the example shop (every event, to
    ``<shop>/webhooks/cardvault``), made through the vault's API once it answers, and
    again when the store no longer has it; its ``whsec_`` secret is kept in the shop's
    zone (``webhook.json``, 0600), where the shop reads it at start."""
    import httpx

    from cardvault.transport.tls import client_context

    path = state / "shop" / "webhook.json"
    known: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
    keys = info["keys"]
    with httpx.Client(
        base_url=info["vault"]["url"],
        verify=client_context(info["ca_bundle"]),
        auth=(keys["secret"], ""),
        timeout=10,
        trust_env=False,
    ) as http:
        endpoint = known.get("endpoint")
        if endpoint and known.get("secret"):
            # Kept while the store still has it (a new store needs a new endpoint).
            found = http.get(f"/v1/webhook_endpoints/{endpoint}")
            if found.status_code == 200:
                return
        answer = http.post(
            "/v1/webhook_endpoints",
            data={
                "url": info["shop"]["url"] + "/webhooks/cardvault",
                "enabled_events[]": "*",
                "description": "the example shop",
            },
        )
    if answer.status_code != 200:
        raise RuntimeError(f"cannot create the shop's webhook endpoint ({answer.status_code})")
    made = answer.json()
    write_private(path, json.dumps({"endpoint": made["id"], "secret": made["secret"]}).encode())


def _start_shop(stack: _Stack, info: dict[str, Any], shop: Path) -> None:
    """Start the example shop and wait until it answers. Started once the vault answers:
    it asks the vault for cardvault.js's hash."""
    proc = stack.start(
        "shop", _script(shop, "--config", info["shop"]["config"]), info["shop"]["log"]
    )
    _wait_healthy(info["shop"]["url"], info["ca_bundle"], proc, time.monotonic() + 30)


def _print_stack(info: dict[str, Any], stack_file: Path, *, acquirer: bool) -> None:
    """What runs where, the test keys, and (with the shop) where to buy something."""
    state = Path(info["state"])
    ks, vault, acq = info["keyservice"], info["vault"], info["acquirer"]
    out.print(f"vault        {vault['url']}  (Stripe-compatible API, /healthz)")
    out.print(f"redirect     {vault['redirect_url']}  (answers only with a redirect to HTTPS)")
    out.print(f"admin API    {vault['admin_url']}  (mutual TLS, identity 'admin')")
    out.print(f"key service  {ks['url']}  (mutual TLS: identities 'vault' and 'admin')")
    if acquirer:
        out.print(f"acquirer     {acq['url']}  (simulated; the allowlisted {acq['forward_url']})")
    if "shop" in info:
        out.print(
            f"shop         {info['shop']['url']}  (the example shop; holds only pm_ ids)",
            soft_wrap=True,
        )
    out.print(f"CA bundle    {info['ca_bundle']}")
    out.print(
        f"test keys    {info['keys']['publishable']}  /  {info['keys']['secret']}",
        highlight=False,
    )
    out.print(f"stack        {stack_file}")
    if "shop" in info:
        out.print(
            f"[bold]open {info['shop']['url']} to buy something[/] (your browser must "
            f"trust {state / 'ca' / CA_CERT_FILE}); test cards: 4242 4242 4242 4242",
            highlight=False,
            soft_wrap=True,
        )
    out.print("Press Ctrl-C to stop.")


def up(
    state: Annotated[Path, typer.Option("--state", help="State directory.")] = Path(".cardvault"),
    vault_port: Annotated[int, typer.Option(help="The vault's HTTPS port.")] = 8443,
    redirect_port: Annotated[
        int, typer.Option(help="The vault's HTTP port (redirects only).")
    ] = 8080,
    keyservice_port: Annotated[int, typer.Option(help="The key service's port (mTLS).")] = 8444,
    acquirer_port: Annotated[int, typer.Option(help="The simulated acquirer's port.")] = 8445,
    shop_port: Annotated[int, typer.Option(help="The example shop's HTTPS port.")] = 8446,
    admin_port: Annotated[int, typer.Option(help="The vault's admin API port (mTLS).")] = 8447,
    restarts: Annotated[
        int,
        typer.Option(
            min=0,
            help=f"Restarts of one service allowed within {RESTART_WINDOW:g} s; one more "
            "exit is a crash loop, and up gives up and stops the stack.",
        ),
    ] = RESTARTS,
    stop_grace: Annotated[
        float,
        typer.Option(min=0, help="Seconds services get to stop on Ctrl-C before they are killed."),
    ] = STOP_GRACE,
    vault_workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Vault processes serving its ports (more than one needs --database-url).",
        ),
    ] = 1,
    database_url: Annotated[
        str | None,
        typer.Option(
            help="The vault's store: this PostgreSQL database (postgresql://role@host/db) "
            "instead of SQLite in the state directory.",
            show_default=False,
        ),
    ] = None,
    redis_url: Annotated[
        str | None,
        typer.Option(
            help="Keep the vault's rate limits in this Redis (redis://host:port/db or "
            "rediss://), shared by every vault process, instead of in memory.",
        ),
    ] = None,
) -> None:
    """Start the local stack (development only) and keep it running until Ctrl-C.

    A service that exits is reported and restarted (see docs/reliability.md)."""
    state = state.resolve()
    _check_vault_store(database_url, vault_workers)
    acquirer, shop = acquirer_entry(), shop_entry()
    ports = [vault_port, redirect_port, keyservice_port, admin_port]
    ports += [acquirer_port] if acquirer else []
    ports += [shop_port] if shop else []
    _check_ports(ports)
    info = prepare(
        state,
        vault_port=vault_port,
        redirect_port=redirect_port,
        admin_port=admin_port,
        keyservice_port=keyservice_port,
        acquirer_port=acquirer_port,
        shop_port=shop_port,
        database_url=database_url,
        vault_workers=vault_workers,
    )
    if shop is None:
        del info["shop"]
    if redis_url is not None:
        _use_redis(info["vault"]["config"], redis_url)
    err.print(
        "[bold yellow]DEVELOPMENT STACK[/] — local certificates, a key service that unseals "
        "itself from a local file; never put real card data in it."
    )
    stack_file = state / STACK_FILE
    stack_file.unlink(missing_ok=True)
    stack = _Stack(
        state, restarts=restarts, on_change=lambda: _write_stack(stack_file, info, stack)
    )
    stack.catch_signals()
    try:
        _start_services(stack, info, acquirer=acquirer, acquirer_port=acquirer_port)
        if shop is not None:
            _shop_webhook(state, info)
            _start_shop(stack, info, shop)
        else:
            err.print("[yellow]examples/shop not found: running without the example shop[/]")
        _write_stack(stack_file, info, stack)
        _print_stack(info, stack_file, acquirer=acquirer is not None)
        stack.watch()
    except RuntimeError as exc:
        err.print(f"[red]{exc}[/] (logs: {state}/*/*.log)")
        raise typer.Exit(1) from None
    finally:
        stack_file.unlink(missing_ok=True)
        stack.shutdown(stop_grace)
        out.print("stopped.")
    if stack.gave_up is not None:
        raise typer.Exit(1)


def _use_redis(vault_config: str, redis_url: str) -> None:
    """``[limits] backend = "redis"`` in the vault's settings (written afresh on every
    run by ``prepare``), with ``redis_url``."""
    if not redis_url.startswith(("redis://", "rediss://")):
        err.print("[red]--redis-url must be redis://host:port/db or rediss://host:port/db[/]")
        raise typer.Exit(2)
    path = Path(vault_config)
    toml = f'\n[limits]\nbackend = "redis"\nredis_url = {json.dumps(redis_url)}\n'
    write_private(path, path.read_bytes() + toml.encode())


def _write_stack(stack_file: Path, info: dict[str, Any], stack: _Stack) -> None:
    """``stack.json``: the stack's description, with each service's process id, its
    restarts and how it last ended; replaced whole (never half written)."""
    for child in stack.children:
        entry = info.get(child.name)
        if isinstance(entry, dict):
            entry["pid"] = child.proc.pid
            entry["restarts"] = child.restarts
            entry["last_exit"] = child.last_exit
    write_private(stack_file, json.dumps(info, indent=2).encode())


def _check_vault_store(database_url: str | None, workers: int) -> None:
    """Exit 2 unless the vault's store can serve ``workers`` processes: several need
    PostgreSQL (the SQLite store has one writer, in one process)."""
    if database_url is not None and not database_url.startswith(("postgresql://", "postgres://")):
        err.print("[red]--database-url must be a PostgreSQL URL: postgresql://role@host/db[/]")
        raise typer.Exit(2)
    if workers > 1 and database_url is None:
        err.print(
            f"[red]--vault-workers {workers} needs --database-url postgresql://…[/]: the "
            "SQLite store has one writer, in one process"
        )
        raise typer.Exit(2)


def _check_port_free(port: int) -> None:
    import socket

    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            err.print(
                f"[red]port {port} is in use[/]: stop what uses it, or choose another port (see --help)"
            )
            raise typer.Exit(1) from None


__all__ = ["prepare", "up"]
