"""The garbage collector is tuned once a service has started (run_until_stopped)."""

from __future__ import annotations

import gc
import subprocess
import sys
import textwrap

from cardvault.transport.server import GC_THRESHOLDS, tune_gc_for_serving


def test_tune_gc_for_serving_freezes_and_raises_the_threshold() -> None:
    before = gc.get_threshold()
    try:
        made_at_startup = object.__new__(type("StartupThing", (), {}))
        tune_gc_for_serving()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
        # What existed before the call is frozen, hence not in any generation's list.
        assert not any(made_at_startup is o for o in gc.get_objects())
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_tuning_still_collects_reference_cycles() -> None:
    before = gc.get_threshold()
    try:
        tune_gc_for_serving()

        class Node:
            other: Node

        a, b = Node(), Node()
        a.other, b.other = b, a
        alive = len([o for o in gc.get_objects() if isinstance(o, Node)])
        del a, b
        assert alive == 2
        gc.collect()
        assert not [o for o in gc.get_objects() if isinstance(o, Node)]
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_run_until_stopped_tunes_the_collector_after_startup() -> None:
    # A real process: the tuning is process-wide, so it must not touch the test run's.
    script = textwrap.dedent(
        """
        import gc, os, signal
        from cardvault.transport.server import run_until_stopped

        seen = {"default": gc.get_threshold()}

        async def startup():
            seen["startup"] = (gc.get_threshold(), gc.get_freeze_count())

        def ready():
            print(seen["default"] == seen["startup"][0], seen["startup"][1])
            print(gc.get_threshold(), gc.get_freeze_count() > 0)
            os.kill(os.getpid(), signal.SIGINT)

        run_until_stopped([], ready=ready, startup=startup)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    at_startup, serving = result.stdout.strip().splitlines()
    # Untouched while start-up runs (the interpreter's defaults, nothing frozen) ...
    assert at_startup == "True 0"
    # ... tuned once it is done.
    assert serving == f"{GC_THRESHOLDS} True"
