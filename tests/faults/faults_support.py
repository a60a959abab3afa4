"""What every fault scenario drives and checks, written once.

**The load** is what a well-behaved merchant does: worker threads, each on its own HTTPS
connection verified against the test CA, create payment methods with a secret key, and
every *logical request* (one order's card) carries an ``Idempotency-Key`` and a
``metadata[order]`` of its own. A request that got no connection at all (the vault is
down) is sent again at once with the same key; one that may have reached the vault and
got anything but a 200 (a cut connection, a 503) is left *unacknowledged*, and is what
the check retries. The ledger keeps every answer.

**The check** (:func:`check`), after the fault is over, is the same for every scenario,
because a client cannot tell the faults apart and every one of them must leave the same
state behind:

* *0 acknowledged lost*: every payment method answered 200 can be read back (the API's
  list), and it is the one card stored for its order;
* *0 duplicates*: at most one payment method per ``metadata[order]`` (from the vault's
  own database, where an invisible duplicate would be too);
* *0 cards without their audit record*: every card stored has its
  ``payment_method.created`` record in the vault's audit log (audit before effect);
  and every such record of the scenario names a card stored or is followed by
  ``payment_method.not_stored`` (no record of a card that silently never came);
* *0 idempotency keys stuck*: every unacknowledged logical request, retried with its
  same key and parameters until it gets an answer other than 503 or 409 (within
  :data:`RETRY_FOR` seconds in all), gets a 200, and its id is the card stored for its
  order; the acknowledged ones (a sample, or all), retried too, replay the same id;
* *honest answers*: no 500, every 503 has a ``Retry-After`` and a code the scenario
  may give, nothing else unexpected;
* ``cardvault audit verify`` passes on the vault's log.

The checks read the vault's database and files behind its back, so they see what a
client could not: a duplicate stored under an id nobody was told, a row without its
record. They also count the claims still held afterwards (``claims_held_after``), for
the report only: a claim whose answer could not be stored is held until the next
request with its key or the vault's settler (once a minute) completes it, which a
client does not see.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import secrets
import statistics
import threading
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cardvault.audit import LOG_FILE
from cardvault.audit.record import format_time
from cardvault.transport.tls import client_context
from helpers import cli
from stack import Stack

__all__ = [
    "CARD",
    "OPEN_LIMITS",
    "REPLAY_SAMPLE",
    "RETRY_FOR",
    "Answer",
    "Findings",
    "Ledger",
    "Load",
    "Logical",
    "Result",
    "assert_clean",
    "audit_records",
    "check",
    "https_client",
    "report_table",
    "tokenize",
    "wait_until",
]

#: A published test card (never a real-looking number).
CARD = {
    "type": "card",
    "card[number]": "4242424242424242",
    "card[exp_month]": "12",
    "card[exp_year]": "2034",
}
#: Seconds the check spends, in all, retrying the unacknowledged requests.
RETRY_FOR = 30.0
#: Acknowledged requests retried with their key by the check (a sample: a replay reads
#: the card again, and the load acknowledges thousands), unless a scenario asks for all.
REPLAY_SAMPLE = 100
#: The vault's [limits] for the fault stacks: the load must reach the code under test.
OPEN_LIMITS = "secret_rate = 100000.0\nsecret_burst = 100000.0\n"


def https_client(ca_file: Path, *, timeout: float = 30.0) -> httpx.Client:
    """A client that verifies the vault's certificate against the test CA, always."""
    return httpx.Client(
        verify=client_context(ca_file),
        trust_env=False,
        timeout=httpx.Timeout(timeout, connect=5.0),
    )


# --- the requests -----------------------------------------------------------------------


@dataclass(frozen=True)
class Logical:
    """One order's card: what a client sends again, unchanged, until it is answered."""

    order: str
    key: str
    cvc: str | None = None

    def form(self) -> dict[str, str]:
        form = {**CARD, "metadata[order]": self.order}
        if self.cvc is not None:
            form["card[cvc]"] = self.cvc
        return form


@dataclass(frozen=True)
class Answer:
    """What one HTTP attempt got. ``status`` None: no answer (``error`` says why);
    ``sent`` False: no connection was made, so nothing can have reached the vault."""

    at: float
    status: int | None
    code: str | None = None
    retry_after: str | None = None
    pm_id: str | None = None
    error: str | None = None
    sent: bool = True
    #: A 200 whose payment method is another order's (a replay of the wrong request).
    wrong_object: bool = False
    replayed: bool = False


def tokenize(client: httpx.Client, url: str, secret: str, logical: Logical) -> Answer:
    """``POST /v1/payment_methods`` for ``logical``, with its Idempotency-Key."""
    try:
        r = client.post(
            f"{url}/v1/payment_methods",
            data=logical.form(),
            headers={"authorization": f"Bearer {secret}", "idempotency-key": logical.key},
        )
    except httpx.ConnectError as exc:
        return Answer(time.monotonic(), None, error=type(exc).__name__, sent=False)
    except httpx.TransportError as exc:
        return Answer(time.monotonic(), None, error=type(exc).__name__)
    now = time.monotonic()
    try:
        body = r.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    retry_after = r.headers.get("retry-after")
    replayed = r.headers.get("idempotent-replayed") == "true"
    if r.status_code == 200:
        metadata = body.get("metadata") or {}
        return Answer(
            now,
            200,
            pm_id=body.get("id"),
            wrong_object=metadata.get("order") != logical.order,
            retry_after=retry_after,
            replayed=replayed,
        )
    error = body.get("error") if isinstance(body.get("error"), dict) else {}
    assert isinstance(error, dict)
    return Answer(now, r.status_code, code=error.get("code"), retry_after=retry_after)


class Ledger:
    """Every logical request of one scenario and every answer it got, thread-safe.

    Orders are ``<scenario>-<run>-<n>``: unique across runs on one stack, so that
    several scenarios can share a stack and each check only its own."""

    def __init__(self, scenario: str, secret: str, account: str, *, cvc: str | None = None):
        self.scenario = scenario
        self.prefix = f"{scenario}-{secrets.token_hex(3)}-"
        self.secret = secret
        self.account = account
        self.cvc = cvc
        #: Wall-clock start, as the audit log writes times (its records of this run
        #: are the ones at or after it), and in seconds.
        self.since = format_time(dt.datetime.now(dt.UTC))
        self.since_epoch = int(time.time())
        self.answers: list[Answer] = []
        self.retries: list[Answer] = []
        self.acked: dict[str, str] = {}
        self.unacked: dict[str, Logical] = {}
        self.logical = 0
        self._lock = threading.Lock()

    def new(self) -> Logical:
        with self._lock:
            n = self.logical
            self.logical += 1
        return self.request(f"{self.prefix}{n}")

    def request(self, order: str) -> Logical:
        """The logical request of ``order``, exactly as it was (and is again) sent."""
        return Logical(order, f"ik-{order}", self.cvc)

    def record(self, logical: Logical, answer: Answer) -> None:
        with self._lock:
            self.answers.append(answer)
            if answer.status == 200 and answer.pm_id and not answer.wrong_object:
                self.acked[logical.order] = answer.pm_id
                self.unacked.pop(logical.order, None)
            elif answer.sent and logical.order not in self.acked:
                self.unacked[logical.order] = logical

    def retried(self, answer: Answer) -> None:
        with self._lock:
            self.retries.append(answer)

    def first_200(self, since: float) -> float | None:
        """When the first 200 answered after ``since`` arrived (monotonic), or None."""
        with self._lock:
            times = [a.at for a in self.answers if a.status == 200 and a.at >= since]
        return min(times) if times else None

    def count(self, since: float = 0.0, **match: object) -> int:
        """Answers since ``since`` whose fields equal ``match`` (status=503,
        code="keyservice_sealed")."""
        with self._lock:
            answers = [a for a in self.answers if a.at >= since]
        return sum(all(getattr(a, k) == v for k, v in match.items()) for a in answers)


class Load:
    """``workers`` threads tokenizing into ``ledger`` while the block runs (see the
    module docstring for what a worker does with each answer)."""

    def __init__(self, stack: Stack, ledger: Ledger, ca_file: Path, *, workers: int = 8):
        self.stack = stack
        self.ledger = ledger
        self.ca_file = ca_file
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, name=f"load-{i}", daemon=True)
            for i in range(workers)
        ]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _work(self) -> None:
        ledger = self.ledger
        with https_client(self.ca_file) as client:
            logical = ledger.new()
            while not self._stop.is_set():
                answer = tokenize(client, self.stack.url, ledger.secret, logical)
                ledger.record(logical, answer)
                if answer.status == 200:
                    logical = ledger.new()
                    continue
                if answer.sent:
                    # It may have reached the vault: the check retries it; go on with
                    # the next order, as a shop's next customer would.
                    logical = ledger.new()
                self._stop.wait(0.05)

    def wait_for_200(self, since: float, timeout: float = 30.0) -> float | None:
        """Seconds from ``since`` (monotonic) to the first 200 after it; None when none
        came within ``timeout``."""
        deadline = since + timeout
        while time.monotonic() < deadline:
            first = self.ledger.first_200(since)
            if first is not None:
                return first - since
            time.sleep(0.01)
        return None


# --- the check ----------------------------------------------------------------------------


def audit_records(stack: Stack) -> list[dict[str, Any]]:
    """The vault's audit records, in order (a line that is not JSON is left to
    ``cardvault audit verify``, which the check runs too)."""
    path = stack.audit_dir / LOG_FILE
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _stored(stack: Stack, ledger: Ledger) -> dict[str, list[str]]:
    """The vault's cards of this scenario, by order, read from its database."""
    stored: dict[str, list[str]] = {}
    rows = stack.sql(
        "SELECT id, metadata FROM payment_methods WHERE account_id = ?", ledger.account
    )
    for pm_id, metadata in rows:
        order = json.loads(str(metadata)).get("order", "")
        if isinstance(order, str) and order.startswith(ledger.prefix):
            stored.setdefault(order, []).append(str(pm_id))
    return stored


def _readable(client: httpx.Client, stack: Stack, secret: str) -> set[str]:
    """Every payment method of the account, read through the API's list."""
    ids: set[str] = set()
    after: str | None = None
    while True:
        params = {"limit": "100", **({"starting_after": after} if after else {})}
        for _ in range(20):
            r = client.get(
                f"{stack.url}/v1/payment_methods",
                params=params,
                headers={"authorization": f"Bearer {secret}"},
            )
            if r.status_code != 503:
                break
            time.sleep(0.25)
        assert r.status_code == 200, r.text
        page = r.json()
        ids.update(pm["id"] for pm in page["data"])
        if not page["has_more"] or not page["data"]:
            return ids
        after = page["data"][-1]["id"]


def _retry_all(
    stack: Stack, ledger: Ledger, ca_file: Path, logicals: list[Logical], within: float
) -> dict[str, Answer]:
    """Each request sent again with its same key and parameters until it gets an answer
    other than 503 or 409 (or none at all), ``within`` seconds for all of them."""
    deadline = time.monotonic() + within
    local = threading.local()

    def one(logical: Logical) -> tuple[str, Answer]:
        if not hasattr(local, "client"):
            local.client = https_client(ca_file)
        while True:
            answer = tokenize(local.client, stack.url, ledger.secret, logical)
            ledger.retried(answer)
            if answer.status not in (None, 503, 409) or time.monotonic() >= deadline:
                return logical.order, answer
            time.sleep(0.2)

    with ThreadPoolExecutor(8) as pool:
        return dict(pool.map(one, logicals))


@dataclass
class Findings:
    """What the check found after one scenario: the figures of the report, and
    :meth:`problems`, empty when every property held."""

    scenario: str
    backend: str
    requests: int = 0
    logical: int = 0
    acknowledged: int = 0
    unacknowledged: int = 0
    lost: list[str] = field(default_factory=list)
    #: An acknowledged order whose stored card is not the one answered.
    not_as_answered: list[str] = field(default_factory=list)
    wrong_objects: int = 0
    duplicates: dict[str, list[str]] = field(default_factory=dict)
    missing_audit: list[str] = field(default_factory=list)
    #: ``payment_method.created`` records of the run naming no card stored and never
    #: followed by ``payment_method.not_stored``.
    unsettled_audit: list[str] = field(default_factory=list)
    stuck: dict[str, str] = field(default_factory=dict)
    replays_wrong: dict[str, str] = field(default_factory=dict)
    held_claims: int = 0
    codes_503: Counter[str] = field(default_factory=Counter)
    without_retry_after: int = 0
    unexpected_503: Counter[str] = field(default_factory=Counter)
    errors_500: int = 0
    other_statuses: Counter[str] = field(default_factory=Counter)
    no_answer: Counter[str] = field(default_factory=Counter)
    verify_ok: bool = False
    verify_output: str = ""
    restarts: list[float] = field(default_factory=list)

    def problems(self) -> list[str]:
        found = []

        def some(items: Iterable[str]) -> str:
            return ", ".join(sorted(items)[:5])

        if self.lost:
            found.append(f"{len(self.lost)} acknowledged cards lost: {some(self.lost)}")
        if self.not_as_answered:
            found.append(
                f"{len(self.not_as_answered)} acknowledged orders whose stored card is not "
                f"the one answered: {some(self.not_as_answered)}"
            )
        if self.wrong_objects:
            found.append(f"{self.wrong_objects} answers with another order's card")
        if self.duplicates:
            found.append(
                f"{len(self.duplicates)} orders stored more than once: "
                + "; ".join(f"{o}: {ids}" for o, ids in list(self.duplicates.items())[:3])
            )
        if self.missing_audit:
            found.append(
                f"{len(self.missing_audit)} cards without their payment_method.created "
                f"record: {some(self.missing_audit)}"
            )
        if self.unsettled_audit:
            found.append(
                f"{len(self.unsettled_audit)} payment_method.created records naming no card "
                f"and no payment_method.not_stored after: {some(self.unsettled_audit)}"
            )
        if self.stuck:
            found.append(
                f"{len(self.stuck)} idempotency keys stuck (not 200 with their order's card "
                f"after {RETRY_FOR:g} s of retries): "
                + "; ".join(f"{o}: {a}" for o, a in list(self.stuck.items())[:5])
            )
        if self.replays_wrong:
            found.append(
                f"{len(self.replays_wrong)} acknowledged requests retried with their key "
                "did not replay their card: "
                + "; ".join(f"{o}: {a}" for o, a in list(self.replays_wrong.items())[:5])
            )
        if self.errors_500:
            found.append(f"{self.errors_500} answers were 500")
        if self.without_retry_after:
            found.append(f"{self.without_retry_after} 503 answers without Retry-After")
        if self.unexpected_503:
            found.append(f"503 with codes this fault should not give: {dict(self.unexpected_503)}")
        if self.other_statuses:
            found.append(f"unexpected answers: {dict(self.other_statuses)}")
        if not self.verify_ok:
            found.append(f"cardvault audit verify failed: {self.verify_output}")
        return found

    def restart_summary(self) -> str:
        if not self.restarts:
            return "-"
        return f"{statistics.median(self.restarts):.2f}/{max(self.restarts):.2f}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "backend": self.backend,
            "requests": self.requests,
            "logical_requests": self.logical,
            "acknowledged": self.acknowledged,
            "unacknowledged": self.unacknowledged,
            "lost": len(self.lost),
            "not_as_answered": len(self.not_as_answered),
            "duplicates": len(self.duplicates),
            "missing_audit_records": len(self.missing_audit),
            "unsettled_audit_records": len(self.unsettled_audit),
            "stuck_keys": len(self.stuck),
            "replays_wrong": len(self.replays_wrong),
            "claims_held_after": self.held_claims,
            "restart_to_first_200_s": [round(s, 3) for s in self.restarts],
            "answers_503_by_code": dict(self.codes_503),
            "answers_503_without_retry_after": self.without_retry_after,
            "answers_500": self.errors_500,
            "other_answers": dict(self.other_statuses),
            "no_answer": dict(self.no_answer),
            "audit_verify": "ok" if self.verify_ok else self.verify_output,
            "problems": self.problems(),
        }


def check(
    stack: Stack,
    ledger: Ledger,
    ca_file: Path,
    *,
    expect_503: Iterable[str] = (),
    restarts: Iterable[float] = (),
    within: float = RETRY_FOR,
    replay_sample: int | None = REPLAY_SAMPLE,
) -> Findings:
    """Settle the scenario's unacknowledged requests and check everything (module
    docstring). ``expect_503``: the codes this scenario's fault may answer;
    ``replay_sample``: how many acknowledged requests to retry with their key (None:
    every one)."""
    unacked = [lg for order, lg in ledger.unacked.items() if order not in ledger.acked]
    acked = sorted(ledger.acked)
    sample = (
        acked if replay_sample is None else random.sample(acked, min(replay_sample, len(acked)))
    )
    retried = _retry_all(stack, ledger, ca_file, unacked, within)
    replays = _retry_all(stack, ledger, ca_file, [ledger.request(o) for o in sample], within)
    found = Findings(ledger.scenario, stack.backend, restarts=list(restarts))
    found.requests = len(ledger.answers) + len(ledger.retries)
    found.logical = ledger.logical
    found.acknowledged = len(ledger.acked)
    found.unacknowledged = len(unacked)

    # Honest answers, during the fault and after it.
    allowed = set(expect_503)
    everything = [(a, False) for a in ledger.answers] + [(a, True) for a in ledger.retries]
    for a, retry in everything:
        if a.status is None:
            found.no_answer[a.error or "?"] += 1
        elif a.status == 503:
            found.codes_503[a.code or "?"] += 1
            if not a.retry_after or not a.retry_after.isdigit():
                found.without_retry_after += 1
            if a.code not in allowed:
                found.unexpected_503[a.code or "?"] += 1
        elif a.status == 500:
            found.errors_500 += 1
        elif a.status == 409 and retry:
            pass  # a claim still held when the check began: it retries those
        elif a.status != 200:
            found.other_statuses[f"{a.status} {a.code}"] += 1
        if a.status == 200 and a.wrong_object:
            found.wrong_objects += 1

    stored = _stored(stack, ledger)
    found.duplicates = {o: ids for o, ids in stored.items() if len(ids) > 1}
    with https_client(ca_file) as client:
        readable = _readable(client, stack, ledger.secret)
    for order, pm_id in ledger.acked.items():
        if pm_id not in readable:
            found.lost.append(order)
        elif stored.get(order) != [pm_id]:
            found.not_as_answered.append(order)
    for order, answer in retried.items():
        if answer.status != 200 or answer.pm_id is None or answer.wrong_object:
            found.stuck[order] = f"{answer.status} {answer.code or answer.error or ''}".strip()
        elif stored.get(order) != [answer.pm_id]:
            found.stuck[order] = f"200 {answer.pm_id}, stored {stored.get(order)}"
    for order, answer in replays.items():
        if answer.status != 200 or answer.pm_id != ledger.acked[order]:
            found.replays_wrong[order] = f"{answer.status} {answer.pm_id or answer.code or ''}"

    # Audit before effect: every card has its record; every record of a card that
    # never came is followed up.
    records = audit_records(stack)
    created = {r["object"] for r in records if r.get("action") == "payment_method.created"}
    not_stored = {r["object"] for r in records if r.get("action") == "payment_method.not_stored"}
    every_card = {str(row[0]) for row in stack.sql("SELECT id FROM payment_methods")}
    found.missing_audit = sorted(i for ids in stored.values() for i in ids if i not in created)
    found.unsettled_audit = sorted(
        {
            r["object"]
            for r in records
            if r.get("action") == "payment_method.created"
            and str(r.get("time", "")) >= ledger.since
            and r["object"] not in every_card
            and r["object"] not in not_stored
        }
    )
    held = stack.sql(
        "SELECT count(*) FROM idempotency_keys WHERE account_id = ? AND state = 'claimed' "
        "AND created >= ?",
        ledger.account,
        ledger.since_epoch,
    )
    found.held_claims = int(str(held[0][0]))
    found.verify_ok, found.verify_output = verify_audit(stack)
    return found


def verify_audit(stack: Stack) -> tuple[bool, str]:
    """``cardvault audit verify`` on the vault's log, as an operator runs it."""
    done = cli("audit", "verify", str(stack.audit_dir / LOG_FILE))
    return done.returncode == 0, " ".join((done.stdout + done.stderr).split())[-600:]


# --- a scenario's result, and the report ----------------------------------------------------


@dataclass
class Result:
    """One scenario's run: the common :class:`Findings`, the faults injected, what the
    scenario itself expected and did not see (``problems``), and figures of its own."""

    findings: Findings
    faults: int
    problems: list[str] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def all_problems(self) -> list[str]:
        return self.findings.problems() + self.problems

    def as_dict(self) -> dict[str, Any]:
        return {
            **self.findings.as_dict(),
            "faults": self.faults,
            "seconds": round(self.seconds, 1),
            "notes": self.notes,
            "problems": self.all_problems(),
        }


def report_table(results: Iterable[Result]) -> str:
    """The short text table: one line per scenario and backend."""
    head = (
        "scenario",
        "backend",
        "faults",
        "requests",
        "acked",
        "lost",
        "dup",
        "no audit",
        "stuck",
        "restart→200 s (med/max)",
        "503 by code",
        "500",
        "problems",
    )
    rows = [head]
    for r in results:
        f = r.findings
        rows.append(
            (
                f.scenario,
                f.backend,
                str(r.faults),
                str(f.requests),
                str(f.acknowledged),
                str(len(f.lost)),
                str(len(f.duplicates)),
                str(len(f.missing_audit)),
                str(len(f.stuck)),
                f.restart_summary(),
                " ".join(f"{c}={n}" for c, n in sorted(f.codes_503.items())) or "-",
                str(f.errors_500),
                str(len(r.all_problems())),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def assert_clean(result: Result) -> None:
    """Every property held: the report of the run otherwise."""
    assert result.all_problems() == [], json.dumps(result.as_dict(), indent=1, default=str)


def wait_until(predicate: Any, timeout: float, every: float = 0.02) -> bool:
    """Whether ``predicate()`` became true within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return bool(predicate())
