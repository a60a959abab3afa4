"""Several processes serving one vault's ports: ``[server] workers`` (``--workers N``).

With ``workers = 1`` (the default) ``cardvault vault serve`` is the vault itself
(:func:`cardvault.vault.app.run`), and nothing here runs. With ``N > 1`` the process it
starts becomes the **parent** (:func:`supervise`), which serves no request itself:

1. It checks what the workers will need: a PostgreSQL store (the SQLite store has one
   group-commit writer, in one process: N > 1 on SQLite is refused with a
   :class:`~cardvault.errors.ConfigurationError`), the listeners' certificates, the
   audit directory.
2. It checks that the public, redirect and admin ports are free (a port in use is a
   clear error before any worker starts: never a second vault sharing the port with a
   forgotten one), then binds, for each worker, one listening socket per port with
   ``SO_REUSEPORT``: the kernel spreads new connections evenly over the workers' sockets
   by a hash of their addresses (docs/deploy.md, "Workers", says why not one socket
   shared by all: its connections went to whichever worker woke first, three to one).
3. It starts N workers, each ``cardvault vault serve`` again on the same settings, with
   its sockets inherited (their file descriptors passed at spawn) and a
   :class:`WorkerSpec` (``--worker``): its number and those descriptors.
4. It supervises them: when a worker exits, the parent closes that worker's sockets at
   once (the kernel then sends every new connection to the others; the few waiting in
   that socket's queue are reset, as the connections of the dead worker were, and a
   client's retry reaches another) and starts it again under the same number, on new
   sockets (after 0, 0.5, 1, 2 … 8 s); ``worker_restarts`` restarts of one worker within
   :data:`RESTART_WINDOW` seconds and one more exit is a crash loop: every worker is
   stopped and the parent exits 1. A worker that exits 2 (a configuration error, or an
   audit log it refuses to continue) stops them all too, and the parent exits 2:
   restarting cannot mend either.
5. SIGINT or SIGTERM: every worker gets SIGTERM, stops accepting and finishes the
   requests in flight; one still running ``stop_grace`` seconds later is killed. A
   second signal kills at once. The parent then exits 0. Workers die with the parent
   (``PR_SET_PDEATHSIG``: SIGTERM, so they drain) even when it is killed outright.

Each worker is a vault of its own among the processes that share the database
(:meth:`WorkerSpec.settings`): the replica ``<store.replica or host name>/w<i>`` (a
replacement keeps its number and so its name, with a new boot, so it takes over its
dead predecessor's idempotency claims at once) and the audit log ``<audit
directory>/w<i>/`` (one writer per log, which holds its lock), whose ``config.loaded``
names the worker and the replica.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cardvault.errors import ConfigurationError
from cardvault.logging import configure_logging, get_logger
from cardvault.transport.server import Listener, bind
from cardvault.vault.settings import VaultSettings

__all__ = ["RESTART_WINDOW", "WorkerSpec", "supervise", "worker_replica"]

_log = get_logger("cardvault.vault.workers")

#: Seconds within which ``[server] worker_restarts`` restarts of one worker are allowed.
RESTART_WINDOW: Final = 60.0
#: How often the parent looks at its workers when no signal (SIGCHLD) wakes it sooner.
_POLL: Final = 0.25
#: The exit status of a configuration error (and of an audit log refused at start-up).
_CONFIG_EXIT: Final = 2
#: The exit status of a crash loop.
_CRASH_LOOP_EXIT: Final = 1
#: ``listen()``'s backlog of each worker's sockets (uvicorn's default).
_BACKLOG: Final = 2048


def worker_replica(settings: VaultSettings, index: int) -> str:
    """The replica name of worker ``index``: ``<store.replica or host name>/w<index>``."""
    base = settings.store.replica or socket.gethostname() or "vault"
    return f"{base}/w{index}"


@dataclass(frozen=True)
class WorkerSpec:
    """What a worker is told by its parent: its number (0 … count-1), how many there
    are, and the listening sockets it inherited, by listener name."""

    index: int
    count: int
    fds: dict[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"w{self.index}"

    def encode(self) -> str:
        """The ``--worker`` argument: ``1/2:public=3,admin=5``."""
        sockets = ",".join(f"{name}={fd}" for name, fd in sorted(self.fds.items()))
        return f"{self.index}/{self.count}:{sockets}"

    @classmethod
    def parse(cls, text: str) -> WorkerSpec:
        try:
            numbers, _, sockets = text.partition(":")
            index, count = (int(n) for n in numbers.split("/"))
            fds = {
                name: int(fd)
                for name, fd in (item.split("=") for item in sockets.split(",") if item)
            }
        except ValueError:
            raise ConfigurationError("--worker is given by the vault's parent process") from None
        if not 0 <= index < count:
            raise ConfigurationError("--worker is given by the vault's parent process")
        return cls(index, count, fds)

    def settings(self, settings: VaultSettings) -> VaultSettings:
        """``settings`` as this worker runs them: its replica name, and its own audit
        log under the vault's audit directory (the administration log is the vault's)."""
        directory, admin = settings.audit.resolved(settings.store.url)
        return dataclasses.replace(
            settings,
            store=dataclasses.replace(settings.store, replica=worker_replica(settings, self.index)),
            audit=dataclasses.replace(
                settings.audit, directory=directory / self.name, admin_directory=admin
            ),
        )


def check_workers(settings: VaultSettings) -> None:
    """Raise :class:`ConfigurationError` when ``settings`` cannot run as workers."""
    count = settings.server.workers
    if count < 1:
        raise ConfigurationError("server.workers must be at least 1")
    url = settings.store.url
    if count > 1 and not url.startswith(("postgresql://", "postgres://")):
        raise ConfigurationError(
            f"server.workers = {count} needs a PostgreSQL store (store.url = "
            "postgresql://…): the SQLite store has one writer, in one process, so several "
            "vault processes cannot share it. Set server.workers = 1 to run on SQLite."
        )
    if settings.server.worker_restarts < 0 or settings.server.stop_grace < 0:
        raise ConfigurationError("server.worker_restarts and server.stop_grace must be >= 0")


def _backoff(recent: int) -> float:
    """Seconds before a worker is started again, after ``recent`` restarts in the
    window: 0, 0.5, 1, 2 … up to 8."""
    return 0.0 if recent == 0 else min(0.5 * 2 ** (recent - 1), 8.0)


def _describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def _die_with_parent(parent: int) -> Any:
    """A ``preexec_fn``: ask the kernel for SIGTERM when the parent dies (Linux), so
    that no worker outlives it, even killed outright; exit at once if it is gone
    already."""

    def arm() -> None:  # pragma: no cover - runs in the child, before exec
        if sys.platform.startswith("linux"):
            import ctypes

            with contextlib.suppress(Exception):
                ctypes.CDLL(None).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return arm


@dataclass
class _Worker:
    index: int
    proc: subprocess.Popen[bytes] | None = None
    #: Its listening sockets (one per listener, by name) while it runs.
    sockets: dict[str, socket.socket] = field(default_factory=dict)
    #: When it was started again (``time.monotonic()``), within the restart window.
    restarted: deque[float] = field(default_factory=deque)
    #: When its restart is due, while it waits for one.
    restart_at: float | None = None


class _Parent:
    """The workers and their supervision (module docstring)."""

    def __init__(
        self, settings: VaultSettings, config: Path | None, listeners: list[Listener]
    ) -> None:
        self.settings = settings
        self.config = config
        self.listeners = listeners
        self.count = settings.server.workers
        self.workers = [_Worker(i) for i in range(self.count)]
        self.stopping = False
        self.hurry = False
        self.status = 0
        # A signal (SIGCHLD above all) wakes watch() at once.
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)

    def catch_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGCHLD, lambda *_: None)

    def stop(self, *_: object) -> None:
        if self.stopping:
            self.hurry = True
        self.stopping = True

    def _sleep(self, seconds: float) -> None:
        """Wait ``seconds``, or less when a signal comes."""
        ready, _, _ = select.select([self._wake_r], [], [], seconds)
        if ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 512)

    def _argv(self, spec: WorkerSpec) -> list[str]:
        config = ["--config", str(self.config)] if self.config is not None else []
        return [sys.executable, "-m", "cardvault", "vault", "serve", *config,
                "--worker", spec.encode()]  # fmt: skip

    def _bind(self, worker: _Worker) -> None:
        """The worker's sockets: one per listener, ``SO_REUSEPORT``, listening."""
        try:
            for listener in self.listeners:
                sock = bind(listener, reuse_port=True)
                worker.sockets[listener.name] = sock
                sock.listen(_BACKLOG)
        except BaseException:
            self._unbind(worker)
            raise

    @staticmethod
    def _unbind(worker: _Worker) -> None:
        for sock in worker.sockets.values():
            sock.close()
        worker.sockets = {}

    def _start(self, worker: _Worker) -> None:
        worker.restart_at = None
        if not worker.sockets:
            self._bind(worker)
        fds = {name: sock.fileno() for name, sock in worker.sockets.items()}
        spec = WorkerSpec(worker.index, self.count, fds)
        worker.proc = subprocess.Popen(
            self._argv(spec),
            pass_fds=tuple(fds.values()),
            preexec_fn=_die_with_parent(os.getpid()),  # (safe: the parent has no threads)
        )
        _log.info("worker started", worker_started=spec.name, pid=worker.proc.pid)

    def _restart(self, worker: _Worker, now: float) -> None:
        try:
            self._start(worker)
        except OSError as exc:
            # Its port was taken meanwhile, or no process could be made: try again.
            _log.error("cannot start a worker", worker_failed=f"w{worker.index}", error=str(exc))
            self._schedule(worker, now, "could not be started")

    def _exited(self, worker: _Worker, now: float) -> None:
        assert worker.proc is not None
        # New connections go to the other workers from now on.
        self._unbind(worker)
        code = worker.proc.returncode
        name = f"w{worker.index}"
        how = _describe(code)
        if code == _CONFIG_EXIT:
            _log.error(
                "a worker exited with a configuration error, or an audit log it refuses to "
                "continue: restarting cannot mend it, so every worker is stopped",
                worker_exited=name,
                how=how,
            )
            self.status = _CONFIG_EXIT
            self.stopping = True
            return
        self._schedule(worker, now, how)

    def _schedule(self, worker: _Worker, now: float, how: str) -> None:
        """Start ``worker`` again after its backoff, or give up on a crash loop."""
        name = f"w{worker.index}"
        while worker.restarted and now - worker.restarted[0] > RESTART_WINDOW:
            worker.restarted.popleft()
        allowed = self.settings.server.worker_restarts
        if len(worker.restarted) >= allowed:
            _log.error(
                "a worker is crash-looping: every worker is stopped",
                worker_exited=name,
                how=how,
                restarts=len(worker.restarted),
                window_s=RESTART_WINDOW,
            )
            self.status = _CRASH_LOOP_EXIT
            self.stopping = True
            return
        delay = _backoff(len(worker.restarted))
        _log.warning("worker stopped; starting it again", worker_exited=name, how=how, in_s=delay)
        worker.restarted.append(now)
        worker.restart_at = now + delay

    def watch(self) -> None:
        for worker in self.workers:
            if not self.stopping:
                self._start(worker)
        while not self.stopping:
            now = time.monotonic()
            for worker in self.workers:
                if self.stopping:
                    break
                if worker.restart_at is not None:
                    if now >= worker.restart_at:
                        self._restart(worker, now)
                elif worker.proc is not None and worker.proc.poll() is not None:
                    self._exited(worker, now)
            due = [w.restart_at for w in self.workers if w.restart_at is not None]
            self._sleep(min([_POLL, *(max(0.0, t - time.monotonic()) for t in due)]))

    def shutdown(self) -> None:
        """SIGTERM to every worker, ``stop_grace`` seconds for them to drain, then
        SIGKILL to those still running; reap them all, and close every socket."""
        running = [w.proc for w in self.workers if w.proc is not None and w.proc.poll() is None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        grace = self.settings.server.stop_grace
        deadline = time.monotonic() + grace
        while (
            any(proc.poll() is None for proc in running)
            and time.monotonic() < deadline
            and not self.hurry
        ):
            self._sleep(0.05)
        for proc in running:
            if proc.poll() is None:
                _log.warning("worker still running after the grace: killed", pid=proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            proc.wait()
        for worker in self.workers:
            self._unbind(worker)
        signal.set_wakeup_fd(-1)
        os.close(self._wake_r)
        os.close(self._wake_w)


def _check_ports(settings: VaultSettings) -> list[Listener]:
    """The vault's listeners, each of whose ports is free now (bound without
    ``SO_REUSEPORT``, then let go): a port in use, by a vault left running too, stops
    the start-up. The listeners' certificates and settings are checked on the way."""
    from cardvault.vault.app import build_listeners

    listeners = build_listeners(settings)
    for listener in listeners:
        bind(listener).close()
    return listeners


def supervise(settings: VaultSettings, config: Path | None) -> int:
    """Run the vault as ``settings.server.workers`` worker processes until SIGINT or
    SIGTERM (module docstring); the exit status: 0 once stopped, 1 after a crash loop,
    2 after a worker's configuration error."""
    configure_logging(
        profile=settings.profile,
        level=settings.logging.level,
        fmt=settings.logging.format,
        fields={"worker": "parent"},
    )
    check_workers(settings)
    settings.audit.resolved(settings.store.url)
    listeners = _check_ports(settings)
    parent = _Parent(settings, config, listeners)
    parent.catch_signals()
    for listener in listeners:
        _log.info("listening", listener=listener.name, address=f"{listener.host}:{listener.port}/")
    _log.info("vault workers starting", workers=parent.count)
    try:
        parent.watch()
    finally:
        parent.shutdown()
    _log.info("vault workers stopped", exit_status=parent.status)
    return parent.status
