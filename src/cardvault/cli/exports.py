"""``cardvault export`` and ``cardvault export-approval``: card export through the
vault's admin API (mutual TLS, the admin identity; docs/migration.md, "Exporting").

The command line never opens the card database and never sees a card number: the vault
decrypts the cards and encrypts them to the allowlisted recipient's key itself; what
comes over the wire, and what this command writes (mode 0600, a temporary file renamed
once the message is whole), is the OpenPGP message only.

``export-approval create`` is the approval ceremony, run offline like ``keyservice
init``: it prints the check to configure and hands out the custodians' shares once.
``export-approval submit`` is one custodian's approval of one export.
"""

from __future__ import annotations

import getpass
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console

from cardvault.cli.imports import AdminSession
from cardvault.cli.keys import AdminTargets, VaultUrlOpt
from cardvault.cli.keyservice import CaOpt, CertOpt, KeyOpt, hand_out
from cardvault.cli.stack import StackOpt
from cardvault.files import write_private, write_private_stream
from cardvault.vault.exports import approval

__all__ = ["approval_app", "export"]

approval_app = typer.Typer(help="Custodian approval of card exports.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)

AccountOpt = Annotated[str, typer.Option("--account", help="The account (acct_…).")]
ToOpt = Annotated[
    str, typer.Option("--to", help="The recipient: a name on the vault's export allowlist.")
]
LiveOpt = Annotated[bool, typer.Option("--live", help="Export live mode's cards.")]


def export(
    account: AccountOpt,
    to: ToOpt,
    out_file: Annotated[
        Path | None,
        typer.Option("--out", help="The file (default: ACCOUNT-RECIPIENT.jsonl.gpg)."),
    ] = None,
    live: LiveOpt = False,
    vault_admin_url: VaultUrlOpt = None,
    ca_bundle: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    stack: StackOpt = None,
) -> None:
    """Export the cards of an account, PGP-encrypted to an allowlisted recipient, once
    custodians have approved it (docs/migration.md)."""
    admin = AdminSession(AdminTargets(None, vault_admin_url, ca_bundle, cert, key, stack))
    target = out_file or Path(f"{account}-{to}.jsonl.gpg")
    body = {"account": account, "mode": "live" if live else "test", "recipient": to}
    written = 0

    def chunks(response: httpx.Response) -> Iterator[bytes]:
        nonlocal written
        for chunk in response.iter_bytes():
            written += len(chunk)
            yield chunk

    try:
        with admin.http.stream(
            "POST", "/v1/admin/exports", json=body, timeout=httpx.Timeout(None, connect=5.0)
        ) as response:
            if response.status_code >= 400:
                response.read()
                admin.check(response)
            # A stream cut off midway raises here, and the temporary file is removed:
            # only a whole message is renamed into place.
            write_private_stream(target, chunks(response))
    except httpx.TransportError as exc:
        err.print(f"[red]the export did not complete:[/] {type(exc).__name__}; nothing written")
        raise typer.Exit(1) from None
    typer.echo(
        json.dumps({"event": "done", "file": str(target), "bytes": written, "recipient": to})
    )


@approval_app.command("create")
def create(
    shares: Annotated[int, typer.Option("--shares", help="Custodians (n).")] = 5,
    threshold: Annotated[int, typer.Option("--threshold", help="Approvals needed (k).")] = 3,
    approval_file: Annotated[
        Path,
        typer.Option("--approval-file", help="Where to write the check ([exports] approval_file)."),
    ] = Path("export-approval.json"),
    out_dir: Annotated[
        Path | None,
        typer.Option("--out-dir", help="Write one share file per custodian here (0600)."),
    ] = None,
) -> None:
    """The approval ceremony: a new approval key split into n shares (any k approve an
    export); only its check is written, to be named by [exports] approval_file. Replaces
    the custodians' old export shares once the vault is restarted with the new file."""
    try:
        check, made = approval.split(shares, threshold)
    except ValueError as exc:
        err.print(f"[red]refused:[/] {exc}")
        raise typer.Exit(2) from None
    write_private(approval_file, check.to_json().encode())
    out.print(f"approval check → {approval_file}: name it in [exports] approval_file")
    hand_out(made, shares, threshold, out_dir, what="approve an export")


@approval_app.command("submit")
def submit(
    account: AccountOpt,
    to: ToOpt,
    live: LiveOpt = False,
    share_file: Annotated[
        Path | None, typer.Option("--share-file", help="Read the share from a file.")
    ] = None,
    vault_admin_url: VaultUrlOpt = None,
    ca_bundle: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    stack: StackOpt = None,
) -> None:
    """One custodian's approval of exporting ACCOUNT's cards to a recipient; the k-th
    approves it (for a limited time, for one export). A share that does not fit wipes
    every approval given so far."""
    if share_file is not None:
        share = share_file.read_text().strip()
    elif sys.stdin.isatty():
        share = getpass.getpass("export-approval share: ").strip()
    else:
        share = sys.stdin.readline().strip()
    admin = AdminSession(AdminTargets(None, vault_admin_url, ca_bundle, cert, key, stack))
    body: dict[str, Any] = {"account": account, "mode": "live" if live else "test",
                            "recipient": to, "share": share}  # fmt: skip
    result = admin.check(admin.http.post("/v1/admin/export_approvals", json=body))
    typer.echo(json.dumps(result))
    if not result["approved"]:
        err.print(
            f"approval {result['progress']}/{result['threshold']}: "
            "the next custodian runs the same command"
        )
