"""gpu_check's ``nccl`` part: the nccl transport's collectives and 10 data-parallel training
steps under ``mpirun -n 1`` on the GPU machine (NCCL refuses two ranks on one GPU), or on 2
ranks through the CuPy and NCCL stand-ins with ``--cpu-smoke``. Skipped, never failed, where
there is no mpi4py or no MPI launcher.

    python benchmarks/gpu_check.py --parts nccl     # as part of the check
    python benchmarks/gpu_check_nccl.py --nccl-rank DIR [--cpu-smoke]   # one rank (internal)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_check_probes import error_record, output_tail  # noqa: E402  (benchmarks/ is on the path)

NCCL_CONFIG = """
[model]
n_layer = 1
n_head = 2
n_embd = 32
block_size = 16
dropout = 0.0
[data]
source = "{source}"
tokenizer = "char"
val_fraction = 0.1
[optim]
lr = 3e-3
warmup_steps = 2
[train]
max_steps = 10
micro_batch_size = 4
log_interval = 5
checkpoint_interval = 0
sample_tokens = 0
[eval]
interval = 10
batches = 2
"""


def _mpi_launcher() -> str | None:
    """mpirun (or mpiexec) next to this Python or on PATH; None when there is none."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("mpirun", path=path) or shutil.which("mpiexec", path=path)


def part_nccl(smoke: bool, budget: float) -> dict[str, Any]:
    import importlib.util

    if importlib.util.find_spec("mpi4py") is None:
        return {"ok": True, "skipped": "no mpi4py"}
    launcher = _mpi_launcher()
    if launcher is None:
        return {"ok": True, "skipped": "no MPI launcher (mpirun / mpiexec)"}
    ranks = 2 if smoke else 1  # one GPU here: NCCL refuses two ranks on one GPU
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [launcher, "-n", str(ranks)]
        if smoke:
            cmd.append("--oversubscribe")  # Open MPI's (the venv's wheel) on a small CPU
        cmd += [sys.executable, __file__, "--nccl-rank", tmp]
        if smoke:
            cmd.append("--cpu-smoke")
        env = {**os.environ, "HANDGRAD_CACHE": tmp, "OMP_NUM_THREADS": "1",
               "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
        # its own process group, so that a hung job is killed whole (launcher and ranks)
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        try:
            output, _ = p.communicate(timeout=max(budget - 5, 1))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            try:
                output, _ = p.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                output = ""
            return {"ok": False, "error": f"mpirun -n {ranks} over {budget - 5:.0f} s",
                    "output_tail": output_tail(output, None)}  # fmt: skip
        result = Path(tmp) / "nccl_result.json"
        if not result.is_file():
            return {"ok": False, "error": f"exit status {p.returncode}, no result",
                    "output_tail": output_tail(output, None)}  # fmt: skip
        res = json.loads(result.read_text())
    res["ranks"] = ranks
    res["ok"] = p.returncode == 0 and res.get("ok", False)
    if p.returncode != 0:
        res["output_tail"] = output_tail(output, None)
    return res


def nccl_rank(smoke: bool, tmp: Path) -> int:
    """One rank of ``part_nccl``'s MPI job: the collectives, then 10 training steps; rank 0
    writes ``tmp/nccl_result.json``."""
    import numpy as np

    if smoke:  # the stand-ins, with two fake GPUs
        sys.path.insert(0, str(ROOT / "tests"))
        import fakecupy
        import fakenccl

        fakecupy.install()
        fakenccl.install(gpus=2)
    import handgrad.distributed as dist
    from handgrad.backend import cuda
    from handgrad.cli import main as cli

    res: dict[str, Any] = {"ok": False}
    try:
        g = dist.init_process_group("nccl")
        cp = cuda.require(g.device_index)
        P, r = g.world_size, g.rank
        res["device_index"] = g.device_index
        checks = {}
        with cp.cuda.Device(g.device_index):
            a = cp.full(5, r + 1, dtype=cp.float32)
            g.all_reduce(a)
            checks["all_reduce"] = a.get().tolist() == [P * (P + 1) / 2] * 5
            a = cp.full(3, 2.0 * (r + 1), dtype=cp.float64)
            g.all_reduce(a, op="avg")
            checks["all_reduce_avg"] = bool(np.allclose(a.get(), P + 1))
            a = cp.full(3, r, dtype=cp.float32)
            g.all_reduce(a, op="max")
            checks["all_reduce_max"] = a.get().tolist() == [P - 1] * 3
            a = cp.full(4, r + 1, dtype=cp.float32)
            g.reduce(a, dst=0)
            checks["reduce"] = a.get().tolist() == [P * (P + 1) / 2 if r == 0 else r + 1] * 4
            a = cp.arange(4, dtype=cp.float32) + 10 * r
            g.broadcast(a, src=0)
            checks["broadcast"] = a.get().tolist() == [0, 1, 2, 3]
            a = cp.arange(3 * P, dtype=cp.float32) * (r + 1)
            out = cp.empty(3, dtype=cp.float32)
            g.reduce_scatter(out, a)
            want = np.arange(3 * r, 3 * r + 3) * (P * (P + 1) / 2)
            checks["reduce_scatter"] = out.get().tolist() == want.tolist()
            out = cp.empty(2 * P, dtype=cp.float32)
            g.all_gather(out, cp.full(2, r, dtype=cp.float32))
            checks["all_gather"] = out.get().tolist() == [q for q in range(P) for _ in (0, 1)]
            host = np.full(2, r + 1.0)
            g.all_reduce(host)  # a host array: over MPI
            checks["host_all_reduce"] = host.tolist() == [P * (P + 1) / 2] * 2
            g.barrier()
        res["checks"] = checks
        corpus = tmp / "corpus.txt"
        if r == 0:
            corpus.write_text("The quick brown fox jumps over the lazy dog. " * 400)
        g.barrier()
        config = tmp / f"nccl_{r}.toml"
        config.write_text(NCCL_CONFIG.format(source=corpus))
        run = tmp / "run"
        t0 = time.perf_counter()
        code = cli(["train", str(config), "--out", str(run), "--set", "train.device=cuda",
                    "--no-progress"])  # fmt: skip
        res["train_s"] = time.perf_counter() - t0
        res["train_exit"] = code
        if r == 0 and code == 0:
            recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            res["train_losses"] = [rec["train_loss"] for rec in recs]
        res["ok"] = all(checks.values()) and code == 0 and bool(res.get("train_losses", r))
    except Exception as e:  # noqa: BLE001  (reported in the summary)
        res.update(error_record(e))
    if dist.is_initialized() and dist.get_rank() != 0:
        return 0 if res["ok"] else 1
    (tmp / "nccl_result.json").write_text(json.dumps(res, default=str))
    return 0 if res["ok"] else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one rank of gpu_check's nccl part")
    ap.add_argument("--nccl-rank", type=Path, required=True, help="the part's scratch dir")
    ap.add_argument("--cpu-smoke", action="store_true", help="the CuPy and NCCL stand-ins")
    args = ap.parse_args(argv)
    return nccl_rank(args.cpu_smoke, args.nccl_rank)


if __name__ == "__main__":
    sys.exit(main())
