"""``cardvault accounts`` and ``cardvault api-keys``: tenants and their API keys.

These run on the vault's host through the vault's administration
(:mod:`cardvault.vault.admin`): ``--config`` names the vault's settings, and beside a
local stack (``cardvault up``) they are found by themselves. Every action is audited in
the vault's administration log. A key is shown once, when it is created; only its hash
is stored.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Literal, TypeVar

import typer
from rich.console import Console

from cardvault.cli.output import JsonOpt, print_json
from cardvault.cli.stack import StackOpt, load_stack, stack_value
from cardvault.config import load_settings
from cardvault.errors import CardVaultError, ConfigurationError
from cardvault.vault.admin import Administration, administer, normalize_origin
from cardvault.vault.settings import VaultSettings

accounts_app = typer.Typer(help="Accounts (tenants) of this vault.", no_args_is_help=True)
keys_app = typer.Typer(
    help="API keys: pk_/sk_, test/live; shown once, stored hashed.", no_args_is_help=True
)
out = Console()
err = Console(stderr=True)
T = TypeVar("T")

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="The vault's TOML settings (default: the local stack's vault, when one runs).",
        show_default=False,
    ),
]


def vault_settings(config: Path | None, stack: Path | None) -> VaultSettings:
    """The vault's settings: from ``--config``, else the local stack's vault."""
    if config is None:
        found = stack_value(load_stack(stack), "vault", "config")
        if found is None:
            raise ConfigurationError(
                "no vault settings: give --config (the vault's TOML settings), or run this "
                "beside a local stack (cardvault up)"
            )
        config = Path(found)
    return load_settings(VaultSettings, config)


def _administer(
    config: Path | None, stack: Path | None, work: Callable[[Administration], Awaitable[T]]
) -> T:
    settings = vault_settings(config, stack)
    try:
        return administer(settings, work)
    except CardVaultError as exc:
        if isinstance(exc, ConfigurationError):
            raise
        err.print(f"[red]{exc.code}:[/] {exc.message}")
        raise typer.Exit(1) from None


OriginOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--allowed-origin",
        "--origin",
        help="An https origin (https://host[:port]) whose pages may frame the card "
        "element. Repeatable.",
    ),
]


def _origins(values: list[str] | None) -> list[str]:
    """The normalized origins, duplicates dropped, or exit 2 naming the bad one."""
    out: list[str] = []
    for value in values or []:
        try:
            origin = normalize_origin(value)
        except ValueError as exc:
            err.print(f"[red]invalid origin[/] {value!r}: {exc}", highlight=False)
            raise typer.Exit(2) from None
        if origin not in out:
            out.append(origin)
    return out


@accounts_app.command("create")
def create_account(
    config: ConfigOpt = None,
    stack: StackOpt = None,
    name: Annotated[str, typer.Option(help="A name for people.")] = "",
    live: Annotated[bool, typer.Option("--live", help="Also create live-mode keys.")] = False,
    allowed_origin: OriginOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an account with test-mode keys (and live-mode keys with --live)."""
    origins = _origins(allowed_origin)
    made = _administer(
        config, stack, lambda admin: admin.create_account(name, origins=origins, live=live)
    )
    if as_json:
        print_json(
            {
                "account": made.id,
                "allowed_origins": list(made.origins),
                "keys": [{"kind": k, "mode": m, "key": key} for k, m, key in made.keys],
            }
        )
        return
    shown = [("account", made.id)]
    if made.origins:
        shown.append(("allowed origins", " ".join(made.origins)))
    shown += [(f"{kind} ({mode})", key) for kind, mode, key in made.keys]
    for label, value in shown:
        out.print(f"{label:22} {value}", highlight=False)
    out.print("[bold]Keys are shown once and stored only as hashes. Keep them now.[/]")


@accounts_app.command("set-origins")
def set_origins(
    account: Annotated[str, typer.Argument(help="The account id (acct_…).")],
    config: ConfigOpt = None,
    stack: StackOpt = None,
    origin: OriginOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Replace the origins whose pages may frame the account's card element.

    With no --origin, no page may frame it any more. Takes effect on the next frame load.
    """
    origins = _origins(origin)
    if not _administer(config, stack, lambda admin: admin.set_allowed_origins(account, origins)):
        err.print("[red]no such account[/]")
        raise typer.Exit(1)
    if as_json:
        print_json({"account": account, "allowed_origins": origins})
    elif origins:
        out.print(f"{account} allowed origins: {' '.join(origins)}", highlight=False)
    else:
        out.print(f"{account} allowed origins: none (no page may frame its card element)")


@keys_app.command("create")
def create_key(
    account: Annotated[str, typer.Option(help="The account id (acct_…).")],
    config: ConfigOpt = None,
    stack: StackOpt = None,
    kind: Annotated[str, typer.Option(help="publishable or secret.")] = "secret",
    mode: Annotated[str, typer.Option(help="test or live.")] = "test",
    as_json: JsonOpt = False,
) -> None:
    """Create one API key for an account; printed once."""
    if kind not in ("publishable", "secret") or mode not in ("test", "live"):
        err.print("[red]--kind is publishable|secret and --mode is test|live[/]")
        raise typer.Exit(2)
    chosen_kind: Literal["publishable", "secret"] = (
        "publishable" if kind == "publishable" else "secret"
    )
    chosen_mode: Literal["test", "live"] = "live" if mode == "live" else "test"
    record, secret = _administer(
        config, stack, lambda admin: admin.create_api_key(account, chosen_kind, chosen_mode)
    )
    if as_json:
        print_json({"id": record.id, "account": account, "kind": kind, "mode": mode, "key": secret})
        return
    out.print(f"{record.id}  {secret}", highlight=False)
    out.print("[bold]Shown once; stored only as a hash.[/]")


@keys_app.command("revoke")
def revoke_key(
    key_id: str, config: ConfigOpt = None, stack: StackOpt = None, as_json: JsonOpt = False
) -> None:
    """Revoke an API key by its id (key_…). Takes effect within two seconds."""
    if not _administer(config, stack, lambda admin: admin.revoke_api_key(key_id)):
        err.print("[red]no such key, or already revoked[/]")
        raise typer.Exit(1)
    if as_json:
        print_json({"id": key_id, "revoked": True})
    else:
        out.print(f"revoked {key_id}")


__all__ = ["accounts_app", "keys_app"]
