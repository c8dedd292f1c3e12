"""``[train] device = "cuda"`` on the CuPy stand-in: the trainer runs, resumes exactly, and
its losses are the CPU run's; any device array that leaks into NumPy fails the test (the
stand-in refuses implicit conversion, as CuPy does)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from handgrad.train import train
from handgrad.train.config import from_dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fakecupy  # noqa: E402


def run(cfg_dict, out, resume=None):
    return train(from_dict(cfg_dict), out, resume=resume, progress=False, log=lambda m: None)


def test_train_and_resume_on_the_device_match_the_cpu(tiny, tmp_path) -> None:
    cpu = run(tiny(), tmp_path / "cpu")
    with fakecupy.installed():
        full = run(tiny(train={"device": "cuda"}), tmp_path / "dev")
        run(tiny(train={"device": "cuda", "max_steps": 3}), tmp_path / "split")
        second = run(tiny(train={"device": "cuda"}), tmp_path / "split", resume=tmp_path / "split")
    assert sorted(full.train_losses) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(
        [full.train_losses[s] for s in range(1, 7)], [cpu.train_losses[s] for s in range(1, 7)],
        rtol=1e-6,
    )  # fmt: skip
    assert {s: second.train_losses[s] for s in (4, 5, 6)} == {
        s: full.train_losses[s] for s in (4, 5, 6)
    }
    assert second.final_eval.loss == full.final_eval.loss


def test_a_device_run_defaults_to_bf16_autocast(tiny, tmp_path) -> None:
    """``autocast = "auto"`` on a GPU: every matrix product of training and evaluation is
    bf16 (samples, drawn without autocast, are left out), and the losses stay within bf16's
    reach of the CPU's float32 run."""
    from handgrad.backend import cuda

    cpu = run(tiny(train={"sample_tokens": 0}), tmp_path / "cpu")
    with fakecupy.installed(bf16_matmul=True):
        cuda.GEMM_FLOPS.clear()
        dev = run(
            tiny(train={"device": "cuda", "autocast": "auto", "sample_tokens": 0}), tmp_path / "dev"
        )
        flops = cuda.gemm_flops()
    assert set(flops) == {"bfloat16"} and flops["bfloat16"] > 0, flops
    got = [dev.train_losses[s] for s in range(1, 7)]
    want = [cpu.train_losses[s] for s in range(1, 7)]
    np.testing.assert_allclose(got, want, rtol=2e-2)
    assert got != want  # it did round
