"""Shared helpers for the kernel tests."""

import os
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture(scope="session")
def emulator_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the CUDA emulation's kernel libraries are built: one cache for the run (shared by
    pytest-xdist's workers), or a lasting one named by HANDGRAD_CUDA_EMUL_CACHE."""
    if os.environ.get("HANDGRAD_CUDA_EMUL_CACHE"):
        return Path(os.environ["HANDGRAD_CUDA_EMUL_CACHE"])
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "cuda_emul"
