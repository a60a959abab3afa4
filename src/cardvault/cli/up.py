"""``cardvault up``: the local stack in one command.

Today the stack is the vault (public HTTPS listener, HTTP redirect port, mTLS admin API);
the key service, the acquirer and the example shop join it as they are built. Each zone
gets its own state directory and certificate; every process is a real child process.
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
from cardvault.transport.certs import CA_CERT_FILE, init_ca, load_ca, write_private

out = Console()
err = Console(stderr=True)

STACK_FILE = "stack.json"


def _zone_dir(state: Path, zone: str) -> Path:
    path = state / zone
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def prepare(state: Path, *, vault_port: int, redirect_port: int, admin_port: int) -> dict[str, Any]:
    """Create (or reuse) certificates and configuration under ``state``."""
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_dir = _zone_dir(state, "ca")
    ca = load_ca(ca_dir) if (ca_dir / CA_CERT_FILE).exists() else init_ca(ca_dir)
    ca_pem = (ca_dir / CA_CERT_FILE).read_bytes()

    vault_dir = _zone_dir(state, "vault")
    vault_cert = vault_dir / "vault.pem"
    if not vault_cert.exists():
        ca.issue(
            "vault",
            dns=["localhost"],
            ips=["127.0.0.1", "::1"],
            client_identity="vault",
            out_dir=vault_dir,
        )
    # Each zone keeps its own copy of the CA certificate: no file is shared across zones.
    write_private(vault_dir / CA_CERT_FILE, ca_pem)

    admin_dir = _zone_dir(state, "admin")
    if not (admin_dir / "admin.pem").exists():
        ca.issue("admin", client_identity="admin", out_dir=admin_dir)
    write_private(admin_dir / CA_CERT_FILE, ca_pem)

    config = (
        'profile = "development"\n\n'
        "[server]\n"
        f'host = "127.0.0.1"\nport = {vault_port}\nredirect_port = {redirect_port}\n'
        f'cert_file = "{vault_dir / "vault.pem"}"\nkey_file = "{vault_dir / "vault.key"}"\n\n'
        "[admin]\n"
        f"port = {admin_port}\n"
        f'client_ca_file = "{vault_dir / CA_CERT_FILE}"\n'
        'allowed_identities = ["admin"]\n'
    )
    write_private(vault_dir / "vault.toml", config.encode())
    return {
        "state": str(state),
        "ca_bundle": str(admin_dir / CA_CERT_FILE),
        "vault": {
            "url": f"https://localhost:{vault_port}",
            "redirect_url": f"http://localhost:{redirect_port}",
            "admin_url": f"https://localhost:{admin_port}",
            "config": str(vault_dir / "vault.toml"),
            "log": str(vault_dir / "vault.log"),
        },
        "identities": {
            "admin": {"cert": str(admin_dir / "admin.pem"), "key": str(admin_dir / "admin.key")},
        },
    }


def _wait_healthy(url: str, ca: str, proc: subprocess.Popen[bytes], deadline: float) -> None:
    with Client(base_url=url, ca_bundle=ca, max_retries=0, timeout=2, connect_timeout=1) as client:
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
    admin_port: Annotated[int, typer.Option(help="The vault's admin API port (mTLS).")] = 8447,
) -> None:
    """Start the local stack (development only) and keep it running until Ctrl-C."""
    state = state.resolve()
    info = prepare(state, vault_port=vault_port, redirect_port=redirect_port, admin_port=admin_port)
    err.print(
        "[bold yellow]DEVELOPMENT STACK[/] — local certificates and development settings; "
        "never put real card data in it."
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
    try:
        log = open(info["vault"]["log"], "ab")  # noqa: SIM115 - lives as long as the child
        os.chmod(info["vault"]["log"], 0o600)
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "cardvault",
                    "vault",
                    "serve",
                    "--config",
                    info["vault"]["config"],
                ],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        )
        _wait_healthy(info["vault"]["url"], info["ca_bundle"], procs[0], time.monotonic() + 30)
        write_private(stack_file, json.dumps(info, indent=2).encode())
        out.print(f"vault      {info['vault']['url']}  (/healthz, /.well-known/security.txt)")
        out.print(
            f"redirect   {info['vault']['redirect_url']}  (answers only with a redirect to HTTPS)"
        )
        out.print(f"admin API  {info['vault']['admin_url']}  (mutual TLS, identity 'admin')")
        out.print(f"CA bundle  {info['ca_bundle']}")
        out.print(f"stack      {stack_file}")
        out.print("Press Ctrl-C to stop.")
        while not stopping:
            for proc in procs:
                if proc.poll() is not None:
                    err.print(
                        f"[red]a service exited ({proc.returncode}); see {info['vault']['log']}[/]"
                    )
                    stopping = True
            time.sleep(0.2)
    except RuntimeError as exc:
        err.print(f"[red]{exc}[/] (log: {info['vault']['log']})")
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


__all__ = ["prepare", "up"]
