"""Run the fuzz harnesses in tests/fuzz/ for as long as you like and print what they did.

    .venv/bin/python bench/fuzz.py --seconds 600                 every harness, 10 min each
    .venv/bin/python bench/fuzz.py --harness params --jobs 2     one harness, two processes
    .venv/bin/python bench/fuzz.py --harness cards --merge       keep what grew the corpus

Each harness runs for ``--seconds`` in ``--jobs`` fuzzer processes that share one
working corpus (a copy of ``tests/fuzz/corpus/<harness>/`` in a temporary directory),
with its dictionary, ``-rss_limit_mb``, ``-timeout`` and the crash files written to the
temporary directory. A process that finds a crash stops; with ``--keep-going`` it is
started again on the grown corpus until the time is up. The table gives per harness the
executions, executions per second, crashes (distinct finding kinds in brackets) and the
corpus before and after; each crash is then reproduced (and with ``--minimize`` shrunk)
and printed with any digit run of 8 or more masked.

The repository's corpus changes only with ``--merge``: libFuzzer's ``-merge=1`` then
copies into it the inputs of the working corpus that add coverage, named by their SHA-1.

``--src DIR`` puts DIR first on the harnesses' PYTHONPATH, to fuzz another tree's
cardvault (``git archive <commit> src | tar -x -C /tmp/old``, then ``--src /tmp/old/src``).
``--ignore KINDS`` sets ``CARDVAULT_FUZZ_IGNORE`` (see ``tests/fuzz/_harness.py``), to look
behind a known finding, and ``--modes LETTERS`` sets ``CARDVAULT_FUZZ_MODES``, to fuzz only
some kinds of input (``--harness params --modes j``: JSON bodies).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUZZ = ROOT / "tests" / "fuzz"
HARNESSES = sorted(p.stem.removeprefix("fuzz_") for p in FUZZ.glob("fuzz_*.py"))
_WRITTEN = re.compile(r"Test unit written to (\S+)")
_FINDING = re.compile(r"Finding: \[([\w-]+)\]")
_UNCAUGHT = re.compile(r"=== Uncaught Python exception: ===\s*\n(\w+)")


@dataclass
class Result:
    harness: str
    seconds: float = 0.0
    executions: int = 0
    processes: int = 0
    corpus_before: int = 0
    corpus_after: int = 0
    merged: int | None = None
    crashes: list[Path] = field(default_factory=list)
    #: finding kind -> the crash files of that kind
    kinds: dict[str, list[Path]] = field(default_factory=dict)
    reports: list[str] = field(default_factory=list)


def _env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.src:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.src, env.get("PYTHONPATH")]))
    if args.ignore:
        env["CARDVAULT_FUZZ_IGNORE"] = args.ignore
    if args.modes:
        env["CARDVAULT_FUZZ_MODES"] = args.modes
    return env


def _wrapper(work: Path, harness: str) -> Path:
    """An executable that runs the harness: what libFuzzer's -merge=1 starts again."""
    path = work / f"fuzz_{harness}.sh"
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FUZZ / f"fuzz_{harness}.py"}" "$@"\n')
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _flags(args: argparse.Namespace, harness: str, artifacts: Path) -> list[str]:
    flags = [
        f"-rss_limit_mb={args.rss_limit_mb}",
        f"-timeout={args.timeout}",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/",
    ]
    dictionary = FUZZ / "dict" / f"{harness}.dict"
    if dictionary.exists():
        flags.append(f"-dict={dictionary}")
    if args.max_len:
        flags.append(f"-max_len={args.max_len}")
    return flags


def _crash_kind(log: str) -> tuple[Path, str] | None:
    """The crash file a fuzzer process wrote (it stops at the first) and its kind, read
    from its log: the harness's finding kind, the exception's type, or libFuzzer's own
    ``timeout`` / ``oom``."""
    written = _WRITTEN.search(log)
    if written is None:
        return None
    before = log[: written.start()]
    if "ALARM: working on the last Unit" in before:
        kind = "timeout"
    elif "out-of-memory" in before:
        kind = "oom"
    elif (found := _FINDING.findall(before)) or (found := _UNCAUGHT.findall(before)):
        kind = found[-1]
    else:
        kind = "?"
    return Path(written.group(1)), kind


def _executions(log: str) -> int:
    """Executions a finished fuzzer reported: its final stats, else its last status line."""
    match = re.search(r"stat::number_of_executed_units:\s*(\d+)", log)
    if match:
        return int(match.group(1))
    lines = re.findall(r"^#(\d+)\s", log, re.MULTILINE)
    return int(lines[-1]) if lines else 0


def run_harness(args: argparse.Namespace, harness: str, work: Path) -> Result:
    result = Result(harness)
    corpus = work / "corpus"
    artifacts = work / "artifacts"
    artifacts.mkdir(parents=True)
    shutil.copytree(FUZZ / "corpus" / harness, corpus)
    result.corpus_before = sum(1 for _ in corpus.iterdir())
    env = _env(args)
    script = FUZZ / f"fuzz_{harness}.py"
    flags = _flags(args, harness, artifacts)

    deadline = time.monotonic() + args.seconds
    started = time.monotonic()
    running: dict[int, tuple[subprocess.Popen[bytes], Path]] = {}
    runs = 0

    def start(slot: int) -> None:
        nonlocal runs
        left = int(deadline - time.monotonic())
        if left < 1:
            return
        runs += 1
        log = work / f"run-{runs:03d}.log"
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, str(script), f"-max_total_time={left}", *flags, str(corpus)],
                cwd=work,
                env=env,
                stdout=fh,
                stderr=subprocess.STDOUT,
            )
        running[slot] = (proc, log)

    for slot in range(args.jobs):
        start(slot)
    while running:
        time.sleep(0.2)
        for slot, (proc, log) in list(running.items()):
            if proc.poll() is None:
                if time.monotonic() > deadline + args.timeout + 60:
                    proc.kill()
                continue
            del running[slot]
            text = log.read_text(errors="replace")
            result.executions += _executions(text)
            result.processes += 1
            crash = _crash_kind(text)
            if crash is not None:
                result.kinds.setdefault(crash[1], []).append(crash[0])
            if proc.returncode != 0 and args.keep_going:
                start(slot)
    result.seconds = time.monotonic() - started
    result.crashes = sorted(artifacts.iterdir())
    result.corpus_after = sum(1 for _ in corpus.iterdir())

    # One report per kind: the smallest input of that kind, run again (and shrunk), with
    # no kind ignored, so that it shows what the input really does.
    plain = {k: v for k, v in env.items() if k != "CARDVAULT_FUZZ_IGNORE"}
    for kind, files in sorted(result.kinds.items()):
        smallest = min((f for f in files if f.exists()), key=lambda f: f.stat().st_size)
        report = _report(script, smallest, plain, minimize=args.minimize)
        result.reports.append(f"{kind} ({len(files)} crash files): {report}")

    if args.merge:
        before = sum(1 for _ in (FUZZ / "corpus" / harness).iterdir())
        wrapper = _wrapper(work, harness)
        merge_env = dict(env, CARDVAULT_FUZZ_SELF=str(wrapper))
        with open(work / "merge.log", "wb") as fh:
            subprocess.run(
                [str(wrapper), "-merge=1", *flags, str(FUZZ / "corpus" / harness), str(corpus)],
                cwd=work,
                env=merge_env,
                stdout=fh,
                stderr=subprocess.STDOUT,
                check=False,
            )
        result.merged = sum(1 for _ in (FUZZ / "corpus" / harness).iterdir()) - before
    return result


def _report(script: Path, crash: Path, env: dict[str, str], *, minimize: bool) -> str:
    """What the harness says about one crash file (run again in a fresh process)."""
    cmd = [sys.executable, str(script), "--reproduce", str(crash)]
    try:
        out = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=120, check=False
        ).stdout.strip()
    except subprocess.TimeoutExpired:
        out = f"{crash}: timeout: the input did not finish in 120 s"
    if minimize:
        small = crash.with_name(crash.name + ".min")
        try:
            done = subprocess.run(
                [sys.executable, str(script), "--minimize", str(crash), str(small)],
                env=env,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            out += f"\n  minimized: {done.stdout.strip()} ({small})"
        except subprocess.TimeoutExpired:
            out += "\n  minimizing took more than 600 s; skipped"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="fuzzing time per harness")
    parser.add_argument(
        "--harness",
        action="append",
        choices=HARNESSES,
        help="a harness to run (repeatable; default: all)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="fuzzer processes per harness")
    parser.add_argument("--merge", action="store_true", help="merge new inputs into the repo")
    parser.add_argument("--keep-going", action="store_true", help="restart after a crash")
    parser.add_argument("--minimize", action="store_true", help="shrink each crashing input")
    parser.add_argument("--max-len", type=int, default=0, help="libFuzzer -max_len (0: its own)")
    parser.add_argument("--rss-limit-mb", type=int, default=1024)
    parser.add_argument("--timeout", type=int, default=5, help="libFuzzer -timeout per input")
    parser.add_argument("--src", help="a cardvault source tree to fuzz instead (PYTHONPATH)")
    parser.add_argument("--ignore", help="finding kinds not to report (CARDVAULT_FUZZ_IGNORE)")
    parser.add_argument("--modes", help="input modes to fuzz, e.g. j (CARDVAULT_FUZZ_MODES)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="cardvault-fuzz-"))
    results: list[Result] = []
    try:
        for harness in args.harness or HARNESSES:
            print(f"fuzzing {harness} for {args.seconds:.0f} s x {args.jobs} ...", flush=True)
            results.append(run_harness(args, harness, base / harness))
    finally:
        print()
        header = (
            f"{'harness':<10} {'seconds':>8} {'execs':>12} {'execs/s':>9} {'procs':>5} "
            f"{'crashes':>7} {'corpus':>13} {'merged':>6}  kinds"
        )
        print(header)
        print("-" * len(header))
        for r in results:
            rate = r.executions / r.seconds if r.seconds else 0.0
            merged = "-" if r.merged is None else str(r.merged)
            kinds = ", ".join(f"{k} x{len(v)}" for k, v in sorted(r.kinds.items()))
            print(
                f"{r.harness:<10} {r.seconds:>8.0f} {r.executions:>12,} {rate:>9,.0f} "
                f"{r.processes:>5} {len(r.crashes):>7} "
                f"{f'{r.corpus_before} -> {r.corpus_after}':>13} {merged:>6}  {kinds}"
            )
        for r in results:
            for report in r.reports:
                print(f"\n[{r.harness}] {report}")
        if args.keep or any(r.crashes for r in results):
            print(f"\nwork directory (logs, corpora, crash files): {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
