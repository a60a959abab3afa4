"""``cardvault vault``: run the card-data environment's service."""

from __future__ import annotations

import sys
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
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers",
            help="Processes serving the ports (server.workers, default 1). More than one "
            "needs a PostgreSQL store; see docs/deploy.md, 'Workers'.",
            show_default=False,
        ),
    ] = None,
    worker: Annotated[
        str | None,
        typer.Option("--worker", hidden=True, help="Given by the parent of the workers."),
    ] = None,
) -> None:
    """Run the vault until SIGINT/SIGTERM. Settings come from --config and CARDVAULT_* variables."""
    overrides = {"server": {"workers": workers}} if workers is not None else None
    settings = load_settings(VaultSettings, config, overrides=overrides)
    if worker is not None:
        from cardvault.vault.app import run
        from cardvault.vault.workers import WorkerSpec

        run(settings, worker=WorkerSpec.parse(worker))
    elif settings.server.workers == 1:
        from cardvault.vault.app import run

        run(settings)
    else:
        from cardvault.vault.workers import supervise

        sys.exit(supervise(settings, config))
