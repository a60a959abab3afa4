"""The vault's audit directory full under load: a small tmpfs filled to the last byte
(as root), or ENOSPC injected into the vault's writes there (``inject/``, always).

Fail closed: a card whose ``payment_method.created`` record cannot be written is never
stored, so the answers are 503 ``audit_unavailable`` (never a 500, never a card without
its record); a short outage passes without a restart; a long one makes the vault exit
74 for its supervisor, and a restart while the disk is still full exits 74 again (not
2, a "configuration error" that supervisors leave down); once there is space the
restarted vault answers, every retry with the same key gets its card, and the log
verifies."""

from __future__ import annotations

import pytest
from fault_scenarios import FaultStack, audit_full
from faults_support import assert_clean

from cardvault.audit.recorder import AUDIT_FAILED_EXIT

pytestmark = pytest.mark.slow


def test_injected_enospc_is_503_audit_unavailable_then_exit_74_and_nothing_unaudited(
    faults: FaultStack,
) -> None:
    result = audit_full(faults, "enospc", short_seconds=1.5)
    found = result.findings
    assert found.codes_503["audit_unavailable"] > 0
    # The long outage: exit 74, and 74 again when started while still full.
    assert result.notes["vault_exits"] == [AUDIT_FAILED_EXIT, AUDIT_FAILED_EXIT]
    assert len(found.restarts) == 2  # after the short outage, and after the restart
    assert_clean(result)


def test_a_full_tmpfs_is_503_audit_unavailable_then_exit_74_and_nothing_unaudited(
    faults: FaultStack,
) -> None:
    if not faults.tmpfs:
        pytest.skip(f"no tmpfs of its own for the audit directory: {faults.tmpfs_reason}")
    result = audit_full(faults, "tmpfs", short_seconds=0)
    found = result.findings
    assert found.codes_503["audit_unavailable"] > 0
    assert result.notes["vault_exits"] == [AUDIT_FAILED_EXIT]
    assert len(found.restarts) == 1
    assert_clean(result)
