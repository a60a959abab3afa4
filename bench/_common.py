"""Shared pieces of the benchmarks: a child process, a load loop, and the result table.

Benchmarks are scripts, never tests: they measure, they do not assert thresholds. Every
figure they print is read as a ratio to a baseline taken in the same run, because the
absolute numbers depend on whatever else the machine is doing.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

Send = Callable[[], Awaitable[None]]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cardvault(args: Sequence[str], *, log: Path) -> None:
    """Run ``python -m cardvault ARGS`` to completion; raise with the log on failure."""
    with open(log, "ab") as fh:
        result = subprocess.run(
            [sys.executable, "-m", "cardvault", *args], stdout=fh, stderr=fh, check=False
        )
    if result.returncode != 0:
        raise RuntimeError(
            f"cardvault {' '.join(args)} exited with {result.returncode}:\n{log.read_text()}"
        )


@contextlib.contextmanager
def cardvault_process(args: Sequence[str], *, log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``python -m cardvault ARGS`` as a child process; SIGTERM it afterwards.

    With ``CARDVAULT_BENCH_PROFILE=FILE`` in the environment, a ``vault serve`` child
    runs under cProfile and writes its statistics to FILE when it stops (read them with
    ``python -m pstats FILE``). Profiling slows the vault: its figures are then not
    comparable with a normal run.
    """
    profile = os.environ.get("CARDVAULT_BENCH_PROFILE")
    wrapper: list[str] = []
    if profile and list(args[:2]) == ["vault", "serve"]:
        wrapper = ["-m", "cProfile", "-o", profile]
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            [sys.executable, *wrapper, "-m", "cardvault", *args],
            stdout=fh,
            stderr=fh,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes], *, log: Path, timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the process exited with {proc.returncode}:\n{log.read_text()}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open within {timeout} s")


@dataclass
class Result:
    label: str
    concurrency: int
    seconds: float
    latencies: list[float] = field(repr=False)

    @property
    def ops(self) -> int:
        return len(self.latencies)

    @property
    def ops_per_second(self) -> float:
        return self.ops / self.seconds

    def percentile(self, q: float) -> float:
        """Nearest-rank percentile of the latencies, in milliseconds."""
        ordered = sorted(self.latencies)
        rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
        return ordered[rank - 1] * 1000


async def measure(
    label: str, send: Send, *, concurrency: int, seconds: float, warmup: float = 0.5
) -> Result:
    """Call ``send`` from ``concurrency`` workers, each waiting for its previous call,
    for ``seconds``, after ``warmup`` seconds whose calls are not counted (they open the
    keep-alive connections and warm the server's caches)."""

    async def worker(until: float, latencies: list[float] | None) -> None:
        while True:
            started = time.perf_counter()
            if started >= until:
                return
            await send()
            if latencies is not None:
                latencies.append(time.perf_counter() - started)

    warm_until = time.perf_counter() + warmup
    await asyncio.gather(*(worker(warm_until, None) for _ in range(concurrency)))
    latencies: list[float] = []
    began = time.perf_counter()
    await asyncio.gather(*(worker(began + seconds, latencies) for _ in range(concurrency)))
    # Calls in flight at the deadline finish and count; elapsed time includes them.
    return Result(label, concurrency, time.perf_counter() - began, latencies)


def print_table(results: Sequence[Result], *, baseline: str) -> None:
    """One row per result; ``ratio`` is ops/s relative to ``baseline`` at the same
    concurrency, from the same run."""
    base = {r.concurrency: r.ops_per_second for r in results if r.label == baseline}
    header = ("endpoint", "conc", "ops/s", f"vs {baseline.split()[-1]}", "p50 ms", "p99 ms")
    rows = [
        (
            r.label,
            str(r.concurrency),
            f"{r.ops_per_second:,.0f}",
            f"{r.ops_per_second / base[r.concurrency]:.2f}" if r.concurrency in base else "-",
            f"{r.percentile(50):.2f}",
            f"{r.percentile(99):.2f}",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True))
        return "  ".join([first, *rest])

    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
