"""``kill -9`` of the vault ten times under load, on SQLite and on PostgreSQL, the vault
started again at once each time (as ``cardvault up`` or systemd does).

A kill can stop a tokenization at any instruction: before its key is claimed, between
the claim and the audit record, between the record and the row, between the row's
commit and the answer. Whatever it cut, the client's retry with the same key must find
the one card or make it, never a second one, and never wait out a claim nobody holds
(the common check, ``faults_support``)."""

from __future__ import annotations

import pytest
from fault_scenarios import FaultStack, vault_killed
from faults_support import assert_clean

pytestmark = pytest.mark.slow


def test_ten_kills_under_load_lose_nothing_duplicate_nothing_and_leave_no_key_stuck(
    faults: FaultStack,
) -> None:
    result = vault_killed(faults, kills=10, load_seconds=1.0)
    found = result.findings
    # The kills happened under load: requests were cut, and were retried by the check.
    assert result.notes["requests_cut_by_the_kills"] > 0
    assert found.unacknowledged > 0
    assert found.acknowledged > 100
    # Each restart answered again.
    assert len(found.restarts) == 10
    assert max(found.restarts) < 15
    assert_clean(result)
