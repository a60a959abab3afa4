"""Fixtures shared by every suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import Pki, make_pki


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A deployment CA with vault/admin/shop certificates and a rogue CA."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path
