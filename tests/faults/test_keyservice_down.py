"""The key service killed (``kill -9``) and started again, then sealed and started
again, under load: tokenizations that need a data key meanwhile are 503
``keyservice_unavailable`` (``Retry-After: 2``) or ``keyservice_sealed``
(``Retry-After: 30``), never a 500, nothing half-stored; once it is back, the load
and every retry with the same key succeed. (The stack's data keys serve 20 encryptions
each, so tokenizations keep needing the key service.)"""

from __future__ import annotations

import pytest
from fault_scenarios import FaultStack, keyservice_down
from faults_support import assert_clean

pytestmark = pytest.mark.slow


def test_the_key_service_killed_and_sealed_under_load_is_503_with_retry_after_then_works(
    faults: FaultStack,
) -> None:
    result = keyservice_down(faults, outages=1, down_seconds=1.0)
    found = result.findings
    assert found.codes_503["keyservice_unavailable"] > 0
    assert found.codes_503["keyservice_sealed"] > 0
    assert len(found.restarts) == 2  # answering again after the restart and the unsealing
    assert_clean(result)
