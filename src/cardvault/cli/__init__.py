"""The ``cardvault`` command line."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from cardvault import __version__
from cardvault.errors import ConfigurationError

__all__ = ["app", "main"]

app = typer.Typer(
    name="cardvault",
    help="cardvault: a self-hosted card-data environment.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)


def _register() -> None:
    from cardvault.cli import (
        accounts,
        api,
        audit,
        certs,
        doctor,
        imports,
        keys,
        keyservice,
        scan,
        up,
        vault,
    )

    app.add_typer(accounts.accounts_app, name="accounts")
    app.add_typer(accounts.keys_app, name="api-keys")
    app.add_typer(audit.app, name="audit")
    app.command("scan")(scan.scan)
    app.add_typer(certs.app, name="certs")
    app.add_typer(doctor.app, name="doctor")
    app.add_typer(keyservice.app, name="keyservice")
    app.add_typer(keys.app, name="keys")
    app.command("import")(imports.import_)
    app.add_typer(imports.key_app, name="import-key")
    app.add_typer(vault.app, name="vault")
    app.command("up")(up.up)
    api.register(app)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    _register()
    try:
        app()
    except ConfigurationError as exc:
        err.print(f"[bold red]configuration error:[/] {exc.message}", highlight=False)
        sys.exit(2)
