"""``cardvault keyservice``: run the key service, and administer it over mutual TLS."""

from __future__ import annotations

import asyncio
import getpass
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cardvault.client import Client, TransportError
from cardvault.config import load_settings
from cardvault.errors import CardVaultError
from cardvault.files import write_private
from cardvault.keyservice.settings import KeyServiceSettings

app = typer.Typer(
    help="The key service: sealed keyring, custodian unseal, data keys.", no_args_is_help=True
)
out = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="The key service's TOML settings.")
]
UrlOpt = Annotated[
    str, typer.Option("--url", envvar="CARDVAULT_KEYSERVICE_URL", help="Key service URL.")
]
CaOpt = Annotated[
    Path, typer.Option("--ca-bundle", envvar="CARDVAULT_CA_BUNDLE", help="CA bundle.")
]
CertOpt = Annotated[
    Path, typer.Option("--cert", envvar="CARDVAULT_ADMIN_CERT", help="Admin client cert.")
]
KeyOpt = Annotated[
    Path, typer.Option("--key", envvar="CARDVAULT_ADMIN_KEY", help="Admin client key.")
]


@app.command("serve")
def serve(config: ConfigOpt = None) -> None:
    """Run the key service until SIGINT/SIGTERM. It starts sealed (unless the dev seal)."""
    from cardvault.keyservice.app import run

    run(load_settings(KeyServiceSettings, config))


@app.command("init")
def init(
    config: ConfigOpt = None,
    shares: Annotated[int, typer.Option(help="How many custodian shares (N).")] = 5,
    threshold: Annotated[int, typer.Option(help="How many shares unseal (K).")] = 3,
    out_dir: Annotated[
        Path | None,
        typer.Option(
            "--out-dir", help="Write one file per custodian here (0600) instead of printing."
        ),
    ] = None,
) -> None:
    """Create the root key and first KEKs, and hand out the root key as N shares, once.

    The root key is never written anywhere; only the shares exist afterwards. With the
    development seal (seal.type = "dev", development profile only) the root key goes to
    seal.dev_key_file instead and no shares are made.
    """
    from cardvault.keyservice.app import check_settings
    from cardvault.keyservice.service import initialize
    from cardvault.storage import open_key_store

    settings = load_settings(KeyServiceSettings, config)
    check_settings(settings)
    dev = settings.seal.dev_key_file if settings.seal.type == "dev" else None
    if dev is None and not 2 <= threshold <= shares <= 255:
        err.print("[red]need 2 <= --threshold <= --shares <= 255[/]")
        raise typer.Exit(2)

    async def go() -> list[Any]:
        store = open_key_store(settings.store.url)
        try:
            return await initialize(store, shares=shares, threshold=threshold, dev_key_file=dev)
        finally:
            await store.close()

    result = asyncio.run(go())
    if dev is not None:
        err.print(
            f"[bold yellow]DEVELOPMENT SEAL[/]: root key written to {dev}. Never use this for real cards."
        )
        return
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for share in result:
            path = out_dir / f"custodian-{share.index}.share"
            write_private(path, (share.to_text() + "\n").encode())
            out.print(
                f"share {share.index}/{shares} → {path} (mode 0600): give it to one custodian"
            )
    else:
        out.print(
            f"[bold]{shares} shares; any {threshold} unseal.[/] Each is shown once. Give one to each custodian."
        )
        for share in result:
            out.print(
                f"  custodian {share.index}: {share.to_text()}", highlight=False, soft_wrap=True
            )
    for share in result:
        share.wipe()
    out.print("The key service is initialized and will start sealed.")


def _client(url: str, ca: Path, cert: Path, key: Path) -> Client:
    return Client(base_url=url, ca_bundle=ca, client_cert=(cert, key), max_retries=1)


def _call(
    url: str, ca: Path, cert: Path, key: Path, method: str, path: str, body: Any = None
) -> Any:
    try:
        with _client(url, ca, cert, key) as client:
            return client.request(method, path, json=body)
    except CardVaultError as exc:
        err.print(f"[red]{exc.code}:[/] {exc.message}")
        raise typer.Exit(1) from None
    except TransportError as exc:
        err.print(f"[red]cannot reach the key service:[/] {exc}")
        raise typer.Exit(1) from None


@app.command("unseal")
def unseal(
    url: UrlOpt,
    ca_bundle: CaOpt,
    cert: CertOpt,
    key: KeyOpt,
    share_file: Annotated[
        Path | None, typer.Option("--share-file", help="Read the share from a file.")
    ] = None,
) -> None:
    """Submit one custodian share (prompted without echo, or from --share-file)."""
    if share_file is not None:
        share = share_file.read_text().strip()
    elif sys.stdin.isatty():
        share = getpass.getpass("custodian share: ").strip()
    else:
        share = sys.stdin.readline().strip()
    result = _call(url, ca_bundle, cert, key, "POST", "/v1/unseal", {"share": share})
    if result["sealed"]:
        out.print(f"accepted: {result['progress']}/{result['threshold']} shares; still sealed")
    else:
        out.print("[green]unsealed[/]")


@app.command("seal")
def seal(url: UrlOpt, ca_bundle: CaOpt, cert: CertOpt, key: KeyOpt) -> None:
    """Seal the key service: wipe the root key and KEKs from its memory."""
    _call(url, ca_bundle, cert, key, "POST", "/v1/seal")
    out.print("sealed")


@app.command("status")
def status(url: UrlOpt, ca_bundle: CaOpt, cert: CertOpt, key: KeyOpt) -> None:
    """Sealed or not, and the key names and versions (never key material)."""
    out.print_json(json.dumps(_call(url, ca_bundle, cert, key, "GET", "/v1/status")))


@app.command("rotate")
def rotate(name: str, url: UrlOpt, ca_bundle: CaOpt, cert: CertOpt, key: KeyOpt) -> None:
    """Add a new version of KEK NAME; new data keys use it at once."""
    out.print_json(json.dumps(_call(url, ca_bundle, cert, key, "POST", f"/v1/keys/{name}/rotate")))


@app.command("rewrap")
def rewrap(
    name: str,
    url: UrlOpt,
    ca_bundle: CaOpt,
    cert: CertOpt,
    key: KeyOpt,
    ciphertext: Annotated[str, typer.Option(help="A wrapped data key (base64).")],
) -> None:
    """Re-wrap one wrapped data key under the newest version of KEK NAME."""
    body = {"ciphertext": ciphertext}
    out.print_json(
        json.dumps(_call(url, ca_bundle, cert, key, "POST", f"/v1/keys/{name}/rewrap", body))
    )


@app.command("config")
def config(
    name: str,
    url: UrlOpt,
    ca_bundle: CaOpt,
    cert: CertOpt,
    key: KeyOpt,
    min_decryption_version: Annotated[int, typer.Option(help="Older versions stop unwrapping.")],
) -> None:
    """Set KEK NAME's min_decryption_version."""
    body = {"min_decryption_version": min_decryption_version}
    out.print_json(
        json.dumps(_call(url, ca_bundle, cert, key, "POST", f"/v1/keys/{name}/config", body))
    )


__all__ = ["app"]
