"""``cardvault logs tail``: the vault's request log, followed live, like ``stripe logs tail``.

The lines come from the vault's admin API (``GET /v1/admin/request_log``, mutual TLS
with the admin identity; :mod:`cardvault.vault.requestlog`): the access lines the vault
writes through its scrubbed log chain, kept in memory, filtered by the vault. Beside a
local stack (``cardvault up``) it finds the vault and the identity by itself.

With ``vault serve --workers N`` each worker holds its own lines, and a poll is answered
by whichever worker took its connection; ``tail`` then polls on a new connection each
time with a short wait, keeps one cursor per worker it has reached, and asks each for
what it logged since ``tail`` started, so that it shows every worker's lines (in the
order it reaches them, not merged by time), each once.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console

from cardvault.cli.imports import AdminSession
from cardvault.cli.keys import AdminTargets, VaultUrlOpt
from cardvault.cli.keyservice import CaOpt, CertOpt, KeyOpt
from cardvault.cli.stack import StackOpt
from cardvault.logging import scrub_text

__all__ = ["app"]

app = typer.Typer(help="The vault's request log.", no_args_is_help=True)
err = Console(stderr=True)

#: Seconds one poll may wait for a line: one vault process, and several (a short wait
#: on a new connection each time, to reach every worker in turn).
_WAIT_ONE = 25
_WAIT_SEVERAL = 1
#: Cursors kept (one per worker buffer reached; the vault takes at most 16).
_MAX_CURSORS = 16
#: Pause after a poll that failed for lack of the vault, before the next.
_RETRY_S = 1.0


def _line(row: dict[str, Any]) -> str:
    """One request as a line: time, status, method, path, request id, duration."""
    when = str(row.get("timestamp", ""))[:19].replace("T", " ")
    duration = row.get("duration_ms")
    took = f"{float(duration):.1f} ms" if isinstance(duration, int | float) else "-"
    worker = row.get("worker")
    text = (
        f"{when} [{row.get('status', '-')}] {row.get('method', '-')} {row.get('path', '-')} "
        f"[{row.get('request_id', '-')}] {took}" + ("" if worker is None else f" (worker {worker})")
    )
    # The vault sends scrubbed lines; scrubbed again here all the same.
    return scrub_text(text)


@app.command("tail")
def tail(
    filter_status: Annotated[
        str | None,
        typer.Option(
            "--filter-status",
            help="Only requests answered with this status: 2XX, 4XX, 5XX (any class) or a code.",
            show_default=False,
        ),
    ] = None,
    filter_path: Annotated[
        str | None,
        typer.Option(
            "--filter-path",
            help="Only requests for this path (a prefix when it ends with *).",
            show_default=False,
        ),
    ] = None,
    filter_method: Annotated[
        str | None,
        typer.Option("--filter-method", help="Only requests with this method.", show_default=False),
    ] = None,
    filter_request_id: Annotated[
        str | None,
        typer.Option(
            "--filter-request-id", help="Only the request with this id.", show_default=False
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print each request as JSON.")] = False,
    max_lines: Annotated[
        int | None,
        typer.Option(
            "--max-lines",
            min=1,
            max=1_000_000,
            help="Stop after this many requests (default: follow until Ctrl-C).",
            show_default=False,
        ),
    ] = None,
    vault_admin_url: VaultUrlOpt = None,
    ca_bundle: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    stack: StackOpt = None,
) -> None:
    """Follow the vault's request log: one line per request (time, status, method, path,
    request id, duration), or JSON lines with --json. Card numbers never appear: the
    vault keeps only its scrubbed access lines."""
    admin = AdminSession(AdminTargets(None, vault_admin_url, ca_bundle, cert, key, stack))
    filters = {
        "status": filter_status,
        "path": filter_path,
        "method": filter_method,
        "request_id": filter_request_id,
    }
    params: dict[str, Any] = {k: v for k, v in filters.items() if v is not None}
    params["since"] = str(time.time_ns() // 1_000_000)
    cursors: dict[str, str] = {}
    shown = 0
    wait = 0  # the first poll answers at once: then "Ready"
    ready = False
    try:
        while max_lines is None or shown < max_lines:
            if cursors:
                params["after"] = ",".join(list(cursors.values())[-_MAX_CURSORS:])
            params["wait"] = str(wait)
            if max_lines is not None:
                params["limit"] = str(min(max_lines - shown, 1000))
            try:
                response = admin.http.get(
                    "/v1/admin/request_log",
                    params=params,
                    headers={"connection": "close"} if wait == _WAIT_SEVERAL else None,
                    timeout=httpx.Timeout(_WAIT_ONE + 15.0, connect=5.0),
                )
            except httpx.TransportError as exc:
                err.print(f"[yellow]cannot reach the vault[/] ({type(exc).__name__}); retrying")
                time.sleep(_RETRY_S)
                continue
            page = admin.check(response)
            buffer_id = str(page["cursor"]).split(".", 1)[0]
            cursors.pop(buffer_id, None)  # most recent last
            cursors[buffer_id] = str(page["cursor"])
            workers = page.get("workers")
            wait = _WAIT_SEVERAL if isinstance(workers, int) and workers > 1 else _WAIT_ONE
            if not ready:
                ready = True
                err.print("Ready! Tailing the vault's request log (^C to quit)")
            for row in page["data"]:
                if max_lines is not None and shown >= max_lines:
                    break
                typer.echo(scrub_text(json.dumps(row)) if as_json else _line(row))
                shown += 1
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    finally:
        admin.http.close()
