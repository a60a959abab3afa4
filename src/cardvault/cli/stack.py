"""The local stack's file, for commands that find their target by themselves.

``cardvault up`` writes ``.cardvault/stack.json`` once every service answers: the URLs,
the CA bundle, the admin identity's certificate, each zone's settings file and the demo
account's keys. A command run beside it (or with ``--stack`` / ``CARDVAULT_STACK``)
takes its defaults from there; options given on the command line always win.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

__all__ = ["DEFAULT_STACK", "StackOpt", "load_stack", "stack_path", "stack_value"]

DEFAULT_STACK = Path(".cardvault/stack.json")
_err = Console(stderr=True)

StackOpt = Annotated[
    Path | None,
    typer.Option(
        "--stack",
        envvar="CARDVAULT_STACK",
        help="The stack file `cardvault up` writes (default: .cardvault/stack.json, when "
        "present); its settings are the defaults.",
        show_default=False,
    ),
]


def stack_path(given: Path | None) -> Path:
    """The stack file: the one given, else ``CARDVAULT_STACK``, else the default."""
    if given is not None:
        return given
    env = os.environ.get("CARDVAULT_STACK")
    return Path(env) if env else DEFAULT_STACK


def load_stack(given: Path | None) -> dict[str, Any] | None:
    """The stack's description, or None when there is no stack file (exit 2 when the
    file is there but cannot be read)."""
    path = stack_path(given)
    if not path.exists():
        if given is not None:
            _err.print(f"[red]no stack at {path}[/]: start one with `cardvault up`")
            raise typer.Exit(2)
        return None
    try:
        stack = json.loads(path.read_text())
    except (OSError, ValueError):
        _err.print(f"[red]cannot read the stack file {path}[/]")
        raise typer.Exit(2) from None
    if not isinstance(stack, dict):
        _err.print(f"[red]the stack file {path} is not a stack description[/]")
        raise typer.Exit(2)
    stack.setdefault("state", str(path.resolve().parent))
    return stack


def stack_value(stack: dict[str, Any] | None, *keys: str) -> Any:
    """``stack[k1][k2]…``, or None where the stack or any key is missing."""
    value: Any = stack
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value
