"""Browser fixtures: the real vault and key service over TLS, a merchant site on another
origin, and headless Chromium that trusts the test CA.

How Chromium trusts the test CA: not with ``ignore_https_errors`` nor any flag that
switches verification off. Chromium on Linux reads the trust anchors a user added to the
NSS database in ``$HOME/.pki/nssdb``; each browser here runs with ``HOME`` pointed at a
temporary directory whose NSS database holds the test CA, marked trusted for TLS
servers (``certutil -A -t "C,,"``). Chromium then verifies every chain, name and date as
it would on the web, and trusts that CA and nothing else the tests made (the rogue CA is
not in it; ``test_the_browser_refuses_the_vault_without_the_test_ca`` shows a browser
without the database refusing the vault).

Origins: the vault is ``https://localhost:VPORT``; the merchant is
``https://127.0.0.1:MPORT``, a different origin and a different site (so Chromium also
puts the card frame in its own process); an unconfigured site is
``https://127.0.0.1:EPORT``.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser_support import (
    CARDVAULT_JS,
    CHROMIUM,
    Ports,
    Recorder,
    Site,
    Sites,
    Vault,
    launch,
    nss_home,
    site_app,
)

from cardvault.transport.server import Listener
from cardvault.transport.tls import client_context, server_context
from cardvault.vault.element import sri_hash
from helpers import Pki, ThreadedServers, cardvault_process, cli, wait_for_port


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that drive Chromium are marked ``browser``. Without Chromium, certutil or
    Playwright they cannot run: in CI that is a failure (scripts/test installs them), on a
    workstation a skip that says why."""
    missing = [
        name
        for name, ok in (
            ("chromium", Path(CHROMIUM).exists()),
            ("certutil (libnss3-tools)", shutil.which("certutil") is not None),
        )
        if not ok
    ]
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing.append("playwright (pip)")
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents and "playwright" in getattr(
            item, "fixturenames", ()
        ):
            item.add_marker(pytest.mark.browser)
            if missing and not os.environ.get("CI"):
                item.add_marker(pytest.mark.skip(reason="needs " + ", ".join(missing)))


# -- the vault and the key service, as real processes ----------------------------------------


@pytest.fixture(scope="session")
def ports() -> Ports:
    return Ports()


@pytest.fixture(scope="session")
def vault(tmp_path_factory: pytest.TempPathFactory, pki: Pki, ports: Ports) -> Iterator[Vault]:
    """keyd (dev seal) and the vault (SQLite store) as child processes, with one account
    whose card element may be framed by the merchant's origin only."""
    d = tmp_path_factory.mktemp("browser-stack")
    if not pki.cert("keyd")[0].exists():
        pki.ca.issue("keyd", dns=["localhost"], ips=["127.0.0.1"])
    kcert, kkey = pki.cert("keyd")
    # Each service in a directory of its own: its SQLite store's directory is also where
    # its audit log lives by default, and two services cannot share one log.
    keyd_dir, vault_dir = d / "keyd", d / "vault"
    keyd_dir.mkdir()
    vault_dir.mkdir()
    kconf = d / "keyd.toml"
    kconf.write_text(
        'profile = "development"\n[server]\n'
        f'port = {ports.keyd}\ncert_file = "{kcert}"\nkey_file = "{kkey}"\n'
        f'client_ca_file = "{pki.ca_file}"\n'
        f'[store]\nurl = "sqlite:///{keyd_dir / "keyd.db"}"\n'
        f'[seal]\ntype = "dev"\ndev_key_file = "{d / "root.key"}"\n'
    )
    r = cli("keyservice", "init", "--config", str(kconf))
    assert r.returncode == 0, r.stderr
    vcert, vkey = pki.cert("vault")
    vconf = d / "vault.toml"
    vconf.write_text(
        'profile = "development"\n[server]\n'
        f'port = {ports.vault}\ncert_file = "{vcert}"\nkey_file = "{vkey}"\n'
        f'[store]\nurl = "sqlite:///{vault_dir / "vault.db"}"\n'
        f'[keyservice]\nurl = "https://localhost:{ports.keyd}"\nca_file = "{pki.ca_file}"\n'
        f'cert_file = "{vcert}"\nkey_file = "{vkey}"\n'
    )
    r = cli(
        "accounts", "create", "--config", str(vconf), "--name", "Example Shop",
        "--allowed-origin", ports.merchant_origin,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    found = dict(re.findall(r"^(\S+(?: \(\w+\))?)\s+(\S+)$", r.stdout, re.M))
    assert f"allowed origins        {ports.merchant_origin}" in r.stdout
    with cardvault_process(
        ["keyservice", "serve", "--config", str(kconf)], log=d / "keyd.log"
    ) as kp:
        wait_for_port(ports.keyd, kp)
        with cardvault_process(
            ["vault", "serve", "--config", str(vconf)], log=d / "vault.log"
        ) as vp:
            wait_for_port(ports.vault, vp)
            yield Vault(
                f"https://localhost:{ports.vault}",
                d,
                vconf,
                found["account"],
                found["publishable (test)"],
                found["secret (test)"],
                d / "vault.log",
            )


@pytest.fixture(scope="session")
def api(pki: Pki) -> Iterator[httpx.Client]:
    """A plain HTTPS client that verifies against the test CA, for looking behind the
    browser's back."""
    with httpx.Client(verify=client_context(pki.ca_file), trust_env=False, timeout=15) as c:
        yield c


# -- the merchant's site, and a site that is not configured ----------------------------------


@pytest.fixture(scope="session")
def sites(pki: Pki, ports: Ports, vault: Vault) -> Iterator[Sites]:
    if not pki.cert("merchant")[0].exists():
        pki.ca.issue("merchant", dns=["localhost"], ips=["127.0.0.1"])
    cert, key = pki.cert("merchant")
    integrity = sri_hash(CARDVAULT_JS.read_bytes())
    common = {"vault": vault.url, "integrity": integrity, "pk": vault.pk}
    # A merchant page as it should be: its own strict policy, the vault named for the
    # script and the frame only.
    merchant_csp = (
        f"default-src 'none'; script-src 'self' {vault.url}; frame-src {vault.url}; "
        "style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; "
        "form-action 'self'; frame-ancestors 'none'"
    )
    html = "text/html; charset=utf-8"
    js = "text/javascript; charset=utf-8"
    css = "text/css; charset=utf-8"
    merchant = Site(ports.merchant_origin)
    merchant_pages = {
        "/checkout": ("checkout.html", html, {**common, "_csp": merchant_csp}),
        "/checkout.js": ("checkout.js", js, {}),
        "/shop.css": ("shop.css", css, {}),
        "/tampered": (
            "tampered.html",
            html,
            {**common, "integrity": sri_hash(b"another file"), "_csp": merchant_csp},
        ),
    }
    evil = Site(ports.evil_origin)
    evil_csp = f"default-src 'self'; script-src 'self' {vault.url}; frame-src {vault.url}"
    evil_pages = {
        "/": (
            "evil.html",
            html,
            {**common, "claimed_origin": ports.merchant_origin, "_csp": evil_csp},
        ),
        "/evil.js": ("evil.js", js, {}),
    }
    listeners = [
        Listener(
            "merchant",
            site_app(merchant, merchant_pages),
            "127.0.0.1",
            ports.merchant,
            server_context(cert, key),
        ),
        Listener(
            "evil", site_app(evil, evil_pages), "127.0.0.1", ports.evil, server_context(cert, key)
        ),
    ]
    with ThreadedServers(listeners):
        yield Sites(merchant, evil, vault.url, integrity)


# -- Chromium ------------------------------------------------------------------------------


# Module scope, not session: Playwright's sync API keeps an event loop running in this
# thread while it is open, and suites that call asyncio.run() must not run inside it.
@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Any, tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Any]:
    home = nss_home(tmp_path_factory.mktemp("chromium-home"), pki.ca_file)
    b = launch(playwright, home)
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def context(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context()
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def page(context: Any) -> Any:
    p = context.new_page()
    p.set_default_timeout(15_000)
    return p


@pytest.fixture
def recorder(context: Any, page: Any) -> Recorder:
    rec = Recorder()
    context.on("request", lambda r: rec.requests.append(r))
    context.on("response", lambda r: rec.responses.append(r))
    page.on("console", lambda m: rec.console.append(f"{m.type}: {m.text}"))
    return rec
