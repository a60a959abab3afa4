"""The transport's limits (docs/transport.md, "Limits") on real listeners over real TLS.

Every test runs a real listener (``cardvault.transport.server.serve``) in a thread, on
asyncio's event loop and on uvloop (what the services run), and talks to it over a
real socket with a verifying TLS client, byte by byte where the test needs it. The
64 MiB header runs the production path (``run_until_stopped``) in its own process, so
that its memory can be measured.

Timeouts are set to about a second; the only timed assertions are generous upper
bounds on the timeout under test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from structlog.testing import capture_logs

from cardvault.config import ServerLimits
from cardvault.transport.asgi import HSTS, build_app, redirect_app
from cardvault.transport.server import Listener, serve
from cardvault.transport.tls import client_context, server_context
from helpers import Pki, ThreadedServers, free_ports

#: A published test card number: a refusal never repeats what the client sent.
CANARY = "4242424242424242"
#: A generous bound for a timeout of 1 s (a loaded CI machine is slow, not broken).
WITHIN = 10.0


class UvloopServers(ThreadedServers):
    """:class:`ThreadedServers` on uvloop, the event loop the services run."""

    def _run(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            await serve(self.listeners, ready=self._ready.set, stop=self._stop)

        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(main())
        except BaseException as exc:  # surfaced to the test thread
            self._error = exc
            self._ready.set()


async def body_length(request: Request) -> Response:
    body = await request.body()
    return Response(str(len(body)), media_type="text/plain")


async def slow(_request: Request) -> Response:
    await asyncio.sleep(1.5)
    return Response("slow", media_type="text/plain")


Listen = Callable[..., contextlib.AbstractContextManager[int]]


@pytest.fixture(params=["asyncio", "uvloop"])
def listen(request: pytest.FixtureRequest, pki: Pki) -> Listen:
    """``listen(limits, tls=True)``: a listener with ``limits``; yields its port. With
    ``tls=False`` it is the plain-HTTP redirect listener."""
    runner = UvloopServers if request.param == "uvloop" else ThreadedServers

    @contextlib.contextmanager
    def start(limits: ServerLimits, *, tls: bool = True) -> Iterator[int]:
        (port,) = free_ports(1)
        if tls:
            app = build_app(
                [Route("/", body_length, methods=["GET", "POST"]), Route("/slow", slow)],
                service="test",
                security_txt=None,
            )
            listener = Listener(
                "test", app, "127.0.0.1", port, server_context(*pki.cert("vault")), limits
            )
        else:
            app = redirect_app(https_port=443, public_host="vault.example.com")
            listener = Listener("test-redirect", app, "127.0.0.1", port, limits=limits)
        with runner([listener]):
            yield port

    return start


def connect(pki: Pki, port: int, *, tls: bool = True, source: str = "127.0.0.1") -> socket.socket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=30, source_address=(source, 0))
    if not tls:
        return raw
    return client_context(pki.ca_file).wrap_socket(raw, server_hostname="localhost")


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes


def read_answer(sock: socket.socket, data: bytes = b"") -> Answer:
    """The next answer on ``sock``; ``data`` is what was already read of it."""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before an answer: {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"{name} twice"
        headers[name.lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed inside the body"
        rest += chunk
        data += chunk
    return Answer(int(status_line.split(" ")[1]), headers, rest[:length], data)


def answer_arrived(sock: socket.socket, wait: float, read: bytearray) -> bool:
    """Whether the server has sent something within ``wait`` seconds (appended to
    ``read``). TLS records without application data (TLS 1.3's session tickets) make the
    socket readable too: they are consumed and do not count."""
    if not select.select([sock], [], [], wait)[0]:
        return False
    sock.setblocking(False)
    try:
        read += sock.recv(65536)
    except (ssl.SSLWantReadError, BlockingIOError):
        return False
    finally:
        sock.settimeout(30)
    return True


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server has closed; the socket's timeout fails the test otherwise."""
    try:
        while True:
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError, ssl.SSLEOFError):
        return True


def request(sock: socket.socket, head: str, body: bytes = b"") -> Answer:
    sock.sendall(head.encode("latin-1") + body)
    return read_answer(sock)


def get(path: str = "/", extra: str = "") -> str:
    return f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n"


def assert_refusal(
    answer: Answer, status: int, code: str, *, error_type: str = "invalid_request_error"
) -> None:
    """What every refusal is: Stripe's error object, the headers every response carries,
    Connection: close, and nothing the client sent."""
    assert answer.status == status, answer.raw
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["connection"] == "close"
    assert answer.headers["strict-transport-security"] == HSTS
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["referrer-policy"] == "no-referrer"
    assert answer.headers["cache-control"] == "no-store"
    assert "default-src 'none'" in answer.headers["content-security-policy"]
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["request-id"].startswith("req_")
    assert "server" not in answer.headers
    error = json.loads(answer.body)
    assert list(error) == ["error"]
    assert set(error["error"]) == {"type", "code", "message"}
    assert (error["error"]["type"], error["error"]["code"]) == (error_type, code)
    assert CANARY not in answer.raw.decode("latin-1")


def refusals(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in logs if e["event"] in ("request_refused", "connection_refused")]


# --- idle connections -------------------------------------------------------------------


def test_an_idle_tls_connection_is_closed_after_the_first_byte_timeout(
    listen: Listen, pki: Pki
) -> None:
    with capture_logs() as logs, listen(ServerLimits(first_byte_timeout=1)) as port:
        with connect(pki, port) as sock:
            started = time.monotonic()
            assert closed_by_server(sock)
            assert time.monotonic() - started < WITHIN
    closes = [e for e in logs if e["event"] == "connection_closed"]
    assert [(e["limit"], e["client"]) for e in closes] == [("first_byte_timeout", "127.0.0.1")]


def test_bytes_between_requests_do_not_hold_a_connection_open(listen: Listen, pki: Pki) -> None:
    # Blank lines before a request are allowed and skipped: they are not a request.
    with listen(ServerLimits(first_byte_timeout=1)) as port, connect(pki, port) as sock:
        started = time.monotonic()
        with contextlib.suppress(OSError):
            for _ in range(20):
                sock.sendall(b"\r\n")
                time.sleep(0.1)
        assert closed_by_server(sock)
        assert time.monotonic() - started < WITHIN


def test_a_connection_that_never_handshakes_is_dropped_after_the_handshake_timeout(
    listen: Listen, pki: Pki
) -> None:
    with listen(ServerLimits(tls_handshake_timeout=1)) as port:
        with connect(pki, port, tls=False) as raw:
            started = time.monotonic()
            assert closed_by_server(raw)
            assert time.monotonic() - started < WITHIN


def test_an_idle_keep_alive_connection_is_closed_after_its_timeout(
    listen: Listen, pki: Pki
) -> None:
    limits = ServerLimits(keep_alive_timeout=1, first_byte_timeout=60)
    with listen(limits) as port, connect(pki, port) as sock:
        assert request(sock, get()).status == 200
        started = time.monotonic()
        assert closed_by_server(sock)
        assert time.monotonic() - started < WITHIN


# --- slow requests ----------------------------------------------------------------------


def test_a_head_trickled_a_byte_at_a_time_gets_408_within_the_head_timeout(
    listen: Listen, pki: Pki
) -> None:
    limits = ServerLimits(head_timeout=1, first_byte_timeout=60, request_timeout=60)
    head = get(f"/?card={CANARY}", "X-Slow: ").encode() + b"a" * 100
    with capture_logs() as logs, listen(limits) as port, connect(pki, port) as sock:
        started = time.monotonic()
        read = bytearray()
        for byte in head:
            # One byte every 0.3 s, until the server answers.
            if answer_arrived(sock, 0.3, read):
                break
            sock.sendall(bytes([byte]))
        else:
            pytest.fail("the whole head was trickled without an answer")
        answer = read_answer(sock, bytes(read))
        assert_refusal(answer, 408, "request_timeout")
        assert closed_by_server(sock)
        assert time.monotonic() - started < WITHIN
    (refusal,) = refusals(logs)
    assert (refusal["limit"], refusal["client"], refusal["status"]) == (
        "head_timeout",
        "127.0.0.1",
        408,
    )
    assert refusal["request_id"] == answer.headers["request-id"]


def test_a_stalled_body_gets_408_within_the_request_timeout(listen: Listen, pki: Pki) -> None:
    limits = ServerLimits(head_timeout=1, request_timeout=1)
    with listen(limits) as port, connect(pki, port) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n")
        sock.sendall(b"x" * 10)
        started = time.monotonic()
        assert_refusal(read_answer(sock), 408, "request_timeout")
        assert closed_by_server(sock)
        assert time.monotonic() - started < WITHIN


def test_a_slow_application_is_not_a_slow_request(listen: Listen, pki: Pki) -> None:
    # The request's clocks stop when its body has arrived; the answer may take longer.
    limits = ServerLimits(head_timeout=1, request_timeout=1)
    with listen(limits) as port, connect(pki, port) as sock:
        answer = request(sock, get("/slow"))
        assert (answer.status, answer.body) == (200, b"slow")


# --- sizes ------------------------------------------------------------------------------

SERVER = """
import sys
from cardvault.logging import configure_logging
from cardvault.transport.asgi import build_app
from cardvault.transport.server import Listener, run_until_stopped
from cardvault.transport.tls import server_context

configure_logging(fmt="json")
port, cert, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
app = build_app([], service="test", security_txt=None)
listener = Listener("test", app, "127.0.0.1", port, server_context(cert, key))
run_until_stopped([listener], ready=lambda: print("ready", flush=True))
"""


def peak_memory(pid: int) -> int:
    """The process's peak resident memory so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc")
def test_a_64_mib_header_is_refused_with_431_before_it_is_held(pki: Pki, tmp_path: Path) -> None:
    """The tester's case, on the production path (uvloop, default limits), in a process
    of its own: the answer comes after about 16 KiB of head, long before 64 MiB were
    sent, and the server's peak memory barely moves."""
    (port,) = free_ports(1)
    log = tmp_path / "server.log"
    cert, key = pki.cert("vault")
    with log.open("wb") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(port), str(cert), str(key)],
            stdout=subprocess.PIPE,
            stderr=errors,
        )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n", log.read_text()
        with connect(pki, port) as warm:  # allocate what any request needs, then measure
            assert request(warm, get("/nothing")).status == 404
        before = peak_memory(proc.pid)
        chunk = b"a" * 65536
        sent = 0
        read = bytearray()
        with connect(pki, port) as sock:
            sock.sendall(get("/", f"X-Card: {CANARY}\r\nX-Big: ").encode())
            while sent < 64 * 1024 * 1024 and not answer_arrived(sock, 0, read):
                sock.sendall(chunk)
                sent += len(chunk)
            answer = read_answer(sock, bytes(read))
        grown = peak_memory(proc.pid) - before
    finally:
        proc.terminate()
        proc.wait(10)
    assert_refusal(answer, 431, "request_header_fields_too_large")
    assert sent < 16 * 1024 * 1024, f"{sent} bytes were sent before the answer"
    # Measured: under 1 MiB (16 KiB of head, a read or two, TLS buffers). The old
    # behaviour held the whole value, 64 MiB and more.
    assert grown < 16 * 1024 * 1024, f"the server's peak memory grew by {grown} bytes"
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    refused = [e for e in lines if e.get("event") == "request_refused"]
    assert [(e["limit"], e["client"], e["status"]) for e in refused] == [
        ("max_head_bytes", "127.0.0.1", 431)
    ]


def test_a_huge_header_on_plain_http_is_refused_before_it_is_sent(listen: Listen, pki: Pki) -> None:
    # The redirect listener has the same limits; its answers carry no HSTS (meaningless
    # over HTTP, RFC 6797 §7.2) but the other headers.
    sent = 0
    with listen(ServerLimits(), tls=False) as port, connect(pki, port, tls=False) as sock:
        sock.sendall(get("/", "X-Big: ").encode())
        read = bytearray()
        while sent < 64 * 1024 * 1024 and not answer_arrived(sock, 0, read):
            sock.sendall(b"a" * 65536)
            sent += 65536
        answer = read_answer(sock, bytes(read))
        assert closed_by_server(sock)
    assert sent < 16 * 1024 * 1024
    assert answer.status == 431
    assert "strict-transport-security" not in answer.headers
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert answer.headers["connection"] == "close"
    assert json.loads(answer.body)["error"]["code"] == "request_header_fields_too_large"


def test_a_head_over_16_kib_in_one_read_gets_431(listen: Listen, pki: Pki) -> None:
    fields = "".join(f"X-Field-{i}: {'v' * 400}\r\n" for i in range(45))  # about 18 KiB
    with listen(ServerLimits()) as port, connect(pki, port) as sock:
        assert_refusal(request(sock, get("/", fields)), 431, "request_header_fields_too_large")
        assert closed_by_server(sock)


def test_101_header_fields_get_431_and_100_do_not(listen: Listen, pki: Pki) -> None:
    ninety_nine = "".join(f"X-Field-{i}: 1\r\n" for i in range(99))  # and Host: 100
    with capture_logs() as logs, listen(ServerLimits()) as port:
        with connect(pki, port) as sock:
            assert request(sock, get("/", ninety_nine)).status == 200
        with connect(pki, port) as sock:
            answer = request(sock, get("/", ninety_nine + f"X-Card: {CANARY}\r\n"))
            assert_refusal(answer, 431, "request_header_fields_too_large")
            assert closed_by_server(sock)
    assert [e["limit"] for e in refusals(logs)] == ["max_headers"]


def test_a_url_over_8_kib_gets_414(listen: Listen, pki: Pki) -> None:
    with listen(ServerLimits()) as port:
        with connect(pki, port) as sock:
            assert request(sock, get("/?q=" + "a" * 8000)).status == 200
        with connect(pki, port) as sock:
            answer = request(sock, get(f"/?card={CANARY}&q=" + "a" * 8200))
            assert_refusal(answer, 414, "uri_too_long")
            assert answer.raw.startswith(b"HTTP/1.1 414 URI Too Long\r\n")
            assert closed_by_server(sock)


def test_a_declared_body_over_the_cap_gets_413_before_it_is_sent(listen: Listen, pki: Pki) -> None:
    with listen(ServerLimits(max_body_bytes=1000)) as port:
        with connect(pki, port) as sock:
            head = "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000\r\n\r\n"
            assert request(sock, head, b"x" * 1000).body == b"1000"
        with connect(pki, port) as sock:
            # Only the head: the answer does not wait for the body.
            head = "POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1001\r\n\r\n"
            assert_refusal(request(sock, head), 413, "request_too_large")
            assert closed_by_server(sock)


def test_a_chunked_body_over_the_cap_gets_413(listen: Listen, pki: Pki) -> None:
    chunk = b"258\r\n" + b"x" * 600 + b"\r\n"
    head = "POST / HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
    with listen(ServerLimits(max_body_bytes=1000)) as port:
        with connect(pki, port) as sock:
            assert request(sock, head, chunk + b"0\r\n\r\n").body == b"600"
        with connect(pki, port) as sock:
            assert_refusal(request(sock, head, chunk * 2), 413, "request_too_large")
            assert closed_by_server(sock)


def test_a_malformed_request_gets_a_stripe_400(listen: Listen, pki: Pki) -> None:
    with listen(ServerLimits()) as port, connect(pki, port) as sock:
        answer = request(sock, f"GET /{CANARY} HTTP/1.1\r\nHost localhost\r\n\r\n")
        assert_refusal(answer, 400, "request_malformed")
        assert closed_by_server(sock)


# --- connection caps --------------------------------------------------------------------


def open_and_use(pki: Pki, port: int, source: str = "127.0.0.1") -> socket.socket:
    """A connection the server has surely counted: it has answered a request on it."""
    sock = connect(pki, port, source=source)
    assert request(sock, get()).status == 200
    return sock


def refused_with_503(pki: Pki, port: int, source: str = "127.0.0.1") -> bool:
    with connect(pki, port, source=source) as sock:
        answer = request(sock, get())
        if answer.status != 503:
            return False
        assert_refusal(answer, 503, "too_many_connections", error_type="api_error")
        assert answer.headers["retry-after"] == "1"
        assert closed_by_server(sock)
        return True


def eventually_admitted(pki: Pki, port: int) -> None:
    """A new connection is served once a counted one has closed (the server notices the
    close a moment later: poll, without a timed assertion)."""
    for _ in range(100):
        with connect(pki, port) as sock:
            if request(sock, get()).status == 200:
                return
        time.sleep(0.05)
    pytest.fail("no connection was admitted after one closed")


def test_the_per_client_cap_answers_503_with_retry_after(listen: Listen, pki: Pki) -> None:
    limits = ServerLimits(max_connections_per_client=2)
    with capture_logs() as logs, listen(limits) as port:
        held = [open_and_use(pki, port) for _ in range(2)]
        assert refused_with_503(pki, port)
        # Another address is another client.
        with open_and_use(pki, port, source="127.0.0.2"):
            pass
        # Connections already open are still served.
        assert request(held[0], get()).status == 200
        held.pop().close()
        eventually_admitted(pki, port)
        for sock in held:
            sock.close()
    first = refusals(logs)[0]
    assert (first["event"], first["limit"], first["client"], first["status"]) == (
        "connection_refused",
        "max_connections_per_client",
        "127.0.0.1",
        503,
    )


def test_the_listener_cap_answers_503_with_retry_after(listen: Listen, pki: Pki) -> None:
    limits = ServerLimits(max_connections=2, max_connections_per_client=0)
    with capture_logs() as logs, listen(limits) as port:
        held = [open_and_use(pki, port), open_and_use(pki, port, source="127.0.0.2")]
        assert refused_with_503(pki, port)
        assert refused_with_503(pki, port, source="127.0.0.3")
        held.pop().close()
        eventually_admitted(pki, port)
        for sock in held:
            sock.close()
    assert {e["limit"] for e in refusals(logs)} == {"max_connections"}


def test_no_per_client_cap_when_it_is_0(listen: Listen, pki: Pki) -> None:
    limits = ServerLimits(max_connections_per_client=0)
    with listen(limits) as port:
        held = [open_and_use(pki, port) for _ in range(5)]
        for sock in held:
            sock.close()


# --- what still works -------------------------------------------------------------------


def test_keep_alive_requests_within_the_limits_are_served(listen: Listen, pki: Pki) -> None:
    body = b"card=" + CANARY.encode() + b"&pad=" + b"p" * 5000
    post = f"POST / HTTP/1.1\r\nHost: localhost\r\nContent-Length: {len(body)}\r\n\r\n"
    big_head = get("/", "".join(f"X-Field-{i}: {'v' * 300}\r\n" for i in range(45)))
    assert 13_000 < len(big_head) < 16 * 1024
    with listen(ServerLimits()) as port, connect(pki, port) as sock:
        for _ in range(3):
            assert request(sock, get()).status == 200
        # A head and its body in one write: the body's bytes are no head bytes.
        assert request(sock, post, body).body == str(len(body)).encode()
        # A head in pieces, then a head near the limit.
        for piece in (b"GET / HT", b"TP/1.1\r\nHo", b"st: localhost\r\n", b"\r\n"):
            sock.sendall(piece)
            time.sleep(0.05)
        assert read_answer(sock).status == 200
        assert request(sock, big_head).status == 200
        # Two requests in one write (pipelining), each with a body.
        sock.sendall((post.encode() + body) * 2)
        assert [read_answer(sock).body for _ in range(2)] == [str(len(body)).encode()] * 2
        assert request(sock, get()).status == 200
