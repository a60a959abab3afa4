"""``cardvault keyservice``: run the key service, and administer it over mutual TLS."""

from __future__ import annotations

import getpass
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from cardvault.cli.output import JsonOpt, print_json
from cardvault.cli.stack import StackOpt, load_stack, stack_value
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
# Each defaults to the local stack's (its key service, CA bundle and admin identity)
# when a stack file is found (cardvault.cli.stack).
UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url", envvar="CARDVAULT_KEYSERVICE_URL", help="Key service URL.", show_default=False
    ),
]
CaOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca-bundle", envvar="CARDVAULT_CA_BUNDLE", help="CA bundle.", show_default=False
    ),
]
CertOpt = Annotated[
    Path | None,
    typer.Option(
        "--cert", envvar="CARDVAULT_ADMIN_CERT", help="Admin client cert.", show_default=False
    ),
]
KeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--key", envvar="CARDVAULT_ADMIN_KEY", help="Admin client key.", show_default=False
    ),
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
    PKCS#11 seal the root key is made inside the token and the N shares are approval
    shares (K of them approve a key version's destruction). With the
    development seal (seal.type = "dev", development profile only) the root key goes to
    seal.dev_key_file instead and no shares are made.
    """
    from cardvault.keyservice.app import check_settings, initialize_key_service

    settings = load_settings(KeyServiceSettings, config)
    check_settings(settings)
    dev = settings.seal.dev_key_file if settings.seal.type == "dev" else None
    if dev is None and not 2 <= threshold <= shares <= 255:
        err.print("[red]need 2 <= --threshold <= --shares <= 255[/]")
        raise typer.Exit(2)
    result = initialize_key_service(settings, shares=shares, threshold=threshold)
    if dev is not None:
        err.print(
            f"[bold yellow]DEVELOPMENT SEAL[/]: root key written to {dev}. Never use this for real cards."
        )
        return
    token = settings.seal.type == "pkcs11"
    hand_out(
        result, shares, threshold, out_dir,
        "approve a key version's destruction (the root key stays in the token)"
        if token
        else "unseal",
    )  # fmt: skip
    out.print(
        "The key service is initialized; it unseals itself at start from the token."
        if token
        else "The key service is initialized and will start sealed."
    )


def _client(url: str, ca: Path, cert: Path, key: Path) -> Client:
    return Client(base_url=url, ca_bundle=ca, client_cert=(cert, key), max_retries=1)


def _call(
    url: str | None,
    ca: Path | None,
    cert: Path | None,
    key: Path | None,
    stack_file: Path | None,
    method: str,
    path: str,
    body: Any = None,
) -> Any:
    stack = load_stack(stack_file)
    admin = stack_value(stack, "identities", "admin") or {}
    url = url or stack_value(stack, "keyservice", "url")
    ca = ca or _path(stack_value(stack, "ca_bundle"))
    cert = cert or _path(admin.get("cert"))
    key = key or _path(admin.get("key"))
    if url is None or ca is None or cert is None or key is None:
        err.print(
            "[red]no key service to call[/]: give --url, --ca-bundle, --cert and --key "
            "(or their CARDVAULT_ variables), or run this beside a local stack (cardvault up)"
        )
        raise typer.Exit(2)
    try:
        with _client(url, ca, cert, key) as client:
            return client.request(method, path, json=body)
    except CardVaultError as exc:
        err.print(f"[red]{exc.code}:[/] {exc.message}")
        raise typer.Exit(1) from None
    except TransportError as exc:
        err.print(f"[red]cannot reach the key service:[/] {exc}")
        raise typer.Exit(1) from None


def _path(value: object) -> Path | None:
    return Path(value) if isinstance(value, str) and value else None


@app.command("unseal")
def unseal(
    url: UrlOpt = None,
    ca_bundle: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    stack: StackOpt = None,
    share_file: Annotated[
        Path | None, typer.Option("--share-file", help="Read the share from a file.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Submit one custodian share (prompted without echo, or from --share-file)."""
    if share_file is not None:
        share = share_file.read_text().strip()
    elif sys.stdin.isatty():
        share = getpass.getpass("custodian share: ").strip()
    else:
        share = sys.stdin.readline().strip()
    result = _call(url, ca_bundle, cert, key, stack, "POST", "/v1/unseal", {"share": share})
    if as_json:
        print_json(result)
    elif result["sealed"]:
        out.print(f"accepted: {result['progress']}/{result['threshold']} shares; still sealed")
    else:
        out.print("[green]unsealed[/]")


@app.command("seal")
def seal(
    url: UrlOpt = None,
    ca_bundle: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    stack: StackOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Seal the key service: wipe the root key and KEKs from its memory."""
    result = _call(url, ca_bundle, cert, key, stack, "POST", "/v1/seal")
    if as_json:
        print_json(result)
    else:
        out.print("sealed")


@app.command("status")
def status(
    url: UrlOpt = None,
    ca_bundle: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    stack: StackOpt = None,
) -> None:
    """Sealed or not, and the key names and versions (never key material)."""
    out.print_json(json.dumps(_call(url, ca_bundle, cert, key, stack, "GET", "/v1/status")))


@app.command("rotate")
def rotate(
    name: str,
    url: UrlOpt = None,
    ca_bundle: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    stack: StackOpt = None,
) -> None:
    """Add a new version of KEK NAME; new data keys use it at once."""
    out.print_json(
        json.dumps(_call(url, ca_bundle, cert, key, stack, "POST", f"/v1/keys/{name}/rotate"))
    )


@app.command("rewrap")
def rewrap(
    name: str,
    ciphertext: Annotated[str, typer.Option(help="A wrapped data key (base64).")],
    url: UrlOpt = None,
    ca_bundle: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    stack: StackOpt = None,
) -> None:
    """Re-wrap one wrapped data key under the newest version of KEK NAME."""
    body = {"ciphertext": ciphertext}
    out.print_json(
        json.dumps(_call(url, ca_bundle, cert, key, stack, "POST", f"/v1/keys/{name}/rewrap", body))
    )


@app.command("config")
def config(
    name: str,
    min_decryption_version: Annotated[int, typer.Option(help="Older versions stop unwrapping.")],
    url: UrlOpt = None,
    ca_bundle: CaOpt = None,
    cert: CertOpt = None,
    key: KeyOpt = None,
    stack: StackOpt = None,
) -> None:
    """Set KEK NAME's min_decryption_version."""
    body = {"min_decryption_version": min_decryption_version}
    out.print_json(
        json.dumps(_call(url, ca_bundle, cert, key, stack, "POST", f"/v1/keys/{name}/config", body))
    )


# -- ceremonies on a stopped key service (docs/keys.md) ---------------------------------

ShareFileOpt = Annotated[
    list[Path] | None,
    typer.Option(
        "--share-file",
        help="A current custodian share, one per file; repeat K times. Without it, "
        "shares are read from the terminal (no echo) or stdin, one per line.",
    ),
]
OutDirOpt = Annotated[
    Path | None,
    typer.Option("--out-dir", help="Write one file per new custodian here (0600)."),
]


def _current_shares(files: list[Path] | None) -> list[str]:
    if files:
        return [path.read_text().strip() for path in files]
    if not sys.stdin.isatty():
        return [line.strip() for line in sys.stdin if line.strip()]
    err.print(
        "Current custodian shares, one per prompt; an empty answer ends (none for the HSM seal)."
    )
    found: list[str] = []
    while share := getpass.getpass(f"current share {len(found) + 1}: ").strip():
        found.append(share)
    return found


def hand_out(
    result: list[Any], shares: int, threshold: int, out_dir: Path | None, what: str = "unseal"
) -> None:
    out.print(
        f"[bold]{shares} shares; any {threshold} {what}.[/] Each is shown once. "
        "Give one to each custodian."
    )
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        for share in result:
            path = out_dir / f"custodian-{share.index}.share"
            write_private(path, (share.to_text() + "\n").encode())
            out.print(
                f"share {share.index}/{shares} → {path} (mode 0600): give it to one custodian"
            )
    else:
        for share in result:
            out.print(
                f"  custodian {share.index}: {share.to_text()}", highlight=False, soft_wrap=True
            )
    for share in result:
        share.wipe()


def _ceremony(run: Any) -> list[Any]:
    try:
        return run()  # type: ignore[no-any-return]
    except CardVaultError as exc:
        err.print(f"[red]refused:[/] {exc.message}")
        raise typer.Exit(1) from None


@app.command("reseal")
def reseal(
    to: Annotated[str, typer.Option("--to", help="The new seal: shamir or pkcs11.")],
    config: ConfigOpt = None,
    share_file: ShareFileOpt = None,
    shares: Annotated[
        int, typer.Option(help="How many new shares (N): unseal shares, or approval shares.")
    ] = 5,
    threshold: Annotated[
        int, typer.Option(help="How many unseal (K), or approve a destruction (pkcs11).")
    ] = 3,
    out_dir: OutDirOpt = None,
) -> None:
    """Move a STOPPED key service to another seal under a new root key.

    Opens the current seal (K current shares, or the token with its PIN file), makes a
    new root key under the new seal (inside the token for pkcs11, split into new shares
    for shamir) and seals every KEK again under it in one transaction. Data keys and
    cards are untouched; the old shares or token key open nothing stored afterwards.
    Then set [seal] type to the new seal and start the service.
    """
    from cardvault.keyservice.app import reseal_key_service

    if to not in ("shamir", "pkcs11"):
        err.print("[red]--to must be shamir or pkcs11[/]")
        raise typer.Exit(2)
    if not 2 <= threshold <= shares <= 255:
        err.print("[red]need 2 <= --threshold <= --shares <= 255[/]")
        raise typer.Exit(2)
    settings = load_settings(KeyServiceSettings, config)
    current = _current_shares(share_file)
    result = _ceremony(
        lambda: reseal_key_service(
            settings,
            to=to,  # type: ignore[arg-type]
            shares=current,
            new_shares=shares,
            new_threshold=threshold,
        )
    )
    hand_out(
        result, shares, threshold, out_dir,
        "unseal" if to == "shamir" else "approve a key version's destruction",
    )  # fmt: skip
    out.print(f'Resealed under a new root key. Set [seal] type = "{to}" and start the service.')


@app.command("rekey")
def rekey(
    config: ConfigOpt = None,
    share_file: ShareFileOpt = None,
    shares: Annotated[int, typer.Option(help="How many new custodian shares (N).")] = 5,
    threshold: Annotated[int, typer.Option(help="How many new shares unseal (K).")] = 3,
    out_dir: OutDirOpt = None,
) -> None:
    """New custodian shares (new N, new K) for the SAME root key of a stopped service.

    Needs K current shares. The root key and its check value do not change; the old
    shares stop working (refused as another split; they rebuild nothing stored).
    """
    from cardvault.keyservice.app import rekey_key_service

    if not 2 <= threshold <= shares <= 255:
        err.print("[red]need 2 <= --threshold <= --shares <= 255[/]")
        raise typer.Exit(2)
    settings = load_settings(KeyServiceSettings, config)
    current = _current_shares(share_file)
    result = _ceremony(
        lambda: rekey_key_service(
            settings, shares=current, new_shares=shares, new_threshold=threshold
        )
    )
    hand_out(result, shares, threshold, out_dir)
    out.print("Custodian shares replaced: the old shares no longer unseal this key service.")


__all__ = ["app", "hand_out"]
