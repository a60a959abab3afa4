"""``cardvault accounts`` and ``cardvault api-keys``: tenants and their API keys.

These run on the vault's host against the vault's own store (``--config`` names the
vault's settings). A key is shown once, when it is created; only its hash is stored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from rich.console import Console

from cardvault.config import load_settings
from cardvault.errors import CardVaultError, ConfigurationError
from cardvault.vault.settings import VaultSettings

accounts_app = typer.Typer(help="Accounts (tenants) of this vault.", no_args_is_help=True)
keys_app = typer.Typer(
    help="API keys: pk_/sk_, test/live; shown once, stored hashed.", no_args_is_help=True
)
out = Console()
err = Console(stderr=True)
T = TypeVar("T")

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="The vault's TOML settings.")
]


def _with_service(config: Path | None, work: Callable[[Any], Awaitable[T]]) -> T:
    from cardvault.storage import open_vault_store
    from cardvault.vault.accounts import Accounts

    settings = load_settings(VaultSettings, config)
    if not settings.store.url:
        raise ConfigurationError("missing required setting store.url")

    async def go() -> T:
        from cardvault.audit import AuditLog
        from cardvault.audit.recorder import Recorder

        _directory, admin_directory = settings.audit.resolved(settings.store.url)
        store = open_vault_store(settings.store.url)
        # The running vault holds its own log; administration is recorded in its own.
        recorder = Recorder(await AuditLog.open(admin_directory))
        try:
            await store.migrate()
            # Accounts and keys need no card keys: no key-service client is made.
            service = Accounts(store, audit=recorder)
            return await work(service)
        finally:
            await recorder.close()
            await store.close()

    try:
        return asyncio.run(go())
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
    from cardvault.vault.element import normalize_origin

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
    name: Annotated[str, typer.Option(help="A name for people.")] = "",
    live: Annotated[bool, typer.Option("--live", help="Also create live-mode keys.")] = False,
    allowed_origin: OriginOpt = None,
) -> None:
    """Create an account with test-mode keys (and live-mode keys with --live)."""
    origins = _origins(allowed_origin)

    async def work(service: Any) -> list[tuple[str, str]]:
        account = await service.create_account(name)
        shown = [("account", account.id)]
        if origins:
            await service.store.set_allowed_origins(account.id, origins)
            shown.append(("allowed origins", " ".join(origins)))
        modes: list[Literal["test", "live"]] = ["test", "live"] if live else ["test"]
        for mode in modes:
            for kind in ("publishable", "secret"):
                _record, secret = await service.create_api_key(account.id, kind, mode)
                shown.append((f"{kind} ({mode})", secret))
        return shown

    for label, value in _with_service(config, work):
        out.print(f"{label:22} {value}", highlight=False)
    out.print("[bold]Keys are shown once and stored only as hashes. Keep them now.[/]")


@accounts_app.command("set-origins")
def set_origins(
    account: Annotated[str, typer.Argument(help="The account id (acct_…).")],
    config: ConfigOpt = None,
    origin: OriginOpt = None,
) -> None:
    """Replace the origins whose pages may frame the account's card element.

    With no --origin, no page may frame it any more. Takes effect on the next frame load.
    """
    origins = _origins(origin)

    async def work(service: Any) -> bool:
        done: bool = await service.store.set_allowed_origins(account, origins)
        return done

    if not _with_service(config, work):
        err.print("[red]no such account[/]")
        raise typer.Exit(1)
    if origins:
        out.print(f"{account} allowed origins: {' '.join(origins)}", highlight=False)
    else:
        out.print(f"{account} allowed origins: none (no page may frame its card element)")


@keys_app.command("create")
def create_key(
    account: Annotated[str, typer.Option(help="The account id (acct_…).")],
    config: ConfigOpt = None,
    kind: Annotated[str, typer.Option(help="publishable or secret.")] = "secret",
    mode: Annotated[str, typer.Option(help="test or live.")] = "test",
) -> None:
    """Create one API key for an account; printed once."""
    if kind not in ("publishable", "secret") or mode not in ("test", "live"):
        err.print("[red]--kind is publishable|secret and --mode is test|live[/]")
        raise typer.Exit(2)

    async def work(service: Any) -> tuple[Any, str]:
        result: tuple[Any, str] = await service.create_api_key(account, kind, mode)
        return result

    record, secret = _with_service(config, work)
    out.print(f"{record.id}  {secret}", highlight=False)
    out.print("[bold]Shown once; stored only as a hash.[/]")


@keys_app.command("revoke")
def revoke_key(key_id: str, config: ConfigOpt = None) -> None:
    """Revoke an API key by its id (key_…). Takes effect within two seconds."""

    async def work(service: Any) -> bool:
        done: bool = await service.revoke_api_key(key_id)
        return done

    if not _with_service(config, work):
        err.print("[red]no such key, or already revoked[/]")
        raise typer.Exit(1)
    out.print(f"revoked {key_id}")


__all__ = ["accounts_app", "keys_app"]
