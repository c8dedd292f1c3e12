"""Data-parallel training over MPI: every rank gets the one-process gradient."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_ddp_over_mpi_matches_one_process(mpirun):
    run = mpirun(HERE / "ddp_ranks.py")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "rank 0: ddp ok" in out and "rank 1: ddp ok" in out, out
