"""The card element's endpoints as HTTP sees them (no browser): the frame's headers, who
gets a frame and who a refusal, the script and its published hash, and the accounts'
allowed origins as the CLI sets them."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlencode

import httpx
import pytest
from browser_support import CARDVAULT_JS, Ports, Vault

from cardvault.transport.asgi import API_CSP, HSTS
from cardvault.vault.element import frame_csp, normalize_origin, sri_hash
from helpers import cli

DOCS = Path(__file__).resolve().parents[2] / "docs" / "element.md"
REFUSED = "This card form cannot be shown on this page."


def frame(
    api: httpx.Client, vault: Vault, origin: str, *, key: str | None = None, dest: str = "iframe"
) -> httpx.Response:
    query = urlencode({"key": vault.pk if key is None else key, "origin": origin})
    return api.get(f"{vault.url}/element/v1/card.html?{query}", headers={"sec-fetch-dest": dest})


def test_the_frame_for_an_allowed_origin_has_its_own_policy_and_hsts(
    api: httpx.Client, vault: Vault, ports: Ports
) -> None:
    r = frame(api, vault, ports.merchant_origin)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.headers["content-security-policy"] == (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        f"img-src 'self'; form-action 'none'; base-uri 'none'; "
        f"frame-ancestors {ports.merchant_origin}"
    )
    assert r.headers["content-security-policy"] == frame_csp(ports.merchant_origin)
    # frame-ancestors decides who may frame it; a DENY beside it would contradict it.
    assert "x-frame-options" not in r.headers
    assert r.headers["strict-transport-security"] == HSTS
    assert r.headers["cache-control"] == "no-store"
    assert r.headers["referrer-policy"] == "no-referrer"
    assert f'data-parent-origin="{ports.merchant_origin}"' in r.text
    # No third-party resource: every src and href is a path on the vault itself.
    assert 'src="/element/v1/card.js"' in r.text and 'href="/element/v1/card.css"' in r.text
    assert "http" not in r.text.replace(ports.merchant_origin, "")


@pytest.mark.parametrize(
    ("case", "origin", "key", "dest"),
    [
        ("an origin the account did not configure", "evil", None, "iframe"),
        ("markup in the origin", "merchant+markup", None, "iframe"),
        ("the merchant's origin with a path", "merchant+/", None, "iframe"),
        ("the merchant's host over http", "http", None, "iframe"),
        ("no origin", "", None, "iframe"),
        ("a secret key", "merchant", "sk", "iframe"),
        ("an unknown publishable key", "merchant", "pk_test_" + "A" * 40, "iframe"),
        ("no key", "merchant", "", "iframe"),
        ("a key with markup", "merchant", 'pk_test_x"><script>', "iframe"),
        ("a top-level visit", "merchant", None, "document"),
    ],
)
def test_the_frame_is_refused_and_the_refusal_cannot_be_framed(
    api: httpx.Client,
    vault: Vault,
    ports: Ports,
    case: str,
    origin: str,
    key: str | None,
    dest: str,
) -> None:
    origins = {
        "evil": ports.evil_origin,
        "merchant": ports.merchant_origin,
        "merchant+markup": ports.merchant_origin + '"><script>alert(1)</script>',
        "merchant+/": ports.merchant_origin + "/",
        "http": ports.merchant_origin.replace("https:", "http:"),
        "": "",
    }
    r = frame(api, vault, origins[origin], key=vault.sk if key == "sk" else key, dest=dest)
    assert r.status_code == 403, case
    assert r.headers["content-security-policy"] == API_CSP
    assert "frame-ancestors 'none'" in API_CSP
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["strict-transport-security"] == HSTS
    assert REFUSED in r.text
    # Nothing the caller sent comes back.
    assert "script" not in r.text and vault.sk not in r.text and "127.0.0.1" not in r.text


def test_cardvault_js_is_served_for_cross_origin_use_with_its_published_hash(
    api: httpx.Client, vault: Vault
) -> None:
    r = api.get(f"{vault.url}/js/v1/cardvault.js")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/javascript; charset=utf-8"
    assert r.headers["cache-control"] == "public, max-age=31536000, immutable"
    # SRI needs a CORS fetch (crossorigin="anonymous"); the file is public.
    assert r.headers["access-control-allow-origin"] == "*"
    assert r.headers["strict-transport-security"] == HSTS
    assert r.content == CARDVAULT_JS.read_bytes()
    sri = api.get(f"{vault.url}/js/v1/cardvault.js.sri")
    assert sri.status_code == 200
    assert sri.text == sri_hash(r.content)
    assert sri.text.startswith("sha384-")


def test_the_docs_publish_the_hash_of_the_script_in_this_release() -> None:
    # v1 is immutable once published: a change to cardvault.js must come with a new
    # hash in the docs (and, once merchants pin it, a new version path).
    assert sri_hash(CARDVAULT_JS.read_bytes()) in DOCS.read_text()


def test_the_frames_assets_come_from_the_vault_itself(api: httpx.Client, vault: Vault) -> None:
    js = api.get(f"{vault.url}/element/v1/card.js")
    css = api.get(f"{vault.url}/element/v1/card.css")
    assert js.status_code == css.status_code == 200
    assert js.headers["content-type"] == "text/javascript; charset=utf-8"
    assert css.headers["content-type"] == "text/css; charset=utf-8"
    # The frame's script posts to its own origin only, and never writes HTML.
    assert 'fetch("/v1/payment_methods"' in js.text
    assert ".innerHTML" not in js.text and "eval(" not in js.text
    assert "postMessage(message, PARENT_ORIGIN)" in js.text
    assert '"*"' not in js.text


def test_set_origins_takes_effect_on_the_next_frame_load(
    api: httpx.Client, vault: Vault, ports: Ports
) -> None:
    try:
        r = cli("accounts", "set-origins", vault.account, "-c", str(vault.config),
                "--origin", ports.evil_origin)  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert frame(api, vault, ports.merchant_origin).status_code == 403
        ok = frame(api, vault, ports.evil_origin)
        assert ok.status_code == 200
        assert ok.headers["content-security-policy"].endswith(
            f"frame-ancestors {ports.evil_origin}"
        )
        r = cli("accounts", "set-origins", vault.account, "-c", str(vault.config))
        assert r.returncode == 0, r.stderr
        assert "none" in r.stdout
        assert frame(api, vault, ports.evil_origin).status_code == 403
    finally:
        r = cli("accounts", "set-origins", vault.account, "-c", str(vault.config),
                "--origin", ports.merchant_origin)  # fmt: skip
        assert r.returncode == 0, r.stderr
    assert frame(api, vault, ports.merchant_origin).status_code == 200


@pytest.mark.parametrize(
    "origin",
    [
        "http://shop.example",
        "https://shop.example/checkout",
        "https://shop.example?x=1",
        "https://shop.example#top",
        "https://user@shop.example",
        "https://*.shop.example",
        "https://[::1]:8443",
        "https://shop.example:99999",
        "https://shop_example.com",
        "shop.example",
        "",
    ],
)
def test_the_cli_refuses_what_is_not_an_https_origin(vault: Vault, origin: str) -> None:
    r = cli("accounts", "set-origins", vault.account, "-c", str(vault.config), "--origin", origin)
    assert r.returncode == 2
    assert "invalid origin" in r.stderr


def test_the_cli_refuses_an_unknown_account(vault: Vault) -> None:
    r = cli("accounts", "set-origins", "acct_missing", "-c", str(vault.config),
            "--origin", "https://shop.example")  # fmt: skip
    assert r.returncode == 1
    assert "no such account" in r.stderr


@pytest.mark.parametrize(
    ("given", "normalized"),
    [
        ("https://shop.example", "https://shop.example"),
        ("https://Shop.EXAMPLE", "https://shop.example"),
        ("https://shop.example:443", "https://shop.example"),
        ("https://shop.example/", "https://shop.example"),
        ("https://shop.example:8443", "https://shop.example:8443"),
        ("https://127.0.0.1:8443", "https://127.0.0.1:8443"),
        ("HTTPS://xn--bcher-kva.example", "https://xn--bcher-kva.example"),
    ],
)
def test_origins_are_normalized_as_browsers_serialize_them(given: str, normalized: str) -> None:
    assert normalize_origin(given) == normalized
