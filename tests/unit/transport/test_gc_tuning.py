"""The garbage collector is tuned for serving (run_until_stopped), before start-up."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap
import weakref
from collections.abc import Iterator

import pytest

from cardvault.transport.server import GC_THRESHOLDS, tune_gc_for_serving


@pytest.fixture
def tuned() -> Iterator[None]:
    """Tune this process's collector for one test, then put it back."""
    before = gc.get_threshold()
    try:
        tune_gc_for_serving()
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_tuning_freezes_what_exists_and_raises_the_threshold() -> None:
    made_before = type("MadeBefore", (), {})()
    before = gc.get_threshold()
    try:
        tune_gc_for_serving()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
        # Frozen: in no generation the collector walks.
        assert not any(made_before is o for o in gc.get_objects())
        made_after = type("MadeAfter", (), {})()
        assert any(made_after is o for o in gc.get_objects())
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


@pytest.mark.usefixtures("tuned")
def test_cycles_are_still_collected_without_being_asked() -> None:
    class Node:
        other: object

    a, b = Node(), Node()
    a.other, b.other = b, a
    gone = weakref.ref(a)
    del a, b
    assert gc.isenabled()
    assert gone() is not None  # garbage, waiting for a collection
    # More container objects alive than the young threshold: a collection starts by
    # itself (nothing here calls gc.collect) and frees the cycle.
    alive = [[] for _ in range(GC_THRESHOLDS[0] + 1_000)]
    assert gone() is None
    assert len(alive) > GC_THRESHOLDS[0]


def test_run_until_stopped_tunes_the_collector_before_startup() -> None:
    # A real process: the tuning is process-wide, so it must not touch the test run's.
    script = textwrap.dedent(
        """
        import gc, os, signal
        from cardvault.transport.server import run_until_stopped

        seen = {}

        async def startup():
            seen["startup"] = (gc.get_threshold(), gc.get_freeze_count() > 0)
            seen["opened"] = type("Pool", (), {})()

        def ready():
            print(*seen["startup"])
            # What start-up made stays where the collector walks (a pool that drops a
            # connection later must not leak it).
            print(any(o is seen["opened"] for o in gc.get_objects()))
            os.kill(os.getpid(), signal.SIGINT)

        async def shutdown():
            print("shutdown")

        run_until_stopped([], ready=ready, startup=startup, shutdown=shutdown)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.splitlines() == [f"{GC_THRESHOLDS} True", "True", "shutdown"]
