"""A Redis server of the test's own: Debian's ``redis-server`` on a free port, in a
temporary directory, keeping nothing on disk. Tests never touch a Redis they did not
start (the machine's own at 6379 included): each can kill, pause or restart its own.
Without a ``redis-server`` binary the tests that need one skip, saying why."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from helpers import free_port

__all__ = ["RedisServer", "redis_server", "require_redis_server"]


def require_redis_server() -> str:
    """The ``redis-server`` binary, or skip the test with the reason."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(
            "redis-server is not installed (Debian package redis-server; scripts/test "
            "installs it when run as root): the Redis rate-limit tests need one"
        )
    return binary


@dataclass
class RedisServer:
    dir: Path
    port: int
    #: The TLS port (rediss://), when started with a certificate; ``port`` is then 0.
    tls_port: int = 0
    tls: tuple[Path, Path, Path] | None = None
    proc: subprocess.Popen[bytes] | None = None
    _binary: str = field(default="redis-server", repr=False)

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://localhost:{self.tls_port}/0"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (again, after :meth:`kill`) on the same port; returns once it answers."""
        assert self.proc is None or self.proc.poll() is not None, "still running"
        args = [
            self._binary,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.dir),
            "--logfile", str(self.dir / "redis.log"),
        ]  # fmt: skip
        if self.tls is not None:
            cert, key, ca = self.tls
            args += [
                "--tls-port", str(self.tls_port),
                "--tls-cert-file", str(cert),
                "--tls-key-file", str(key),
                "--tls-ca-cert-file", str(ca),
                "--tls-auth-clients", "no",
            ]  # fmt: skip
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._wait_listening(self.tls_port or self.port)

    def _wait_listening(self, port: int, timeout: float = 10.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {log}")
            if self.tls is None:
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", port), timeout=1) as s,
                ):
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            else:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", port)) == 0:
                        return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not answer on port {port}")

    def kill(self) -> None:
        """SIGKILL: Redis is gone, connections reset, the port closed."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def pause(self) -> None:
        """SIGSTOP: the port accepts connections, but nothing is answered (a timeout)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def redis_server(
    directory: Path, *, tls: tuple[Path, Path, Path] | None = None
) -> Iterator[RedisServer]:
    """A redis-server of its own, stopped afterwards. ``tls``: (certificate, key, CA) to
    serve rediss:// only."""
    binary = require_redis_server()
    directory.mkdir(parents=True, exist_ok=True)
    server = RedisServer(directory, free_port(), _binary=binary)
    if tls is not None:
        server.tls, server.tls_port, server.port = tls, free_port(), 0
    server.start()
    try:
        yield server
    finally:
        server.stop()
