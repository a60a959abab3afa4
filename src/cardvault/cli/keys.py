"""``cardvault keys``: the key lifecycle (rotate, re-encrypt, status, retire, destroy).

Every command talks to the services over mutual TLS with the admin identity: to the key
service (versions, rotation, retirement, destruction) and to the vault's admin API (how
many stored data keys each version wraps, the re-encryption batches). It never opens a
database. Beside a local stack (``cardvault up``) it finds both by itself.
"""

from __future__ import annotations

import getpass
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

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
from rich.table import Table

from cardvault.cli.keyservice import CaOpt, CertOpt, KeyOpt
from cardvault.cli.keyservice import UrlOpt as KeydUrlOpt
from cardvault.cli.stack import StackOpt, load_stack, stack_value
from cardvault.client import Client, TransportError
from cardvault.errors import CardVaultError

app = typer.Typer(
    help="The key lifecycle: rotate, re-encrypt stored keys, status, retire, destroy.",
    no_args_is_help=True,
)
out = Console()
err = Console(stderr=True)

#: Stored keys moved per second by default: low enough that live traffic keeps its pace
#: (bench/reencrypt.py measures what it costs).
DEFAULT_RATE = 200.0
DEFAULT_BATCH = 100
DATA_KEY_KEKS = ("pan", "cvc")

VaultUrlOpt = Annotated[
    str | None,
    typer.Option(
        "--vault-admin-url",
        envvar="CARDVAULT_VAULT_ADMIN_URL",
        help="The vault's admin API URL.",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


class AdminTargets:
    """The key service and the vault's admin API, as the admin identity reaches them."""

    def __init__(
        self,
        url: str | None,
        vault_url: str | None,
        ca: Path | None,
        cert: Path | None,
        key: Path | None,
        stack_file: Path | None,
    ) -> None:
        stack = load_stack(stack_file)
        admin = stack_value(stack, "identities", "admin") or {}
        self.keyd_url = url or stack_value(stack, "keyservice", "url")
        self.vault_url = vault_url or stack_value(stack, "vault", "admin_url")
        self.ca = ca or _path(stack_value(stack, "ca_bundle"))
        self.cert = cert or _path(admin.get("cert"))
        self.key = key or _path(admin.get("key"))
        if self.ca is None or self.cert is None or self.key is None:
            err.print(
                "[red]no admin identity[/]: give --ca-bundle, --cert and --key (or their "
                "CARDVAULT_ variables), or run this beside a local stack (cardvault up)"
            )
            raise typer.Exit(2)

    def _call(self, url: str | None, what: str, method: str, path: str, body: Any = None) -> Any:
        if url is None:
            option = "--url" if what == "key service" else "--vault-admin-url"
            err.print(f"[red]no {what} to call[/]: give {option}, or run this beside a local stack")
            raise typer.Exit(2)
        assert self.ca is not None
        assert self.cert is not None
        assert self.key is not None
        try:
            with Client(
                base_url=url, ca_bundle=self.ca, client_cert=(self.cert, self.key), max_retries=2
            ) as client:
                return client.request(method, path, json=body)
        except CardVaultError as exc:
            err.print(f"[red]{what}: {exc.code}:[/] {exc.message}")
            raise typer.Exit(1) from None
        except TransportError as exc:
            err.print(f"[red]cannot reach the {what}:[/] {exc}")
            raise typer.Exit(1) from None

    def keyd(self, method: str, path: str, body: Any = None) -> Any:
        return self._call(self.keyd_url, "key service", method, path, body)

    def vault(self, method: str, path: str, body: Any = None) -> Any:
        return self._call(self.vault_url, "vault", method, path, body)


def _path(value: object) -> Path | None:
    return Path(value) if isinstance(value, str) and value else None


def _key_info(targets: AdminTargets, name: str) -> dict[str, Any]:
    status = targets.keyd("GET", "/v1/status")
    if status.get("sealed"):
        err.print("[red]the key service is sealed[/]: unseal it first")
        raise typer.Exit(1)
    info = status.get("keys", {}).get(name)
    if info is None:
        err.print(f"[red]no key named {name!r}[/] (pan, cvc, fingerprint)")
        raise typer.Exit(2)
    return dict(info)


def _status(targets: AdminTargets) -> dict[str, Any]:
    """Each KEK version with its state (the key service's) and how many stored data
    keys still use it (the vault's)."""
    keyd = targets.keyd("GET", "/v1/status")
    usage = targets.vault("GET", "/v1/admin/keys")
    keys: dict[str, Any] = {}
    for name, info in sorted(keyd.get("keys", {}).items()):
        counts = usage["data_keys"].get(name, {})
        versions = []
        for version, state in info.get("states", {}).items():
            row: dict[str, Any] = {"version": int(version), "state": state}
            if name in DATA_KEY_KEKS:
                row["stored_keys"] = int(counts.get(version, 0))
            elif name == "fingerprint":
                row["fingerprints"] = (
                    "in use" if usage.get("fingerprint_version") == int(version) else "none"
                )
            versions.append(row)
        keys[name] = {
            "latest_version": info["latest_version"],
            "min_decryption_version": info["min_decryption_version"],
            "versions": versions,
            "job": usage.get("jobs", {}).get(name),
            **({"data_job": usage.get("data_jobs", {}).get(name)} if name in DATA_KEY_KEKS else {}),
        }
    return {"object": "keys.status", "sealed": keyd.get("sealed"), "keys": keys}


@app.command("status")
def status(
    as_json: JsonOpt = False,
    url: KeydUrlOpt = None,
    vault_admin_url: VaultUrlOpt = None,
    ca_bundle: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    stack: StackOpt = None,
) -> None:
    """Each KEK version, its state and how many stored keys still use it."""
    result = _status(AdminTargets(url, vault_admin_url, ca_bundle, cert, key, stack))
    if as_json:
        typer.echo(json.dumps(result))
        return
    table = Table("key", "version", "state", "stored keys")
    for name, info in result["keys"].items():
        for row in info["versions"]:
            used = row.get("stored_keys", row.get("fingerprints", ""))
            table.add_row(name, str(row["version"]), row["state"], str(used))
    out.print(table)


@app.command("rotate")
def rotate(
    name: str,
    url: KeydUrlOpt = None,
    vault_admin_url: VaultUrlOpt = None,
    ca_bundle: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    stack: StackOpt = None,
) -> None:
    """Add a new version of KEK NAME: new data keys are wrapped under it at once; the
    older versions become decrypt-only. For pan and cvc the vault then takes a data key
    under the new version at once and writes the key.rotated event to every account."""
    targets = AdminTargets(url, vault_admin_url, ca_bundle, cert, key, stack)
    result = targets.keyd("POST", f"/v1/keys/{name}/rotate")
    if name in DATA_KEY_KEKS:
        if targets.vault_url is None:
            err.print(
                "[yellow]note[/]: no vault admin API given (--vault-admin-url): the vault "
                "takes the new version at its next data-key renewal, and no key.rotated "
                "event is written"
            )
        else:
            result = {**result, "vault": targets.vault("POST", f"/v1/admin/keys/{name}/rotated")}
    typer.echo(json.dumps(result))
    if name == "fingerprint":
        err.print(
            "[yellow]note[/]: the vault keeps deriving fingerprints under "
            "datakeys.fingerprint_version, so fingerprints stay comparable (docs/keys.md)"
        )


def _when(value: str | None) -> int:
    """``--before``: Unix seconds, an ISO date (midnight UTC) or an ISO date and time
    (UTC unless it names its zone); None: now."""
    if value is None:
        return int(time.time())
    if value.isdigit():
        return int(value)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        err.print("[red]--before[/]: give Unix seconds or an ISO date such as 2026-12-01")
        raise typer.Exit(2) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp())


@app.command("reencrypt")
def reencrypt(
    name: str,
    rate: Annotated[
        float, typer.Option("--rate", help="Most stored keys (or cards) moved per second.")
    ] = DEFAULT_RATE,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Keys (or cards) per batch.")
    ] = DEFAULT_BATCH,
    data: Annotated[
        bool,
        typer.Option(
            "--data",
            help="First re-seal the card data under data keys made before --before "
            "with fresh data keys, then move the stored keys.",
        ),
    ] = False,
    before: Annotated[
        str | None,
        typer.Option(
            "--before",
            help="With --data: the data keys to move away from were made before this "
            "(Unix seconds or an ISO date, UTC). Default: now.",
            show_default=False,
        ),
    ] = None,
    url: KeydUrlOpt = None,
    vault_admin_url: VaultUrlOpt = None,
    ca_bundle: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    stack: StackOpt = None,
) -> None:
    """Move every stored data key of NAME (pan, cvc) to the newest KEK version; with
    --data, first move the card data itself to fresh data keys.

    Runs in the vault, one batch per call; resumable (a cursor in the vault's
    database), idempotent, throttled. A progress bar on a terminal, JSON lines
    otherwise.
    """
    if name not in DATA_KEY_KEKS:
        err.print(
            f"[red]{name!r} wraps no stored keys[/]: reencrypt applies to pan and cvc "
            "(fingerprints: docs/keys.md, 'Fingerprint key rotation')"
        )
        raise typer.Exit(2)
    if rate <= 0 or not 1 <= batch_size <= 1000:
        err.print("[red]need --rate > 0 and 1 <= --batch-size <= 1000[/]")
        raise typer.Exit(2)
    if before is not None and not data:
        err.print("[red]--before applies only with --data[/]")
        raise typer.Exit(2)
    when = _when(before)
    if when > time.time():
        err.print("[red]--before is in the future[/]")
        raise typer.Exit(2)
    targets = AdminTargets(url, vault_admin_url, ca_bundle, cert, key, stack)
    target = int(_key_info(targets, name)["latest_version"])
    runner = _Batches(name, rate=rate, batch_size=batch_size)
    if data:
        usage = targets.vault("GET", "/v1/admin/keys")
        job = usage.get("data_jobs", {}).get(name) or {}
        resumed = bool(job) and job.get("finished") is None and job.get("data_before") == when
        runner.run(
            targets,
            f"/v1/admin/keys/{name}/reencrypt_data",
            {"before": when},
            label=f"re-sealing {name} data made before {when}",
            done_before=int(job.get("moved", 0)) if resumed else 0,
            start={"data_before": when, "resumed": resumed},
        )
        if sys.stdout.isatty():
            out.print(
                f"[green]done[/]: no {name} data is sealed under a data key made before {when}"
            )
    usage = targets.vault("GET", "/v1/admin/keys")
    job = usage.get("jobs", {}).get(name) or {}
    resumed = bool(job) and job.get("finished") is None and job.get("target_version") == target
    runner.run(
        targets,
        f"/v1/admin/keys/{name}/reencrypt",
        {"target_version": target},
        label=f"re-encrypting {name} → v{target}",
        done_before=int(job.get("moved", 0)) if resumed else 0,
        start={"target_version": target, "resumed": resumed},
        remaining=sum(n for v, n in usage["data_keys"].get(name, {}).items() if int(v) < target),
    )
    if sys.stdout.isatty():
        out.print(f"[green]done[/]: every stored {name} key is under v{target}")


class _Batches:
    """Drives one re-encryption run of the vault batch by batch: paced to ``rate``, a
    progress bar on a terminal and JSON lines otherwise, Ctrl-C stops it (the run
    resumes where it stopped)."""

    def __init__(self, name: str, *, rate: float, batch_size: int) -> None:
        self.name, self.rate, self.batch_size = name, rate, batch_size
        self.tty = sys.stdout.isatty()

    def line(self, event: str, **fields: Any) -> None:
        if not self.tty:
            typer.echo(json.dumps({"event": event, "kek": self.name, **fields}), nl=True)
            sys.stdout.flush()

    def run(
        self,
        targets: AdminTargets,
        path: str,
        body: dict[str, Any],
        *,
        label: str,
        done_before: int,
        start: dict[str, Any],
        remaining: int | None = None,
    ) -> None:
        total = done_before + (remaining or 0)
        self.line("start", path=path, total=total if remaining is not None else None,
                  done=done_before, **start)  # fmt: skip
        started = time.monotonic()
        moved_now = 0
        progress = Progress(
            TextColumn(label),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>7.0f}/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=out,
            disable=not self.tty,
        )
        try:
            with progress:
                task = progress.add_task(
                    "reencrypt", total=total or None, completed=done_before, rate=0.0
                )
                while True:
                    t0 = time.monotonic()
                    result = targets.vault("POST", path, {**body, "batch_size": self.batch_size})
                    moved_now += int(result["moved"])
                    elapsed = max(time.monotonic() - started, 1e-9)
                    done = int(result["run_moved"])
                    total = max(total, done + int(result["remaining"]))
                    progress.update(task, completed=done, total=total, rate=moved_now / elapsed)
                    self.line(
                        "done" if result["done"] else "batch",
                        run=result["run"],
                        moved=result["moved"],
                        done=done,
                        total=total,
                        remaining=result["remaining"],
                        rate=round(moved_now / elapsed, 1),
                    )
                    if result["done"]:
                        return
                    # Throttle: this batch's items take at least batch/rate seconds.
                    pause = int(result["moved"]) / self.rate - (time.monotonic() - t0)
                    if pause > 0:
                        time.sleep(pause)
        except KeyboardInterrupt:
            self.line("interrupted", done=moved_now + done_before)
            err.print("[yellow]interrupted[/]: run the same command again to resume")
            raise typer.Exit(130) from None


@app.command("retire")
def retire(
    name: str,
    version: int,
    url: KeydUrlOpt = None,
    vault_admin_url: VaultUrlOpt = None,
    ca_bundle: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    stack: StackOpt = None,
) -> None:
    """Retire VERSION of NAME (and every older one): nothing unwraps under them any more.
    Refused while any stored key still uses them, and for the newest version."""
    targets = AdminTargets(url, vault_admin_url, ca_bundle, cert, key, stack)
    info = _key_info(targets, name)
    if version >= int(info["latest_version"]):
        err.print("[red]the newest version cannot be retired[/]: rotate first")
        raise typer.Exit(1)
    usage = targets.vault("GET", "/v1/admin/keys")
    if name in DATA_KEY_KEKS:
        counts = usage["data_keys"].get(name, {})
        left = sum(n for v, n in counts.items() if int(v) <= version)
        if left:
            err.print(
                f"[red]refused[/]: {left} stored {name} key(s) still use v{version} or older; "
                f"run `cardvault keys reencrypt {name}` first"
            )
            raise typer.Exit(1)
    elif name == "fingerprint" and (usage.get("fingerprint_version") or 0) <= version:
        err.print(
            f"[red]refused[/]: the vault derives fingerprints under v{usage['fingerprint_version']}"
        )
        raise typer.Exit(1)
    minimum = max(int(info["min_decryption_version"]), version + 1)
    result = targets.keyd("POST", f"/v1/keys/{name}/config", {"min_decryption_version": minimum})
    typer.echo(json.dumps(result))


@app.command("destroy")
def destroy(
    name: str,
    version: int,
    share_file: Annotated[
        Path | None, typer.Option("--share-file", help="Read the custodian share from a file.")
    ] = None,
    url: KeydUrlOpt = None,
    ca_bundle: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    stack: StackOpt = None,
) -> None:
    """Approve the destruction of retired VERSION of NAME with one custodian share; the
    K-th approval deletes its key material for good (crypto-shredding). Irreversible."""
    targets = AdminTargets(url, None, ca_bundle, cert, key, stack)
    status = targets.keyd("GET", "/v1/status")
    body: dict[str, Any] = {"version": version}
    if status.get("seal_type") == "shamir":
        if share_file is not None:
            body["share"] = share_file.read_text().strip()
        elif sys.stdin.isatty():
            body["share"] = getpass.getpass("custodian share: ").strip()
        else:
            body["share"] = sys.stdin.readline().strip()
    result = targets.keyd("POST", f"/v1/keys/{name}/destroy", body)
    typer.echo(json.dumps(result))
    if not result.get("destroyed"):
        err.print(
            f"approval {result['progress']}/{result['threshold']}: "
            "the next custodian runs the same command"
        )


__all__ = ["AdminTargets", "VaultUrlOpt", "app"]
