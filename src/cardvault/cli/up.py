"""``cardvault up``: the local stack in one command.

The stack: the key service (mTLS only), the vault (public HTTPS listener, HTTP redirect
port, mTLS admin API), the simulated acquirer and the example shop, each a real child
process. Each zone gets its own state directory and certificate; the acquirer and the
shop run only when cardvault runs from its repository (they live in ``examples/``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cardvault.client import Client, TransportError
from cardvault.files import open_private_append, write_private
from cardvault.transport.certs import CA_CERT_FILE, init_ca, load_ca

out = Console()
err = Console(stderr=True)

STACK_FILE = "stack.json"


def _zone_dir(state: Path, zone: str) -> Path:
    path = state / zone
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def _issue_once(ca: Any, name: str, out_dir: Path, **kwargs: Any) -> None:
    if not (out_dir / f"{name}.pem").exists():
        ca.issue(name, out_dir=out_dir, **kwargs)


def _example_entry(name: str) -> Path | None:
    entry = Path(__file__).resolve().parents[3] / "examples" / name / "__main__.py"
    return entry if entry.exists() else None


def acquirer_entry() -> Path | None:
    """The simulated acquirer's entry point, when cardvault runs from its repository."""
    return _example_entry("acquirer")


def shop_entry() -> Path | None:
    """The example shop's entry point, when cardvault runs from its repository."""
    return _example_entry("shop")


def shop_origin(shop_port: int) -> str:
    """The shop's origin: the demo account's card element may be framed there only."""
    return f"https://localhost:{shop_port}"


def prepare(
    state: Path,
    *,
    vault_port: int,
    redirect_port: int,
    admin_port: int,
    keyservice_port: int,
    acquirer_port: int = 8445,
    shop_port: int = 8446,
) -> dict[str, Any]:
    """Create (or reuse) certificates, configuration and the demo account under ``state``.

    Each zone gets its own directory (mode 0700) with its own certificate, key, copy of
    the CA certificate, configuration and database: no file is shared between zones.
    """
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_dir = _zone_dir(state, "ca")
    ca = load_ca(ca_dir) if (ca_dir / CA_CERT_FILE).exists() else init_ca(ca_dir)
    ca_pem = (ca_dir / CA_CERT_FILE).read_bytes()
    local = {"dns": ["localhost"], "ips": ["127.0.0.1", "::1"]}

    kdir = _zone_dir(state, "keyservice")
    _issue_once(ca, "keyservice", kdir, **local)
    write_private(kdir / CA_CERT_FILE, ca_pem)
    write_private(
        kdir / "keyservice.toml",
        (
            'profile = "development"\n\n[server]\n'
            f'host = "127.0.0.1"\nport = {keyservice_port}\n'
            f'cert_file = "{kdir / "keyservice.pem"}"\nkey_file = "{kdir / "keyservice.key"}"\n'
            f'client_ca_file = "{kdir / CA_CERT_FILE}"\n\n'
            f'[store]\nurl = "sqlite:///{kdir / "keyservice.db"}"\n\n'
            f'[seal]\ntype = "dev"\ndev_key_file = "{kdir / "root.key"}"\n'
        ).encode(),
    )

    vdir = _zone_dir(state, "vault")
    _issue_once(ca, "vault", vdir, client_identity="vault", **local)
    write_private(vdir / CA_CERT_FILE, ca_pem)
    forward_url = f"https://localhost:{acquirer_port}/v1/authorizations"
    write_private(
        vdir / "allowlist.toml",
        (
            "# The local stack's forwarding allowlist: only the simulated acquirer.\n"
            "[[destination]]\n"
            'name = "acquirer"\n'
            f'url = "{forward_url}"\n'
            'methods = ["POST"]\n'
            'replacements = ["card_number", "card_expiry", "card_cvc", "cardholder_name"]\n'
            'accounts = ["*"]\n'
            f'ca_file = "{vdir / CA_CERT_FILE}"\n'
            "[destination.placements]\n"
            'card_number = { json = "/card/number" }\n'
            'card_expiry = { json_month = "/card/exp_month", json_year = "/card/exp_year" }\n'
            'card_cvc = { json = "/card/cvc" }\n'
            'cardholder_name = { json = "/card/name" }\n'
        ).encode(),
    )
    adir = _zone_dir(state, "acquirer")
    _issue_once(ca, "acquirer", adir, **local)
    write_private(
        vdir / "vault.toml",
        (
            'profile = "development"\n\n[server]\n'
            f'host = "127.0.0.1"\nport = {vault_port}\nredirect_port = {redirect_port}\n'
            f'cert_file = "{vdir / "vault.pem"}"\nkey_file = "{vdir / "vault.key"}"\n\n'
            f'[admin]\nport = {admin_port}\nclient_ca_file = "{vdir / CA_CERT_FILE}"\n'
            'allowed_identities = ["admin"]\n\n'
            f'[store]\nurl = "sqlite:///{vdir / "vault.db"}"\n\n'
            f'[keyservice]\nurl = "https://localhost:{keyservice_port}"\n'
            f'ca_file = "{vdir / CA_CERT_FILE}"\ncert_file = "{vdir / "vault.pem"}"\n'
            f'key_file = "{vdir / "vault.key"}"\n\n'
            f'[forwarding]\nallowlist_file = "{vdir / "allowlist.toml"}"\n'
        ).encode(),
    )

    zones: dict[str, dict[str, str]] = {}
    for zone in ("admin", "shop"):
        zdir = _zone_dir(state, zone)
        _issue_once(ca, zone, zdir, client_identity=zone)
        write_private(zdir / CA_CERT_FILE, ca_pem)
        zones[zone] = {"cert": str(zdir / f"{zone}.pem"), "key": str(zdir / f"{zone}.key")}

    # The shop's HTTPS certificate: a server certificate only, apart from its client
    # identity "shop" (which no service of ours accepts for anything).
    sdir = state / "shop"
    _issue_once(ca, "shop-server", sdir, **local)
    write_private(
        sdir / "shop.toml",
        (
            "# The example shop's settings, written by `cardvault up`.\n"
            f'[server]\nhost = "127.0.0.1"\nport = {shop_port}\n'
            f'cert_file = "{sdir / "shop-server.pem"}"\nkey_file = "{sdir / "shop-server.key"}"\n'
            f'public_url = "{shop_origin(shop_port)}"\n\n'
            f'[vault]\nurl = "https://localhost:{vault_port}"\nca_file = "{sdir / CA_CERT_FILE}"\n'
            f'keys_file = "{sdir / "keys.json"}"\n\n'
            f'[acquirer]\nforward_url = "{forward_url}"\n\n'
            f'[store]\ndb_file = "{sdir / "shop.db"}"\n'
        ).encode(),
    )

    return {
        "state": str(state),
        "ca_bundle": str(state / "shop" / CA_CERT_FILE),
        "vault": {
            "url": f"https://localhost:{vault_port}",
            "redirect_url": f"http://localhost:{redirect_port}",
            "admin_url": f"https://localhost:{admin_port}",
            "config": str(vdir / "vault.toml"),
            "log": str(vdir / "vault.log"),
        },
        "acquirer": {
            "url": f"https://localhost:{acquirer_port}",
            "forward_url": forward_url,
            "state": str(adir / "state"),
            "cert": str(adir / "acquirer.pem"),
            "key": str(adir / "acquirer.key"),
            "log": str(adir / "acquirer.log"),
        },
        "shop": {
            "url": shop_origin(shop_port),
            "dir": str(sdir),
            "config": str(sdir / "shop.toml"),
            "db": str(sdir / "shop.db"),
            "log": str(sdir / "shop.log"),
        },
        "keyservice": {
            "url": f"https://localhost:{keyservice_port}",
            "config": str(kdir / "keyservice.toml"),
            "log": str(kdir / "keyservice.log"),
        },
        "identities": {
            "vault": {"cert": str(vdir / "vault.pem"), "key": str(vdir / "vault.key")},
            **zones,
        },
    }


def _demo_keys(state: Path, vault_config: str) -> dict[str, str]:
    """The demo account's test keys, created on first run and kept in the shop's zone."""
    path = state / "shop" / "keys.json"
    if path.exists():
        keys: dict[str, str] = json.loads(path.read_text())
        return keys
    from cardvault.config import load_settings
    from cardvault.vault.admin import administer
    from cardvault.vault.settings import VaultSettings

    made = administer(
        load_settings(VaultSettings, Path(vault_config)),
        lambda admin: admin.create_account("demo"),
    )
    keys = {"account": made.id, **{kind: key for kind, _mode, key in made.keys}}
    write_private(path, json.dumps(keys).encode())
    return keys


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


def _spawn_script(args: list[str], log_path: str) -> subprocess.Popen[bytes]:
    log = _child_log(log_path)
    try:
        return subprocess.Popen(
            [sys.executable, *args], stdout=log, stderr=log, start_new_session=True
        )
    finally:
        log.close()


def _spawn(args: list[str], log_path: str) -> subprocess.Popen[bytes]:
    log = _child_log(log_path)
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "cardvault", *args],
            stdout=log,
            stderr=log,
            start_new_session=True,
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
) -> None:
    """Start the local stack (development only) and keep it running until Ctrl-C."""
    state = state.resolve()
    entry = acquirer_entry()
    shop = shop_entry()
    ports = [vault_port, redirect_port, keyservice_port, admin_port]
    ports += [acquirer_port] if entry else []
    ports += [shop_port] if shop else []
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
    info = prepare(
        state,
        vault_port=vault_port,
        redirect_port=redirect_port,
        admin_port=admin_port,
        keyservice_port=keyservice_port,
        acquirer_port=acquirer_port,
        shop_port=shop_port,
    )
    if shop is None:
        del info["shop"]
    err.print(
        "[bold yellow]DEVELOPMENT STACK[/] — local certificates, a key service that unseals "
        "itself from a local file; never put real card data in it."
    )
    stack_file = state / STACK_FILE
    stack_file.unlink(missing_ok=True)
    procs: list[subprocess.Popen[bytes]] = []
    stopping = False

    def stop(*_: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    ks, vault = info["keyservice"], info["vault"]
    try:
        if not (state / "keyservice" / "root.key").exists():
            init = subprocess.run(
                [sys.executable, "-m", "cardvault", "keyservice", "init", "--config", ks["config"]],
                capture_output=True,
                text=True,
                check=False,
            )
            if init.returncode != 0:
                raise RuntimeError(f"key service init failed: {init.stderr.strip()}")
        ks_proc = _spawn(["keyservice", "serve", "--config", ks["config"]], ks["log"])
        procs.append(ks_proc)
        info["keys"] = _demo_keys(state, vault["config"])
        if shop is not None:
            _allow_origin(vault["config"], info["keys"]["account"], info["shop"]["url"])
        vault_proc = _spawn(["vault", "serve", "--config", vault["config"]], vault["log"])
        procs.append(vault_proc)
        acq = info["acquirer"]
        acq_proc = None
        if entry is not None:
            acq_proc = _spawn_script(
                [
                    str(entry), "--host", "127.0.0.1", "--port", str(acquirer_port),
                    "--cert", acq["cert"], "--key", acq["key"], "--state", acq["state"],
                ],
                acq["log"],
            )  # fmt: skip
            procs.append(acq_proc)
        else:
            err.print(
                "[yellow]examples/acquirer not found: running without the simulated acquirer[/]"
            )
        identity = info["identities"]["admin"]
        deadline = time.monotonic() + 30
        _wait_healthy(
            ks["url"], info["ca_bundle"], ks_proc, deadline, (identity["cert"], identity["key"])
        )
        _wait_healthy(vault["url"], info["ca_bundle"], vault_proc, deadline)
        if acq_proc is not None:
            _wait_healthy(acq["url"], info["ca_bundle"], acq_proc, deadline)
        if shop is not None:
            # Started once the vault answers: it asks the vault for cardvault.js's hash.
            shop_proc = _spawn_script(
                [str(shop), "--config", info["shop"]["config"]], info["shop"]["log"]
            )
            procs.append(shop_proc)
            _wait_healthy(info["shop"]["url"], info["ca_bundle"], shop_proc, time.monotonic() + 30)
        else:
            err.print("[yellow]examples/shop not found: running without the example shop[/]")
        write_private(stack_file, json.dumps(info, indent=2).encode())
        out.print(f"vault        {vault['url']}  (Stripe-compatible API, /healthz)")
        out.print(f"redirect     {vault['redirect_url']}  (answers only with a redirect to HTTPS)")
        out.print(f"admin API    {vault['admin_url']}  (mutual TLS, identity 'admin')")
        out.print(f"key service  {ks['url']}  (mutual TLS: identities 'vault' and 'admin')")
        if entry is not None:
            out.print(
                f"acquirer     {acq['url']}  (simulated; the allowlisted {acq['forward_url']})"
            )
        if shop is not None:
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
        if shop is not None:
            out.print(
                f"[bold]open {info['shop']['url']} to buy something[/] (your browser must "
                f"trust {state / 'ca' / CA_CERT_FILE}); test cards: 4242 4242 4242 4242",
                highlight=False,
                soft_wrap=True,
            )
        out.print("Press Ctrl-C to stop.")
        while not stopping:
            for proc in procs:
                if proc.poll() is not None:
                    err.print(
                        f"[red]a service exited ({proc.returncode}); logs in {state}/*/*.log[/]"
                    )
                    stopping = True
            time.sleep(0.2)
    except RuntimeError as exc:
        err.print(f"[red]{exc}[/] (logs: {state}/*/*.log)")
        raise typer.Exit(1) from None
    finally:
        stack_file.unlink(missing_ok=True)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        out.print("stopped.")


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
