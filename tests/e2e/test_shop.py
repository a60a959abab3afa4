"""The example shop in the whole stack: ``cardvault up`` in a temporary directory, and a
purchase through the API path the checkout page takes.

The card element (in a browser) posts the card to the vault with the publishable key and
hands the shop's page a ``pm_…``; the page posts that id to the shop's ``/orders``. Here
the test does the same two requests itself (the browser path is
tests/browser/test_shop_checkout.py). Then it checks what each zone ended up with: the
acquirer got the card, the shop's database, log and files hold no card number or CVC,
the shop's certificates open nothing at the key service, and stopping ``up`` leaves no
process behind.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from cardvault.client import Client
from cardvault.scan import scan_paths
from cardvault.transport.tls import client_context
from helpers import free_ports

VISA = "4242424242424242"  # published test cards (shared/testdata/test_cards.json)
DECLINED = "4000000000000002"
MASTERCARD = "5555555555554444"
CVC = "737"

pytestmark = pytest.mark.slow


@dataclass
class Stack:
    proc: subprocess.Popen[bytes]
    state: Path
    info: dict[str, Any]
    children: list[int]
    log: Path

    @property
    def shop_url(self) -> str:
        return str(self.info["shop"]["url"])

    def http(self) -> httpx.Client:
        return httpx.Client(
            verify=client_context(self.info["ca_bundle"]), trust_env=False, timeout=30
        )

    def pm(self, number: str, cvc: str = CVC) -> dict[str, Any]:
        """What the card element does: the card to the vault, with the publishable key."""
        with Client(
            self.info["keys"]["publishable"],
            base_url=self.info["vault"]["url"],
            ca_bundle=self.info["ca_bundle"],
        ) as vault:
            return vault.payment_methods.create(
                card={"number": number, "exp_month": 12, "exp_year": 2031, "cvc": cvc},
                billing_details={"name": "Jenny Rosen"},
            )

    def order(self, pm_id: str, **headers: str) -> httpx.Response:
        """What the checkout page does next: only the pm_ id to the shop's server."""
        with self.http() as http:
            return http.post(
                f"{self.shop_url}/orders", json={"payment_method": pm_id}, headers=headers
            )


def children_of(pid: int) -> list[int]:
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False
    )
    return [int(p) for p in out.stdout.split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split()[2] != "Z"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("shop-stack")
    state = tmp / "state"
    names = ("vault", "redirect", "keyservice", "admin", "acquirer", "shop")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    args = [
        sys.executable, "-m", "cardvault", "up", "--state", str(state),
        "--vault-port", str(ports["vault"]), "--redirect-port", str(ports["redirect"]),
        "--keyservice-port", str(ports["keyservice"]), "--admin-port", str(ports["admin"]),
        "--acquirer-port", str(ports["acquirer"]), "--shop-port", str(ports["shop"]),
    ]  # fmt: skip
    log = tmp / "up.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(args, stdout=fh, stderr=fh)
    try:
        deadline = time.monotonic() + 90
        while not (state / "stack.json").exists():
            assert proc.poll() is None, f"cardvault up exited: {log.read_text()}"
            assert time.monotonic() < deadline, "stack.json did not appear"
            time.sleep(0.1)
        info = json.loads((state / "stack.json").read_text())
        yield Stack(proc, state, info, children_of(proc.pid), log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_up_runs_the_shop_as_a_fourth_process_and_names_it_in_stack_json(stack: Stack) -> None:
    assert len(stack.children) == 4  # key service, vault, acquirer, shop
    shop = stack.info["shop"]
    assert shop["url"].startswith("https://localhost:")
    assert Path(shop["db"]).parent == stack.state / "shop"
    assert "open " + shop["url"] + " to buy something" in stack.log.read_text()


def test_the_shop_speaks_https_with_hsts_and_its_own_certificate(stack: Stack) -> None:
    with stack.http() as http:
        r = http.get(stack.shop_url + "/")
    assert r.status_code == 200
    assert r.headers["strict-transport-security"].startswith("max-age=63072000")
    # The checkout loads the vault's script pinned by the hash the vault publishes,
    # and its policy names the vault for the script and the frame only.
    vault = stack.info["vault"]["url"]
    with stack.http() as http:
        sri = http.get(vault + "/js/v1/cardvault.js.sri").text.strip()
    assert f'<script src="{vault}/js/v1/cardvault.js" integrity="{sri}"' in r.text
    assert f"script-src 'self' {vault}; frame-src {vault};" in r.headers["content-security-policy"]
    assert stack.info["keys"]["publishable"] in r.text
    assert stack.info["keys"]["secret"] not in r.text


def test_the_vault_lets_the_shops_checkout_frame_the_card_element(stack: Stack) -> None:
    with stack.http() as http:
        r = http.get(
            stack.info["vault"]["url"] + "/element/v1/card.html",
            params={"key": stack.info["keys"]["publishable"], "origin": stack.shop_url},
            headers={"sec-fetch-dest": "iframe"},
        )
    assert r.status_code == 200
    assert f"frame-ancestors {stack.shop_url}" in r.headers["content-security-policy"]


def test_buying_something_approves_it_and_the_orders_page_shows_brand_last4_and_answer(
    stack: Stack,
) -> None:
    pm = stack.pm(VISA)
    r = stack.order(pm["id"], origin=stack.shop_url)
    assert r.status_code == 200, r.text
    order = r.json()["order"]
    assert order["status"] == "approved"
    assert (order["brand"], order["last4"], order["amount"]) == ("visa", "4242", 6000)
    assert order["authorization_id"].startswith("auth_")
    assert order["forwarding_request"].startswith("fwdreq_")
    with stack.http() as http:
        page = http.get(stack.shop_url + "/orders").text
    row = page[page.index(f'<tr id="{order["id"]}"') :].split("</tr>", 1)[0]
    assert "Visa •••• 4242" in row
    assert "approved" in row
    assert order["authorization_id"] in row

    # The acquirer received the real card, the CVC and the shop's amount and reference.
    received = [
        json.loads(line)
        for line in (Path(stack.info["acquirer"]["state"]) / "received.jsonl")
        .read_text()
        .splitlines()
    ]
    sent = [json.loads(r["body"]) for r in received if order["id"] in (r["body"] or "")]
    assert len(sent) == 1
    assert sent[0]["card"]["number"] == VISA
    assert sent[0]["card"]["cvc"] == CVC
    assert (sent[0]["amount"], sent[0]["currency"]) == (6000, "usd")


def test_the_shop_receives_the_vaults_webhooks_verified_and_shows_them_on_its_orders_page(
    stack: Stack,
) -> None:
    # `up` made the demo account's endpoint for the shop and gave the shop its secret.
    secret = json.loads((Path(stack.info["shop"]["dir"]) / "webhook.json").read_text())
    assert secret["secret"].startswith("whsec_")
    pm = stack.pm(VISA)
    r = stack.order(pm["id"], origin=stack.shop_url)
    assert r.status_code == 200, r.text
    fwd = r.json()["order"]["forwarding_request"]
    deadline = time.monotonic() + 20
    while True:
        with stack.http() as http:
            page = http.get(stack.shop_url + "/orders").text
        events = page[page.index("Events from the vault") :]
        if pm["id"] in events and fwd in events:
            break
        assert time.monotonic() < deadline, events[:2000]
        time.sleep(0.2)
    row = events[: events.index(pm["id"])].rsplit("<tr", 1)[1]
    assert 'data-type="payment_method.created"' in row
    assert "forwarding.request.created" in events
    # A delivery whose signature does not verify is refused.
    with stack.http() as http:
        forged = http.post(
            stack.shop_url + "/webhooks/cardvault",
            content=b'{"id": "evt_forged", "object": "event"}',
            headers={"stripe-signature": "t=1,v1=00", "content-type": "application/json"},
        )
    assert forged.status_code == 400


def test_a_declined_card_is_recorded_with_the_acquirers_decline_code(stack: Stack) -> None:
    pm = stack.pm(DECLINED)
    r = stack.order(pm["id"])
    assert r.status_code == 200, r.text
    order = r.json()["order"]
    assert (order["status"], order["decline_code"], order["last4"]) == (
        "declined",
        "card_declined",
        "0002",
    )


def test_a_payment_method_pays_for_one_order_only(stack: Stack) -> None:
    pm = stack.pm(MASTERCARD)
    assert stack.order(pm["id"]).json()["order"]["status"] == "approved"
    again = stack.order(pm["id"])
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "payment_method_used"


def test_the_shop_refuses_orders_from_other_origins_and_unknown_payment_methods(
    stack: Stack,
) -> None:
    pm = stack.pm(VISA)
    assert stack.order(pm["id"], origin="https://evil.example").status_code == 403
    assert stack.order(pm["id"], **{"sec-fetch-site": "cross-site"}).status_code == 403
    with stack.http() as http:
        form = http.post(f"{stack.shop_url}/orders", data={"payment_method": pm["id"]})
    assert form.status_code == 415
    unknown = stack.order("pm_" + "x" * 24)
    assert unknown.status_code == 400
    assert unknown.json()["error"]["code"] == "invalid_payment_method"
    assert stack.order("../v1/forwarding").status_code == 400
    # None of these made an order: the pm is still good for one.
    assert stack.order(pm["id"]).json()["order"]["status"] == "approved"


# --- one order per attempt: a repeat answers the first order, never a second charge ----------


def attempt_id() -> str:
    return "att_" + secrets.token_hex(16)


def sent_for(stack: Stack, order_id: str) -> list[dict[str, Any]]:
    """What the acquirer received for ``order_id`` (its reference)."""
    path = Path(stack.info["acquirer"]["state"]) / "received.jsonl"
    received = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in received if order_id in (r["body"] or "")]


def order_attempt(stack: Stack, attempt: str, pm_id: str, **headers: str) -> httpx.Response:
    with stack.http() as http:
        return http.post(
            f"{stack.shop_url}/orders",
            json={"attempt": attempt, "payment_method": pm_id},
            headers=headers,
        )


def count_orders(stack: Stack) -> int:
    with sqlite3.connect(stack.info["shop"]["db"]) as db:
        return int(db.execute("SELECT count(*) FROM orders").fetchone()[0])


def test_the_same_attempt_sent_again_is_one_order_and_one_forward(stack: Stack) -> None:
    attempt, before = attempt_id(), count_orders(stack)
    # Three at once (a double click, a retried POST), then one more, each with a payment
    # method of its own: one order, charged once, and every answer is that order.
    pms = [stack.pm(VISA)["id"] for _ in range(4)]
    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda pm: order_attempt(stack, attempt, pm), pms[:3]))
    answers.append(order_attempt(stack, attempt, pms[3]))
    assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    orders = [a.json()["order"] for a in answers]
    assert len({(o["id"], o["status"], o["forwarding_request"]) for o in orders}) == 1
    assert (orders[0]["status"], orders[0]["attempt"]) == ("approved", attempt)
    assert count_orders(stack) == before + 1
    assert len(sent_for(stack, orders[0]["id"])) == 1
    # The payment methods of the repeats were not used: each can still pay an order.
    assert order_attempt(stack, attempt_id(), pms[3]).json()["order"]["status"] == "approved"


def test_a_declined_attempt_answers_its_decline_and_the_next_attempt(stack: Stack) -> None:
    attempt = attempt_id()
    first = order_attempt(stack, attempt, stack.pm(DECLINED)["id"])
    again = order_attempt(stack, attempt, stack.pm(VISA)["id"])
    assert first.json()["order"]["status"] == "declined"
    assert again.json()["order"]["id"] == first.json()["order"]["id"]  # not a new charge
    # A new try (another card) is a new attempt, which the answer offers.
    nxt = again.json()["next_attempt"]
    assert nxt != attempt
    paid = order_attempt(stack, nxt, stack.pm(VISA)["id"])
    assert paid.json()["order"]["status"] == "approved"
    assert "next_attempt" not in paid.json()


@pytest.mark.parametrize("forwarded", [False, True], ids=["before-forward", "after-forward"])
def test_an_order_left_pending_by_a_dead_shop_is_finished_by_its_attempts_retry(
    stack: Stack, forwarded: bool
) -> None:
    # The shop recorded the pending order and died, before forwarding or after the
    # vault had forwarded (and the acquirer approved) but before recording the answer.
    # The customer's retry of the attempt forwards under the same Idempotency-Key: the
    # vault sends it once, or answers the forward it made.
    attempt, pm = attempt_id(), stack.pm(VISA)["id"]
    order_id = "ord_" + secrets.token_hex(8)
    first = None
    if forwarded:
        with Client(
            stack.info["keys"]["secret"],
            base_url=stack.info["vault"]["url"],
            ca_bundle=stack.info["ca_bundle"],
        ) as vault:
            first = vault.forwarding.create(
                payment_method=pm,
                url=stack.info["acquirer"]["forward_url"],
                replacements=["card_number", "card_expiry", "card_cvc"],
                request={
                    "headers": [{"name": "Content-Type", "value": "application/json"}],
                    "body": json.dumps(
                        {"amount": 6000, "currency": "usd", "reference": order_id, "card": {}}
                    ),
                },
                idempotency_key=f"shop-{attempt}",
            )
    with sqlite3.connect(stack.info["shop"]["db"]) as db:
        db.execute(
            "INSERT INTO orders (id, created, description, amount, currency, payment_method, "
            "brand, last4, status, attempt, claimed_until) "
            "VALUES (?, ?, 'Field notebook, dot grid, Fountain pen, fine nib', 6000, 'usd', "
            "?, 'visa', '4242', 'pending', ?, ?)",
            (order_id, int(time.time()) - 600, pm, attempt, int(time.time()) - 400),
        )
    r = order_attempt(stack, attempt, stack.pm(VISA)["id"])
    assert r.status_code == 200, r.text
    order = r.json()["order"]
    assert (order["id"], order["status"]) == (order_id, "approved")
    assert len(sent_for(stack, order_id)) == 1
    if first is not None:
        assert order["forwarding_request"] == first["id"]


def test_the_checkout_keeps_its_attempt_across_reloads_until_it_is_paid(stack: Stack) -> None:
    def page_attempt(text: str) -> str:
        found = re.search(r'data-attempt="(att_[0-9a-f]{32})"', text)
        assert found, text
        return found.group(1)

    with stack.http() as http:
        first = http.get(stack.shop_url + "/")
        attempt = page_attempt(first.text)
        cookie = first.headers["set-cookie"]
        assert cookie.startswith(f"__Host-attempt={attempt};")
        assert {"secure", "httponly", "path=/", "samesite=strict"} <= {
            part.strip().lower() for part in cookie.split(";")
        }
        assert page_attempt(http.get(stack.shop_url + "/").text) == attempt  # a reload
        paid = http.post(
            stack.shop_url + "/orders",
            json={"attempt": attempt, "payment_method": stack.pm(VISA)["id"]},
        ).json()["order"]
        # Paid: the checkout is the receipt, with nothing to pay.
        receipt = http.get(stack.shop_url + "/")
        assert paid["id"] in receipt.text
        assert 'id="pay"' not in receipt.text and "data-attempt" not in receipt.text
        # A new order is asked for on purpose (a POST), and is a new attempt.
        assert http.get(stack.shop_url + "/checkout/new").status_code == 405
        refused = http.post(
            stack.shop_url + "/checkout/new", headers={"origin": "https://evil.example"}
        )
        assert refused.status_code == 403
        new = http.post(stack.shop_url + "/checkout/new", headers={"origin": stack.shop_url})
        assert (new.status_code, new.headers["location"]) == (303, "/")
        second = page_attempt(http.get(stack.shop_url + "/").text)
        assert second != attempt
        # Declined: the page goes on with the next attempt, and so does a reload.
        declined = http.post(
            stack.shop_url + "/orders",
            json={"attempt": second, "payment_method": stack.pm(DECLINED)["id"]},
        ).json()
        assert declined["order"]["status"] == "declined"
        assert page_attempt(http.get(stack.shop_url + "/").text) == declined["next_attempt"]


def test_an_attempt_the_shop_did_not_make_is_refused(stack: Stack) -> None:
    before, pm = count_orders(stack), stack.pm(VISA)["id"]
    for bad in ["att_1", "ord_" + "0" * 32, "ATT_" + "0" * 32, "", 7, ["att_" + "0" * 32]]:
        with stack.http() as http:
            r = http.post(f"{stack.shop_url}/orders", json={"attempt": bad, "payment_method": pm})
        assert (r.status_code, r.json()["error"]["code"]) == (400, "invalid_attempt"), bad
    assert count_orders(stack) == before


def test_the_order_store_adds_attempts_to_a_database_made_before_them(tmp_path: Path) -> None:
    db = tmp_path / "shop.db"
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TABLE orders (id TEXT PRIMARY KEY, created INTEGER NOT NULL, "
            "description TEXT NOT NULL, amount INTEGER NOT NULL, currency TEXT NOT NULL, "
            "payment_method TEXT NOT NULL UNIQUE, brand TEXT, last4 TEXT, status TEXT NOT NULL, "
            "decline_code TEXT, authorization_id TEXT, acquirer_status INTEGER, "
            "forwarding_request TEXT, error TEXT)"
        )
        conn.execute(
            "INSERT INTO orders (id, created, description, amount, currency, payment_method, "
            "status) VALUES ('ord_old', 1, 'x', 6000, 'usd', 'pm_old', 'approved')"
        )
    script = (
        "import sys; from pathlib import Path; from examples.shop.orders import OrderStore\n"
        "s = OrderStore(Path(sys.argv[1]))\n"
        "print(s.get('ord_old').attempt)\n"
        "o = s.create(attempt='att_' + '0' * 32, payment_method='pm_new', description='x', "
        "amount=1, currency='usd', brand=None, last4=None, claim_for=60)\n"
        "print(s.by_attempt('att_' + '0' * 32).id == o.id)\n"
        "try:\n"
        "    s.create(attempt='att_' + '0' * 32, payment_method='pm_other', description='x', "
        "amount=1, currency='usd', brand=None, last4=None, claim_for=60)\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script, str(db)],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.stdout.split() == ["None", "True", "AttemptTaken"], out.stderr


def test_the_shops_database_files_and_logs_hold_no_card_number_or_cvc(stack: Stack) -> None:
    # Something must have been bought for this to mean anything.
    db = Path(stack.info["shop"]["db"])
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT payment_method, last4, status FROM orders").fetchall()
    assert {status for _pm, _last4, status in rows} >= {"approved", "declined"}
    assert all(pm.startswith("pm_") for pm, _last4, _status in rows)
    shop_dir = stack.state / "shop"
    assert (shop_dir / "shop.log").stat().st_size > 0
    findings = scan_paths([shop_dir], canaries=[VISA, DECLINED, MASTERCARD], cvcs=[CVC])
    assert findings == [], [str(f) for f in findings]
    # The scan can fail: the acquirer's record, which holds the cards on purpose, is found.
    assert scan_paths([Path(stack.info["acquirer"]["state"])], canaries=[VISA])


def test_the_shops_certificates_are_refused_by_the_key_service(stack: Stack) -> None:
    url = stack.info["keyservice"]["url"] + "/v1/keys/pan/datakey"
    identity = stack.info["identities"]["shop"]
    ctx = client_context(stack.info["ca_bundle"], client_cert=(identity["cert"], identity["key"]))
    with httpx.Client(verify=ctx, trust_env=False) as c:
        assert c.post(url).status_code == 403
    # Its HTTPS certificate is no client certificate at all: the handshake fails.
    shop_dir = stack.state / "shop"
    server = (str(shop_dir / "shop-server.pem"), str(shop_dir / "shop-server.key"))
    ctx = client_context(stack.info["ca_bundle"], client_cert=server)
    with httpx.Client(verify=ctx, trust_env=False) as c:
        try:
            status = c.post(url).status_code
        except (httpx.TransportError, ssl.SSLError):
            status = None
    assert status in (None, 403)


# --- the shop's listener is the shared transport's: same TLS checks, same limits ----------

#: The stack's HTTPS listeners that any client may reach (the key service's and the admin
#: API's demand client certificates).
PUBLIC_LISTENERS = ["vault", "shop", "acquirer"]


def listener_url(stack: Stack, name: str) -> str:
    return stack.shop_url if name == "shop" else str(stack.info[name]["url"])


def tls_session(
    stack: Stack,
    name: str,
    *,
    group: str | None = None,
    version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3,
) -> ssl.SSLSession:
    """One request over a new connection to listener ``name``, read to the end (TLS 1.3
    tickets come after the handshake); the client's session. ``group`` makes the
    client offer that key-exchange group only."""
    port = int(listener_url(stack, name).rsplit(":", 1)[1])
    ctx = client_context(stack.info["ca_bundle"])
    ctx.maximum_version = version
    if group is not None:
        ctx.set_ecdh_curve(group)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            answer = b""
            while chunk := tls.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 ")
            session = tls.session
    assert session is not None
    return session


@pytest.mark.parametrize("name", PUBLIC_LISTENERS)
@pytest.mark.parametrize("group", ["X448", "secp521r1"])
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_every_listener_refuses_x448_and_secp521r1(
    stack: Stack, name: str, group: str, version: ssl.TLSVersion
) -> None:
    with pytest.raises(ssl.SSLError):
        tls_session(stack, name, group=group, version=version)
    # The same client with a group of the profile is served. (P-256: in TLS 1.2 the
    # offered groups also limit the certificate's curve, which is P-256.)
    tls_session(stack, name, group="prime256v1", version=version)


@pytest.mark.parametrize("name", PUBLIC_LISTENERS)
@pytest.mark.parametrize(
    "version",
    [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
)
def test_no_listener_issues_a_session_ticket(
    stack: Stack, name: str, version: ssl.TLSVersion
) -> None:
    assert not tls_session(stack, name, version=version).has_ticket


def test_the_shops_listener_is_compliant_with_mozilla_intermediate(
    stack: Stack, tmp_path: Path
) -> None:
    from test_sslyze import sslyze_binary

    port = int(stack.shop_url.rsplit(":", 1)[1])
    proc = subprocess.run(
        [
            sslyze_binary(),
            "--mozilla_config=intermediate",
            f"--certinfo_ca_file={stack.info['ca_bundle']}",
            f"--json_out={tmp_path / 'out.json'}",
            f"localhost:{port}",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK - Compliant" in proc.stdout


def test_the_shops_listener_has_the_transports_limits(stack: Stack) -> None:
    # 101 header fields: refused by the shared transport before the shop's app sees them,
    # in the transport's error format, with HSTS.
    fields = {f"x-field-{i}": "1" for i in range(101)}
    with stack.http() as http:
        assert http.get(stack.shop_url + "/healthz").status_code == 200
        r = http.get(stack.shop_url + "/healthz", headers=fields)
    assert r.status_code == 431
    assert r.headers["strict-transport-security"].startswith("max-age=63072000")
    assert r.headers["connection"] == "close"
    assert r.json()["error"]["code"] == "request_header_fields_too_large"
    # The refusal is one line of the shop's JSON log.
    log = (stack.state / "shop" / "shop.log").read_text()
    refused = [
        json.loads(line)
        for line in log.splitlines()
        if line.startswith("{") and '"request_refused"' in line
    ]
    assert [(e["limit"], e["client"], e["status"]) for e in refused] == [
        ("max_headers", "127.0.0.1", 431)
    ]


def cli(stack: Stack, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDVAULT_")}
    return subprocess.run(
        [sys.executable, "-m", "cardvault", *args, "--stack", str(stack.state / "stack.json")],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def test_the_cli_stores_a_card_read_from_stdin_and_forwards_it_with_the_stacks_keys(
    stack: Stack,
) -> None:
    created = cli(
        stack, "payment-methods", "create", "--exp-month", "12", "--exp-year", "2031",
        "--number", "-", "--cvc", "-", "--name", "Jenny Rosen", stdin=f"{VISA}\n{CVC}\n",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    assert "warning" not in created.stderr
    assert VISA not in created.stdout
    pm = json.loads(created.stdout)
    assert (pm["card"]["last4"], pm["billing_details"]["name"]) == ("4242", "Jenny Rosen")

    got = cli(stack, "payment-methods", "retrieve", pm["id"])
    assert json.loads(got.stdout)["id"] == pm["id"]
    # (Newest first, but several were made this second: their order is the ids'.)
    listed = json.loads(cli(stack, "payment-methods", "list", "--limit", "1").stdout)
    assert len(listed["data"]) == 1 and listed["has_more"] is True
    every = json.loads(cli(stack, "payment-methods", "list", "--all").stdout)
    assert pm["id"] in [p["id"] for p in every] and len(every) > 1

    # Forwarding goes to the stack's acquirer by default, with its demo body.
    fwd = cli(stack, "forwarding", "create", "--payment-method", pm["id"])
    assert fwd.returncode == 0, fwd.stderr
    forwarded = json.loads(fwd.stdout)
    assert forwarded["response_details"]["status"] == 200
    assert '"approved"' in forwarded["response_details"]["body"]
    assert VISA not in fwd.stdout
    again = json.loads(cli(stack, "forwarding", "retrieve", forwarded["id"]).stdout)
    assert again["id"] == forwarded["id"]
    listed = json.loads(cli(stack, "forwarding", "list", "--limit", "100").stdout)
    assert forwarded["id"] in [f["id"] for f in listed["data"]]

    deleted = cli(stack, "payment-methods", "delete", pm["id"], "--yes")
    assert json.loads(deleted.stdout)["deleted"] is True
    gone = cli(stack, "payment-methods", "retrieve", pm["id"])
    assert gone.returncode == 1
    assert "resource_missing" in gone.stderr


def test_the_generic_verbs_call_any_api_path_like_the_stripe_cli(stack: Stack) -> None:
    """``cardvault get|post|delete PATH -d key=value``: the number read from stdin
    (``-d card[number]=-``), answers printed as JSON, only relative API paths."""
    made = cli(
        stack, "post", "/v1/payment_methods", "-d", "type=card", "-d", "card[number]=-",
        "-d", "card[exp_month]=12", "-d", "card[exp_year]=2031", stdin=f"{VISA}\n",
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    assert "warning" not in made.stderr
    pm = json.loads(made.stdout)
    assert pm["card"]["last4"] == "4242"
    got = cli(stack, "get", f"/v1/payment_methods/{pm['id']}")
    assert json.loads(got.stdout)["id"] == pm["id"]
    page = json.loads(cli(stack, "get", "/v1/payment_methods", "-d", "limit=1").stdout)
    assert page["object"] == "list" and len(page["data"]) == 1
    # A card number typed on the command line works, with the shell-history warning.
    typed = cli(
        stack, "post", "/v1/payment_methods", "-d", "type=card", "-d", f"card[number]={VISA}",
        "-d", "card[exp_month]=12", "-d", "card[exp_year]=2031",
    )  # fmt: skip
    assert typed.returncode == 0, typed.stderr
    assert "shell history" in typed.stderr
    gone = json.loads(cli(stack, "delete", f"/v1/payment_methods/{pm['id']}").stdout)
    assert gone["deleted"] is True
    missing = cli(stack, "get", f"/v1/payment_methods/{pm['id']}")
    assert missing.returncode == 1
    assert "resource_missing" in missing.stderr
    # Never a URL (the API key would go with it), never outside /v1/.
    for path in ("https://example.com/v1/payment_methods", "/healthz", "v1/payment_methods"):
        refused = cli(stack, "get", path)
        assert refused.returncode == 2, path
        assert "API path" in refused.stderr


def in_stack_dir(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    """``cardvault ARGS`` run where ``cardvault up`` was (the stack file at
    ``.cardvault/stack.json``), with no option naming a stack, a config or a URL."""
    workdir = stack.state.parent / "operator"
    (workdir / ".cardvault").mkdir(parents=True, exist_ok=True)
    link = workdir / ".cardvault" / "stack.json"
    if not link.exists():
        link.symlink_to(stack.state / "stack.json")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CARDVAULT_")}
    return subprocess.run(
        [sys.executable, "-m", "cardvault", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
        cwd=workdir,
    )


def test_administration_finds_the_running_stack_by_itself(stack: Stack) -> None:
    # Accounts and keys go through the vault's administration, with the stack's vault
    # settings; nothing names a config.
    made = in_stack_dir(stack, "accounts", "create", "--name", "found")
    assert made.returncode == 0, made.stderr
    account = re.search(r"^account\s+(acct_\w+)$", made.stdout, re.M)
    secret = re.search(r"^secret \(test\)\s+(sk_test_\w+)$", made.stdout, re.M)
    assert account and secret, made.stdout
    key = in_stack_dir(stack, "api-keys", "create", "--account", account.group(1))
    assert key.returncode == 0, key.stderr
    key_id = key.stdout.split()[0]
    assert in_stack_dir(stack, "api-keys", "revoke", key_id).returncode == 0
    origins = in_stack_dir(
        stack, "accounts", "set-origins", account.group(1), "--origin", "https://found.example"
    )
    assert origins.returncode == 0, origins.stderr
    # The new key works against the running vault.
    with Client(
        secret.group(1), base_url=stack.info["vault"]["url"], ca_bundle=stack.info["ca_bundle"]
    ) as vault:
        assert vault.payment_methods.list()["object"] == "list"
    # The key service's status through its admin identity; every zone's audit log; and
    # the stack's files for card data.
    status = in_stack_dir(stack, "keyservice", "status")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["sealed"] is False
    verified = in_stack_dir(stack, "audit", "verify")
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "vault" in verified.stdout and "keyservice" in verified.stdout
    scanned = in_stack_dir(stack, "scan", "--ignore", "*.log")
    assert scanned.returncode == 0, scanned.stdout + scanned.stderr
    # The operator's actions are in the vault's administration log.
    admin_log = stack.state / "vault-admin" / "audit.jsonl"
    actions = [json.loads(line)["action"] for line in admin_log.read_text().splitlines()]
    assert {"account.created", "api_key.created", "api_key.revoked", "account.origins_set"} <= set(
        actions
    )


def test_the_cli_warns_about_a_card_number_on_the_command_line(stack: Stack) -> None:
    r = cli(
        stack, "payment-methods", "create", "--exp-month", "12", "--exp-year", "2031",
        "--number", MASTERCARD, "--publishable",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "shell history" in r.stderr
    assert MASTERCARD not in r.stdout + r.stderr
    assert json.loads(r.stdout)["card"]["last4"] == "4444"


def test_the_cli_reports_errors_without_echoing_input(stack: Stack) -> None:
    bad = cli(stack, "payment-methods", "retrieve", f"{VISA}/../x")
    assert bad.returncode == 2
    assert VISA not in bad.stderr
    declined = cli(
        stack, "payment-methods", "create", "--exp-month", "12", "--exp-year", "2031",
        stdin="4242424242424241\n",  # the Visa test card with its check digit changed
    )  # fmt: skip
    assert declined.returncode == 1
    assert "4242424242424241" not in declined.stdout + declined.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "cardvault", "payment-methods", "list", "--stack", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 2
    assert "cardvault up" in missing.stderr


def test_stopping_up_stops_the_shop_and_leaves_no_process_behind(stack: Stack) -> None:
    children = stack.children
    assert all(alive(pid) for pid in children)
    stack.proc.send_signal(signal.SIGINT)
    assert stack.proc.wait(30) == 0
    assert not (stack.state / "stack.json").exists()
    deadline = time.monotonic() + 5
    while [pid for pid in children if alive(pid)] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [pid for pid in children if alive(pid)] == []
    with pytest.raises(httpx.TransportError), stack.http() as http:
        http.get(stack.shop_url + "/healthz", timeout=2)
