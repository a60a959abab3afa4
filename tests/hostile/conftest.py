"""Fixtures of the hostile suite: the real key service and vault over real TLS, with
rate limits high enough that the requests under test reach the code under test."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from hostile_support import OPEN_LIMITS

from cardvault.transport.tls import client_context
from helpers import Pki
from stack import Stack, run_stack, vault_database


@pytest.fixture(scope="session")
def hostile(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[Stack]:
    """One SQLite stack for the whole suite (tests that need a backend of their own
    start one)."""
    with vault_database("sqlite", tmp_path_factory.mktemp("hostile-db")) as dsn:
        yield from run_stack(tmp_path_factory, pki, "sqlite", dsn, limits=OPEN_LIMITS)


@pytest.fixture(scope="session")
def client(pki: Pki) -> Iterator[httpx.Client]:
    with httpx.Client(verify=client_context(pki.ca_file), trust_env=False, timeout=30) as c:
        yield c
