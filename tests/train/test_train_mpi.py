"""``mpirun -n 2 handgrad train CONFIG``: every rank runs the loop on its share of each batch.

Two MPI ranks must train like one process on the same global batch (micro_batch_size x 2),
and like ``[train] processes = 2`` on one machine to the bit (both sum the two halves'
gradients, a + b); checkpoints are the same files for any world size, so a run resumes on
another one exactly; a rank that fails stops the other within 10 s, naming itself."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from handgrad.backend import num_threads
from handgrad.cli import main
from handgrad.serialization import load_file

HERE = Path(__file__).resolve().parent

CONFIG = """
[model]
n_layer = 1
n_head = 2
n_embd = 32
block_size = 16
dropout = 0.0
[data]
source = "{source}"
[optim]
lr = 3e-3
min_lr = 3e-4
warmup_steps = 2
decay_steps = 30
[train]
max_steps = 30
micro_batch_size = 4
seed = 7
log_interval = 1
checkpoint_interval = 15
sample_tokens = 8
[eval]
interval = 10
batches = 3
"""  # 3 evaluation batches: dealt unevenly over 2 ranks


@pytest.fixture
def config(tmp_path, data_dir) -> Path:
    path = tmp_path / "tiny.toml"
    path.write_text(CONFIG.format(source=data_dir))
    return path


def mpi_train(
    mpirun: Callable, *args: str, fault: str | None = None
) -> subprocess.CompletedProcess:
    faults = ["--fault", fault] if fault else []
    return mpirun(
        HERE / "mpi_train.py", *faults, "--", "train", *args, "--no-progress", timeout=180
    )


def one_process(*args: str) -> None:
    """``handgrad train`` here, on one thread as each MPI rank runs: a float32 sum over a
    BLAS call's threads rounds differently, and the MPI runs are held to these bit for bit."""
    with num_threads(1):
        assert main(["train", *args, "--no-progress"]) == 0


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["train_loss"] for r in records}


def val_losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in records if "val_loss" in r}


def files(run: Path, step: int, name: str) -> dict[str, np.ndarray]:
    return load_file(run / "checkpoints" / f"step_{step:07d}" / f"{name}.safetensors")


def test_two_mpi_ranks_train_like_one_process(mpirun, config, tmp_path):
    done = mpi_train(mpirun, str(config), "--out", str(tmp_path / "mpi"))
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert out.count("done: 30 steps") == 1, out  # rank 0 alone reports
    assert out.count("step 30: train") == 1, out
    one_process(str(config), "--out", str(tmp_path / "one"), "--set", "train.micro_batch_size=8")
    one_process(str(config), "--out", str(tmp_path / "local"), "--set", "train.processes=2")
    mpi, one, local = (tmp_path / d for d in ("mpi", "one", "local"))
    assert sorted(losses(mpi)) == list(range(1, 31))
    for step, loss in losses(one).items():
        assert losses(mpi)[step] == pytest.approx(loss, rel=1e-5, abs=0), step
    for step, loss in val_losses(one).items():
        assert val_losses(mpi)[step] == pytest.approx(loss, rel=1e-5, abs=0), step
    assert sorted(val_losses(mpi)) == [10, 20, 30]
    # the same sums as forked ranks, so the same bits: losses, weights, optimizer state
    assert losses(mpi) == losses(local) and val_losses(mpi) == val_losses(local)
    for name in ("model", "optimizer"):
        a, b, c = files(mpi, 30, name), files(one, 30, name), files(local, 30, name)
        assert sorted(a) == sorted(b) == sorted(c)
        for k in a:
            assert a[k].tobytes() == c[k].tobytes(), (name, k)
            # Adam divides by sqrt(v): rounding differences move an element whose gradient
            # is near 0 by a fraction of lr (3e-3), hence this bound against one process
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-4, err_msg=f"{name} {k}")
    assert (mpi / "latest").read_text().strip() == "checkpoints/step_0000030"
    state = json.loads((mpi / "checkpoints" / "step_0000030" / "trainer_state.json").read_text())
    assert state["hardware"]["processes"] == 2
    assert json.loads((mpi / "config.json").read_text())["train"]["processes"] == 2


def test_resume_on_another_world_size_is_exact(mpirun, config, tmp_path):
    full, two_one, one_two = tmp_path / "full", tmp_path / "two_one", tmp_path / "one_two"
    assert mpi_train(mpirun, str(config), "--out", str(full)).returncode == 0
    # 2 MPI ranks, then one process (the checkpoint's config: processes = 2, forked)
    first = mpi_train(mpirun, str(config), "--out", str(two_one), "--set", "train.max_steps=15")
    assert first.returncode == 0, first.stdout + first.stderr
    one_process("--resume", str(two_one), "--set", "train.max_steps=30")
    # one process first, then 2 MPI ranks
    one_process(
        str(config), "--out", str(one_two), "--set", "train.max_steps=15",
        "--set", "train.processes=2",
    )  # fmt: skip
    second = mpi_train(mpirun, "--resume", str(one_two), "--set", "train.max_steps=30")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "resuming from" in second.stderr and "at step 15" in second.stderr
    for run in (two_one, one_two):
        assert losses(run) == losses(full), run
        for name in ("model", "optimizer"):
            a, b = files(full, 30, name), files(run, 30, name)
            assert all(a[k].tobytes() == b[k].tobytes() for k in a), (run, name)


@pytest.mark.parametrize(
    "fault, message",
    [
        ("raise", r"rank 1 of 2 failed: Traceback(.|\n)*ValueError: boom on rank 1 at step 8"),
        # the launcher's words, or the watchdog's when it sees rank 1's connection close first
        (
            "kill",
            r"rank 1 (.|\n)*(signal 9|Killed|killed)|rank 1 of 2 \(host .+\) failed: its "
            r"process ended",
        ),
        ("nan", r"handgrad train: error: step 8: training loss is nan"),
    ],
)
def test_a_failing_rank_stops_every_rank(mpirun, config, tmp_path, fault, message):
    run = tmp_path / "run"
    args = str(config), "--out", str(run), "--set", "train.checkpoint_interval=5"
    done = mpi_train(mpirun, *args, fault=f"{fault}:8")
    end, out = time.time(), done.stdout + done.stderr
    assert done.returncode != 0, out
    assert re.search(message, out), out
    failed = float(out.split("rank 1 failing at ")[1].split()[0])
    assert end - failed < 10, out  # rank 0 did not wait on
    assert out.count("training loss is nan") <= 1, out  # one rank says it
    # latest names the last complete checkpoint, which loads
    assert (run / "latest").read_text().strip() == "checkpoints/step_0000005"
    assert files(run, 5, "model")
    assert "done:" not in out


def test_processes_other_than_the_world_size_is_refused(mpirun, config, tmp_path):
    done = mpi_train(
        mpirun, str(config), "--out", str(tmp_path / "r"), "--set", "train.processes=3"
    )
    out = done.stdout + done.stderr
    assert done.returncode != 0
    assert out.count("[train] processes = 3, but this run was started by MPI with 2 ranks") == 1
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_zero1_trains_like_plain_data_parallel_and_resumes_either_way(mpirun, config, tmp_path):
    plain, zero = tmp_path / "plain", tmp_path / "zero"
    assert mpi_train(mpirun, str(config), "--out", str(plain)).returncode == 0
    done = mpi_train(mpirun, str(config), "--out", str(zero), "--set", "train.zero=1")
    assert done.returncode == 0, done.stdout + done.stderr
    # the same update on the same summed gradient; only the clipping norm is summed in
    # another order (over shards instead of parameters)
    for step, loss in losses(plain).items():
        assert losses(zero)[step] == pytest.approx(loss, rel=1e-5, abs=0), step
    for name in ("model", "optimizer"):  # AdamW's own layout, whole parameters
        a, b = files(plain, 30, name), files(zero, 30, name)
        assert sorted(a) == sorted(b)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-4, err_msg=f"{name} {k}")
    # ZeRO's checkpoint resumed by plain data parallel in one process, and a plain one by ZeRO
    z1, p2z = tmp_path / "z1", tmp_path / "p2z"
    args = str(config), "--set", "train.max_steps=15"
    assert mpi_train(mpirun, *args, "--out", str(z1), "--set", "train.zero=1").returncode == 0
    one_process("--resume", str(z1), "--set", "train.max_steps=30", "--set", "train.zero=0")
    assert mpi_train(mpirun, *args, "--out", str(p2z)).returncode == 0
    done = mpi_train(mpirun, "--resume", str(p2z), "--set", "train.max_steps=30",
                     "--set", "train.zero=1")  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    for run in (z1, p2z):
        assert sorted(losses(run)) == list(range(1, 31))
        for step, loss in losses(plain).items():
            assert losses(run)[step] == pytest.approx(loss, rel=1e-5, abs=0), (run, step)


def test_zero1_on_one_mpi_rank_is_refused(mpirun, config, tmp_path):
    out = tmp_path / "r"
    args = ["--", "train", str(config), "--out", str(out), "--set", "train.zero=1"]
    done = mpirun(HERE / "mpi_train.py", *args, timeout=180, n=1)
    text = done.stdout + done.stderr
    assert done.returncode != 0, text
    assert "[train] zero = 1 needs MPI ranks" in text and "this run has 1 MPI rank" in text
    assert not out.exists()
