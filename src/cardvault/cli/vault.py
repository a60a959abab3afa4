"""``cardvault vault``: run the card-data environment's service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cardvault.config import load_settings
from cardvault.vault.settings import VaultSettings

app = typer.Typer(help="The vault: the card-data environment's service.", no_args_is_help=True)


@app.command("serve")
def serve(
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="A TOML settings file (see docs/configuration.md)."),
    ] = None,
) -> None:
    """Run the vault until SIGINT/SIGTERM. Settings come from --config and CARDVAULT_* variables."""
    from cardvault.vault.app import run

    settings = load_settings(VaultSettings, config)
    run(settings)
