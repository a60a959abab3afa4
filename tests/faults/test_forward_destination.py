"""Forwards while the destination is down (connection refused), presents a certificate
the vault does not trust, hangs (the vault's timeout), resets the connection after
reading the request, or answers an error; and one forward whose vault is killed while
the destination holds it.

When nothing can have reached the destination, the CVC and the Idempotency-Key are not
consumed: the retry with the same key sends the card once, CVC included. When it may
have (a timeout, a reset, a crash), the forward is ``unknown`` and never sent again:
the retry replays the first answer, and the CVC is gone. Each case is checked against
what the destination actually received (``fault_scenarios.forwards``)."""

from __future__ import annotations

import pytest
from fault_scenarios import FORWARD_MODES, FaultStack, forwards
from faults_support import assert_clean

pytestmark = pytest.mark.slow


def test_forwards_to_a_destination_down_hung_resetting_or_erring_are_sent_at_most_once(
    faults: FaultStack,
) -> None:
    result = forwards(faults, per_mode=3)
    # One forwarding request per card: none for the attempts that were not sent, none
    # for the refused second forwards of a CVC that may have left.
    assert result.notes["forwards"] == 3 * len(FORWARD_MODES) + 1
    assert_clean(result)
