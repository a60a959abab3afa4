"""The example shop's checkout in headless Chromium, on the stack ``cardvault up`` runs.

A customer opens the shop (https://localhost:SHOP), types a published test card into
the vault's card element, and pays. The tests look at what the page showed, what the
orders page says, which requests carried the card number (only the frame's, to the
vault), and what the shop's zone kept (no card number). Then that the shop charges once:
a double click, an attempt sent again by hand, a reload after paying; that Pay stays
disabled once paid; and that the pages fit a 390 px wide screen.

Chromium trusts the stack's own CA (``STATE/ca/ca.pem``) through an NSS database, as in
the rest of this folder; nothing switches certificate verification off.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import sqlite3
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser_support import Recorder, launch, nss_home

from cardvault.client import Client
from cardvault.scan import scan_paths
from cardvault.transport.tls import client_context
from helpers import free_ports

VISA = "4242424242424242"  # published test cards (shared/testdata/test_cards.json)
DECLINED = "4000000000000002"
FRAME = "iframe[title='Secure card payment input frame']"
SCREENSHOT = Path(__file__).resolve().parents[2] / "docs" / "images" / "shop-checkout.png"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("shop-browser")
    state = tmp / "state"
    names = ("vault", "redirect", "keyservice", "admin", "acquirer", "shop")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    args = [sys.executable, "-m", "cardvault", "up", "--state", str(state)]
    for name in names:
        args += [f"--{name}-port", str(ports[name])]
    log = tmp / "up.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=fh)
    try:
        deadline = time.monotonic() + 90
        while not (state / "stack.json").exists():
            assert proc.poll() is None, f"cardvault up exited: {log.read_text()}"
            assert time.monotonic() < deadline, "stack.json did not appear"
            time.sleep(0.1)
        yield json.loads((state / "stack.json").read_text())
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def shop_browser(
    playwright: Any, tmp_path_factory: pytest.TempPathFactory, stack: dict[str, Any]
) -> Iterator[Any]:
    ca = Path(stack["state"]) / "ca" / "ca.pem"
    b = launch(playwright, nss_home(tmp_path_factory.mktemp("shop-chromium-home"), ca))
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def shop_page(shop_browser: Any) -> Iterator[tuple[Any, Recorder]]:
    context = shop_browser.new_context()
    rec = Recorder()
    context.on("request", lambda r: rec.requests.append(r))
    try:
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.on("console", lambda m: rec.console.append(f"{m.type}: {m.text}"))
        yield page, rec
    finally:
        context.close()


def open_checkout(page: Any, stack: dict[str, Any]) -> None:
    page.goto(stack["shop"]["url"] + "/")
    page.wait_for_function("window.cardReady === true")


def type_card(page: Any, number: str, expiry: str = "1234", cvc: str = "123") -> None:
    page.get_by_label("Name on card").fill("Jenny Rosen")
    frame = page.frame_locator(FRAME)
    frame.get_by_label("Card number").press_sequentially(number)
    frame.get_by_label("Expiry date").press_sequentially(expiry)
    frame.get_by_label("Security code").press_sequentially(cvc)


def pay(page: Any) -> dict[str, str]:
    page.get_by_role("button", name=re.compile("^Pay")).click()
    page.wait_for_selector("#result[data-state]")
    result = page.locator("#result")
    return {
        "state": result.get_attribute("data-state") or "",
        "order": result.get_attribute("data-order") or "",
        "text": result.inner_text(),
    }


def png_pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and the unfiltered rows of an 8-bit PNG (as Chromium writes them)."""
    pos, idat, width, height, channels = 8, b"", 0, 0, 3
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos : pos + 4])
        kind, chunk = png[pos + 4 : pos + 8], png[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            width, height, _depth, color = struct.unpack(">IIBB", chunk[:10])
            channels = {2: 3, 6: 4, 0: 1, 4: 2}[color]
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    raw = zlib.decompress(idat)
    stride = width * channels + 1
    rows: list[bytes] = []
    prev = bytearray(stride - 1)
    for y in range(height):
        kind_byte, line = raw[y * stride], bytearray(raw[y * stride + 1 : (y + 1) * stride])
        for i in range(len(line)):
            a = line[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if kind_byte == 1:
                line[i] = (line[i] + a) & 255
            elif kind_byte == 2:
                line[i] = (line[i] + b) & 255
            elif kind_byte == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif kind_byte == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def looks_the_same(old: bytes, new: bytes) -> bool:
    """Chromium anti-aliases the frame's rounded corners a little differently from run to
    run; a few dozen pixels is that, not a change of the page."""
    w1, h1, rows1 = png_pixels(old)
    w2, h2, rows2 = png_pixels(new)
    if (w1, h1) != (w2, h2):
        return False
    changed = sum(
        1
        for r1, r2 in zip(rows1, rows2, strict=True)
        for x, y in zip(r1, r2, strict=True)
        if x != y
    )
    return changed < 200


def save_screenshot(page: Any) -> None:
    """The shop's checkout with a card typed in, for the README: taken before paying, so
    that it is the same on every run, and written only when it changed (beyond
    anti-aliasing), so that a test run leaves the work tree clean."""
    for frame in page.frames:
        if "/element/v1/card.html" in frame.url:
            frame.evaluate("document.activeElement && document.activeElement.blur()")
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.wait_for_timeout(500)
    png = page.screenshot(full_page=True, animations="disabled", caret="hide")
    assert len(png) > 10_000
    if not SCREENSHOT.exists() or not looks_the_same(SCREENSHOT.read_bytes(), png):
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(png)


def test_a_customer_buys_with_a_test_card_and_the_order_is_approved(
    shop_page: tuple[Any, Recorder], stack: dict[str, Any]
) -> None:
    page, rec = shop_page
    open_checkout(page, stack)
    type_card(page, VISA)
    save_screenshot(page)
    result = pay(page)
    assert result["state"] == "approved", (result, rec.console)
    assert "Visa ending in 4242" in result["text"]
    order_id = result["order"]
    assert order_id.startswith("ord_")

    page.get_by_role("link", name="See your orders").click()
    page.wait_for_url(re.compile(r"/orders"))
    row = page.locator(f"tr[id='{order_id}']")
    assert row.get_attribute("data-status") == "approved"
    assert "Visa •••• 4242" in row.inner_text()

    # The number left the browser once, from the vault's frame to the vault; nothing
    # sent to the shop's origin carried it (the shop got the pm_ id only).
    carrying = [r for r in rec.requests if VISA in (r.post_data or "") + r.url]
    assert [(r.frame.url.split("?")[0], r.url) for r in carrying] == [
        (
            stack["vault"]["url"] + "/element/v1/card.html",
            stack["vault"]["url"] + "/v1/payment_methods",
        )
    ]
    to_shop = [r for r in rec.requests if r.url.startswith(stack["shop"]["url"])]
    assert any(r.method == "POST" and r.url.endswith("/orders") for r in to_shop)

    received = (Path(stack["acquirer"]["state"]) / "received.jsonl").read_text()
    assert VISA in received  # the acquirer got the card, by way of the vault
    assert scan_paths([Path(stack["shop"]["dir"])], canaries=[VISA]) == []


def test_a_declined_card_shows_the_decline_and_is_listed_as_declined(
    shop_page: tuple[Any, Recorder], stack: dict[str, Any]
) -> None:
    page, _rec = shop_page
    open_checkout(page, stack)
    type_card(page, DECLINED)
    result = pay(page)
    assert result["state"] == "declined"
    assert "card_declined" in result["text"]
    page.goto(stack["shop"]["url"] + "/orders")
    row = page.locator(f"tr[id='{result['order']}']")
    assert row.get_attribute("data-status") == "declined"
    assert "Visa •••• 0002" in row.inner_text()
    assert scan_paths([Path(stack["shop"]["dir"])], canaries=[VISA, DECLINED]) == []


# --- paying once: one order attempt per order, Pay disabled once paid --------------------
#
# The shop is the model merchants copy (issue 19, item 9): after an approval the card
# fields stayed filled and Pay stayed enabled, and a second click placed a second $60
# order. Each order attempt (att_…) is now made by the shop's server with the page, is
# unique in its orders table and is the Idempotency-Key of its forward; these tests count
# what the shop recorded and what the acquirer received.


def order_count(stack: dict[str, Any]) -> int:
    with sqlite3.connect(stack["shop"]["db"]) as db:
        return int(db.execute("SELECT count(*) FROM orders").fetchone()[0])


def acquirer_received(stack: dict[str, Any]) -> list[dict[str, Any]]:
    path = Path(stack["acquirer"]["state"]) / "received.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def new_pm(stack: dict[str, Any], number: str = VISA) -> str:
    """What the card element does: the card to the vault with the publishable key."""
    with Client(
        stack["keys"]["publishable"], base_url=stack["vault"]["url"], ca_bundle=stack["ca_bundle"]
    ) as vault:
        pm = vault.payment_methods.create(
            card={"number": number, "exp_month": 12, "exp_year": 2031, "cvc": "123"}
        )
    return str(pm["id"])


def post_order(stack: dict[str, Any], attempt: str, pm: str) -> httpx.Response:
    """What the checkout page sends, sent by hand: the attempt and a pm_ id."""
    with httpx.Client(
        verify=client_context(stack["ca_bundle"]), trust_env=False, timeout=60
    ) as http:
        return http.post(
            stack["shop"]["url"] + "/orders", json={"attempt": attempt, "payment_method": pm}
        )


def page_attempt(page: Any) -> str:
    """The order attempt the server rendered the checkout with. (Before attempts
    existed there was none: a made-up one then shows what the shop does with it.)"""
    return page.locator("#payment-form").get_attribute("data-attempt") or (
        "att_" + secrets.token_hex(16)
    )


def settle(page: Any) -> None:
    """Long enough for a second order, if the page sent one, to reach the shop's table
    (the row is written before the forward) and usually the acquirer."""
    page.wait_for_timeout(2500)


def orders_posted(rec: Recorder, stack: dict[str, Any]) -> int:
    url = stack["shop"]["url"] + "/orders"
    return sum(1 for r in rec.requests if r.method == "POST" and r.url == url)


def test_clicking_pay_twice_places_one_order_and_one_forward(
    shop_page: tuple[Any, Recorder], stack: dict[str, Any]
) -> None:
    page, rec = shop_page
    open_checkout(page, stack)
    type_card(page, VISA)
    orders, received = order_count(stack), len(acquirer_received(stack))
    box = page.locator("#pay").bounding_box()
    assert box is not None
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.dblclick(x, y)  # a quick double click on Pay
    page.wait_for_selector("#result[data-state]")
    page.mouse.click(x, y)  # and a click once the answer is shown
    settle(page)
    result = page.locator("#result")
    assert result.get_attribute("data-state") == "approved", rec.console
    assert order_count(stack) - orders == 1
    sent = acquirer_received(stack)[received:]
    assert len(sent) == 1
    assert result.get_attribute("data-order") in sent[0]["body"]
    assert orders_posted(rec, stack) == 1


def test_the_same_attempt_sent_again_is_the_same_order(
    shop_page: tuple[Any, Recorder], stack: dict[str, Any]
) -> None:
    page, rec = shop_page
    open_checkout(page, stack)
    attempt = page_attempt(page)
    orders, received = order_count(stack), len(acquirer_received(stack))
    # The page's attempt, sent by hand: twice at once, then once more, each time with a
    # payment method of its own (as a second click would make).
    with ThreadPoolExecutor(2) as pool:
        pms = [new_pm(stack), new_pm(stack)]
        first = list(pool.map(lambda pm: post_order(stack, attempt, pm), pms))
    again = post_order(stack, attempt, new_pm(stack))
    answers = [*first, again]
    assert [a.status_code for a in answers] == [200, 200, 200], [a.text for a in answers]
    assert len({a.json()["order"]["id"] for a in answers}) == 1
    order = again.json()["order"]
    assert order["status"] == "approved"
    assert order_count(stack) - orders == 1
    assert [order["id"] in r["body"] for r in acquirer_received(stack)[received:]] == [True]

    # The page then pays with the same attempt: it is told about the same order, and
    # nothing more is charged.
    type_card(page, VISA)
    result = pay(page)
    assert (result["state"], result["order"]) == ("approved", order["id"]), rec.console
    settle(page)
    assert order_count(stack) - orders == 1
    assert len(acquirer_received(stack)) - received == 1


def test_after_an_approval_pay_stays_disabled_and_a_reload_shows_the_receipt(
    shop_page: tuple[Any, Recorder], stack: dict[str, Any]
) -> None:
    page, rec = shop_page
    open_checkout(page, stack)
    type_card(page, VISA)
    result = pay(page)
    assert result["state"] == "approved", rec.console
    orders = order_count(stack)
    pay_button = page.locator("#pay")
    assert pay_button.is_disabled()
    page.wait_for_timeout(1000)
    assert pay_button.is_disabled()  # not only until the answer: for good
    assert page.locator(FRAME).count() == 0  # the card fields are gone

    # A reload is the receipt of the same order, with no Pay button at all.
    page.reload()
    assert page.locator("#result").get_attribute("data-order") == result["order"]
    assert page.get_by_role("button", name=re.compile("^Pay")).count() == 0
    assert order_count(stack) == orders

    # Buying again is a new attempt, asked for on purpose.
    with page.expect_navigation(url=stack["shop"]["url"] + "/"):
        page.get_by_role("button", name="Start a new order").click()
    page.wait_for_function("window.cardReady === true")
    assert page.get_by_role("button", name=re.compile("^Pay")).is_enabled()
    type_card(page, VISA)
    second = pay(page)
    assert second["state"] == "approved"
    assert second["order"] != result["order"]
    assert order_count(stack) == orders + 1


def test_a_decline_enables_pay_again_for_a_new_attempt(
    shop_page: tuple[Any, Recorder], stack: dict[str, Any]
) -> None:
    page, rec = shop_page
    open_checkout(page, stack)
    attempt = page_attempt(page)
    type_card(page, DECLINED)
    declined = pay(page)
    assert declined["state"] == "declined", rec.console
    assert page.locator("#pay").is_enabled()
    type_card(page, VISA)  # the fields were cleared: another card
    approved = pay(page)
    assert approved["state"] == "approved", rec.console
    assert approved["order"] != declined["order"]
    with sqlite3.connect(stack["shop"]["db"]) as db:
        attempts = dict(
            db.execute(
                "SELECT id, attempt FROM orders WHERE id IN (?, ?)",
                (declined["order"], approved["order"]),
            ).fetchall()
        )
    assert attempts[declined["order"]] == attempt
    assert attempts[approved["order"]] not in (None, attempt)
    # A reload after the approval is its receipt, not a fresh form.
    page.reload()
    assert page.locator("#result").get_attribute("data-order") == approved["order"]


def no_sideways_scroll(page: Any) -> dict[str, Any]:
    return dict(
        page.evaluate(
            """() => ({
                scrollWidth: document.documentElement.scrollWidth,
                innerWidth: window.innerWidth,
                outside: Array.from(document.querySelectorAll("main *"))
                    .filter((el) => el.getBoundingClientRect().right > window.innerWidth + 0.5)
                    .map((el) => el.tagName + (el.id ? "#" + el.id : "")),
            })"""
        )
    )


def test_the_shop_fits_a_390_px_wide_screen(
    shop_browser: Any, stack: dict[str, Any], tmp_path: Path
) -> None:
    # Something to list, with the longest ids the table shows.
    attempt = "att_" + secrets.token_hex(16)
    assert post_order(stack, attempt, new_pm(stack)).status_code == 200
    context = shop_browser.new_context(viewport={"width": 390, "height": 844})
    try:
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.goto(stack["shop"]["url"] + "/orders")
        assert page.locator("tbody tr[data-status]").count() >= 1
        page.screenshot(path=str(tmp_path / "orders-390.png"), full_page=True)
        fit = no_sideways_scroll(page)
        assert fit["scrollWidth"] <= fit["innerWidth"], fit
        assert fit["outside"] == [], fit
        open_checkout(page, stack)
        page.screenshot(path=str(tmp_path / "checkout-390.png"), full_page=True)
        fit = no_sideways_scroll(page)
        assert fit["scrollWidth"] <= fit["innerWidth"], fit
        assert fit["outside"] == [], fit
    finally:
        context.close()
