"""Slow, idle, huge and many connections against the real vault (issue 17, item 3).

Before: a TLS connection that never sent a request, or a head trickled a byte per ten
seconds, was still open after 150 s; one 64 MiB header was answered 200; there was no
connection cap. The vault here runs with short timeouts (``[server.limits]``) so that
the suite waits seconds, not minutes; the only timed assertions are generous upper
bounds on the timeout under test. The transport's own tests
(tests/unit/transport/test_limits.py) cover every limit on bare listeners.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest
from hostile_support import OPEN_LIMITS, card_numbers_in, vault_rss_mib

from cardvault.transport.tls import client_context
from helpers import Pki
from stack import Stack, run_stack, vault_database

SHORT_LIMITS = (
    "[server.limits]\n"
    "first_byte_timeout = 1.0\nhead_timeout = 1.5\nrequest_timeout = 3.0\n"
    "keep_alive_timeout = 1.0\nmax_connections_per_client = 6\n"
)
#: A generous bound on a timeout of about a second (a loaded CI machine is slow).
WITHIN = 12.0


@pytest.fixture(scope="module")
def slow_vault(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Stack]:
    with vault_database("sqlite", tmp_path_factory.mktemp("conn-db")) as dsn:
        yield from run_stack(
            tmp_path_factory, pki, "sqlite", dsn, limits=OPEN_LIMITS, vault_toml=SHORT_LIMITS
        )


@contextlib.contextmanager
def tls_connection(stack: Stack, pki: Pki) -> Iterator[ssl.SSLSocket]:
    parts = urlsplit(stack.url)
    raw = socket.create_connection((parts.hostname or "localhost", parts.port or 443), timeout=30)
    with client_context(pki.ca_file).wrap_socket(raw, server_hostname="localhost") as conn:
        yield conn


def read_until_closed(conn: ssl.SSLSocket, deadline: float) -> bytes:
    """Everything the server sends until it closes the connection (or the deadline)."""
    data = b""
    while time.monotonic() < deadline:
        conn.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = conn.recv(65536)
        except TimeoutError:
            break
        except (ssl.SSLError, ConnectionError):
            return data
        if not chunk:
            return data
        data += chunk
    raise AssertionError(f"the connection was still open after {WITHIN} s")


def status_and_error(answer: bytes) -> tuple[int, dict[str, str]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"strict-transport-security" in head.lower()
    assert card_numbers_in(answer.decode("latin-1")) == []
    return status, json.loads(body)["error"]


def test_an_idle_tls_connection_is_closed(slow_vault: Stack, pki: Pki) -> None:
    with tls_connection(slow_vault, pki) as conn:
        started = time.monotonic()
        read_until_closed(conn, started + WITHIN)
        assert time.monotonic() - started < WITHIN


def test_a_head_trickled_a_byte_at_a_time_gets_408(slow_vault: Stack, pki: Pki) -> None:
    head = b"GET /v1/payment_methods HTTP/1.1\r\nHost: localhost\r\nX-Slow: " + b"4" * 200
    with tls_connection(slow_vault, pki) as conn:
        started = time.monotonic()
        answer = b""
        for byte in head:
            try:
                conn.sendall(bytes([byte]))
            except (ssl.SSLError, ConnectionError):
                break
            conn.settimeout(0.25)
            try:
                answer += conn.recv(65536)
            except TimeoutError:
                continue
            if answer:
                break
            if time.monotonic() - started > WITHIN:
                break
        answer += read_until_closed(conn, time.monotonic() + WITHIN)
    status, error = status_and_error(answer)
    assert status == 408 and error["code"] == "request_timeout"
    assert time.monotonic() - started < WITHIN + 1


def test_a_64_mib_header_is_refused_before_it_is_held(slow_vault: Stack, pki: Pki) -> None:
    before = vault_rss_mib(slow_vault.vault_pid)
    sent = 0
    answer = b""
    with tls_connection(slow_vault, pki) as conn:
        conn.sendall(b"GET /v1/noop HTTP/1.1\r\nHost: localhost\r\nX-Big: ")
        chunk = b"a" * 65536
        conn.settimeout(0.0)
        while sent < 64 * 1024 * 1024:
            try:
                sent += conn.send(chunk)
            except (ssl.SSLWantWriteError, BlockingIOError):
                pass
            except (ssl.SSLError, ConnectionError):
                break
            try:
                answer += conn.recv(65536)
            except (ssl.SSLWantReadError, BlockingIOError):
                continue
            except (ssl.SSLError, ConnectionError):
                break
            if answer:
                break
        conn.settimeout(5)
        with contextlib.suppress(ssl.SSLError, ConnectionError, TimeoutError, socket.timeout):
            answer += read_until_closed(conn, time.monotonic() + WITHIN)
    status, error = status_and_error(answer)
    assert status == 431 and error["code"] == "request_header_fields_too_large"
    assert sent < 8 * 1024 * 1024, f"{sent} bytes went out before the refusal"
    assert vault_rss_mib(slow_vault.vault_pid) < max(200, before + 20)


def test_one_address_gets_503_past_its_cap(slow_vault: Stack, pki: Pki) -> None:
    with contextlib.ExitStack() as held:
        for _ in range(6):
            conn = held.enter_context(tls_connection(slow_vault, pki))
            conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
            conn.settimeout(10)
            assert b" 200 " in conn.recv(65536).split(b"\r\n", 1)[0]
        with tls_connection(slow_vault, pki) as extra:
            answer = read_until_closed(extra, time.monotonic() + WITHIN)
    status, error = status_and_error(answer)
    assert status == 503 and error["code"] == "too_many_connections"
    assert b"retry-after" in answer.lower()
    # The cap is per connection, not a ban: a new connection is served again.
    with tls_connection(slow_vault, pki) as again:
        again.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        again.settimeout(10)
        assert b" 200 " in again.recv(65536).split(b"\r\n", 1)[0]
