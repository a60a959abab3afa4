"""Events and webhooks with real processes: the vault and the key service, and a
receiving HTTPS endpoint (a small server in this test, with a certificate of the test
CA) that verifies what it gets with the official ``stripe`` library."""

from __future__ import annotations

import contextlib
import json
import signal
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import stripe

from cardvault.transport.tls import client_context
from helpers import Pki, free_port
from hostile.hostile_support import card_numbers_in
from stack import Stack, run_stack, tokenize, vault_database, wait_until


@dataclass
class Received:
    body: bytes
    signature: str
    status: int


@dataclass
class Receiver:
    """An HTTPS endpoint that answers the next of ``statuses`` (then the last one)."""

    port: int
    statuses: list[int] = field(default_factory=lambda: [200])
    received: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}/hooks/cardvault"

    def answer(self) -> int:
        with self.lock:
            n = len(self.received)
            return self.statuses[min(n, len(self.statuses) - 1)]


@contextlib.contextmanager
def receiver(pki: Pki) -> Iterator[Receiver]:
    state = Receiver(free_port())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            status = state.answer()
            with state.lock:
                state.received.append(Received(body, self.headers["stripe-signature"], status))
            self.send_response(status)
            self.send_header("content-length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *_args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", state.port), Handler)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*map(str, pki.cert("vault")))
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> Iterator[Stack]:
    webhooks = (
        "[webhooks]\n"
        'allowed_hosts = ["localhost"]\n'
        f'ca_file = "{pki.ca_file}"\n'
        "retry_base_seconds = 0.5\nretry_max_seconds = 2.0\npoll_interval = 0.1\ntimeout = 5.0\n"
    )
    with vault_database(request.param, tmp_path_factory.mktemp("db")) as dsn:
        yield from run_stack(tmp_path_factory, pki, request.param, dsn, vault_toml=webhooks)


@pytest.fixture(scope="module")
def http(pki: Pki) -> Iterator[httpx.Client]:
    with httpx.Client(verify=client_context(pki.ca_file), trust_env=False, timeout=15) as c:
        yield c


def api(http: httpx.Client, stack: Stack, method: str, path: str, **kw: object) -> httpx.Response:
    key = stack.accounts[1]["sk"]
    return http.request(method, stack.url + path, auth=(key, ""), **kw)  # type: ignore[arg-type]


@contextlib.contextmanager
def endpoint(http: httpx.Client, stack: Stack, url: str) -> Iterator[dict[str, object]]:
    r = api(
        http,
        stack,
        "POST",
        "/v1/webhook_endpoints",
        data={"url": url, "enabled_events[]": "payment_method.created"},
    )
    assert r.status_code == 200, r.text
    created = r.json()
    try:
        yield created
    finally:
        api(http, stack, "DELETE", f"/v1/webhook_endpoints/{created['id']}")


def test_an_endpoint_failing_three_times_gets_the_event_once_on_the_fourth_attempt(
    http: httpx.Client, stack: Stack, pki: Pki
) -> None:
    with receiver(pki) as rx, endpoint(http, stack, rx.url) as we:
        rx.statuses = [500, 500, 500, 200]
        secret = str(we["secret"])
        assert secret.startswith("whsec_")
        shown = api(http, stack, "GET", f"/v1/webhook_endpoints/{we['id']}").json()
        assert "secret" not in shown and shown["url"] == rx.url
        pm_id = tokenize(http, stack)

        wait_until(lambda: any(r.status == 200 for r in rx.received))
        time.sleep(1.5)  # nothing more comes once it has succeeded
        assert [r.status for r in rx.received] == [500, 500, 500, 200]
        assert len({r.body for r in rx.received}) == 1

        last = rx.received[-1]
        event = stripe.Webhook.construct_event(last.body.decode(), last.signature, secret)
        assert event.type == "payment_method.created"
        assert event.data.object.id == pm_id
        assert event.data.object.billing_details.name == "Jenny Rosen"
        assert event.data.object.card.last4 == "4242"
        tampered = last.body.replace(b"4242", b"4243").decode()
        with pytest.raises(stripe.SignatureVerificationError):
            stripe.Webhook.construct_event(tampered, last.signature, secret)
        with pytest.raises(stripe.SignatureVerificationError):
            stripe.Webhook.construct_event(last.body.decode(), last.signature, "whsec_other")

        deliveries = api(http, stack, "GET", f"/v1/webhook_endpoints/{we['id']}/deliveries")
        [delivery] = deliveries.json()["data"]
        assert delivery["status"] == "succeeded"
        assert delivery["attempts"] == 4 and delivery["event"] == event.id

        listed = api(http, stack, "GET", "/v1/events", params={"type": "payment_method.*"})
        assert event.id in [e["id"] for e in listed.json()["data"]]
        one = api(http, stack, "GET", f"/v1/events/{event.id}").json()
        assert one["object"] == "event" and one["data"]["object"]["id"] == pm_id

        seen = [r.body.decode() for r in rx.received] + [
            deliveries.text,
            listed.text,
            json.dumps(one),
        ]
        assert all(card_numbers_in(text) == [] for text in seen)
    assert card_numbers_in(stack.vault_log.read_text(errors="replace")) == []


def test_a_vault_restarted_mid_retry_still_delivers(
    http: httpx.Client, stack: Stack, pki: Pki
) -> None:
    with receiver(pki) as rx, endpoint(http, stack, rx.url) as we:
        rx.statuses = [503]
        tokenize(http, stack)
        wait_until(lambda: len(rx.received) >= 1)
        assert stack.stop("vault", signal.SIGKILL) == -9
        rx.statuses = [503] * len(rx.received) + [200]
        stack.start("vault")
        wait_until(lambda: any(r.status == 200 for r in rx.received), timeout=30)
        event = stripe.Webhook.construct_event(
            rx.received[-1].body.decode(), rx.received[-1].signature, str(we["secret"])
        )
        assert event.type == "payment_method.created"


def test_deletes_and_their_events_are_listed_and_filtered(http: httpx.Client, stack: Stack) -> None:
    pm_id = tokenize(http, stack)
    assert api(http, stack, "DELETE", f"/v1/payment_methods/{pm_id}").status_code == 200
    r = api(http, stack, "GET", "/v1/events", params={"type": "payment_method.deleted", "limit": 1})
    [event] = r.json()["data"]
    assert event["data"]["object"]["id"] == pm_id
    assert event["livemode"] is False and event["api_version"]
    # Another account's secret key sees none of it; a publishable key may not list.
    other = http.get(f"{stack.url}/v1/events/{event['id']}", auth=(stack.accounts[0]["sk"], ""))
    assert other.status_code == 404
    pk = http.get(f"{stack.url}/v1/events", auth=(stack.accounts[1]["pk"], ""))
    assert pk.status_code == 403


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost/hooks",
        "https://127.0.0.1/hooks",
        "https://[::1]/hooks",
        "https://10.0.0.1/hooks",
        "https://user@example.com/hooks",
    ],
)
def test_a_webhook_url_that_is_not_https_to_a_name_is_refused(
    http: httpx.Client, stack: Stack, url: str
) -> None:
    r = api(
        http,
        stack,
        "POST",
        "/v1/webhook_endpoints",
        data={"url": url, "enabled_events[]": "*"},
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "url"
    assert json.dumps(r.json()).count("whsec_") == 0
