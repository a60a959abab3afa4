"""``cardvault certs``: a deployment CA and the certificates it issues."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cardvault.cli.output import JsonOpt, print_json
from cardvault.transport.certs import (
    DEFAULT_LEAF_DAYS,
    MAX_LEAF_DAYS,
    RENEW_WITHIN_DAYS,
    init_ca,
    load_ca,
)

app = typer.Typer(
    help="Make a deployment CA and issue server and client certificates.", no_args_is_help=True
)
out = Console()
err = Console(stderr=True)

DirOption = Annotated[Path, typer.Option("--dir", help="The directory holding ca.pem and ca.key.")]


@app.command("init")
def init(directory: DirOption, as_json: JsonOpt = False) -> None:
    """Create a deployment CA (EC P-256) in DIR: ca.pem and ca.key, both mode 0600."""
    try:
        ca = init_ca(directory)
    except FileExistsError:
        err.print(f"[red]A CA already exists in {directory}; refusing to replace it.[/]")
        raise typer.Exit(1) from None
    if as_json:
        print_json({"certificate": str(ca.cert_path), "key": str(directory / "ca.key")})
        return
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
    as_json: JsonOpt = False,
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
    if as_json:
        print_json(_issued(issued.cert_path, issued.key_path, cert.not_valid_after_utc))
        return
    out.print(
        f"issued [bold]{issued.cert_path}[/] (key {issued.key_path}, mode 0600), "
        f"valid until {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    )


@app.command("renew")
def renew(
    directory: DirOption,
    certs: Annotated[list[Path], typer.Argument(help="NAME.pem files (beside NAME.key).")],
    within: Annotated[
        int, typer.Option("--within", help="Renew what has fewer days left than this.")
    ] = RENEW_WITHIN_DAYS,
    days: Annotated[
        int, typer.Option(help="Lifetime of a renewed certificate.")
    ] = DEFAULT_LEAF_DAYS,
    as_json: JsonOpt = False,
) -> None:
    """Reissue each certificate that expires within --within days, or that the CA in DIR
    did not issue: same names and identity, a new key. Restart the service that uses it
    afterwards. What is current is left alone."""
    try:
        ca = load_ca(directory)
    except FileNotFoundError:
        err.print(f"[red]No CA in {directory}.[/]")
        raise typer.Exit(1) from None
    if not 1 <= days <= MAX_LEAF_DAYS or within < 0:
        err.print(f"[red]need 1 <= --days <= {MAX_LEAF_DAYS} and --within >= 0[/]")
        raise typer.Exit(2)
    failed = False
    results: list[dict[str, Any]] = []
    for path in certs:
        try:
            issued = ca.renew_if_due(path, within_days=within, days=days)
        except (OSError, ValueError) as exc:
            err.print(f"[red]{path}: cannot renew[/] ({exc})")
            results.append({"certificate": str(path), "result": "failed"})
            failed = True
            continue
        if as_json:
            results.append(
                {"certificate": str(path), "result": "current"}
                if issued is None
                else {
                    **_issued(
                        issued.cert_path, issued.key_path, issued.certificate.not_valid_after_utc
                    ),
                    "result": "renewed",
                }
            )
        elif issued is None:
            out.print(f"{path}: current (more than {within} days left)")
        else:
            out.print(
                f"{path}: [bold]renewed[/], valid until "
                f"{issued.certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC (new key)"
            )
    if as_json:
        print_json({"ok": not failed, "certificates": results})
    if failed:
        raise typer.Exit(1)


def _issued(cert: Path, key: Path, not_after: datetime) -> dict[str, Any]:
    return {"certificate": str(cert), "key": str(key), "not_after": not_after.isoformat()}
