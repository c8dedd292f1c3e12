"""benchmarks/gpu_check.py's ``nccl`` part: its --cpu-smoke run drives every collective of
the nccl transport and 10 data-parallel training steps on 2 MPI ranks through the CuPy and
NCCL stand-ins; without an MPI launcher the part says it skipped, and never fails or hangs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check_nccl  # noqa: E402


def test_the_nccl_part_on_the_stand_ins(mpirun, tmp_path) -> None:
    del mpirun  # only its skip: no mpi4py or no mpirun
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke", "--parts", "nccl",
         "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    res = json.loads(out.read_text())["parts"]["nccl"]
    assert res["ok"] is True and res["ranks"] == 2, res
    assert sorted(res["checks"]) == [
        "all_gather", "all_reduce", "all_reduce_avg", "all_reduce_max", "broadcast",
        "host_all_reduce", "reduce", "reduce_scatter",
    ]  # fmt: skip
    assert all(res["checks"].values()), res
    assert res["train_exit"] == 0 and len(res["train_losses"]) == 2
    assert all(math.isfinite(v) and 0 < v < 5 for v in res["train_losses"])


def test_without_a_launcher_the_part_is_skipped(monkeypatch) -> None:
    monkeypatch.setattr(gpu_check_nccl, "_mpi_launcher", lambda: None)
    res = gpu_check_nccl.part_nccl(smoke=True, budget=30)
    if "mpi4py" in res.get("skipped", ""):
        assert res == {"ok": True, "skipped": "no mpi4py"}
    else:
        assert res == {"ok": True, "skipped": "no MPI launcher (mpirun / mpiexec)"}
