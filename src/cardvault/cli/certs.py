"""``cardvault certs``: a deployment CA and the certificates it issues."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from cardvault.transport.certs import DEFAULT_LEAF_DAYS, init_ca, load_ca

app = typer.Typer(
    help="Make a deployment CA and issue server and client certificates.", no_args_is_help=True
)
out = Console()
err = Console(stderr=True)

DirOption = Annotated[Path, typer.Option("--dir", help="The directory holding ca.pem and ca.key.")]


@app.command("init")
def init(directory: DirOption) -> None:
    """Create a deployment CA (EC P-256) in DIR: ca.pem and ca.key, both mode 0600."""
    try:
        ca = init_ca(directory)
    except FileExistsError:
        err.print(f"[red]A CA already exists in {directory}; refusing to replace it.[/]")
        raise typer.Exit(1) from None
    out.print(f"CA created: [bold]{ca.cert_path}[/] (key: {directory / 'ca.key'}, mode 0600)")


@app.command("issue")
def issue(
    directory: DirOption,
    name: Annotated[str, typer.Option("--name", help="File name: NAME.pem and NAME.key.")],
    dns: Annotated[
        list[str] | None, typer.Option("--dns", help="A DNS name to serve (repeatable).")
    ] = None,
    ip: Annotated[
        list[str] | None, typer.Option("--ip", help="An IP address to serve (repeatable).")
    ] = None,
    client: Annotated[
        str | None,
        typer.Option(
            "--client", help="Also a client certificate for this identity (spiffe://cardvault/ID)."
        ),
    ] = None,
    days: Annotated[int, typer.Option(help="Lifetime in days.")] = DEFAULT_LEAF_DAYS,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Write the files here instead of DIR.")
    ] = None,
) -> None:
    """Issue (or reissue) a server and/or client certificate signed by the CA in DIR."""
    try:
        ca = load_ca(directory)
    except FileNotFoundError:
        err.print(
            f"[red]No CA in {directory}; run `cardvault certs init --dir {directory}` first.[/]"
        )
        raise typer.Exit(1) from None
    if days < 1:
        err.print("[red]--days must be at least 1[/]")
        raise typer.Exit(2)
    try:
        issued = ca.issue(
            name, dns=dns or [], ips=ip or [], client_identity=client, days=days, out_dir=out_dir
        )
    except ValueError as exc:
        err.print(f"[red]{exc}[/]")
        raise typer.Exit(2) from None
    cert = issued.certificate
    out.print(
        f"issued [bold]{issued.cert_path}[/] (key {issued.key_path}, mode 0600), "
        f"valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    )
