"""``[train] device`` and ``matmul_precision``: validation, a step with no host read, losses
read once per log interval, checkpoints independent of the device that wrote them, and
``handgrad sample --device``; on the CuPy stand-in (tests/fakecupy.py)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest

from handgrad.backend import cuda
from handgrad.cli import main
from handgrad.data import get_batch
from handgrad.parallel import choose_mode
from handgrad.parallel.step import BatchUploader, PendingLosses
from handgrad.serialization import load_file
from handgrad.train import train
from handgrad.train.config import ConfigError, from_dict, load_config
from handgrad.train.trainer import TrainingDiverged, build_run

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fakecupy  # noqa: E402


def run(cfg_dict, out):
    return train(from_dict(cfg_dict), out, progress=False, log=lambda m: None)


@pytest.mark.parametrize(
    "train_values, words",
    [
        ({"device": "gpu"}, "[train] device = 'gpu': expected 'cpu', 'cuda' or 'cuda:N'"),
        ({"device": "cuda:x"}, "[train] device = 'cuda:x'"),
        ({"matmul_precision": "medium"}, "matmul_precision = 'medium': must be 'highest'"),
    ],
)
def test_bad_device_settings_are_refused(tiny, train_values, words) -> None:
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        from_dict(tiny(train=train_values))


def test_processes_on_one_gpu_run_as_one_micro_batch(tiny, tmp_path) -> None:
    # a config written for 2 CPU ranks trains on one GPU as is: the 2 shares of each micro
    # batch run in one process, so the batches and the mean gradient are the config's
    said: list[str] = []
    two = tiny(train={"processes": 2, "micro_batch_size": 2, "device": "cuda"})
    with fakecupy.installed():
        dev = train(from_dict(two), tmp_path / "two", progress=False, log=said.append)
        one = run(tiny(train={"device": "cuda", "micro_batch_size": 4}), tmp_path / "one")
    assert any("micro batch of 4 windows runs in this one process" in m for m in said), said
    assert dev.train_losses == one.train_losses


def test_device_from_the_command_line(tiny) -> None:
    cfg = load_config(tiny(), overrides=["train.device=cuda:1", "train.matmul_precision=high"])
    assert cfg.train.device == "cuda:1" and cfg.train.matmul_precision == "high"
    assert load_config(tiny()).train.device == "cpu"


def test_a_step_reads_nothing_back_and_losses_come_in_one_copy(tiny, tmp_path) -> None:
    cfg = from_dict(tiny(train={"device": "cuda", "grad_accum_steps": 2}))
    with fakecupy.installed() as cp:
        mode = choose_mode("cuda", 1, False, say=lambda m: None)
        r = build_run(cfg, tmp_path / "run", mode)
        assert all(isinstance(p.data, cp.ndarray) for p in r.model.parameters())
        t = cfg.train
        mode.setup(r.model, r.optimizer, t.micro_batch_size, 2, r.block_size, t.seed)
        pending = PendingLosses()
        for step in range(3):
            x, y = get_batch(r.data.train, cfg.global_batch_size, r.block_size, r.rng)
            fakecupy.stats.reset()
            res = mode.clip_and_step(step, mode.gradients(step, x, y), 1e-3, 1.0)
            assert fakecupy.stats.syncs == 0, f"step {step} read the device"
            assert fakecupy.stats.uploads == 2  # x and y, once each for both micro batches
            assert pending.add(step + 1, res) is None  # left on the device
        fakecupy.stats.reset()
        values = pending.read()
        assert fakecupy.stats.syncs == 1 and len(pending) == 0
    assert [s for s, _, _ in values] == [1, 2, 3]
    assert all(math.isfinite(v) and v > 0 for _, loss, norm in values for v in (loss, norm))


def test_a_non_finite_loss_is_reported_with_its_step(tiny, tmp_path, monkeypatch) -> None:
    real_read = PendingLosses.read

    def poisoned(self):
        out = real_read(self)
        return [(s, math.nan if s == 2 else loss, norm) for s, loss, norm in out]

    monkeypatch.setattr(PendingLosses, "read", poisoned)
    with fakecupy.installed():
        with pytest.raises(
            TrainingDiverged, match=r"step 2: training loss is nan \(read at step 3"
        ):
            run(tiny(train={"device": "cuda", "log_interval": 3}), tmp_path / "nan")


def test_log_interval_losses_and_checkpoints_match_the_cpu(tiny, tmp_path) -> None:
    cpu = run(tiny(train={"log_interval": 4}), tmp_path / "cpu")
    with fakecupy.installed():
        dev = run(tiny(train={"device": "cuda", "log_interval": 4}), tmp_path / "dev")
    assert sorted(dev.train_losses) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(
        [dev.train_losses[s] for s in range(1, 7)], [cpu.train_losses[s] for s in range(1, 7)],
        rtol=1e-6,
    )  # fmt: skip
    # the same files, names, dtypes and shapes (host arrays, whatever device wrote them);
    # the values agree to rounding: on a device attention always subtracts the row max
    assert sorted(p.name for p in dev.checkpoint.iterdir()) == sorted(
        p.name for p in cpu.checkpoint.iterdir()
    )
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = load_file(cpu.checkpoint / name), load_file(dev.checkpoint / name)
        assert list(a) == list(b)
        for k in a:
            assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape), k
            np.testing.assert_allclose(b[k], a[k], rtol=1e-3, atol=1e-4, err_msg=k)
    hardware = json.loads((dev.checkpoint / "trainer_state.json").read_text())["hardware"]
    assert hardware["device"].startswith("gpu") and hardware["array_module"] == "cupy"
    with fakecupy.installed():  # a checkpoint written on the device resumes on the CPU
        more = tiny(train={"log_interval": 4, "max_steps": 7}, optim={"decay_steps": 8})
        resumed = train(from_dict(more), tmp_path / "dev", resume=dev.checkpoint, progress=False,
                        log=lambda m: None)  # fmt: skip
    assert sorted(resumed.train_losses) == [7]


def test_batch_uploader() -> None:
    a = np.arange(12).reshape(3, 4)
    assert BatchUploader("cpu")(a) is a
    with fakecupy.installed() as cp:
        fakecupy.stats.reset()
        d = BatchUploader("cuda")(a)
        assert isinstance(d, cp.ndarray) and fakecupy.stats.uploads == 1
        np.testing.assert_array_equal(d.get(), a)


def test_matmul_precision_sets_cupy_tf32(monkeypatch) -> None:
    monkeypatch.setenv("CUPY_TF32", "0")
    with fakecupy.installed():
        cuda.set_matmul_precision("high")
        assert os.environ["CUPY_TF32"] == "1"
        cuda.set_matmul_precision("highest")
        assert os.environ["CUPY_TF32"] == "0"
    with pytest.raises(ValueError, match="expected one of \\['highest', 'high'\\], got 'low'"):
        cuda.set_matmul_precision("low")


def test_sample_on_the_device_gives_the_cpu_text(tiny, tmp_path, capsys) -> None:
    res = run(tiny(), tmp_path / "run")
    args = ["sample", "--checkpoint", str(res.checkpoint), "--prompt", "The", "--seed", "3",
            "--max-new-tokens", "12"]  # fmt: skip
    assert main(args) == 0
    want = capsys.readouterr().out
    with fakecupy.installed():
        assert main([*args, "--device", "cuda"]) == 0
    assert capsys.readouterr().out == want
    assert main([*args, "--device", "tpu"]) == 1
    assert "unknown device type in 'tpu'" in capsys.readouterr().err
