"""``cardvault logs tail`` with real processes: the vault's request log followed over its
admin API (mutual TLS, the admin identity), filtered by the vault, scrubbed: a request
carrying a card number in a header, its query and its path shows none in tail's output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from cardvault.transport.tls import client_context
from helpers import Pki, free_port, wait_for_port
from hostile.hostile_support import card_numbers_in
from stack import Stack, run_stack, vault_database

VISA = "4242424242424242"
MASTERCARD = "5555555555554444"


@pytest.fixture(scope="module")
def admin_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pki: Pki, admin_port: int) -> Iterator[Stack]:
    admin = (
        f'[admin]\nport = {admin_port}\nclient_ca_file = "{pki.ca_file}"\n'
        'allowed_identities = ["admin"]\n'
    )
    with vault_database("sqlite", tmp_path_factory.mktemp("db")) as dsn:
        for stack in run_stack(tmp_path_factory, pki, "sqlite", dsn, vault_toml=admin):
            wait_for_port(admin_port, stack.processes["vault"])
            yield stack


@pytest.fixture(scope="module")
def env(pki: Pki, admin_port: int) -> dict[str, str]:
    """The CLI's environment: the admin API and identity named, no stack file."""
    cert, key = pki.cert("admin")
    env = {
        **os.environ,
        "CARDVAULT_VAULT_ADMIN_URL": f"https://localhost:{admin_port}",
        "CARDVAULT_CA_BUNDLE": str(pki.ca_file),
        "CARDVAULT_ADMIN_CERT": str(cert),
        "CARDVAULT_ADMIN_KEY": str(key),
    }
    env.pop("CARDVAULT_STACK", None)
    return env


@pytest.fixture(scope="module")
def http(pki: Pki) -> Iterator[httpx.Client]:
    with httpx.Client(verify=client_context(pki.ca_file), trust_env=False, timeout=15) as c:
        yield c


def start_tail(env: dict[str, str], cwd: Path, *args: str) -> subprocess.Popen[str]:
    """``cardvault logs tail ARGS``, returned once it says it is ready."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cardvault", "logs", "tail", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
    )
    assert proc.stderr is not None
    first = proc.stderr.readline()
    if "Ready" not in first:
        proc.kill()
        rest = proc.communicate(timeout=30)[1]
        raise AssertionError(f"tail did not start: {first}{rest}")
    return proc


def finish(proc: subprocess.Popen[str]) -> tuple[str, str]:
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return out, err


def test_tail_shows_each_request_scrubbed_with_its_request_id(
    stack: Stack, env: dict[str, str], http: httpx.Client, tmp_path: Path
) -> None:
    sk = stack.accounts[1]["sk"]
    tail = start_tail(env, tmp_path, "--json", "--max-lines", "3")
    # A card number in a header, the query and the path of one request...
    probe = http.get(
        f"{stack.url}/v1/payment_methods/{VISA}",
        params={"card[number]": VISA, "q": MASTERCARD},
        headers={"Authorization": f"Bearer {sk}", "X-Card": VISA},
    )
    assert probe.status_code == 404
    # ... in the body of another, and a third that fails.
    card = {
        "type": "card",
        "card[number]": MASTERCARD,
        "card[exp_month]": "12",
        "card[exp_year]": "2034",
        "card[cvc]": "123",
    }
    stored = http.post(f"{stack.url}/v1/payment_methods", data=card, auth=(sk, ""))
    assert stored.status_code == 200, stored.text
    refused = http.get(f"{stack.url}/v1/payment_methods", auth=("sk_test_nope", ""))
    assert refused.status_code == 401
    out, err = finish(tail)
    assert tail.returncode == 0, err

    lines = [json.loads(line) for line in out.splitlines()]
    assert [(x["method"], x["status"], x["request_id"]) for x in lines] == [
        ("GET", 404, probe.headers["request-id"]),
        ("POST", 200, stored.headers["request-id"]),
        ("GET", 401, refused.headers["request-id"]),
    ]
    assert lines[0]["path"] == "/v1/payment_methods/[REDACTED CARD NUMBER]"
    assert all(isinstance(x["duration_ms"], int | float) for x in lines)
    assert card_numbers_in(out + err) == []
    # The vault's own log holds the same lines, as scrubbed.
    assert card_numbers_in(stack.vault_log.read_text(errors="replace")) == []


def test_tail_filters_on_the_vault_and_prints_one_line_per_request(
    stack: Stack, env: dict[str, str], http: httpx.Client, tmp_path: Path
) -> None:
    sk = stack.accounts[1]["sk"]
    tail = start_tail(
        env,
        tmp_path,
        "--filter-status",
        "4XX",
        "--filter-method",
        "GET",
        "--filter-path",
        "/v1/payment_methods/*",
        "--max-lines",
        "1",
    )
    ok = http.get(f"{stack.url}/v1/payment_methods", auth=(sk, ""))
    deleted = http.delete(f"{stack.url}/v1/payment_methods/pm_nothing", auth=(sk, ""))
    missing = http.get(f"{stack.url}/v1/payment_methods/pm_nothing", auth=(sk, ""))
    assert (ok.status_code, deleted.status_code, missing.status_code) == (200, 404, 404)
    out, err = finish(tail)
    assert tail.returncode == 0, err
    [line] = out.splitlines()
    assert "[404] GET /v1/payment_methods/pm_nothing" in line
    assert f"[{missing.headers['request-id']}]" in line and line.endswith("ms")

    by_id = start_tail(
        env, tmp_path, "--filter-request-id", ok.headers["request-id"], "--max-lines", "1"
    )
    # A line already held is not shown again: tail shows what comes after it starts.
    again = http.get(f"{stack.url}/v1/payment_methods", auth=(sk, ""))
    http.get(f"{stack.url}/v1/payment_methods", auth=(sk, ""))
    by_id.terminate()
    out, _err = by_id.communicate(timeout=30)
    assert again.headers["request-id"] not in out and ok.headers["request-id"] not in out


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--filter-status", "6XX"),
        ("--filter-method", "BREW"),
        ("--filter-path", "no-slash"),
        ("--filter-request-id", VISA),
    ],
)
def test_tail_refuses_a_bad_filter_with_the_vaults_error(
    stack: Stack, env: dict[str, str], tmp_path: Path, option: str, value: str
) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "cardvault", "logs", "tail", option, value],
        capture_output=True, text=True, timeout=60, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 1
    assert "vault: parameter_invalid" in r.stderr
    assert card_numbers_in(r.stdout + r.stderr) == []


def test_the_request_log_is_the_admin_apis_alone_and_bounded(
    stack: Stack, pki: Pki, admin_port: int
) -> None:
    url = f"https://localhost:{admin_port}/v1/admin/request_log"
    admin = client_context(pki.ca_file, client_cert=pki.cert("admin"))
    with httpx.Client(verify=admin, trust_env=False, timeout=15) as c:
        for params in ({"limit": "100000"}, {"wait": "3600"}, {"after": "x" * 5000}):
            r = c.get(url, params=params)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert error["param"] == next(iter(params))
        r = c.get(url, params={"wait": "0"})
        assert r.status_code == 200
        assert r.json()["object"] == "list" and r.json()["cursor"].startswith("rl_")
    # Another identity of the same CA: refused.
    other = client_context(pki.ca_file, client_cert=pki.cert("shop"))
    with httpx.Client(verify=other, trust_env=False, timeout=15) as c:
        assert c.get(url, params={"wait": "0"}).status_code == 403
    # The public listener does not serve it.
    with httpx.Client(verify=client_context(pki.ca_file), trust_env=False, timeout=15) as c:
        assert c.get(f"{stack.url}/v1/admin/request_log").status_code == 404
