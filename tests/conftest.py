"""Shared pytest fixtures for the whole suite."""

from __future__ import annotations

from pathlib import Path

import pytest

import handgrad

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed() -> None:
    """Each test starts from the same global generator state (and so is repeatable)."""
    handgrad.manual_seed(1234)


@pytest.fixture
def shakespeare_path() -> Path:
    """tiny Shakespeare from ../shared/data (skips when a user's clone has no ../shared)."""
    p = SHARED_DATA / "tinyshakespeare.txt"
    if not p.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt is not present")
    return p
