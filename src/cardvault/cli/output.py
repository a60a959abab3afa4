"""What the commands share to print a result: ``--json`` and the JSON itself."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

__all__ = ["JsonOpt", "print_json"]

JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")]


def print_json(result: Any) -> None:
    """``result`` as one JSON document on stdout (no markup, no wrapping)."""
    print(json.dumps(result, indent=2, ensure_ascii=False))
