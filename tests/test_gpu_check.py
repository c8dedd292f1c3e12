"""benchmarks/gpu_check.py runs end to end in --cpu-smoke mode and writes its JSON summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.mark.slow
def test_cpu_smoke_runs_every_part(tmp_path: Path) -> None:
    parts = ["cuda_tests", "parity", "throughput_handgrad", "kernels_ratio", "throughput_torch"]
    if SHAKESPEARE.is_file():
        parts.append("shakespeare")
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke", "--json", str(out),
         "--parts", *parts],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "=== handgrad gpu_check (--cpu-smoke)" in r.stdout
    assert "[env ] python=" in r.stdout
    summary = json.loads(out.read_text())
    env = summary["environment"]
    assert env["numpy"] and env["python"] and "cupy" in env and "torch" in env
    assert summary["cpu_smoke"] is True and summary["all_ok"] is True and summary["complete"]
    res = summary["parts"]
    assert set(parts) <= set(res)
    assert res["cuda_tests"]["failed"] == 0 and res["cuda_tests"]["skipped"] > 0
    assert res["parity"]["steps"] == 3 and res["parity"]["max_rel_diff"] <= 1e-4
    for side in ("throughput_handgrad", "throughput_torch"):
        assert res[side]["micro_batch"] == 4 and res[side]["tokens_per_s"] > 0
        assert 0 < res[side]["mfu"] < 1
    assert res["throughput_ratio"]["same_micro_batch"] is True
    if "shakespeare" in parts:
        assert 0 < res["shakespeare"]["final_val_loss"] < 5 and res["shakespeare"]["steps"] == 10


def test_a_failing_part_is_reported_and_the_rest_still_run(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    results = gpu_check.summarize(
        {"parity": {"ok": False, "error": "RuntimeError: boom"},
         "throughput_handgrad": {"ok": True, "micro_batch": 8, "tokens_per_s": 50.0,
                                 "peak_device_bytes": 10},
         "throughput_torch": {"ok": True, "micro_batch": 8, "tokens_per_s": 100.0,
                              "peak_device_bytes": 20}}
    )  # fmt: skip
    assert results["throughput_ratio"]["handgrad_over_torch_tokens_per_s"] == 0.5
    assert results["throughput_ratio"]["memory_ratio"] == 0.5
    assert results["throughput_ratio"]["memory_within_1.2x"] is True
    gpu_check.print_summary(results, smoke=True, total=1.0)


def test_probes_report_instead_of_raising() -> None:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check_probes as probes

    from handgrad.backend import cuda

    state = probes.gpu_state()
    assert isinstance(state["kernels"], bool) and isinstance(state["kernels_compiled"], list)
    assert probes.model_dtype("cpu") == ("bfloat16", None)
    if not cuda.is_available():
        tf32 = probes.tf32_reaches_cublas()  # no GPU: an error entry, not an exception
        assert tf32["ok"] is False and tf32["error"]


def test_reported_attention_path_is_the_one_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """gpu_check names the attention path by the rule of scaled_dot_product_attention: the
    two agree, on a device below and above _DEVICE_KEEP_SCORES."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    sys.path.insert(0, str(REPO / "tests"))
    import fakecupy
    import gpu_check_probes as probes
    import numpy as np

    import handgrad as hg
    import handgrad.nn.functional as F
    from handgrad.models.gpt2 import GPT2Config
    from handgrad.nn import attention as A

    config = GPT2Config(n_layer=1, n_head=2, n_embd=8, block_size=16, vocab_size=32)
    monkeypatch.setattr(A, "_ATTN_BATCH_ALL", 100)
    fakecupy.reference_kernels(monkeypatch)
    with fakecupy.installed(kernels=True):
        for keep, want in ((10**6, "_AttentionUntiled"), (200, "_AttentionTiled")):
            monkeypatch.setattr(A, "_DEVICE_KEEP_SCORES", keep)
            q = hg.tensor(np.ones((3, 2, 16, 4), np.float32)).to("cuda").requires_grad_()
            node = F.scaled_dot_product_attention(q, q, q, is_causal=True)._ctx
            reported = probes.attention_path(config, 3, 16)
            assert type(node).__name__ == want
            assert reported.startswith("untiled" if want == "_AttentionUntiled" else "tiled")


def test_a_run_cut_short_keeps_the_parts_it_finished(tmp_path: Path, monkeypatch) -> None:
    """The device's time limit may kill the check between parts: the JSON written after each
    part keeps what was measured, marked incomplete."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    def run_part(name, smoke, budget, extra):
        if name == "shakespeare":
            raise KeyboardInterrupt  # the kill arriving during the second part
        return {"ok": True, "time_s": 1.0, "max_rel_diff": 1e-6}

    monkeypatch.setattr(gpu_check, "run_environment", lambda: {"python": "3"})
    monkeypatch.setattr(gpu_check, "run_part", run_part)
    out = tmp_path / "gpu_check.json"
    with pytest.raises(KeyboardInterrupt):
        gpu_check.main(["--cpu-smoke", "--parts", "parity", "shakespeare", "--json", str(out)])
    summary = json.loads(out.read_text())
    assert summary["complete"] is False and summary["all_ok"] is False
    assert list(summary["parts"]) == ["parity"] and summary["parts"]["parity"]["ok"] is True


def test_tiny_shakespeare_is_looked_for_inside_the_repo_then_beside_it(monkeypatch, tmp_path):
    """A copy of the repo sent to a GPU machine carries a ``shared/`` inside it, not the
    ``../shared`` beside the checkout; $HANDGRAD_SHAKESPEARE comes first."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import gpu_check

    monkeypatch.delenv("HANDGRAD_SHAKESPEARE", raising=False)
    inside, beside = (base / "shared/data/tinyshakespeare.txt" for base in (REPO, REPO.parent))
    assert gpu_check.shakespeare_candidates() == [inside, beside]
    mine = tmp_path / "t.txt"
    monkeypatch.setenv("HANDGRAD_SHAKESPEARE", str(mine))
    assert gpu_check.shakespeare_candidates() == [mine, inside, beside]
    monkeypatch.setattr(gpu_check, "shakespeare_candidates", lambda: [mine])
    # without it the part trains on the pydocs corpus instead, says so, and checks the loss
    res = gpu_check.part_shakespeare(smoke=True, budget=120)
    assert res["ok"] is True, res
    assert str(mine) in res["data"] and "pydocs" in res["data"]
