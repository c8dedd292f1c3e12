"""``mpirun -n 2 handgrad train CONFIG --set train.device=cuda``: one GPU per rank, the
gradients reduced by NCCL, run here on the CuPy and NCCL stand-ins (tests/fakecupy.py,
tests/fakenccl.py: two fake GPUs whose collectives go over MPI on host memory), so the
``nccl`` transport and the trainer's GPU path run their real code without a GPU.

Two fake-GPU ranks must train like one CPU process on the same global batch, write the
checkpoint two CPU ranks write, read nothing back from the device inside a step, do the
same with ZeRO-1, and leave a checkpoint that one CPU process resumes; a rank that fails
stops the other within 10 s, naming itself."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from tests.train.test_train_mpi import files, losses, one_process, val_losses

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
decay_steps = 20
[train]
max_steps = 20
micro_batch_size = 4
seed = 7
log_interval = 5
checkpoint_interval = 10
sample_tokens = 8
autocast = "none"     # float32 on the GPUs too: their losses equal the CPU's
[eval]
interval = 10
batches = 3
"""


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir) -> dict[str, Path]:
    """The config, and the CPU runs the GPU runs are held to: one process with twice the
    micro batch, and two forked ranks (``processes = 2``, the same sums as two MPI ranks)."""
    root = tmp_path_factory.mktemp("nccl")
    config = root / "tiny.toml"
    config.write_text(CONFIG.format(source=data_dir))
    one_process(str(config), "--out", str(root / "one"), "--set", "train.micro_batch_size=8")
    one_process(str(config), "--out", str(root / "local"), "--set", "train.processes=2")
    return {"config": config, "one": root / "one", "local": root / "local", "root": root}


def gpu_train(mpirun, *args: str, fault: str | None = None):  # type: ignore[no-untyped-def]
    faults = ["--fault", fault] if fault else []
    cmd = ["--fake-gpu", *faults, "--", "train", *args, "--set", "train.device=cuda"]
    return mpirun(HERE / "mpi_train.py", *cmd, "--no-progress", timeout=180)


def syncs_per_step(out: str) -> dict[int, list[int]]:
    found = re.findall(r"rank (\d) syncs per step: \[([\d, ]*)\]", out)
    return {int(r): [int(v) for v in s.split(",") if v.strip()] for r, s in found}


N_EMBD = 32


def nccl_calls(out: str, rank: int) -> dict[str, int]:
    found = re.search(rf"rank {rank} nccl calls: \[(.*)\]", out)
    assert found, out
    return {k: int(v) for k, v in re.findall(r"\('(\w+)', (\d+)\)", found.group(1))}


def assert_close(a: np.ndarray, b: np.ndarray, atol: float, what: str) -> None:
    """Within ``atol``, but for the key bias (middle third of c_attn.bias): softmax does not
    change when every score of a row moves by q.b_k, so its true gradient is 0 and AdamW's
    m / sqrt(v) turns rounding noise into steps of up to lr; it gets 1e-4 (lr = 3e-3)."""
    if what.endswith("attn.c_attn.bias"):
        key = slice(N_EMBD, 2 * N_EMBD)
        np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-4, err_msg=what)
        a, b = np.delete(a, np.r_[key]), np.delete(b, np.r_[key])
    np.testing.assert_allclose(a, b, rtol=0, atol=atol, err_msg=what)


def assert_same_training(run: Path, ref: dict[str, Path], atol: float) -> None:
    """Losses as one CPU process's (1e-5 relative); weights and AdamW state as two CPU
    ranks' within ``atol``."""
    assert sorted(losses(run)) == [5, 10, 15, 20]
    for step, loss in losses(ref["one"]).items():
        assert losses(run)[step] == pytest.approx(loss, rel=1e-5, abs=0), step
    for step, loss in val_losses(ref["one"]).items():
        assert val_losses(run)[step] == pytest.approx(loss, rel=1e-5, abs=0), step
    for step in (10, 20):
        for name in ("model", "optimizer"):
            a, b = files(run, step, name), files(ref["local"], step, name)
            assert sorted(a) == sorted(b)
            for k in a:
                assert a[k].dtype == b[k].dtype, (name, k)
                assert_close(a[k], b[k], atol, f"{name} {k}")


def test_two_fake_gpus_train_like_the_cpu_and_resume_there(mpirun, reference, tmp_path):
    run = tmp_path / "gpu"
    done = gpu_train(mpirun, str(reference["config"]), "--out", str(run))
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert out.count("done: 20 steps") == 1, out  # rank 0 alone reports
    assert "on cuda:0 (one GPU per rank, NCCL)" in out, out
    # no step reads the device back: losses come up at log_interval, outside the step
    assert syncs_per_step(out) == {0: [0] * 20, 1: [0] * 20}, out
    # per step: the loss sums and one bucket of gradients through NCCL
    assert nccl_calls(out, 1) == {"allReduce": 40}, out
    # the fake reduces as MPI does, in rank order; the generic array path on the fake
    # rounds a little differently from the CPU's
    assert_same_training(run, reference, atol=1e-6)
    # its step-10 checkpoint resumed by one CPU process (twice the micro batch: same batch)
    resumed = tmp_path / "resumed"
    one_process(
        "--resume", str(run / "checkpoints" / "step_0000010"), "--out", str(resumed),
        "--set", "train.device=cpu", "--set", "train.processes=1",
        "--set", "train.micro_batch_size=8",
    )  # fmt: skip
    for step in (15, 20):
        assert losses(resumed)[step] == pytest.approx(losses(run)[step], rel=1e-5, abs=0)
    for name in ("model", "optimizer"):
        a, b = files(resumed, 20, name), files(run, 20, name)
        for k in a:
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-4, err_msg=f"{name} {k}")


def test_zero1_on_two_fake_gpus(mpirun, reference, tmp_path):
    run = tmp_path / "zero"
    done = gpu_train(mpirun, str(reference["config"]), "--out", str(run), "--set", "train.zero=1")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert syncs_per_step(out) == {0: [0] * 20, 1: [0] * 20}, out
    # per step: gradients reduce-scattered, the norm all-reduced, parameters gathered;
    # AdamW's state gathered (moments m, v) for each of the two checkpoints
    calls = nccl_calls(out, 1)
    assert calls["reduceScatter"] == 20 and calls["allGather"] == 20 + 2 * 2, out
    assert_same_training(run, reference, atol=1e-6)


def test_one_gpu_named_for_two_ranks_on_a_node_is_refused(mpirun, reference, tmp_path):
    run = tmp_path / "r"
    args = ["--fake-gpu", "--", "train", str(reference["config"]), "--out", str(run)]
    done = mpirun(HERE / "mpi_train.py", *args, "--set", "train.device=cuda:1", timeout=180)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert out.count("[train] device = 'cuda:1' names one GPU, but 2 ranks run on this node") == 1
    assert not (run / "metrics.jsonl").exists()


def test_a_failing_fake_gpu_rank_stops_every_rank(mpirun, reference, tmp_path):
    run = tmp_path / "run"
    args = str(reference["config"]), "--out", str(run), "--set", "train.checkpoint_interval=5"
    done = gpu_train(mpirun, *args, fault="raise:8")
    end, out = time.time(), done.stdout + done.stderr
    assert done.returncode != 0, out
    assert re.search(r"rank 1 of 2 failed: Traceback(.|\n)*ValueError: boom on rank 1", out), out
    assert out.count("failed: Traceback") == 1, out
    failed = float(out.split("rank 1 failing at ")[1].split()[0])
    assert end - failed < 10, out
    assert (run / "latest").read_text().strip() == "checkpoints/step_0000005"
    assert "done:" not in out


def test_gpu_data_parallel_outside_mpi_is_one_process(tiny):
    from handgrad.parallel import RunMode, choose_mode
    from handgrad.train.config import from_dict

    # the config is the same under mpirun (one rank per GPU) and without it; without MPI the
    # run mode runs the shares of each micro batch in one process on the one GPU
    assert from_dict(tiny(train={"device": "cuda", "processes": 2})).train.processes == 2
    mode = choose_mode("cuda", 2, False)
    assert type(mode) is RunMode and mode.processes == 2


def test_a_rank_whose_nccl_fails_to_start_ends_the_job(mpirun, reference, tmp_path):
    """Rank 1's communicator raises while rank 0 waits in NCCL's start-up (which has no
    timeout): the job must end at once, naming rank 1, not hang."""
    run = tmp_path / "run"
    args = ["--fake-gpu", "--fault", "nccl:0", "--", "train", str(reference["config"])]
    try:
        done = mpirun(HERE / "mpi_train.py", *args, "--out", str(run),
                      "--set", "train.device=cuda", timeout=60)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("a rank whose NCCL failed to start left the other waiting: hung for 60 s")
    end, out = time.time(), done.stdout + done.stderr
    assert done.returncode != 0, out
    assert re.search(r"rank 1 of 2 failed: (.|\n)*boom on rank 1: NCCL could not start", out), out
    failed = float(out.split("rank 1 failing at ")[1].split()[0])
    assert end - failed < 10, out
    assert not (run / "metrics.jsonl").exists()
