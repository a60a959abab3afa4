"""The vault's PostgreSQL connections ended under load, three times: each time its
backends are terminated over and over (statements, commits included, cut at every
point), then new connections refused too, with ``pg_terminate_backend`` and
``ALLOW_CONNECTIONS`` on the test's own database only; the server is never stopped.

A write whose connection dies may have committed: the answer is a 503 that says "try
again later" (never a 500, never "nothing was stored"), and the retry with the same
key finds the card instead of storing a second one (the common check)."""

from __future__ import annotations

import pytest
from fault_scenarios import FaultStack, postgres_terminated
from faults_support import assert_clean

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.mark.parametrize("fault_stacks", ["postgres"], indirect=True)
def test_connections_terminated_under_load_are_503_then_nothing_lost_or_doubled(
    faults: FaultStack,
) -> None:
    result = postgres_terminated(faults, outages=3, outage_seconds=1.0)
    found = result.findings
    assert result.notes["backends_terminated"] > 0
    assert found.codes_503["database_unavailable"] > 0  # the outages met requests
    assert found.unacknowledged > 0
    assert len(found.restarts) == 3  # answering again after each outage, no restart
    assert_clean(result)
