"""Faults at a size the test suite cannot afford, and the report of what survived them.

The same scenarios as ``tests/faults`` (``tests/faults/fault_scenarios.py``: the real
key service and vault over TLS with a test CA, a merchant-like load of tokenizations,
each logical request with its own Idempotency-Key and ``metadata[order]``), with the
sizes as arguments, on SQLite and on a PostgreSQL database created and dropped for the
run:

* ``kill``: ``kill -9`` of the vault ``--kills`` times, ``--load-seconds`` of load
  before each, the vault started again at once;
* ``postgres``: the vault's connections terminated (then refused) ``--pg-outages``
  times for ``--pg-outage-seconds`` each, on the run's own database (PostgreSQL only;
  the server is never stopped);
* ``keyservice``: the key service killed and started again, then sealed and started
  again, ``--keyservice-outages`` times, each down ``--keyservice-down-seconds``;
* ``audit-enospc`` and ``audit-tmpfs``: the vault's audit directory full (ENOSPC
  injected; a tmpfs filled for real, as root only), ``--audit-rounds`` times: a short
  outage of ``--audit-short-seconds``, then one until the vault exits 74;
* ``forwards``: ``--forwards-per-mode`` forwards at once while the destination is
  down, untrusted, hung, resetting or answering an error, then a vault killed under a
  forward.

After each scenario the common check runs (``tests/faults/faults_support.py``):
acknowledged cards lost, duplicates per order, cards without their audit record,
idempotency keys stuck (every unacknowledged request retried with its key for up to
30 s), acknowledged requests retried with their key (100 of them, all after the
PostgreSQL outages, or all with ``--replay-all``), 500s and 503s by code, ``cardvault
audit verify``. Printed: a table, one line
per scenario and backend, and every problem found; written: the full report as JSON
(``--json``, by default a file in the temporary directory, named at the end). A run
exits 1 when any property failed (a correctness result, not a threshold on a figure).

    .venv/bin/python bench/faults.py
    .venv/bin/python bench/faults.py --backend sqlite --scenarios kill --kills 50
    .venv/bin/python bench/faults.py --kills 20 --load-seconds 2 --pg-outage-seconds 5

Run it as root for the tmpfs variant (it is reported as skipped otherwise).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "faults")]

import fault_scenarios as scenarios  # noqa: E402
from faults_support import Result, report_table  # noqa: E402

from helpers import make_pki  # noqa: E402

SCENARIOS = ("kill", "postgres", "keyservice", "audit-enospc", "audit-tmpfs", "forwards")


class _Temp:
    """Numbered directories under one root, as pytest's ``tmp_path_factory`` makes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.count = 0

    def mktemp(self, basename: str) -> Path:
        self.count += 1
        path = self.root / f"{basename}{self.count}"
        path.mkdir()
        return path


def _runs(args: argparse.Namespace) -> dict[str, Callable[[scenarios.FaultStack], Result]]:
    return {
        "kill": lambda fs: scenarios.vault_killed(
            fs, kills=args.kills, load_seconds=args.load_seconds, workers=args.workers
        ),
        "postgres": lambda fs: scenarios.postgres_terminated(
            fs,
            outages=args.pg_outages,
            outage_seconds=args.pg_outage_seconds,
            load_seconds=args.load_seconds,
            workers=args.workers,
        ),
        "keyservice": lambda fs: scenarios.keyservice_down(
            fs,
            outages=args.keyservice_outages,
            down_seconds=args.keyservice_down_seconds,
            load_seconds=args.load_seconds,
            workers=args.workers,
        ),
        "audit-enospc": lambda fs: scenarios.audit_full(
            fs,
            "enospc",
            rounds=args.audit_rounds,
            load_seconds=args.load_seconds,
            short_seconds=args.audit_short_seconds,
            workers=args.workers,
        ),
        "audit-tmpfs": lambda fs: scenarios.audit_full(
            fs,
            "tmpfs",
            rounds=args.audit_rounds,
            load_seconds=args.load_seconds,
            short_seconds=args.audit_short_seconds,
            workers=args.workers,
        ),
        "forwards": lambda fs: scenarios.forwards(fs, per_mode=args.forwards_per_mode),
    }


def _commit() -> str:
    done = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "unknown"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated, of {', '.join(SCENARIOS)} (all)",
    )
    p.add_argument("--workers", type=int, default=8, help="load threads (8)")
    p.add_argument("--load-seconds", type=float, default=2.0, help="load before each fault (2)")
    p.add_argument("--kills", type=int, default=20, help="kill -9 of the vault (20)")
    p.add_argument("--pg-outages", type=int, default=3, help="PostgreSQL outages (3)")
    p.add_argument("--pg-outage-seconds", type=float, default=5.0, help="each (5)")
    p.add_argument("--keyservice-outages", type=int, default=3, help="kills and seals each (3)")
    p.add_argument("--keyservice-down-seconds", type=float, default=3.0, help="each (3)")
    p.add_argument("--audit-rounds", type=int, default=2, help="full audit directory (2)")
    p.add_argument(
        "--audit-short-seconds",
        type=float,
        default=3.0,
        help="the short outage, under the vault's 5 s of grace before it exits (3)",
    )
    p.add_argument("--forwards-per-mode", type=int, default=10, help="at once per mode (10)")
    p.add_argument(
        "--replay-all",
        action="store_true",
        help="retry every acknowledged request with its key, not a sample of 100",
    )
    p.add_argument("--json", type=Path, help="where to write the report (a temporary file)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory and logs")
    args = p.parse_args()
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        p.error(f"unknown scenarios: {', '.join(unknown)}")
    backends = ["sqlite", "postgres"] if args.backend == "both" else [args.backend]
    runs = _runs(args)

    root = Path(tempfile.mkdtemp(prefix="cardvault-faults-"))
    temp = _Temp(root)
    results: list[Result] = []
    skipped: list[str] = []
    started = time.monotonic()
    try:
        pki = make_pki(temp.mktemp("pki"))
        for backend in backends:
            with scenarios.fault_stack(temp, pki, backend) as fs:
                fs.replay_all = args.replay_all
                for name in chosen:
                    if name == "postgres" and backend != "postgres":
                        continue
                    if name == "audit-tmpfs" and not fs.tmpfs:
                        skipped.append(f"{name} on {backend}: {fs.tmpfs_reason}")
                        continue
                    fs.heal()
                    print(f"{backend}: {name} …", flush=True)
                    result = runs[name](fs)
                    fs.heal()
                    results.append(result)
                    print(f"  {result.seconds:.1f} s, problems: {len(result.all_problems())}")
    finally:
        if args.keep:
            print(f"kept: {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)

    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": _commit(),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds": round(time.monotonic() - started, 1),
        "skipped": skipped,
        "scenarios": [r.as_dict() for r in results],
    }
    out = args.json or Path(tempfile.gettempdir()) / (
        f"cardvault-faults-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    )
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")

    print()
    print(report_table(results))
    for line in skipped:
        print(f"skipped: {line}")
    problems = [(r, p) for r in results for p in r.all_problems()]
    for r, problem in problems:
        print(f"PROBLEM {r.findings.scenario} ({r.findings.backend}): {problem}")
    print(f"\n{report['seconds']} s; report: {out}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
