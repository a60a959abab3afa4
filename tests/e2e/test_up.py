"""`cardvault up`, the README's run command: the local stack in one command."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from cardvault.client import Client
from cardvault.transport.tls import client_context
from helpers import free_ports


def wait_for(path: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"cardvault up exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError("stack.json did not appear")
        time.sleep(0.1)


def pids_of_children(pid: int) -> list[int]:
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


@pytest.mark.slow
def test_up_runs_the_stack_and_stops_it_cleanly(tmp_path: Path) -> None:
    state = tmp_path / "state"
    names = ("vault", "redirect", "keyservice", "admin", "acquirer", "shop")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    args = [
        sys.executable, "-m", "cardvault", "up", "--state", str(state),
        "--vault-port", str(ports["vault"]), "--redirect-port", str(ports["redirect"]),
        "--keyservice-port", str(ports["keyservice"]), "--admin-port", str(ports["admin"]),
        "--acquirer-port", str(ports["acquirer"]), "--shop-port", str(ports["shop"]),
    ]  # fmt: skip
    log = (tmp_path / "up.log").open("wb")
    proc = subprocess.Popen(args, stdout=log, stderr=log)
    try:
        wait_for(state / "stack.json", proc)
        stack = json.loads((state / "stack.json").read_text())
        children = pids_of_children(proc.pid)
        assert len(children) == 4  # key service, vault, simulated acquirer, example shop
        assert stack["shop"]["url"] == f"https://localhost:{ports['shop']}"
        assert (
            stack["acquirer"]["forward_url"]
            == f"https://localhost:{ports['acquirer']}/v1/authorizations"
        )

        # Every zone's files are private to it.
        for path in state.rglob("*"):
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode & 0o077 == 0, f"{path} is readable by others ({oct(mode)})"
        # No credential appears in two zones.
        keys = {p.read_bytes() for p in state.rglob("*.key")}
        assert len(keys) == len(list(state.rglob("*.key")))

        with Client(
            stack["keys"]["secret"], base_url=stack["vault"]["url"], ca_bundle=stack["ca_bundle"]
        ) as vault:
            pm = vault.post(
                "/v1/payment_methods",
                {"type": "card", "card[number]": "4242424242424242", "card[exp_month]": "12",
                 "card[exp_year]": "2031", "card[cvc]": "314"},
            )  # fmt: skip
            assert pm["card"]["last4"] == "4242"
            fwd = vault.post(
                "/v1/forwarding/requests",
                {
                    "payment_method": pm["id"],
                    "url": stack["acquirer"]["forward_url"],
                    "replacements[0]": "card_number",
                    "replacements[1]": "card_expiry",
                    "replacements[2]": "card_cvc",
                    "request[headers][0][name]": "Content-Type",
                    "request[headers][0][value]": "application/json",
                    "request[body]": '{"amount": 1000, "currency": "usd", "card": {}}',
                },
            )
            assert fwd["response_details"]["status"] == 200
            assert '"approved"' in fwd["response_details"]["body"]
        received = Path(stack["acquirer"]["state"]) / "received.jsonl"
        assert "4242424242424242" in received.read_text()  # the acquirer got the real card

        # The shop's certificate is refused by the key service.
        shop = stack["identities"]["shop"]
        ctx = client_context(stack["ca_bundle"], client_cert=(shop["cert"], shop["key"]))
        with httpx.Client(verify=ctx, trust_env=False) as c:
            r = c.post(f"{stack['keyservice']['url']}/v1/keys/pan/datakey")
        assert r.status_code == 403

        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert not (state / "stack.json").exists()
        time.sleep(0.5)
        assert [pid for pid in children if alive(pid)] == []
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()

    # A second run reuses the state: same CA, same demo keys.
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(state / "stack.json", proc)
        again = json.loads((state / "stack.json").read_text())
        assert again["keys"] == stack["keys"]
        # The shop's origin is still allowed to frame the card element.
        with httpx.Client(verify=client_context(again["ca_bundle"]), trust_env=False) as c:
            frame = c.get(
                again["vault"]["url"] + "/element/v1/card.html",
                params={"key": again["keys"]["publishable"], "origin": again["shop"]["url"]},
                headers={"sec-fetch-dest": "iframe"},
            )
        assert frame.status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def _up_refused(state: Path, *ports: str) -> subprocess.CompletedProcess[str]:
    """``cardvault up`` with these port options, expected to stop before it starts."""
    return subprocess.run(
        [sys.executable, "-m", "cardvault", "up", "--state", str(state), *ports],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_up_reports_a_port_in_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = _up_refused(tmp_path, "--vault-port", str(port))
    assert r.returncode == 1
    assert f"port {port} is in use" in r.stderr


def test_up_refuses_one_port_for_two_services(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    r = _up_refused(tmp_path, "--vault-port", str(port), "--acquirer-port", str(port))
    assert r.returncode == 2
    assert f"port {port} given to more than one service" in r.stderr
    assert not (tmp_path / "stack.json").exists()
