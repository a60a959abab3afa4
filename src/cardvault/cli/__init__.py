"""The ``cardvault`` command line."""

from __future__ import annotations

import sys
import typing
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.main
from rich.console import Console

from cardvault import __version__
from cardvault.errors import ConfigurationError

__all__ = ["app", "main"]

app = typer.Typer(
    name="cardvault",
    help="cardvault: a self-hosted card-data environment.",
    no_args_is_help=True,
    # --install-completion / --show-completion SHELL (bash, zsh, fish, powershell).
    add_completion=True,
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
        exports,
        imports,
        keys,
        keyservice,
        listen,
        logs,
        scan,
        trigger,
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
    app.add_typer(logs.app, name="logs")
    app.command("listen")(listen.listen)
    app.command("trigger")(trigger.trigger)
    app.command("import")(imports.import_)
    app.add_typer(imports.key_app, name="import-key")
    app.command("export")(exports.export)
    app.add_typer(exports.approval_app, name="export-approval")
    app.add_typer(vault.app, name="vault")
    app.command("up")(up.up)
    api.register(app)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"cardvault {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", callback=_print_version, is_eager=True
        ),
    ] = False,
) -> None:
    """cardvault: a self-hosted card-data environment."""


#: How a parameter's value is shown in the help, by its annotation.
_METAVARS: dict[object, str] = {int: "INTEGER", float: "NUMBER", Path: "PATH", str: "TEXT"}


def _plain_metavars(command: Any) -> None:
    """Help that shows what to type: a flag shows nothing after its name (not
    ``<bool>``, which reads as a value to give), an option its value's kind in
    capitals (``PATH``, ``INTEGER``, ``TEXT``; a list's element kind), a choice its
    choices."""
    for param in command.params:
        if param.metavar is not None:
            continue
        if getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""
            continue
        desc = param.type_descriptor
        if desc.is_choice:
            param.metavar = "|".join(str(c) for c in desc.choices or ())
        else:
            kind = desc.annotation
            if desc.is_list and typing.get_args(kind):
                kind = typing.get_args(kind)[0]
            param.metavar = _METAVARS.get(kind, "TEXT")
        if param.nargs != 1 and not getattr(param, "multiple", False):
            param.metavar += "..."
        if not param.opts or not param.opts[0].startswith("-"):
            # An argument's kind is in its name column already (the metavar).
            param.display_type_rich = lambda ctx: None
    make_help = command.get_help_option

    def help_option(ctx: Any) -> Any:
        option = make_help(ctx)
        if option is not None:
            option.metavar = ""
        return option

    command.get_help_option = help_option
    for sub in getattr(command, "commands", {}).values():
        _plain_metavars(sub)


def main() -> None:
    _register()
    command = typer.main.get_command(app)
    _plain_metavars(command)
    try:
        command(prog_name="cardvault")
    except ConfigurationError as exc:
        err.print(f"[bold red]configuration error:[/] {exc.message}", highlight=False)
        sys.exit(2)
