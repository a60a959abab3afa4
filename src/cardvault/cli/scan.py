"""``cardvault scan``: search files for card numbers, CVCs and planted canaries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from cardvault.cli.progress import byte_progress
from cardvault.cli.stack import StackOpt, load_stack, stack_value
from cardvault.scan import Finding, scan_paths, scan_size

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True)


def _read_canaries(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def scan(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Files or directories to search (default: the local stack's state: "
            "every zone's files but the simulated acquirer's).",
            show_default=False,
        ),
    ] = None,
    canary: Annotated[
        list[str] | None,
        typer.Option("--canary", help="A planted value to find (repeatable; 8+ characters)."),
    ] = None,
    canary_file: Annotated[
        Path | None,
        typer.Option("--canary-file", help="Canaries, one per line (# starts a comment)."),
    ] = None,
    cvc: Annotated[
        list[str] | None,
        typer.Option("--cvc", help="A CVC to find where a field name says CVC (repeatable)."),
    ] = None,
    ignore: Annotated[
        list[str] | None,
        typer.Option("--ignore", help="Leave out paths matching this glob (repeatable)."),
    ] = None,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="One JSON object: the verdict and every finding."),
    ] = False,
    stack: StackOpt = None,
) -> None:
    """Search files for card numbers, CVCs and canaries (ASCII, UTF-16, hex, base64).

    Prints one line per finding (never the value itself) and exits 1 when anything is
    found or a file cannot be read, 0 when everything is clean. On a terminal, a
    progress bar (bytes, rate, time left) runs on stderr while it searches.
    """
    if not paths:
        found = stack_value(load_stack(stack), "state")
        if found is None:
            err.print("[red]Give files or directories to search[/] (or run beside a local stack).")
            raise typer.Exit(2)
        # Every zone of ours; the simulated acquirer stands for a card network outside
        # the deployment, which receives card numbers by design.
        paths = sorted(p for p in Path(found).iterdir() if p.name != "acquirer")
    canaries = list(canary or [])
    try:
        if canary_file is not None:
            canaries += _read_canaries(canary_file)
        total = scan_size(paths, ignore=ignore or [])
        with byte_progress(err, "scanning", total, enabled=not as_json) as advance:
            findings = scan_paths(
                paths, canaries=canaries, cvcs=cvc or [], ignore=ignore or [], on_bytes=advance
            )
    except FileNotFoundError as exc:
        err.print(f"[red]No such file or directory: {escape(str(exc.filename))}[/]")
        raise typer.Exit(2) from None
    except ValueError as exc:
        err.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps({"clean": not findings, "findings": [_as_dict(f) for f in findings]}))
        if findings:
            raise typer.Exit(1)
        return
    for finding in findings:
        out.print(str(finding), markup=False)
    if findings:
        err.print(f"[red]{len(findings)} finding(s).[/]")
        raise typer.Exit(1)
    err.print("[green]clean[/]: nothing found.")


def _as_dict(finding: Finding) -> dict[str, object]:
    """A finding as JSON: where, what and how encoded; the value only masked."""
    return {
        "path": str(finding.path),
        "offset": finding.offset,
        "kind": str(finding.kind),
        "encoding": str(finding.encoding),
        "masked": finding.masked,
    }


#: ``scan`` on its own, for tests and for running this module without the main CLI.
app = typer.Typer(add_completion=False)
app.command()(scan)
