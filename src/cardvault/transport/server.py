"""Run ASGI applications on TLS listeners (uvicorn + httptools), several in one process.

A :class:`Listener` is one socket: an application, an address, a TLS context or none,
and the limits its connections get. :func:`bind` binds it (a port in use is a clear
error at once), :func:`build_server` makes the uvicorn server that serves it, and
:func:`serve` runs every listener on one event loop until SIGINT/SIGTERM.
:func:`run_until_stopped` is what a service runs: it tunes the garbage collector for
serving (:func:`tune_gc_for_serving`), runs the service's start-up, serves on uvloop and
runs its shut-down.

Each connection runs :class:`cardvault.transport.protocol.TlsHttpProtocol` (the ASGI TLS
extension and the request and connection limits, with the listener's
:class:`~cardvault.transport.protocol.ConnectionGate`); the listening socket applies the
TLS handshake and shutdown timeouts of the listener's
:class:`~cardvault.config.ServerLimits`. docs/transport.md ("Limits") lists each limit
and its answer.

Every HTTPS listener gets its context from :func:`cardvault.transport.tls.server_context`;
a plain listener exists only to redirect (:func:`cardvault.transport.asgi.redirect_app`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.config import STARTUP_FAILURE

from cardvault.config import ServerLimits
from cardvault.logging import get_logger
from cardvault.transport.protocol import ConnectionGate, TlsHttpProtocol

__all__ = [
    "GC_THRESHOLDS",
    "Listener",
    "ServerLimits",
    "bind",
    "build_server",
    "run_until_stopped",
    "serve",
    "tune_gc_for_serving",
]

_log = get_logger("cardvault.server")


@dataclass
class Listener:
    """One socket: an app, an address, either a TLS context or nothing (redirect), and
    the limits its connections get."""

    name: str
    app: Callable[..., Any]
    host: str
    port: int
    ssl_context: ssl.SSLContext | None = None
    limits: ServerLimits = dataclasses.field(default_factory=ServerLimits)
    #: A listening socket inherited from a parent process (a vault worker's), served
    #: instead of binding ``host``:``port`` here.
    fd: int | None = None


class _Server(uvicorn.Server):
    """uvicorn's server, started on a socket cardvault bound, with the listener's limits.

    uvicorn's ``Server.startup`` calls ``loop.create_server(..., ssl=...)`` without
    ``ssl_handshake_timeout`` (asyncio's default is 60 s) or ``ssl_shutdown_timeout``
    (30 s), and builds each connection's protocol from the config alone. This is the
    same start-up for the one path cardvault uses (sockets it bound itself, see
    :func:`serve`), with the TLS timeouts from the limits and a protocol factory that
    hands every connection the listener's limits and its
    :class:`~cardvault.transport.protocol.ConnectionGate`.
    (uvicorn's own ``limit_concurrency`` is not used: it answers a bare 503 without our
    headers, after reading the request.)
    """

    def __init__(self, config: uvicorn.Config, listener: Listener) -> None:
        super().__init__(config)
        self.listener = listener
        self.gate = ConnectionGate(listener.limits)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        if sockets is None:
            raise TypeError("cardvault listeners serve sockets bound by transport.server.bind")
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(STARTUP_FAILURE)
        config = self.config
        limits = self.listener.limits

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            return TlsHttpProtocol(
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=_loop,
                limits=limits,
                gate=self.gate,
                listener=self.listener.name,
            )

        loop = asyncio.get_running_loop()
        tls: dict[str, Any] = {}
        if config.ssl is not None:
            tls = {
                "ssl_handshake_timeout": limits.tls_handshake_timeout,
                "ssl_shutdown_timeout": limits.close_timeout,
            }
        self.servers = []
        for sock in sockets:
            server = await loop.create_server(
                create_protocol, sock=sock, ssl=config.ssl, backlog=config.backlog, **tls
            )
            self.servers.append(server)
        self.started = True


def build_server(listener: Listener) -> uvicorn.Server:
    ctx = listener.ssl_context
    config = uvicorn.Config(
        listener.app,
        host=listener.host,
        port=listener.port,
        http=TlsHttpProtocol,
        loop="uvloop",
        lifespan="auto",
        ws="none",
        log_config=None,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        # The context is built by cardvault.transport.tls, never by uvicorn's defaults.
        ssl_context_factory=(lambda _config, _default: ctx) if ctx is not None else None,
    )
    return _Server(config, listener)


def bind(listener: Listener, *, reuse_port: bool = False) -> socket.socket:
    """Bind the listener's socket now, so that a port in use is a clear error at once.
    A listener with an inherited socket (``fd``) gets that socket, already bound.
    ``reuse_port``: ``SO_REUSEPORT``, for one of several sockets on the port, one per
    worker process, among which the kernel spreads the connections."""
    if listener.fd is not None:
        return socket.socket(fileno=listener.fd)
    family = socket.AF_INET6 if ":" in listener.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((listener.host, listener.port))
    except OSError as exc:
        sock.close()
        raise OSError(
            exc.errno,
            f"cannot listen on {listener.host}:{listener.port} for {listener.name}: "
            f"{exc.strerror} (is another process using the port?)",
        ) from exc
    sock.set_inheritable(True)
    return sock


async def serve(
    listeners: Sequence[Listener],
    *,
    ready: Callable[[], Any] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve every listener until SIGINT/SIGTERM (or ``stop`` is set), then shut down all.

    Every socket is bound before any server starts; a port in use raises ``OSError``
    naming it, and nothing is left listening.
    """
    sockets: list[socket.socket] = []
    try:
        for lst in listeners:
            sockets.append(bind(lst))
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    servers = [build_server(lst) for lst in listeners]
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):  # pragma: no cover
            pass

    # uvicorn's public serve() installs its own signal handlers per server; _serve() is
    # the same without them, so one handler here stops every listener together.
    tasks = [
        asyncio.create_task(server._serve(sockets=[sock]), name=f"listener:{lst.name}")
        for server, lst, sock in zip(servers, listeners, sockets, strict=True)
    ]
    try:
        while not all(s.started for s in servers):
            if any(t.done() for t in tasks):
                raise RuntimeError("a listener stopped during start-up")
            await asyncio.sleep(0.01)
        for lst in listeners:
            scheme = "https" if lst.ssl_context else "http"
            # The URL ends with "/": in the console format it ends the line, and a port
            # followed by the next line's date reads as a 13-digit run to a card scanner.
            _log.info("listening", listener=lst.name, url=f"{scheme}://{lst.host}:{lst.port}/")
        if ready is not None:
            ready()
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
    finally:
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
        for sock in sockets:
            sock.close()
        for sig in handled:
            loop.remove_signal_handler(sig)


#: The cyclic garbage collector's thresholds while a service serves (CPython's default
#: is 700, 10, 10). See :func:`tune_gc_for_serving`.
GC_THRESHOLDS = (20_000, 20, 10)


def tune_gc_for_serving() -> None:
    """Set the cyclic garbage collector up for a long-running server: collect, move
    every object that exists now (modules, classes, functions, the application and its
    configuration) into the permanent generation with :func:`gc.freeze`, and raise the
    young generation's threshold to ``GC_THRESHOLDS``. :func:`run_until_stopped` calls
    it before the service's start-up, so that what start-up opens (database pools and
    their connections, files) stays in the collected generations: a pool replaces
    connections over time, and a frozen cycle that is dropped is never freed.

    Why: CPython starts a young-generation collection whenever 700 more container
    objects are alive than at the last one. 32 tokenizations in flight hold more than
    that, so the vault ran about 40 young collections a second that found nothing to
    free, and every few seconds a full collection that walked the whole heap, modules
    included, for about 90 ms with the event loop stopped. Frozen objects are never
    walked again, and requests in flight rarely reach the new threshold. Reference
    cycles are still collected, later and in larger batches: up to about 20,000
    container objects of cyclic garbage (and what they hold) may wait for a collection.
    On ``bench/tokenization.py`` the tokenization's p99 fell by half and its vault CPU by
    5-18% in three alternating pairs (see ``bench/README.md``).

    Card data and keys do not wait for the collector on the request path: they are
    wiped explicitly (``CardNumber.wipe`` in the handlers, ``Key.wipe``, and a dropped
    ``Key`` wipes itself as soon as nothing refers to it). The ``__del__`` of card data
    is a backstop, and for an object caught in a reference cycle it now runs later.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_until_stopped(
    listeners: Sequence[Listener],
    *,
    ready: Callable[[], Any] | None = None,
    startup: Callable[[], Coroutine[Any, Any, Any]] | None = None,
    shutdown: Callable[[], Coroutine[Any, Any, Any]] | None = None,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve ``listeners`` on a uvloop event loop until SIGINT/SIGTERM, or until ``stop``
    is set (by the service itself: a task of its start-up that decides it must exit).

    ``startup`` runs on the same loop before any socket is bound (an error there stops
    start-up with nothing listening); ``shutdown`` runs after every listener closed.
    The garbage collector is tuned for serving before ``startup``
    (:func:`tune_gc_for_serving`).
    """
    import uvloop

    tune_gc_for_serving()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        if startup is not None:
            runner.run(startup())
        try:
            runner.run(serve(listeners, ready=ready, stop=stop))
        finally:
            if shutdown is not None:
                runner.run(shutdown())
