"""Data-parallel training over processes (``[train] processes``): the same training as one
process on the same global batch, exact resume, errors that name the problem."""

from __future__ import annotations

import multiprocessing
import os
import signal

import numpy as np
import pytest

import handgrad as hg
from handgrad import backend as B
from handgrad import nn
from handgrad.models.gpt2 import GPT2
from handgrad.parallel.ddp import DistributedDataParallel
from handgrad.serialization import load_file
from handgrad.train import TrainingDiverged, train
from handgrad.train.config import ConfigError, from_dict

pytestmark = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)


def run(cfg_dict, out, resume=None):
    return train(from_dict(cfg_dict), out, resume=resume, progress=False, log=lambda m: None)


def bits(losses):
    return {k: np.float64(v).view(np.int64) for k, v in losses.items()}


@pytest.mark.parametrize("accum", [1, 2])
def test_two_processes_train_like_one_on_the_same_batch(tiny, tmp_path, accum):
    # global batch 8 = 4 x 2 processes (x accum) in one, 8 (x accum) windows in the other
    two = run(
        tiny(train={"micro_batch_size": 4, "processes": 2, "grad_accum_steps": accum}),
        tmp_path / "two",
    )
    one = run(
        tiny(train={"micro_batch_size": 8, "processes": 1, "grad_accum_steps": accum}),
        tmp_path / "one",
    )
    assert sorted(two.train_losses) == [1, 2, 3, 4, 5, 6]
    # only the order of the sums differs (the halves' gradients are added at the end)
    for step, loss in one.train_losses.items():
        assert two.train_losses[step] == pytest.approx(loss, rel=1e-5, abs=0), step
    assert two.final_eval.loss == pytest.approx(one.final_eval.loss, rel=1e-5)
    assert two.final_eval.tokens == one.final_eval.tokens  # evaluated on the same windows
    a = load_file(tmp_path / "two" / "checkpoints" / "step_0000006" / "model.safetensors")
    b = load_file(tmp_path / "one" / "checkpoints" / "step_0000006" / "model.safetensors")
    # Adam divides by sqrt(v): an element whose gradient is near 0 moves by up to lr on a
    # rounding difference, so the weights are compared against a fraction of one step (3e-3)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-4, err_msg=k)
    # the training moved the weights: the comparison above is not between two initial models
    init = GPT2(GPT2.from_checkpoint(tmp_path / "one").config).state_dict()
    assert any(not np.allclose(init[k].numpy(), b[k]) for k in b)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_two_processes_resume_bit_exact_with_dropout(tiny, tmp_path, dtype):
    # dropout > 0: worker ranks draw their masks from (seed, step, rank) generators; bfloat16
    # parameters are shared as bfloat16, their float32 master weights stay with rank 0
    model = {"dropout": 0.1, "dtype": dtype}
    train_cfg = {"micro_batch_size": 2, "processes": 2}
    full = run(tiny(model=model, train=train_cfg), tmp_path / "full")
    first = run(tiny(model=model, train={**train_cfg, "max_steps": 3}), tmp_path / "split")
    second = run(tiny(model=model, train=train_cfg), tmp_path / "split", resume=tmp_path / "split")
    assert sorted(second.train_losses) == [4, 5, 6]
    assert bits({**first.train_losses, **second.train_losses}) == bits(full.train_losses)
    a = load_file(tmp_path / "full" / "checkpoints" / "step_0000006" / "model.safetensors")
    b = load_file(tmp_path / "split" / "checkpoints" / "step_0000006" / "model.safetensors")
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)


def test_two_processes_stop_on_nan(tiny, tmp_path):
    cfg = tiny(
        optim={"lr": 1e30, "min_lr": 0.0, "warmup_steps": 0},
        train={"micro_batch_size": 2, "processes": 2, "max_steps": 10},
    )
    with pytest.raises(TrainingDiverged, match="training loss is"):
        run(cfg, tmp_path / "run")


class _Picky(nn.Module):
    """A toy model with loss mean(w^2) x (sum of x and y); it refuses negative token ids."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(hg.ones(3))

    def forward(self, x, y):
        if (x.data < 0).any():
            raise ValueError(f"negative token id in a batch of shape {tuple(x.shape)}")
        return None, (self.w * self.w).mean() * float(x.data.sum() + y.data.sum())


def test_data_parallel_sums_gradients_and_reports_worker_errors():
    model = _Picky()
    x = np.arange(8, dtype=np.int64).reshape(4, 2)
    y = np.ones((4, 2), dtype=np.int64)
    with DistributedDataParallel(model, 2, rows=4, block_size=2, seed=0) as dp:
        losses = dp.forward_backward(0, x, y, micro_batch_size=2, scale=0.5)
        # rank 0: rows 0-1 (sums 6 + 4), rank 1: rows 2-3 (22 + 4); w = 1
        assert losses == [pytest.approx((10 + 26) / 2)]
        # d/dw of 0.5 (mean(w^2) 10 + mean(w^2) 26) = 0.5 (2 w / 3) 36 = 12 w
        np.testing.assert_allclose(model.w.grad.numpy(), np.full(3, 12.0))
        assert B.get_num_threads() == B.available_cores()  # restored after the step
        # the workers read the weights as rank 0 leaves them (with stale w = 1 in rank 1 the
        # gradient would be (2 * 2 * 10 + 2 * 1 * 26) / 3, not 2 * 2 * 36 / 3 = 48)
        model.w.grad = None
        model.w.data[...] = 2.0
        dp.forward_backward(1, x, y, micro_batch_size=2, scale=1.0)
        np.testing.assert_allclose(model.w.grad.numpy(), np.full(3, 48.0))
        bad = x.copy()
        bad[3, 0] = -1  # only rank 1 sees it
        with pytest.raises(RuntimeError, match="worker 1 failed(.|\n)*negative token id"):
            dp.forward_backward(2, bad, y, micro_batch_size=2, scale=1.0)
    # the worker has stopped after its error; a fresh one shows a replaced array is caught
    with DistributedDataParallel(model, 2, rows=4, block_size=2, seed=0) as dp:
        model.w.data = np.zeros(3, dtype=np.float32)
        with pytest.raises(RuntimeError, match="parameter 0 .* new array"):
            dp.forward_backward(0, x, y, micro_batch_size=2, scale=1.0)
    # a worker that dies (e.g. killed for lack of memory) is reported, not waited for forever
    with DistributedDataParallel(model, 2, rows=4, block_size=2, seed=0) as dp:
        os.kill(dp.workers[0].pid, signal.SIGKILL)
        dp.workers[0].join(timeout=10)
        with pytest.raises(RuntimeError, match="worker 1 (has stopped|stopped without)"):
            dp.forward_backward(0, x, y, micro_batch_size=2, scale=1.0)
    with pytest.raises(ValueError, match="5 rows do not split over 2 processes"):
        DistributedDataParallel(model, 2, rows=5, block_size=2, seed=0)


def test_without_fork_the_shares_run_in_one_process(tiny, tmp_path, monkeypatch):
    import handgrad.parallel.modes as modes_module

    monkeypatch.setattr(modes_module, "can_fork", lambda: False)
    said = []
    cfg = tiny(train={"micro_batch_size": 4, "processes": 2, "max_steps": 3})
    alone = train(from_dict(cfg), tmp_path / "alone", progress=False, log=said.append)
    assert any("cannot fork" in m and "micro batch of 8 windows" in m for m in said), said
    one = run(tiny(train={"micro_batch_size": 8, "processes": 1, "max_steps": 3}), tmp_path / "one")
    # the very same computation as one process on micro batches of 8
    assert bits(alone.train_losses) == bits(one.train_losses)


@pytest.mark.parametrize("processes", [1, 2])
def test_zero1_without_mpi_is_refused_before_any_work(tiny, tmp_path, processes):
    # forked ranks only compute gradients and rank 0 steps the whole optimizer, so ZeRO-1
    # there would silently be plain data parallel; one process has nothing to shard over
    out = tmp_path / "run"
    cfg = tiny(train={"micro_batch_size": 2, "processes": processes, "zero": 1})
    with pytest.raises(ConfigError) as err:
        run(cfg, out)
    message = str(err.value)
    assert "[train] zero = 1 needs MPI ranks" in message
    assert "set [train] zero = 0" in message
    assert ("forked" in message) == (processes > 1)
    assert not out.exists()  # refused before the run directory was made
    # the same config with zero = 0 trains
    plain = run(tiny(train={"micro_batch_size": 2, "processes": processes}), out)
    assert sorted(plain.train_losses) == [1, 2, 3, 4, 5, 6]


def test_zero1_without_mpi_is_a_cli_error(tiny, tmp_path, capsys):
    from handgrad.cli import main

    cfg = tiny()
    config = tmp_path / "tiny.toml"
    config.write_text(
        "[model]\nn_layer = 1\nn_head = 2\nn_embd = 32\nblock_size = 16\n"
        f"[data]\nsource = {str(cfg['data']['source'])!r}\n"
        "[train]\nmax_steps = 2\nzero = 1\n"
    )
    code = main(["train", str(config), "--out", str(tmp_path / "run"), "--no-progress"])
    assert code != 0
    err = capsys.readouterr().err
    assert "[train] zero = 1 needs MPI ranks" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
