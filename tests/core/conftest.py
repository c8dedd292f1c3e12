"""Shared fixtures for the core tests; makes ``_torchref`` importable in any import mode."""

import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A generator seeded from the test id: fresh inputs per test, reproducible across runs."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))
