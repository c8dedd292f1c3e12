"""Data-parallel training over MPI: every rank gets the one-process gradient."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_ddp_over_mpi_matches_one_process(mpirun, mpi_env):
    run = subprocess.run(
        [mpirun, "-n", "2", "--oversubscribe", sys.executable, str(HERE / "ddp_ranks.py")],
        env=mpi_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "rank 0: ddp ok" in out and "rank 1: ddp ok" in out, out
