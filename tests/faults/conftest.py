"""Fixtures of the fault suite: one stack per backend for the whole session (starting
one takes seconds, and each scenario checks only the orders it made), put back on its
feet before every test in case the one before failed half-way."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fault_scenarios import FaultStack, fault_stack

from helpers import Pki


@pytest.fixture(
    scope="session", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def fault_stacks(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> Iterator[FaultStack]:
    with fault_stack(tmp_path_factory, pki, request.param) as fs:
        yield fs


@pytest.fixture
def faults(fault_stacks: FaultStack) -> Iterator[FaultStack]:
    fault_stacks.heal()
    yield fault_stacks
    fault_stacks.heal()
