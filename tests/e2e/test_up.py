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
from cardvault.transport.certs import load_ca
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

    # The vault's certificate five days from its end: the next start renews it.
    ca = load_ca(state / "ca")
    vault_pem = state / "vault" / "vault.pem"
    assert ca.renew_if_due(vault_pem, within_days=10_000, days=5) is not None
    old_vault_key = (state / "vault" / "vault.key").read_bytes()

    # A second run reuses the state: same CA, same demo keys.
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(state / "stack.json", proc)
        again = json.loads((state / "stack.json").read_text())
        assert again["keys"] == stack["keys"]
        assert (state / "vault" / "vault.key").read_bytes() != old_vault_key
        # Every listener of the stack, audited from outside: compliant, the renewed
        # certificate with its full lifetime ahead.
        r = subprocess.run(
            [sys.executable, "-m", "cardvault", "doctor", "tls", "--json",
             "--stack", str(state / "stack.json")],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
        audit = json.loads(r.stdout)
        assert audit["compliant"] is True
        by_name = {e["endpoint"]["name"]: e for e in audit["endpoints"]}
        assert set(by_name) >= {"vault", "vault admin", "key service", "shop", "acquirer"}
        assert by_name["vault"]["certificate"]["days_left"] > 80
        assert all(e["certificate"]["accepted_ca"] for e in audit["endpoints"])
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


# --- supervision ---------------------------------------------------------------------


def up_args(state: Path, ports: dict[str, int], *more: str) -> list[str]:
    return [
        sys.executable, "-m", "cardvault", "up", "--state", str(state),
        "--vault-port", str(ports["vault"]), "--redirect-port", str(ports["redirect"]),
        "--keyservice-port", str(ports["keyservice"]), "--admin-port", str(ports["admin"]),
        "--acquirer-port", str(ports["acquirer"]), "--shop-port", str(ports["shop"]), *more,
    ]  # fmt: skip


def some_ports() -> dict[str, int]:
    names = ("vault", "redirect", "keyservice", "admin", "acquirer", "shop")
    return dict(zip(names, free_ports(len(names)), strict=True))


def read_stack(state: Path) -> dict[str, object]:
    stack: dict[str, object] = json.loads((state / "stack.json").read_text())
    return stack


def eventually(check: object, timeout: float = 60, every: float = 0.2) -> object:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()  # type: ignore[operator]
        except Exception:  # not yet: the process is starting, the file being replaced
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("not within the time allowed")
        time.sleep(every)


@pytest.mark.slow
def test_up_restarts_a_killed_vault_and_kills_a_stuck_child_on_ctrl_c(tmp_path: Path) -> None:
    state = tmp_path / "state"
    out_path = tmp_path / "up.log"
    with out_path.open("wb") as out:
        proc = subprocess.Popen(
            up_args(state, some_ports(), "--stop-grace", "2"), stdout=out, stderr=out
        )
    try:
        wait_for(state / "stack.json", proc)
        before = read_stack(state)
        vault = before["vault"]
        assert isinstance(vault, dict) and vault["restarts"] == 0
        os.kill(vault["pid"], signal.SIGKILL)  # as the OOM killer does

        def restarted() -> dict[str, object] | None:
            now = read_stack(state)["vault"]
            assert isinstance(now, dict)
            return now if now["restarts"] == 1 and now["pid"] != vault["pid"] else None

        again = eventually(restarted)
        assert isinstance(again, dict)
        assert "SIGKILL" in str(again["last_exit"])
        keys = before["keys"]
        assert isinstance(keys, dict)

        def tokenizes() -> bool:
            with Client(
                keys["secret"], base_url=vault["url"], ca_bundle=before["ca_bundle"], max_retries=0
            ) as client:
                pm = client.post(
                    "/v1/payment_methods",
                    {"type": "card", "card[number]": "4242424242424242",
                     "card[exp_month]": "12", "card[exp_year]": "2031"},
                )  # fmt: skip
            return bool(pm["card"]["last4"] == "4242")

        eventually(tokenizes)  # the vault answers again
        said = out_path.read_text()
        assert "vault was killed by SIGKILL" in said and "vault restarted" in said

        # A child that cannot act on SIGTERM (stopped) is killed after the grace period.
        stuck = again["pid"]
        assert isinstance(stuck, int)
        os.kill(stuck, signal.SIGSTOP)
        children = pids_of_children(proc.pid)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert 2 <= time.monotonic() - started < 20
        time.sleep(0.5)
        assert not alive(stuck)
        assert [pid for pid in children if alive(pid)] == []
        assert "vault did not stop within 2 s of SIGTERM: killed" in out_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_up_gives_up_on_a_vault_that_keeps_failing_to_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    out_path = tmp_path / "up.log"
    with out_path.open("wb") as out:
        proc = subprocess.Popen(
            up_args(state, some_ports(), "--restarts", "2"), stdout=out, stderr=out
        )
    try:
        wait_for(state / "stack.json", proc)
        vault = read_stack(state)["vault"]
        assert isinstance(vault, dict)
        children = pids_of_children(proc.pid)
        # A byte of the vault's audit log flipped (in place): each start refuses it.
        log = state / "vault" / "audit.jsonl"
        with log.open("r+b") as fh:
            fh.seek(40)
            byte = fh.read(1)
            fh.seek(40)
            fh.write(bytes([byte[0] ^ 0x01]))
        os.kill(vault["pid"], signal.SIGKILL)
        assert proc.wait(60) == 1
        said = " ".join(out_path.read_text().split())
        assert "vault exited with status 2" in said
        assert "crash-looping, so up gives up and stops the stack" in said
        assert not (state / "stack.json").exists()
        time.sleep(0.5)
        assert [pid for pid in children if alive(pid)] == []
        refused = " ".join((state / "vault" / "vault.log").read_text().split())
        assert "cardvault audit repair" in refused
    finally:
        if proc.poll() is None:
            proc.kill()


def _child(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path: Path) -> None:
    from cardvault.cli.up import _Stack

    ready = tmp_path / "ready"
    stack = _Stack(tmp_path)
    proc = stack.start(
        "stubborn",
        _child(
            "import signal, time, pathlib\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            f"pathlib.Path({str(ready)!r}).touch()\n"
            "time.sleep(120)\n"
        ),
        str(tmp_path / "stubborn.log"),
    )
    eventually(ready.exists, timeout=20, every=0.05)
    started = time.monotonic()
    stack.shutdown(grace=1.0)
    took = time.monotonic() - started
    assert 1.0 <= took < 5
    assert proc.returncode == -signal.SIGKILL


def test_a_crash_loop_stops_after_the_restarts_allowed(tmp_path: Path) -> None:
    from cardvault.cli.up import _Stack

    changes: list[int] = []
    stack = _Stack(tmp_path, restarts=3, on_change=lambda: changes.append(1))
    stack.start("crasher", _child("import sys; sys.exit(3)"), str(tmp_path / "crasher.log"))
    started = time.monotonic()
    stack.watch(every=0.05)  # returns once it gives up
    assert time.monotonic() - started < 20
    (child,) = stack.children
    assert stack.gave_up is child
    assert child.restarts == 3 and len(changes) == 3
    assert child.last_exit == "exited with status 3"
    stack.shutdown(grace=1.0)


def test_a_child_that_exits_once_is_restarted_and_runs_on(tmp_path: Path) -> None:
    import threading

    from cardvault.cli.up import _Stack

    marker = tmp_path / "ran-once"
    stack = _Stack(tmp_path)
    stack.start(
        "flaky",
        _child(
            "import pathlib, sys, time\n"
            f"marker = pathlib.Path({str(marker)!r})\n"
            "if not marker.exists():\n"
            "    marker.touch()\n"
            "    sys.exit(74)\n"
            "time.sleep(120)\n"
        ),
        str(tmp_path / "flaky.log"),
    )
    watcher = threading.Thread(target=stack.watch, kwargs={"every": 0.05})
    watcher.start()
    try:
        (child,) = stack.children
        eventually(lambda: child.restarts == 1 and child.proc.poll() is None, timeout=20)
        time.sleep(0.5)
        assert child.restarts == 1 and child.proc.poll() is None
        assert child.last_exit == "exited with status 74 (its audit log failed)"
        assert stack.gave_up is None
    finally:
        stack.stopping = True
        watcher.join(10)
        stack.shutdown(grace=2.0)


@pytest.mark.slow
def test_no_child_outlives_an_up_that_is_killed(tmp_path: Path) -> None:
    # Before: the children ran in sessions of their own and nothing tied them to up, so
    # an up killed outright (SIGKILL: no Ctrl-C handler runs) left the whole stack
    # running, holding its ports and its logs.
    state = tmp_path / "state"
    proc = subprocess.Popen(
        up_args(state, some_ports()), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_for(state / "stack.json", proc)
        children = pids_of_children(proc.pid)
        assert len(children) >= 2  # the key service and the vault at least
        proc.kill()
        proc.wait(10)
        eventually(lambda: not any(alive(pid) for pid in children), timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        for pid in pids_of_children(proc.pid):
            os.kill(pid, signal.SIGKILL)
