"""``cardvault listen`` without processes: where events may be forwarded, the event
filter, the kept signing secret, and the one signer it shares with the vault."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import stripe
import typer

from cardvault.cli.listen import event_filters, forward_target, signing_secret, wanted
from cardvault.crypto.webhook import new_webhook_secret, sign_webhook
from cardvault.vault.webhooks import sign


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("https://hooks.example.com/in", "https://hooks.example.com/in"),
        ("https://localhost:4242/in?x=1", "https://localhost:4242/in?x=1"),
        ("http://localhost:4242/webhook", "http://localhost:4242/webhook"),
        ("http://127.0.0.1:4242/webhook", "http://127.0.0.1:4242/webhook"),
        ("http://127.9.9.9/webhook", "http://127.9.9.9/webhook"),
        ("http://[::1]:4242/webhook", "http://[::1]:4242/webhook"),
        # As Stripe's CLI: no scheme is http://, which must then be loopback.
        ("localhost:4242/webhook", "http://localhost:4242/webhook"),
        ("http://localhost:4242/webhook#part", "http://localhost:4242/webhook"),
    ],
)
def test_forward_target_takes_https_or_loopback_http(given: str, used: str) -> None:
    assert forward_target(given).url == used


@pytest.mark.parametrize(
    "url",
    [
        "http://example.com/hooks",
        "http://10.0.0.1/hooks",
        "http://[fe80::1]/hooks",
        "http://0.0.0.0:4242/hooks",
        "http://localhost.example.com/hooks",
        "example.com/hooks",
        "ftp://localhost/hooks",
        "file:///etc/passwd",
        "https://user:pw@hooks.example.com/in",
        "https://hooks.example.com:99999/in",
        "https:///in",
        "https://hooks.example.com/in put",
        "https://hooks.example.com/\r\nX-Evil: 1",
        "https://hooks.example.com/" + "a" * 2100,
    ],
)
def test_forward_target_refuses_what_is_neither(url: str) -> None:
    with pytest.raises(ValueError, match="--forward-to"):
        forward_target(url)


def test_event_filters_take_types_prefixes_and_star() -> None:
    assert event_filters(None) == ["*"]
    assert event_filters("payment_method.created, forwarding.*") == [
        "payment_method.created",
        "forwarding.*",
    ]
    for bad in ("", ",", "Payment.Created", "payment_method.", "a.*.b", "x" * 101, "a," * 60):
        with pytest.raises(ValueError, match="--events"):
            event_filters(bad)


def test_wanted_matches_a_type_a_prefix_or_everything() -> None:
    assert wanted("payment_method.created", ["*"])
    assert wanted("payment_method.created", ["payment_method.*"])
    assert wanted("forwarding.request.failed", ["forwarding.*"])
    assert wanted("payment_method.deleted", ["key.rotated", "payment_method.deleted"])
    assert not wanted("payment_method.created", ["payment_method.deleted"])
    assert not wanted("payment_methods.created", ["payment_method.*"])


def test_the_signing_secret_is_made_once_private_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "config" / "listen.json"
    first = signing_secret(path)
    assert first.startswith("whsec_") and len(first) > 40
    assert path.stat().st_mode & 0o777 == 0o600
    assert signing_secret(path) == first
    assert json.loads(path.read_text()) == {"secret": first}


def test_a_signing_secret_file_others_can_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "listen.json"
    signing_secret(path)
    path.chmod(0o644)
    with pytest.raises(typer.Exit):
        signing_secret(path)


def test_the_vault_and_listen_sign_with_the_same_function() -> None:
    # One signer: what the vault's delivery sends and what listen sends verify alike.
    assert sign is sign_webhook
    secret = new_webhook_secret()
    assert secret != new_webhook_secret()
    body = b'{"id": "evt_1", "object": "event", "type": "payment_method.created"}'
    header = sign_webhook(body, secret, int(time.time()))
    assert stripe.Webhook.construct_event(body.decode(), header, secret).id == "evt_1"
