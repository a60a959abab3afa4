"""What the fuzz harnesses share: findings, the checks they make, and ``main()``.

A harness module (``fuzz_<name>.py`` beside this file) defines ``TestOneInput(data)``
and calls :func:`main`. ``TestOneInput`` raises :class:`Finding` when a property does not
hold; any other exception escaping it is a crash as well (atheris reports both the same
way: it prints the traceback, writes the input to ``<artifact_prefix>crash-<sha1>`` and
exits with code 77).

Nothing here imports cardvault at module level: :func:`main` imports the targets inside
``atheris.instrument_imports()`` so that their code is instrumented for coverage, which
only works for modules imported after it starts.

Environment:

``CARDVAULT_FUZZ_SLOW_MS``
    How long one input may take before it is a ``slow`` finding (default 100). A slow
    input is run twice more and only the fastest of the three runs counts, so that a
    pause of a shared machine is not reported.
``CARDVAULT_FUZZ_IGNORE``
    Comma-separated finding kinds not to report (``amplification,RecursionError``), to
    look for other defects behind a known one that is not fixed yet.
``CARDVAULT_FUZZ_MODES``
    The letters of the input modes to fuzz (``j``: only JSON bodies, in
    ``fuzz_params.py``); inputs of other modes do nothing. Empty: every mode.
``CARDVAULT_FUZZ_SELF``
    An executable that runs this harness (a wrapper script): libFuzzer's ``-merge=1``
    and ``-minimize_crash=1`` start the fuzz target again as ``argv[0]``, which a
    ``.py`` file run by the venv's interpreter cannot be.

Besides libFuzzer's flags, a harness takes ``--reproduce FILE...`` (run each input once,
print what it finds, exit 1 if anything) and ``--minimize FILE OUT`` (shrink an input
while it still gives a finding of the same kind, and write it to OUT).
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "Finding",
    "check_encodable",
    "finding",
    "kind_of",
    "main",
    "mask_digits",
    "quiet_logs",
    "shape_of",
    "skip_mode",
    "target",
    "timed",
]

SLOW_SECONDS = float(os.environ.get("CARDVAULT_FUZZ_SLOW_MS", "100")) / 1000
IGNORE = frozenset(k.strip() for k in os.environ.get("CARDVAULT_FUZZ_IGNORE", "").split(","))
MODES = os.environ.get("CARDVAULT_FUZZ_MODES", "")
#: How long the minimizer lets one candidate run before it counts as a timeout.
_CANDIDATE_SECONDS = 5.0


class Finding(Exception):
    """A property of the target does not hold. ``kind`` names which, for grouping."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(f"[{kind}] {message}")
        self.kind = kind


def finding(kind: str, message: str, cause: BaseException | None = None) -> None:
    """Raise a :class:`Finding`, unless ``kind`` is in ``CARDVAULT_FUZZ_IGNORE``."""
    if kind in IGNORE:
        return
    if cause is not None:
        raise Finding(kind, message) from cause
    raise Finding(kind, message)


def unexpected(exc: BaseException, target: str) -> None:
    """An exception the target must never raise: a finding named after its type."""
    finding(type(exc).__name__, f"{target} raised {type(exc).__name__}", exc)


def skip_mode(mode: str) -> bool:
    """Whether ``CARDVAULT_FUZZ_MODES`` leaves out inputs of this mode (a letter)."""
    return bool(MODES) and mode not in MODES


def kind_of(exc: BaseException) -> str:
    return exc.kind if isinstance(exc, Finding) else type(exc).__name__


_spent = 0.0


@contextmanager
def target() -> Iterator[None]:
    """Count the time of the block as the target's (what :func:`timed` limits), so that
    the harness's own checks do not."""
    global _spent
    start = time.perf_counter()
    try:
        yield
    finally:
        _spent += time.perf_counter() - start


def _run(one: Callable[[bytes], None], data: bytes) -> float:
    global _spent
    _spent = 0.0
    one(data)
    return _spent


def timed(one: Callable[[bytes], None], data: bytes) -> None:
    """Run ``one(data)``; a ``slow`` finding when the target's time in it (the blocks
    under :func:`target`) is over the limit even at the fastest of three runs."""
    elapsed = _run(one, data)
    if elapsed <= SLOW_SECONDS or "slow" in IGNORE:
        return
    for _ in range(2):
        elapsed = min(elapsed, _run(one, data))
    if elapsed > SLOW_SECONDS:
        finding(
            "slow",
            f"{len(data)} bytes of input took the target {elapsed * 1000:.0f} ms "
            f"(limit {SLOW_SECONDS * 1000:.0f} ms, fastest of three runs)",
        )


def check_encodable(text: str, where: str) -> None:
    """Every string the targets hand on must be encodable to UTF-8 (no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        finding("unencodable", f"{where} holds a string that is not valid UTF-8 text", exc)


def shape_of(value: Any, where: str) -> tuple[int, int]:
    """``(items, characters)`` of a parsed value, walked without recursion: list items
    plus dict entries, and the characters (code points) of every string, keys included.
    Checks that every string is encodable on the way.

    Characters, not UTF-8 bytes: a query string is read as latin-1, so one byte of
    input may rightly become a two-byte character; no decoding makes more characters
    than it was given bytes.

    :func:`main` instruments this function for coverage: its branches on the kinds of
    value, how deep they nest and the widest character of each string are the only
    signal the fuzzer gets from what a C parser (``json``, ``orjson``) returned, which
    it cannot see into."""
    items = chars = deepest = 0
    stack = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(node, dict):
            items += len(node)
            for key, child in node.items():
                if isinstance(key, str):
                    _text(key, where)
                    chars += len(key)
                stack.append((child, depth + 1))
        elif isinstance(node, list):
            items += len(node)
            stack.extend((child, depth + 1) for child in node)
        elif isinstance(node, str):
            _text(node, where)
            chars += len(node)
        else:
            _scalar(node)
    _depth(deepest)
    return items, chars


def _scalar(value: object) -> str:
    if value is None or isinstance(value, bool):
        return "constant"
    if isinstance(value, int):
        return "big int" if value.bit_length() > 64 else "int"
    if isinstance(value, float):
        return "non-finite" if value != value or abs(value) == float("inf") else "float"
    return "other"


def _depth(deepest: int) -> str:
    if deepest > 256:
        return "deep"
    if deepest > 16:
        return "nested"
    return "flat" if deepest <= 4 else "some"


def _text(text: str, where: str) -> str:
    """Check one string; answer the class of its widest character (see
    :func:`shape_of`)."""
    check_encodable(text, where)
    if text.isascii():
        return "ascii"
    widest = max(text)
    if widest <= "\xff":
        return "latin-1"
    return "bmp" if widest <= "\uffff" else "astral"


def mask_digits(text: str) -> str:
    """``text`` with every run of 8 or more digits (single spaces or dashes allowed
    between them) shown as its first 2 and last 2 digits: for messages and reports, so
    that no card number a fuzzer made up is printed whole."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if not ("0" <= text[i] <= "9"):
            out.append(text[i])
            i += 1
            continue
        j = i
        while j + 1 < n and (
            "0" <= text[j + 1] <= "9"
            or (text[j + 1] in " -" and j + 2 < n and "0" <= text[j + 2] <= "9")
        ):
            j += 1
        run = text[i : j + 1]
        digits = sum(ch.isdigit() for ch in run)
        if digits >= 8:
            out.append(f"{run[:2]}<{digits - 4} digits masked>{run[-2:]}")
        else:
            out.append(run)
        i = j + 1
    return "".join(out)


# --- running -----------------------------------------------------------------------------


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise TimeoutError("the input ran past the deadline")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _outcome(test_one_input: Callable[[bytes], None], data: bytes) -> tuple[str, str] | None:
    """``(kind, description)`` of what ``data`` gives, or None. Only text is kept: an
    exception's traceback would keep alive whatever the target built (a list of 10**8
    items), and the collector walking it would make the next input slow."""
    try:
        with _deadline(_CANDIDATE_SECONDS):
            test_one_input(data)
    except Exception as exc:
        cause = exc.__cause__
        text = str(exc) + (f" (cause: {type(cause).__name__}: {cause})" if cause else "")
        kind = kind_of(exc)
        del exc, cause
    else:
        return None
    gc.collect()
    return kind, text


def _reproduce(test_one_input: Callable[[bytes], None], paths: list[str]) -> int:
    failed = 0
    for path in paths:
        data = Path(path).read_bytes()
        outcome = _outcome(test_one_input, data)
        if outcome is None:
            print(f"{path}: ok")
            continue
        failed += 1
        kind, text = outcome
        print(f"{path}: {kind}: {mask_digits(text)}")
        print(f"  input ({len(data)} bytes): {mask_digits(repr(data[:300]))}")
    return 1 if failed else 0


def _minimize(test_one_input: Callable[[bytes], None], path: str, out: str, keep: int) -> int:
    """Greedy delta debugging: drop chunks, then single bytes, then simplify bytes, as
    long as the input still gives a finding of the same kind. The first ``keep`` bytes
    (a harness's mode byte) stay as they are."""
    data = Path(path).read_bytes()
    first = _outcome(test_one_input, data)
    if first is None:
        print(f"{path}: no finding, nothing to minimize")
        return 1
    kind = first[0]

    def still(candidate: bytes) -> bool:
        outcome = _outcome(test_one_input, candidate)
        return outcome is not None and outcome[0] == kind

    head, data = data[:keep], data[keep:]
    chunk = max(1, len(data) // 2)
    while chunk >= 1:
        i = 0
        while i < len(data):
            candidate = data[:i] + data[i + chunk :]
            if candidate != data and still(head + candidate):
                data = candidate
            else:
                i += chunk
        chunk //= 2
    for i in range(len(data)):
        for simpler in b"a0":
            if data[i] != simpler and data[i] not in b'0123456789[]{}"=&:/':
                candidate = data[:i] + bytes([simpler]) + data[i + 1 :]
                if still(head + candidate):
                    data = candidate
                    break
    data = head + data
    Path(out).write_bytes(data)
    print(f"{kind}: {len(data)} bytes: {mask_digits(repr(data[:300]))}")
    return 0


def quiet_logs() -> None:
    """Drop the targets' info logs (an allowlist refusal logs its reason): a fuzzer
    printing a line per input would mostly measure the terminal. Warnings still show."""
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def main(
    test_one_input: Callable[[bytes], None], load: Callable[[], None], *, mode_bytes: int = 0
) -> None:
    """Fuzz ``test_one_input`` with atheris; ``load`` imports the targets (instrumented).
    ``mode_bytes``: how many leading bytes of an input choose a mode (kept by
    ``--minimize``)."""
    quiet_logs()
    args = sys.argv[1:]
    if args[:1] == ["--reproduce"]:
        load()
        sys.exit(_reproduce(test_one_input, args[1:]))
    if args[:1] == ["--minimize"] and len(args) == 3:
        load()
        sys.exit(_minimize(test_one_input, args[1], args[2], mode_bytes))

    import atheris

    with atheris.instrument_imports(include=["cardvault"]):
        load()
    for function in (shape_of, _text, _scalar, _depth):
        atheris.instrument_func(function)
    argv = list(sys.argv)
    if os.environ.get("CARDVAULT_FUZZ_SELF"):
        argv[0] = os.environ["CARDVAULT_FUZZ_SELF"]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()
