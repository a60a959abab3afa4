"""What the browser tests share besides fixtures: the stack's and the sites' shapes, the
merchant's little web server, and Chromium's launch with its own NSS trust store."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from string import Template
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import cardvault.vault
from cardvault.transport.asgi import build_app
from helpers import free_port

CHROMIUM = os.environ.get("CARDVAULT_CHROMIUM", "/usr/bin/chromium")
#: Flags for a quiet, reproducible headless browser running as root in CI. None of them
#: touches certificate verification.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MERCHANT_DIR = Path(__file__).with_name("merchant")
CARDVAULT_JS = Path(cardvault.vault.__file__).parent / "static" / "cardvault.js"


@dataclass
class Vault:
    url: str
    dir: Path
    config: Path
    account: str
    pk: str
    sk: str
    log: Path


@dataclass
class Ports:
    vault: int = field(default_factory=free_port)
    keyd: int = field(default_factory=free_port)
    merchant: int = field(default_factory=free_port)
    evil: int = field(default_factory=free_port)

    @property
    def merchant_origin(self) -> str:
        return f"https://127.0.0.1:{self.merchant}"

    @property
    def evil_origin(self) -> str:
        return f"https://127.0.0.1:{self.evil}"


@dataclass
class Site:
    origin: str
    #: Every request the site received: (method, path with query, body).
    received: list[tuple[str, str, bytes]] = field(default_factory=list)


def site_app(site: Site, pages: dict[str, tuple[str, str, dict[str, str]]]) -> Any:
    """An app that serves ``pages`` (path → (file, content type, template values)) and
    records every request, including POST /pay."""

    async def page(request: Request) -> Response:
        body = await request.body()
        site.received.append(
            (
                request.method,
                str(request.url.path) + ("?" + request.url.query if request.url.query else ""),
                body,
            )
        )
        if request.url.path == "/pay":
            return Response('{"ok":true}', media_type="application/json")
        entry = pages.get(request.url.path)
        if entry is None:
            return Response("not found", status_code=404, media_type="text/plain")
        name, media, values = entry
        text = (MERCHANT_DIR / name).read_text()
        if values:
            text = Template(text).substitute(values)
        return Response(
            text,
            media_type=media,
            headers={"content-security-policy": values.get("_csp", "default-src 'self'")},
        )

    paths = [*pages, "/pay", "/steal", "/favicon.ico"]
    return build_app(
        [Route(p, page, methods=["GET", "POST"]) for p in paths],
        service="merchant",
        security_txt=None,
    )


@dataclass
class Sites:
    merchant: Site
    evil: Site
    vault_url: str
    integrity: str


def nss_home(directory: Path, ca_file: Path | None) -> Path:
    """A HOME whose NSS database trusts ``ca_file`` for TLS servers (or is empty)."""
    nssdb = directory / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    db = f"sql:{nssdb}"
    subprocess.run(["certutil", "-d", db, "-N", "--empty-password"], check=True)
    if ca_file is not None:
        subprocess.run(
            ["certutil", "-d", db, "-A", "-t", "C,,", "-n", "cardvault-test", "-i", str(ca_file)],
            check=True,
        )
    return directory


def launch(playwright: Any, home: Path) -> Any:
    return playwright.chromium.launch(
        executable_path=CHROMIUM,
        args=CHROMIUM_ARGS,
        env={**os.environ, "HOME": str(home)},
    )


@dataclass
class Recorder:
    """Everything the browser did and said, for one page."""

    requests: list[Any] = field(default_factory=list)
    responses: list[Any] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
