"""``cardvault audit``: verify, export and repair the services' audit logs."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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
from cardvault.cli.progress import byte_progress
from cardvault.cli.stack import StackOpt, load_stack, stack_value

if TYPE_CHECKING:
    from cardvault.audit.repair import RepairPlan

app = typer.Typer(
    help="Verify the hash chain and signatures of audit logs, export them, and repair one "
    "its service refuses to continue.",
    no_args_is_help=True,
)
out = Console()
err = Console(stderr=True)


def admin_log_directory(log: Path) -> Path:
    """Where reading ``log`` is recorded: its zone's admin log (``<zone>-admin/``), or the
    same directory for an admin log itself. The running service holds its own log open.
    A vault worker's log (``<audit dir>/w<i>/``) belongs to the vault's zone: its
    reading is recorded in the vault's admin log, not in a chain made beside it."""
    zone = log.resolve().parent
    if zone.name.endswith("-admin"):
        return zone
    if re.fullmatch(r"w[0-9]+", zone.name):
        zone = zone.parent
    return zone.with_name(zone.name + "-admin")


def _operator() -> str:
    """Who runs the command, as recorded: the user name (from LOGNAME or USER) is the
    operator's text, recorded as untrusted_text so that no name can make a record fail."""
    import getpass

    from cardvault.audit.text import untrusted_text

    return untrusted_text(f"os-user:{getpass.getuser()}", limit=100)


def record_access(log: Path, action: str, *, required: bool) -> None:
    """Record that ``log`` was read, exported or repaired, before it is.

    An export hands the records out and a repair changes the log, so when their record
    cannot be written they are refused (exit 1). A verification only checks integrity
    and must still be able to report on a log when the disk is full, so a failure to
    record it is a warning, and the verification goes on. An admin log's own readers are
    not recorded in it (the log under examination is not written to)."""
    import asyncio

    from cardvault.audit import AuditError, AuditLog
    from cardvault.audit.text import untrusted_text

    target = admin_log_directory(log)
    if target == log.resolve().parent:
        return

    async def go() -> None:
        audit = await AuditLog.open(target)
        try:
            # The path is the operator's text too: recorded as untrusted_text.
            await audit.append(
                action,
                actor=_operator(),
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
        reason = escape(str(exc))
        if required:
            err.print(
                f"[red]cannot record this access in the audit log, so it is refused: {reason}[/]"
            )
            raise typer.Exit(1) from None
        err.print(
            f"[yellow]warning: this verification could not be recorded in {escape(str(target))} "
            f"({reason}); verifying anyway[/]"
        )


def _logs_under(directory: Path) -> list[Path]:
    """Every audit log under ``directory``, at any depth: a local stack's zones
    (``STATE/<zone>/audit.jsonl``), a vault's workers (``…/w<i>/audit.jsonl``), the
    logs of several hosts copied side by side. Lines a repair moved out
    (``audit.cut-….jsonl``) are not logs."""
    return sorted(p for p in directory.rglob(LOG_FILE) if p.is_file())


def _verify_one(
    log: Path,
    public_key: Path | None,
    head: Path | None,
    on_bytes: Callable[[int], None] | None = None,
) -> VerifyResult | str:
    key = public_key if public_key is not None else log.with_name(PUBLIC_KEY_FILE)
    try:
        return verify_log(log, key, head_path=head, on_bytes=on_bytes)
    except FileNotFoundError as exc:
        return f"cannot read {exc.filename}"
    except (OSError, ValueError) as exc:
        return f"cannot verify: {exc}"


def _signer(log: Path, public_key: Path | None) -> str | None:
    """The key id of the key the chain is verified with, or None if it cannot be read."""
    from cardvault.audit.signing import key_id, load_public_key

    try:
        return key_id(load_public_key(public_key or log.with_name(PUBLIC_KEY_FILE)))
    except (OSError, ValueError):
        return None


@dataclass
class _Chain:
    """One chain of a set, as ``verify`` reports it."""

    log: str
    key_id: str | None
    records: int | None = None
    signed_through: int | None = None
    unsigned: int | None = None
    problem: str | None = None
    kind: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def _check_chain(
    name: str,
    log: Path,
    public_key: Path | None,
    head: Path | None,
    on_bytes: Callable[[int], None],
) -> _Chain:
    chain = _Chain(name, _signer(log, public_key))
    if log.exists():
        record_access(log, "audit.verified", required=False)
    result = _verify_one(log, public_key, head, on_bytes)
    if isinstance(result, str):
        chain.problem, chain.kind = result, "unreadable"
        return chain
    chain.records, chain.signed_through = result.records, result.signed_seq
    chain.unsigned = result.unsigned
    if result.problem is not None:
        chain.problem, chain.kind = str(result.problem), str(result.problem.kind)
    return chain


def _shared_keys(chains: list[_Chain]) -> None:
    """A set's chains must each have a signing key of their own: two chains signed by one
    key cannot be told apart (either could stand in for the other), so each such chain
    fails with ``shared_key``."""
    by_key: dict[str, list[_Chain]] = {}
    for chain in chains:
        if chain.key_id is not None:
            by_key.setdefault(chain.key_id, []).append(chain)
    for key, sharing in by_key.items():
        if len(sharing) < 2:
            continue
        for chain in sharing:
            if chain.ok:
                others = ", ".join(c.log for c in sharing if c is not chain)
                chain.problem = f"shared_key: {key} also signs {others}"
                chain.kind = "shared_key"


def _collect(paths: list[Path], state: Path | None) -> list[tuple[str, Path]]:
    """(name shown, log) for every log named or found under a directory named."""
    found: list[tuple[str, Path]] = []
    roots = [*paths, *([state] if state is not None else [])]
    for root in roots:
        if root.is_dir():
            found += [
                (str(log.relative_to(root)) if root == state else str(log), log)
                for log in _logs_under(root)
            ]
        else:
            found.append((str(root), root))
    return found


@app.command("verify")
def verify(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Audit logs (audit.jsonl), or directories to search for them (every log "
            "under each, at any depth: a deployment's set of chains).",
            show_default=False,
        ),
    ] = None,
    state: Annotated[
        Path | None,
        typer.Option(
            "--state", help="Verify every log of a local stack (every audit.jsonl under DIR)."
        ),
    ] = None,
    public_key: Annotated[
        Path | None,
        typer.Option(
            "--public-key",
            help="The service's published key (default: audit.pub beside each log). "
            "Use a copy kept elsewhere when the host itself is in doubt. One log only.",
        ),
    ] = None,
    head: Annotated[
        Path | None,
        typer.Option(
            "--head", help=f"The signed head (default: {HEAD_FILE} beside the log). One log only."
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object: every chain and the verdict.")
    ] = False,
    stack: StackOpt = None,
) -> None:
    """Check the hash chains and checkpoint signatures of one log or a set; exit 1 if any
    fails.

    Reports, per chain, the first record where an edit, deletion, insertion, reordering or
    truncation happened. A set (several logs, or directories) also fails when two chains
    are signed by one key. With neither a PATH nor --state, every log of the local stack
    (cardvault up) is verified. On a terminal, a progress bar runs on stderr meanwhile.
    """
    paths = list(paths or [])
    if not paths and state is None:
        found = stack_value(load_stack(stack), "state")
        state = Path(found) if found else None
        if state is None:
            err.print("[red]Give a log PATH or --state DIR[/] (or run beside a local stack).")
            raise typer.Exit(2)
    if paths and state is not None:
        err.print("[red]Give either log PATHs or --state DIR.[/]")
        raise typer.Exit(2)
    logs = _collect(paths, state)
    single = len(paths) == 1 and not paths[0].is_dir()
    if (head is not None or public_key is not None) and not single:
        err.print("[red]--head and --public-key apply to one log, not to a set.[/]")
        raise typer.Exit(2)
    if not logs:
        where = ", ".join(str(p) for p in [*paths, *([state] if state else [])])
        err.print(f"[red]No audit logs under {escape(where)} (looked for {LOG_FILE}).[/]")
        raise typer.Exit(1)
    total = sum(_size(log) for _, log in logs)
    with byte_progress(err, "verifying", total, enabled=not as_json) as advance:
        chains = [_check_chain(name, log, public_key, head, advance) for name, log in logs]
    _shared_keys(chains)
    ok = all(chain.ok for chain in chains)
    if as_json:
        print(json.dumps({"ok": ok, "chains": [asdict(c) for c in chains]}, indent=2))
    else:
        _print_chains(chains)
    if not ok:
        raise typer.Exit(1)


def _size(log: Path) -> int:
    try:
        return log.stat().st_size
    except OSError:
        return 0  # reported as unreadable by the check


def _print_chains(chains: list[_Chain]) -> None:
    table = Table(title="Audit logs", title_justify="left")
    for column in ("log", "key", "records", "signed through", "unsigned", "result"):
        table.add_column(column, justify="right" if column in {"records", "unsigned"} else "left")
    for c in chains:
        signed = (
            "-"
            if c.records is None
            else (str(c.signed_through) if c.signed_through is not None else "never")
        )
        # The problem may quote text from the log (a forged key id): no markup.
        verdict = "[green]ok[/]" if c.ok else f"[red]{escape(c.problem or '')}[/]"
        table.add_row(
            escape(c.log),
            escape(c.key_id or "-"),
            "-" if c.records is None else str(c.records),
            signed,
            "-" if c.unsigned is None else str(c.unsigned),
            verdict,
        )
    out.print(table)


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


@app.command("repair")
def repair(
    path: Annotated[Path, typer.Argument(help="The audit log (audit.jsonl) its service refuses.")],
    adopt_unsigned: Annotated[
        bool,
        typer.Option(
            "--adopt-unsigned",
            help="Keep the records after the last signature that still verify but that "
            "nothing vouches for (you vouch for them: records written just before a power "
            "cut). By default they are moved out with the rest.",
        ),
    ] = False,
    yes: Annotated[
        bool, typer.Option("--yes", help="Do it (without: only show the plan).")
    ] = False,
) -> None:
    """Make a log its service refuses to continue continuable again, and record it.

    Keeps the part of the log that verifies and is vouched for, moves every line after
    it to audit.cut-<time>.jsonl beside the log, and appends a signed audit.repaired
    record saying what was found, kept and cut, and what audit.head was. Stop the
    service first, and keep a copy of its audit directory as found.
    """
    from cardvault.audit import AuditError, AuditUnavailable
    from cardvault.audit.repair import REPAIR_ACTION, Repair

    try:
        with Repair(path) as job:
            plan = job.plan(adopt_unsigned=adopt_unsigned)
            _print_plan(plan)
            if not plan.needed:
                out.print("[green]nothing to repair[/]: the service continues this log as it is.")
                return
            if not yes:
                err.print("Nothing was changed. Run again with --yes to do this.")
                raise typer.Exit(1)
            record_access(path, REPAIR_ACTION, required=True)
            record = job.apply(plan, actor=_operator())
    except FileNotFoundError as exc:
        err.print(f"[red]No such file: {escape(str(exc.filename))}[/]")
        raise typer.Exit(1) from None
    except AuditUnavailable as exc:
        err.print(f"[red]{escape(str(exc))}[/]: stop the service that writes this log first.")
        raise typer.Exit(1) from None
    except (AuditError, OSError) as exc:
        err.print(f"[red]repair failed: {escape(str(exc))}[/]")
        raise typer.Exit(1) from None
    out.print(
        f"repaired: record {record.seq} ({REPAIR_ACTION}) and a checkpoint that signs it "
        f"were appended; {escape(str(path.with_name(HEAD_FILE)))} names that checkpoint."
    )
    result = _verify_one(path, None, None)
    if isinstance(result, str) or result.problem is not None:
        problem = result if isinstance(result, str) else str(result.problem)
        err.print(f"[red]the repaired log does not verify: {escape(problem)}[/]")
        raise typer.Exit(1)
    out.print(f"verify: [green]ok[/] ({result.records} records)")


def _print_plan(plan: RepairPlan) -> None:
    """What was found and what a repair does, in plain lines (no markup from the log)."""
    show = out.print
    if plan.refused is not None:
        show(f"found        {escape(plan.reason or plan.refused)}", highlight=False)
    show(f"log          {escape(str(plan.path))}: {plan.lines} lines", highlight=False)
    show(f"audit.head   {plan.head}", highlight=False)
    show(f"audit.tail   {plan.mark}", highlight=False)
    if not plan.needed:
        return
    show(f"keep         lines 1 to {plan.keep_lines} (through record {plan.keep_seq})")
    if plan.unvouched:
        verb = "kept (--adopt-unsigned)" if plan.adopted else "cut (--adopt-unsigned keeps them)"
        show(f"unvouched    {plan.unvouched} records after the last signed or marked one: {verb}")
    if plan.cut_lines:
        show(
            f"cut          {plan.cut_lines} lines ({plan.cut_bytes} bytes), moved as they are "
            "to audit.cut-<time>.jsonl beside the log"
        )
    show("then         append a signed audit.repaired record, write audit.head and audit.tail")
