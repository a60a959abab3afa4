"""``cardvault doctor``: checks of a running deployment from outside.

``doctor tls`` audits every TLS endpoint of a deployment: the served protocols and
cipher suites against the Mozilla profile, each certificate (key, names, expiry, the CA
it chains to) and HSTS (cardvault.transport.tlsaudit). Beside a local stack it finds
every listener by itself, with the vault's allowlisted forwarding destinations and the
demo account's webhook receivers.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from cardvault.cli.stack import StackOpt, load_stack, stack_value
from cardvault.transport.tlsaudit import WARN_DAYS, Endpoint, Report, SslyzeMissing, audit

app = typer.Typer(help="Check a running deployment from outside.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)


def _stack_endpoints(stack: dict[str, Any]) -> list[Endpoint]:
    """Every TLS listener of a local stack, and the vault's allowlisted destinations."""
    ca = Path(stack["ca_bundle"])
    admin = stack_value(stack, "identities", "admin") or {}
    client = (Path(admin["cert"]), Path(admin["key"])) if admin.get("cert") else None
    found: list[Endpoint] = []
    listeners = [
        ("vault", stack_value(stack, "vault", "url"), None),
        ("vault admin", stack_value(stack, "vault", "admin_url"), client),
        ("key service", stack_value(stack, "keyservice", "url"), client),
        ("shop", stack_value(stack, "shop", "url"), None),
        ("acquirer", stack_value(stack, "acquirer", "url"), None),
    ]
    for name, url, cert in listeners:
        if url:
            found.append(Endpoint.from_url(name, url, ca_file=ca, client_cert=cert))
    config = stack_value(stack, "vault", "config")
    known = {e.address for e in found}
    if config:
        found += _destinations(Path(config), known)
    found += _webhook_destinations(stack, ca, known)
    return found


def _webhook_destinations(stack: dict[str, Any], ca: Path, known: set[str]) -> list[Endpoint]:
    """The demo account's webhook endpoints (through the vault's API with the stack's
    secret key): each receiver not already in the list, checked against the stack's CA."""
    from cardvault.client import Client, TransportError
    from cardvault.errors import CardVaultError

    url, key = stack_value(stack, "vault", "url"), stack_value(stack, "keys", "secret")
    if not url or not key:
        return []
    try:
        with Client(key, base_url=url, ca_bundle=ca, max_retries=1) as client:
            listed = client.get("/v1/webhook_endpoints", limit=100)
    except (CardVaultError, TransportError) as exc:
        err.print(f"[yellow]the webhook endpoints could not be listed[/] ({exc}): skipped")
        return []
    found = []
    for item in listed.get("data", []):
        try:
            endpoint = Endpoint.from_url(
                f"webhook {item.get('id', '?')}", str(item["url"]), ca_file=ca, own=False
            )
        except (KeyError, ValueError):
            continue
        if endpoint.address not in known:
            known.add(endpoint.address)
            found.append(endpoint)
    return found


def _destinations(vault_config: Path, known: set[str]) -> list[Endpoint]:
    """The vault's allowlisted forwarding destinations (not its own listeners): each
    with the CA file the vault trusts for it, or the public trust stores."""
    try:
        settings = tomllib.loads(vault_config.read_text())
        allowlist = settings.get("forwarding", {}).get("allowlist_file")
        entries = (
            tomllib.loads(Path(allowlist).read_text()).get("destination", []) if allowlist else []
        )
    except (OSError, tomllib.TOMLDecodeError) as exc:
        err.print(
            f"[yellow]the vault's allowlist could not be read[/] ({exc}): destinations skipped"
        )
        return []
    found = []
    for entry in entries:
        endpoint = Endpoint.from_url(
            f"destination {entry.get('name', '?')}",
            str(entry["url"]),
            ca_file=Path(entry["ca_file"]) if entry.get("ca_file") else None,
            own=False,
        )
        if endpoint.address not in known:
            known.add(endpoint.address)
            found.append(endpoint)
    return found


@app.command("tls")
def tls(
    url: Annotated[
        list[str] | None,
        typer.Option("--url", help="Audit this https://host:port (repeatable) instead of a stack."),
    ] = None,
    ca_file: Annotated[
        Path | None,
        typer.Option(
            "--ca-file",
            help="The deployment's accepted CAs (PEM) for --url endpoints; without it, "
            "the public trust stores.",
        ),
    ] = None,
    profile: Annotated[
        str, typer.Option("--profile", help="The Mozilla profile: intermediate or modern.")
    ] = "intermediate",
    warn_days: Annotated[
        int, typer.Option("--warn-days", help="Report certificates with fewer days left.")
    ] = WARN_DAYS,
    sslyze: Annotated[
        str | None,
        typer.Option("--sslyze", envvar="CARDVAULT_SSLYZE", help="The sslyze program."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    stack: StackOpt = None,
) -> None:
    """Audit the TLS of every listener: protocols and cipher suites against the Mozilla
    profile, the certificate chain (key, names, days to expiry, the CA it chains to),
    HSTS and OCSP stapling. Exit 1 when any endpoint drifts."""
    if profile not in ("intermediate", "modern"):
        err.print("[red]--profile must be intermediate or modern[/]")
        raise typer.Exit(2)
    try:
        if url:
            endpoints = [
                Endpoint.from_url(u, u, ca_file=ca_file, own=True) for u in dict.fromkeys(url)
            ]
        else:
            described = load_stack(stack)
            if described is None:
                err.print("[red]nothing to audit[/]: give --url, or run this beside a local stack")
                raise typer.Exit(2)
            endpoints = _stack_endpoints(described)
    except ValueError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    try:
        reports = audit(endpoints, profile=profile, sslyze=sslyze, warn_days=warn_days)
    except SslyzeMissing as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    drift = any(not r.compliant for r in reports)
    if as_json:
        typer.echo(
            json.dumps(
                {"object": "tls_audit", "profile": profile, "compliant": not drift,
                 "endpoints": [r.as_dict() for r in reports]}
            )
        )  # fmt: skip
    else:
        _table(reports, profile)
    if drift:
        raise typer.Exit(1)


def _table(reports: list[Report], profile: str) -> None:
    table = Table("endpoint", "TLS", "key", "days", "CA", "HSTS", "verdict")
    for r in reports:
        cert = r.certificate
        hsts = f"{r.hsts['max_age']}" if r.hsts else ("-" if not r.endpoint.own else "[red]none[/]")
        table.add_row(
            f"{r.endpoint.name} ({r.endpoint.address})",
            ", ".join(p.removeprefix("TLS ") for p in r.protocols) or "-",
            str(cert.get("key", "-")).split(" ")[0],
            str(cert.get("days_left", "-")),
            "yes" if cert.get("accepted_ca") else "[red]no[/]",
            hsts,
            "[green]ok[/]" if r.compliant else "[red]" + "\n".join(r.problems) + "[/]",
        )
    out.print(table)
    bad = sum(not r.compliant for r in reports)
    verdict = (
        "[green]every endpoint compliant[/]" if not bad else f"[red]{bad} endpoint(s) drift[/]"
    )
    out.print(f"Mozilla {profile} profile: {verdict} (--json for every detail)")


__all__ = ["app"]
