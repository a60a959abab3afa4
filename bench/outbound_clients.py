"""What one outbound request of a forward costs the vault, client by client.

The simulated acquirer (``examples/acquirer``) runs over HTTPS in a process of its own,
and this process POSTs ``forward.py``'s small JSON body (the published test card) to
``/v1/authorizations`` on one pooled keep-alive connection per concurrent worker, with
each client in turn:

* ``aiohttp``: aiohttp as ``outbound.py`` used it until its own client (a pinning
  connector, ``trust_env=False``, a dummy cookie jar, no decompression, no
  ``User-Agent``, the URL and the timeout made once, the answer read by chunks of
  64 KiB against the size limit, the peer's address looked up, the headers copied);
* ``aiohttp-trimmed``: the same session with the per-request work cut to what remains
  (no ``Accept``/``Accept-Encoding`` either, the headers made once as a ``CIMultiDict``,
  the answer read at once after its ``Content-Length`` was checked);
* ``httpcore``: httpcore's ``AsyncConnectionPool`` (HTTP/1.1, the same TLS context, no
  retries), on its anyio backend, the answer streamed against the size limit;
* ``httptools``: a minimal HTTP/1.1 client on asyncio's protocols, httptools parsing the
  answer (the sketch the choice was made on);
* ``vault``: this tree's :class:`cardvault.vault.forwarding.outbound.OutboundClient`, as
  the forwarder calls it.

All verify the acquirer's certificate with ``client_context`` (the deployment CA), on
uvloop, as the vault runs. Two measures:

* CPU time (default): ``--rounds`` rounds, each client in turn for ``--count`` requests
  after a warm-up, ``time.process_time`` around them; the median of the rounds, µs per
  request. The acquirer's own time is in its process and not counted.
* ``--instructions``: each client in a child process under callgrind, ``--small`` and
  ``--large`` requests, and the difference per request (start-up, the handshake and the
  warm-up excluded), as ``instructions.py`` does.

    .venv/bin/python bench/outbound_clients.py
    .venv/bin/python bench/outbound_clients.py --instructions --concurrency 1,32
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpcore
import httptools
from _common import free_port, wait_for_port
from forward import DIRECT_BODY, python_process
from multidict import CIMultiDict
from yarl import URL

from cardvault.transport.certs import init_ca
from cardvault.transport.tls import client_context

ROOT = Path(__file__).resolve().parents[1]
HEADERS = [("Content-Type", "application/json")]
TIMEOUT = 30.0
MAX_RESPONSE = 1 << 20
WARMUP = 200

Post = Callable[[], Awaitable[int]]


# --- the clients ----------------------------------------------------------------------


class _PinningConnector(aiohttp.TCPConnector):
    """outbound.py's connector (no pins here: the check runs once per connection)."""

    def __init__(self, *, pins: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._pins = pins

    async def _wrap_create_connection(self, *args: Any, **kwargs: Any) -> Any:
        return await super()._wrap_create_connection(*args, **kwargs)


async def aiohttp_client(url: str, ca: Path) -> tuple[Post, Callable[[], Awaitable[None]]]:
    connector = _PinningConnector(ssl=client_context(ca), limit=100, ttl_dns_cache=60)
    session = aiohttp.ClientSession(
        connector=connector,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent",),
    )
    limit = aiohttp.ClientTimeout(total=TIMEOUT)
    target = URL(url)

    async def post() -> int:
        async with session.request(
            "POST",
            target,
            headers=HEADERS,
            data=DIRECT_BODY,
            allow_redirects=False,
            timeout=limit,
            proxy=None,
        ) as response:
            transport = response.connection.transport if response.connection else None
            if transport is None:
                transport = getattr(getattr(response, "_protocol", None), "transport", None)
            if transport is not None:
                transport.get_extra_info("peername")
            if response.content_length is not None and response.content_length > MAX_RESPONSE:
                raise ValueError("too large")
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.content.iter_chunked(65536):
                size += len(chunk)
                if size > MAX_RESPONSE:
                    raise ValueError("too large")
                chunks.append(chunk)
            [(k.lower(), v) for k, v in response.headers.items()]
            b"".join(chunks)
            return response.status

    return post, session.close


async def aiohttp_trimmed_client(url: str, ca: Path) -> tuple[Post, Callable[[], Awaitable[None]]]:
    connector = aiohttp.TCPConnector(ssl=client_context(ca), limit=100, ttl_dns_cache=60)
    session = aiohttp.ClientSession(
        connector=connector,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        timeout=aiohttp.ClientTimeout(total=TIMEOUT),
    )
    target = URL(url)
    headers = CIMultiDict(HEADERS)

    async def post() -> int:
        async with session.post(
            target, headers=headers, data=DIRECT_BODY, allow_redirects=False
        ) as response:
            if response.content_length is not None and response.content_length > MAX_RESPONSE:
                raise ValueError("too large")
            await response.read()
            return response.status

    return post, session.close


async def httpcore_client(url: str, ca: Path) -> tuple[Post, Callable[[], Awaitable[None]]]:
    pool = httpcore.AsyncConnectionPool(
        ssl_context=client_context(ca), max_connections=100, http1=True, http2=False, retries=0
    )
    extensions = {
        "timeout": {"connect": TIMEOUT, "read": TIMEOUT, "write": TIMEOUT, "pool": TIMEOUT}
    }
    headers = [(b"Content-Type", b"application/json")]

    async def post() -> int:
        async with asyncio.timeout(TIMEOUT):
            async with pool.stream(
                "POST", url, headers=headers, content=DIRECT_BODY, extensions=extensions
            ) as response:
                chunks: list[bytes] = []
                size = 0
                async for chunk in response.aiter_stream():
                    size += len(chunk)
                    if size > MAX_RESPONSE:
                        raise ValueError("too large")
                    chunks.append(chunk)
                b"".join(chunks)
                return int(response.status)

    return post, pool.aclose


class _Sketch(asyncio.Protocol):
    """One HTTP/1.1 connection: the answer parsed by httptools as it arrives."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[int] | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.size = 0
        self.open = True
        self.keep_alive = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        self._fail(exc or ConnectionResetError())

    def _fail(self, exc: BaseException) -> None:
        self.open = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > MAX_RESPONSE:
            self._fail(ValueError("too large"))
            return
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        # Asked here: once the callback returns, the parser has reset for the next one.
        self.keep_alive = self.parser.should_keep_alive()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.parser.get_status_code())


async def httptools_client(url: str, ca: Path) -> tuple[Post, Callable[[], Awaitable[None]]]:
    ctx = client_context(ca)
    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 443
    head = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(DIRECT_BODY)}\r\n\r\n"
    ).encode()
    idle: list[_Sketch] = []
    loop = asyncio.get_running_loop()

    async def post() -> int:
        async with asyncio.timeout(TIMEOUT):
            while idle:
                conn = idle.pop()
                if conn.open:
                    break
            else:
                _, conn = await loop.create_connection(_Sketch, host, port, ssl=ctx)
            conn.waiter = loop.create_future()
            conn.headers, conn.chunks, conn.size = [], [], 0
            assert conn.transport is not None
            conn.transport.write(head + DIRECT_BODY)
            status = await conn.waiter
            b"".join(conn.chunks)
            if conn.keep_alive:
                idle.append(conn)
            return status

    async def close() -> None:
        for conn in idle:
            if conn.transport is not None:
                conn.transport.close()

    return post, close


async def vault_client(url: str, ca: Path) -> tuple[Post, Callable[[], Awaitable[None]]]:
    from cardvault.vault.forwarding.outbound import OutboundClient

    client = OutboundClient()

    async def post() -> int:
        response = await client.send(
            destination="acquirer",
            url=url,
            method="POST",
            headers=HEADERS,
            body=DIRECT_BODY,
            timeout=TIMEOUT,
            max_response_bytes=MAX_RESPONSE,
            ca_file=ca,
        )
        return response.status

    return post, client.close


CLIENTS = {
    "aiohttp": aiohttp_client,
    "aiohttp-trimmed": aiohttp_trimmed_client,
    "httpcore": httpcore_client,
    "httptools": httptools_client,
    "vault": vault_client,
}


# --- the measure ----------------------------------------------------------------------


async def _run(post: Post, count: int, concurrency: int) -> None:
    share = [count // concurrency + (i < count % concurrency) for i in range(concurrency)]

    async def worker(n: int) -> None:
        for _ in range(n):
            status = await post()
            if status not in (200, 402):
                raise RuntimeError(f"acquirer answered {status}")

    await asyncio.gather(*(worker(n) for n in share))


async def _cpu(names: list[str], url: str, ca: Path, args: argparse.Namespace, c: int) -> None:
    # Each client is made, warmed up (its connections open), measured and closed in
    # turn: the acquirer caps the connections one address may hold.
    figures: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            post, close = await CLIENTS[name](url, ca)
            await _run(post, WARMUP, c)
            started = time.process_time()
            await _run(post, args.count, c)
            figures[name].append((time.process_time() - started) / args.count * 1e6)
            await close()
    base = statistics.median(figures[names[0]])
    for name in names:
        mid = statistics.median(figures[name])
        print(
            f"c={c:<3} {name:>16}: {mid:8.1f} µs CPU per request "
            f"(rounds {min(figures[name]):.1f}-{max(figures[name]):.1f}), "
            f"{mid / base:.2f}× {names[0]}",
            flush=True,
        )


async def _child(name: str, url: str, ca: Path, count: int, c: int) -> None:
    post, close = await CLIENTS[name](url, ca)
    await _run(post, WARMUP, c)
    await _run(post, count, c)
    await close()


def _instructions(name: str, url: str, ca: Path, count: int, c: int) -> float:
    command = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        sys.executable, str(Path(__file__).resolve()), "--child", name,
        "--url", url, "--ca", str(ca), "--count", str(count), "--concurrency", str(c),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    output = result.stdout + result.stderr
    found = re.search(r"Collected : (\d+)", output)
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"{name} x{count} failed ({result.returncode}):\n{output[-3000:]}")
    return float(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--count", type=int, default=3000, help="requests per round (CPU)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--instructions", action="store_true", help="callgrind, not CPU time")
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--large", type=int, default=600)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--ca", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import uvloop

    if args.child:
        uvloop.run(_child(args.child, args.url, args.ca, args.count, int(args.concurrency)))
        return 0
    names = args.clients.split(",")
    if unknown := set(names) - set(CLIENTS):
        parser.error(f"unknown clients: {', '.join(sorted(unknown))}")
    if args.instructions and shutil.which("valgrind") is None:
        parser.error("valgrind is not installed")
    levels = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="cardvault-outbound-"))
    try:
        ca = init_ca(work / "pki")
        cert = ca.issue("acquirer", dns=["localhost"], ips=["127.0.0.1"])
        port = free_port()
        url = f"https://localhost:{port}/v1/authorizations"
        acquirer_args = [
            str(ROOT / "examples" / "acquirer" / "__main__.py"),
            "--host", "127.0.0.1", "--port", str(port),
            "--cert", str(cert.cert_path), "--key", str(cert.key_path),
            "--state", str(work / "acquirer"), "--log-level", "warning",
        ]  # fmt: skip
        log = work / "acquirer.log"
        with python_process(acquirer_args, log=log) as acquirer:
            wait_for_port(port, acquirer, log=log)
            for c in levels:
                if not args.instructions:
                    uvloop.run(_cpu(names, url, ca.cert_path, args, c))
                    continue
                base = 0.0
                for name in names:
                    small = _instructions(name, url, ca.cert_path, args.small, c)
                    large = _instructions(name, url, ca.cert_path, args.large, c)
                    per = (large - small) / (args.large - args.small)
                    base = base or per
                    print(
                        f"c={c:<3} {name:>16}: {per:12,.0f} instructions per request, "
                        f"{per / base:.2f}× {names[0]}",
                        flush=True,
                    )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main())
