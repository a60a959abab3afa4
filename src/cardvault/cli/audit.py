"""``cardvault audit``: verify and export the services' audit logs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from cardvault.audit import (
    HEAD_FILE,
    LOG_FILE,
    PUBLIC_KEY_FILE,
    AuditCorrupt,
    VerifyResult,
    verify_log,
)
from cardvault.audit import (
    export as export_records,
)
from cardvault.cli.stack import StackOpt, load_stack, stack_value

app = typer.Typer(
    help="Verify the hash chain and signatures of audit logs, and export them.",
    no_args_is_help=True,
)
out = Console()
err = Console(stderr=True)


def admin_log_directory(log: Path) -> Path:
    """Where reading ``log`` is recorded: its zone's admin log (``<zone>-admin/``), or the
    same directory for an admin log itself. The running service holds its own log open."""
    zone = log.resolve().parent
    return zone if zone.name.endswith("-admin") else zone.with_name(zone.name + "-admin")


def record_access(log: Path, action: str, *, required: bool) -> None:
    """Record that ``log`` was read or exported, before it is.

    An export hands the records out, so when its record cannot be written the export is
    refused (exit 1). A verification only checks integrity; it must still be able to
    report a damaged log, so a failure to record it is a warning. An admin log's own
    readers are not recorded in it (the log under examination is not written to)."""
    import asyncio
    import getpass

    from cardvault.audit import AuditError, AuditLog
    from cardvault.audit.text import untrusted_text

    target = admin_log_directory(log)
    if target == log.resolve().parent:
        return

    async def go() -> None:
        audit = await AuditLog.open(target)
        try:
            # The user name (from LOGNAME or USER) and the path are the operator's text:
            # recorded as untrusted_text, so no name or path can make the record fail.
            await audit.append(
                action,
                actor=untrusted_text(f"os-user:{getpass.getuser()}", limit=100),
                origin="local",
                object_id=untrusted_text(str(log.resolve())[-200:]),
                result="ok",
                request_id=None,
            )
        finally:
            await audit.close()

    try:
        asyncio.run(go())
    except (AuditError, OSError) as exc:
        err.print(
            f"[red]cannot record this access in the audit log, so it is refused: {escape(str(exc))}[/]"
        )
        raise typer.Exit(1) from None


def _logs_under(state: Path) -> list[Path]:
    """Every zone's log in a local stack: STATE/<zone>/audit.jsonl."""
    return sorted(state.glob(f"*/{LOG_FILE}"))


def _verify_one(log: Path, public_key: Path | None, head: Path | None) -> VerifyResult | str:
    key = public_key if public_key is not None else log.with_name(PUBLIC_KEY_FILE)
    try:
        return verify_log(log, key, head_path=head)
    except FileNotFoundError as exc:
        return f"cannot read {exc.filename}"
    except (OSError, ValueError) as exc:
        return f"cannot verify: {exc}"


@app.command("verify")
def verify(
    path: Annotated[
        Path | None, typer.Argument(help="An audit log (audit.jsonl).", show_default=False)
    ] = None,
    state: Annotated[
        Path | None,
        typer.Option(
            "--state", help="Verify every zone's log of a local stack (DIR/*/audit.jsonl)."
        ),
    ] = None,
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            help="The service's published key (default: audit.pub beside each log). "
            "Use a copy kept elsewhere when the host itself is in doubt.",
        ),
    ] = None,
    head: Annotated[
        Path | None,
        typer.Option("--head", help=f"The signed head (default: {HEAD_FILE} beside the log)."),
    ] = None,
    stack: StackOpt = None,
) -> None:
    """Check the hash chain and checkpoint signatures; exit 1 at the first problem.

    Reports the first record where an edit, deletion, insertion, reordering or
    truncation happened. With neither a PATH nor --state, every log of the local stack
    (cardvault up) is verified.
    """
    if path is None and state is None:
        found = stack_value(load_stack(stack), "state")
        state = Path(found) if found else None
        if state is None:
            err.print("[red]Give a log PATH or --state DIR[/] (or run beside a local stack).")
            raise typer.Exit(2)
    if path is not None and state is not None:
        err.print("[red]Give either a log PATH or --state DIR.[/]")
        raise typer.Exit(2)
    if state is not None:
        if head is not None or public_key is not None:
            err.print("[red]--head and --public-key apply to one log, not to --state.[/]")
            raise typer.Exit(2)
        logs = _logs_under(state)
        if not logs:
            err.print(
                f"[red]No audit logs under {escape(str(state))} (looked for */{LOG_FILE}).[/]"
            )
            raise typer.Exit(1)
    else:
        assert path is not None
        logs = [path]

    table = Table(title="Audit logs", title_justify="left")
    for column in ("log", "records", "signed through", "unsigned", "result"):
        table.add_column(column, justify="right" if column in {"records", "unsigned"} else "left")
    failed = False
    for log in logs:
        name = str(log.relative_to(state)) if state is not None else str(log)
        if log.exists():
            record_access(log, "audit.verified", required=False)
        result = _verify_one(log, public_key, head)
        if isinstance(result, str):
            failed = True
            table.add_row(escape(name), "-", "-", "-", f"[red]{escape(result)}[/]")
            continue
        signed = str(result.signed_seq) if result.signed_seq is not None else "never"
        if result.problem is None:
            verdict = "[green]ok[/]"
        else:
            failed = True
            # The message may quote text from the log (a forged key id): no markup.
            verdict = f"[red]{escape(str(result.problem))}[/]"
        table.add_row(escape(name), str(result.records), signed, str(result.unsigned), verdict)
    out.print(table)
    if failed:
        raise typer.Exit(1)


@app.command("export")
def export(
    path: Annotated[Path, typer.Argument(help="An audit log (audit.jsonl).")],
    out_file: Annotated[
        Path | None,
        typer.Option("--out", help="Write here (mode 0600) instead of standard output."),
    ] = None,
) -> None:
    """Write the log's records as JSON lines (one object per line), without verifying.

    Run `cardvault audit verify` before and after shipping an export.
    """
    if path.exists():
        record_access(path, "audit.exported", required=True)
    try:
        lines = (
            json.dumps(record, separators=(",", ":"), ensure_ascii=True) + "\n"
            for record in export_records(path)
        )
        if out_file is None:
            for line in lines:
                typer.echo(line, nl=False)
            return
        fd = os.open(out_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as fh:
            fh.writelines(lines)
    except FileNotFoundError as exc:
        err.print(f"[red]No such file: {escape(str(exc.filename))}[/]")
        raise typer.Exit(1) from None
    except AuditCorrupt as exc:
        err.print(f"[red]{escape(str(exc))}[/]")
        raise typer.Exit(1) from None
