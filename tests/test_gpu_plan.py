"""benchmarks/gpu_plan.py --smoke: a tiny GPT-2 step on the CuPy stand-in beside PyTorch,
with every figure of the table present and consistent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_smoke_prints_the_table_and_writes_the_json(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "benchmarks/gpu_plan.py", "--smoke", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    for field in ("GEMM FLOPs", "kernel launches", "peak device bytes", "host syncs",
                  "memory hg / torch", "largest micro batch that fits", "(extrap.)"):  # fmt: skip
        assert field in r.stdout, field
    s = json.loads(out.read_text())
    hg, torch = s["handgrad"], s["torch"]
    assert [row["micro_batch"] for row in hg] == [1, 2] == [row["micro_batch"] for row in torch]
    for row in hg + torch:
        assert sum(row["gemm_flops"].values()) > 0 and row["launches"] > 0
        assert row["peak_bytes"] > 0
    for row in hg:
        assert row["syncs"] == 0 and row["uploads"] == 0  # a step needs no host round trip
        assert row["peak_bytes"] >= row["live_before"] > 0
    assert hg[0]["derived"] is False and hg[1]["derived"] is True
    derived = hg[0]["peak_derived"]
    assert hg[0]["peak_bytes"] <= derived <= 1.1 * hg[0]["peak_bytes"]
    # FLOPs scale with the micro batch; the launches do not depend on it
    for side in (hg, torch):
        assert (
            abs(sum(side[1]["gemm_flops"].values()) / sum(side[0]["gemm_flops"].values()) - 2)
            < 1e-9
        )
        assert side[1]["launches"] == side[0]["launches"]
        assert side[1]["peak_bytes"] > side[0]["peak_bytes"]
    ext = s["extrapolated"]["handgrad"]
    assert ext["by_micro_batch"]["60"]["peak_bytes"] > ext["by_micro_batch"]["16"]["peak_bytes"]
    fits = ext["largest_micro_batch"]
    assert fits["H200 141 GB"] >= fits["H100 80 GB"] > 0
    assert s["memory_ratio"]["1"] > 0
