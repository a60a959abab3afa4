"""``cardvault import`` and ``cardvault import-key``: bulk import through the vault's
admin API (mutual TLS, the admin identity; docs/migration.md). The command line never
opens the card database and never decrypts: it uploads the file (an OpenPGP message to
the vault's import key; a plain file, test mode only, is encrypted to that key here
first, streamed), asks the vault to run the import, shows the progress, and writes the
mapping file (external id → ``pm_…``, no card data) with mode 0600. Beside a local
stack it finds the vault by itself.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import orjson
import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cardvault import pgp
from cardvault.cli.keys import AdminTargets, VaultUrlOpt
from cardvault.cli.keyservice import CaOpt, CertOpt, KeyOpt
from cardvault.cli.stack import StackOpt
from cardvault.files import write_private_stream
from cardvault.transport.tls import client_context

__all__ = ["AdminSession", "import_", "key_app"]

key_app = typer.Typer(help="The vault's OpenPGP import key.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)

#: Bytes per upload part: the vault takes at most 512 KiB in one.
PART = 512 * 1024
_PAGE = 5000


def _is_pgp(path: Path) -> bool:
    """Whether ``path`` starts like an OpenPGP message (binary packet or armor)."""
    with path.open("rb") as fh:
        head = fh.read(64)
    return head.startswith(b"-----BEGIN PGP MESSAGE") or (bool(head) and head[0] & 0x80 != 0)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1024 * 1024):
            digest.update(block)
    return digest.hexdigest()


class AdminSession:
    """Raw calls to the vault's admin API (uploads and the streamed run), on a
    certificate-verifying mutual-TLS client."""

    def __init__(self, targets: AdminTargets) -> None:
        if targets.vault_url is None:
            err.print(
                "[red]no vault to call[/]: give --vault-admin-url, or run this beside a stack"
            )
            raise typer.Exit(2)
        assert targets.ca is not None
        assert targets.cert is not None
        assert targets.key is not None
        ctx = client_context(targets.ca, client_cert=(targets.cert, targets.key))
        self.http = httpx.Client(
            base_url=targets.vault_url,
            verify=ctx,
            timeout=httpx.Timeout(60.0, connect=5.0),
            trust_env=False,
            follow_redirects=False,
        )

    def check(self, response: httpx.Response) -> Any:
        if response.status_code >= 400:
            try:
                error = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                error = {"code": str(response.status_code), "message": "the vault refused"}
            reason = f" ({error['reason']})" if error.get("reason") else ""
            err.print(
                f"[red]vault: {error.get('code')}{reason}:[/] {error.get('message')}",
                soft_wrap=True,
                highlight=False,
            )
            raise typer.Exit(1)
        return response.json()

    def upload(self, source: Iterator[bytes], on_sent: Any) -> str:
        upload = self.check(self.http.post("/v1/admin/import_uploads"))["id"]
        offset = 0
        for part in source:
            answer = self.check(
                self.http.put(
                    f"/v1/admin/import_uploads/{upload}", params={"offset": offset}, content=part
                )
            )
            offset = int(answer["size"])
            on_sent(len(part))
        return str(upload)


def _parts_of_file(path: Path) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while part := fh.read(PART):
            yield part


def _parts_encrypted(path: Path, public_key: str, fingerprint: str) -> Iterator[bytes]:
    """``path`` encrypted to the vault's import key, in parts: gpg's output is
    collected up to a part at a time (never the whole file)."""
    import queue
    import threading

    parts: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=4)
    pending = bytearray()

    def on_chunk(chunk: bytes) -> None:
        pending.extend(chunk)
        while len(pending) >= PART:
            parts.put(bytes(pending[:PART]))
            del pending[:PART]

    def work() -> None:
        try:
            pgp.encrypt(public_key, fingerprint, path, on_chunk)
            if pending:
                parts.put(bytes(pending))
            parts.put(None)
        except BaseException as exc:
            parts.put(exc)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    while (item := parts.get()) is not None:
        if isinstance(item, BaseException):
            raise item
        yield item
    thread.join()


def _parse_map(values: list[str]) -> dict[str, str]:
    columns: dict[str, str] = {}
    for value in values:
        column, sep, field = value.rpartition("=")
        if not sep or not column or not field:
            err.print("[red]--map takes COLUMN=FIELD[/] (e.g. --map 'Card Number=number')")
            raise typer.Exit(2)
        columns[column] = field
    return columns


def import_(
    file: Annotated[Path, typer.Argument(help="The file: an OpenPGP message, or plain (test).")],
    account: Annotated[str, typer.Option("--account", help="The account (acct_…).")],
    live: Annotated[bool, typer.Option("--live", help="Import into live mode.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    mapping: Annotated[
        list[str] | None,
        typer.Option("--map", help="CSV: COLUMN=FIELD (number, exp_month, external_id …)."),
    ] = None,
    out_file: Annotated[
        Path | None,
        typer.Option("--out", help="The mapping file (default: FILE.mapping.csv)."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Rows per batch.")] = 500,
    vault_admin_url: VaultUrlOpt = None,
    ca_bundle: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    stack: StackOpt = None,
) -> None:
    """Import the cards of FILE into an account (docs/migration.md).

    Checked whole first (a file refused is imported in no part), then imported in
    batches; resumable (run it again), idempotent (nothing is created twice). A
    progress bar on a terminal, JSON lines otherwise.
    """
    if fmt not in ("jsonl", "csv"):
        err.print("[red]--format is jsonl or csv[/]")
        raise typer.Exit(2)
    if not 1 <= batch_size <= 1000:
        err.print("[red]--batch-size is 1 to 1000[/]")
        raise typer.Exit(2)
    if not file.is_file():
        err.print(f"[red]no file {file}[/]")
        raise typer.Exit(2)
    columns = _parse_map(mapping or [])
    plain = not _is_pgp(file)
    if plain and live:
        err.print(
            "[red]refused[/]: a plain file is for test mode only; encrypt the file to the "
            "vault's import key (`cardvault import-key show`)"
        )
        raise typer.Exit(2)
    tty = sys.stdout.isatty()
    targets = AdminTargets(None, vault_admin_url, ca_bundle, cert, key, stack)
    admin = AdminSession(targets)
    sha256 = _sha256(file)
    size = file.stat().st_size

    def line(event: str, **fields: Any) -> None:
        if not tty:
            typer.echo(json.dumps({"event": event, **fields}))

    line("upload", file=str(file), bytes=size, sha256=sha256, plain=plain)
    if plain:
        public = admin.check(admin.http.get("/v1/admin/import_key"))
        parts = _parts_encrypted(file, public["public_key"], public["fingerprint"])
    else:
        parts = _parts_of_file(file)
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]:>8.0f} rows/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=out,
        disable=not tty,
    )
    body = {"account": account, "mode": "live" if live else "test", "format": fmt,
            "columns": columns, "sha256": sha256, "plain": plain, "batch_size": batch_size}  # fmt: skip
    summary: dict[str, Any] = {}
    try:
        with progress:
            sent = progress.add_task("uploading", total=None if plain else size, rate=0.0)
            body["upload"] = admin.upload(parts, lambda n: progress.advance(sent, n))
            progress.update(sent, visible=False)
            task = progress.add_task("checking", total=None, rate=0.0)
            started = time.monotonic()
            first_done: int | None = None
            with admin.http.stream(
                "POST", "/v1/admin/imports", json=body, timeout=httpx.Timeout(None, connect=5.0)
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    admin.check(response)
                for raw in response.iter_lines():
                    if not raw:
                        continue
                    event = orjson.loads(raw)
                    kind = event.get("event")
                    if kind == "checked":
                        progress.update(task, description="importing", total=event["rows"])
                        line("checked", **{k: v for k, v in event.items() if k != "event"})
                    elif kind == "batch":
                        if first_done is None:
                            first_done = event["done"]
                        elapsed = max(time.monotonic() - started, 1e-9)
                        progress.update(task, completed=event["done"], rate=event["done"] / elapsed)
                        for refused in event["refused"]:
                            if tty:
                                err.print(
                                    f"line {refused['line']}: {refused['reason']}: "
                                    f"{refused['detail']}",
                                    highlight=False,
                                )
                            else:
                                line("invalid", **refused)
                        line("batch", done=event["done"], total=event["total"],
                             imported=event["imported"], rate=round(event["done"] / elapsed, 1))  # fmt: skip
                    elif kind == "error":
                        err.print(f"[red]vault: {event.get('code')}:[/] {event.get('message')}")
                        line("error", code=event.get("code"), message=event.get("message"))
                        raise typer.Exit(1)
                    elif kind == "done":
                        summary = {k: v for k, v in event.items() if k != "event"}
    except KeyboardInterrupt:
        err.print("[yellow]interrupted[/]: run the same command again to resume")
        raise typer.Exit(130) from None
    except httpx.TransportError as exc:
        err.print(f"[red]cannot reach the vault:[/] {type(exc).__name__}")
        raise typer.Exit(1) from None
    target = out_file or file.with_name(file.name + ".mapping.csv")
    write_private_stream(target, _mapping(admin, str(summary["id"])))
    line("done", mapping=str(target), **summary)
    if tty:
        out.print(
            f"[green]done[/]: {summary['rows']} read, {summary['imported']} imported, "
            f"{summary['already_imported']} already imported, "
            f"{summary['duplicates_by_fingerprint']} duplicates by fingerprint, "
            f"{summary['invalid']} invalid {summary['invalid_by_reason']}; mapping in {target}",
            highlight=False,
        )


def _mapping(admin: AdminSession, job_id: str) -> Iterator[bytes]:
    """The mapping file's lines (CSV: external id, payment method), page by page."""
    yield b"external_id,payment_method\n"
    after = 0
    while True:
        page = admin.check(
            admin.http.get(
                f"/v1/admin/imports/{job_id}/rows", params={"after": after, "limit": _PAGE}
            )
        )
        lines = []
        for row in page["data"]:
            after = int(row["row"])
            if row["payment_method"]:
                ext = str(row["external_id"])
                if any(c in ext for c in ',"\n\r'):
                    ext = '"' + ext.replace('"', '""') + '"'
                lines.append(f"{ext},{row['payment_method']}\n")
        yield "".join(lines).encode()
        if not page["has_more"]:
            return


@key_app.command("create")
def key_create(
    vault_admin_url: VaultUrlOpt = None,
    ca_bundle: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    stack: StackOpt = None,
) -> None:
    """Make the vault's import key (RSA 4096; its passphrase sealed under a data key).
    Prints its fingerprint and public key, for the sender to encrypt to."""
    targets = AdminTargets(None, vault_admin_url, ca_bundle, cert, key, stack)
    typer.echo(json.dumps(targets.vault("POST", "/v1/admin/import_key", {})))


@key_app.command("show")
def key_show(
    vault_admin_url: VaultUrlOpt = None,
    ca_bundle: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    stack: StackOpt = None,
) -> None:
    """The import key's fingerprint and public key (armored)."""
    targets = AdminTargets(None, vault_admin_url, ca_bundle, cert, key, stack)
    typer.echo(json.dumps(targets.vault("GET", "/v1/admin/import_key")))
