"""All-reduce throughput of handgrad.distributed's transports on this machine, and the
training speed of data parallelism (shakespeare-char, tokens/s).

    .venv/bin/python benchmarks/bench_distributed.py                     # local and mpi, 2 ranks
    .venv/bin/python benchmarks/bench_distributed.py --ranks 3 --sizes 1e3 1e6
    .venv/bin/python benchmarks/bench_distributed.py --train-steps 200   # + training tokens/s

For each float32 array size: the median time of one in-place ``all_reduce(a, "sum")`` over
``--repeats`` calls (after two warm-up calls), and the bus bandwidth it amounts to, as NCCL's
tests define it: 2 (P - 1) / P x bytes / time (each byte crosses the ranks' links that
often in a ring all-reduce), so transports and rank counts compare on one scale. The mpi
rows come from the same measurement run by every rank under ``mpirun -n P`` (skipped when
mpi4py or mpirun is missing).

``--train-steps N`` also trains for N steps (after one warm-up step, not timed) and prints
tokens/s of three ways to run the same global batch: one process, ``[train] processes = P``
(forked local ranks) and ``mpirun -n P handgrad train`` (MPI ranks, each running the loop).
Two models: shakespeare-char (global batch 12 x 64) and GPT-2 124M on the same characters
(12 layers, 768 wide, vocab 50,304, global batch ``--big-batch`` x
``--big-block``; ``--big-steps`` steps, 0 to skip).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import handgrad.distributed as dist  # noqa: E402


def measure(sizes: list[int], repeats: int) -> list[dict]:
    """Every rank calls this; rank 0's timings are returned."""
    rows = []
    for n in sizes:
        a = np.ones(n, dtype=np.float32)
        for _ in range(2):
            dist.all_reduce(a)
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            dist.all_reduce(a)
            times.append(time.perf_counter() - start)
        t, P = statistics.median(times), dist.get_world_size()
        rows.append({"n": n, "s": t, "busbw": 2 * (P - 1) / P * a.nbytes / t})
    return rows


def local_rows(ranks: int, sizes: list[int], repeats: int) -> list[dict]:
    dist.init_process_group("local", world_size=ranks, worker=lambda: measure(sizes, repeats))
    try:
        return measure(sizes, repeats)
    finally:
        dist.destroy_process_group()


def mpi_rows(ranks: int, sizes: list[int], repeats: int) -> list[dict] | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    mpirun = shutil.which("mpirun", path=path)
    if mpirun is None:
        return None
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    cmd = [mpirun, "-n", str(ranks), "--oversubscribe", sys.executable, __file__, "--mpi-rank"]
    cmd += ["--repeats", str(repeats), "--sizes", *map(str, sizes)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in run.stdout.splitlines() if line.startswith("[")]
    if run.returncode or not lines:
        print(f"mpirun failed ({run.returncode}):\n{run.stdout}{run.stderr}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def train_sets(model: str, batch: int, block: int, ways: int, steps: int) -> list[str]:
    """--set overrides: ``batch`` windows of ``block`` tokens per step over ``ways`` ranks."""
    sets = [f"train.max_steps={steps}", "train.sample_tokens=0", "eval.batches=0"]
    sets += [f"train.micro_batch_size={batch // ways}", "train.grad_accum_steps=1"]
    sets += ["train.checkpoint_interval=0", f"train.block_size={block}", "optim.warmup_steps=1"]
    if model == "124m":
        sets += ["model.n_layer=12", "model.n_head=12", "model.n_embd=768"]
        sets += ["model.block_size=1024", "model.vocab_size=50304"]  # GPT-2 124M's shape
    return sets


def timed_train(sets: list[str], steps: int, out: str | None = None) -> float | None:
    """tokens/s of steps 2 .. ``steps`` (the first step warms up); every rank of an MPI job
    calls this with the same ``out`` (a fresh directory; default: a temporary one), rank 0
    returns the figure (the others None)."""
    from handgrad.train import train
    from handgrad.train.config import load_config

    cfg1 = load_config("shakespeare-char", [*sets, "train.max_steps=1"])
    cfgn = load_config("shakespeare-char", sets)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(out or tmp) / "run"
        train(cfg1, run, progress=False, log=lambda m: None)
        start = time.perf_counter()
        result = train(cfgn, run, resume=run, progress=False, log=lambda m: None)
        elapsed = time.perf_counter() - start
    if result.rank:
        return None
    return result.tokens_seen * (steps - 1) / steps / elapsed  # the timed steps' tokens


def mpi_tokens_per_s(ranks: int, sets: list[str], steps: int) -> float | None:
    mpirun = _mpirun()
    if mpirun is None:
        return None
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}
    cmd = [mpirun, "-n", str(ranks), "--oversubscribe", sys.executable, __file__]
    with tempfile.TemporaryDirectory() as out:  # one run directory for every rank
        cmd += ["--mpi-train", str(steps), out, *sets]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    lines = [line for line in run.stdout.splitlines() if line.startswith("tokens/s ")]
    if run.returncode or not lines:
        print(f"mpirun failed ({run.returncode}):\n{run.stdout}{run.stderr}", file=sys.stderr)
        return None
    return float(lines[-1].split()[1])


def _mpirun() -> str | None:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which("mpirun", path=path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e3, 1e5, 1e6, 1e7])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--train-steps", type=int, default=0)
    ap.add_argument("--big-steps", type=int, default=2)
    ap.add_argument("--big-batch", type=int, default=2)
    ap.add_argument("--big-block", type=int, default=256)
    ap.add_argument("--mpi-rank", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mpi-train", nargs="+", help=argparse.SUPPRESS)  # steps, out, sets
    args = ap.parse_args()
    if args.mpi_train:  # one rank of an MPI training measurement
        tok_s = timed_train(args.mpi_train[2:], int(args.mpi_train[0]), args.mpi_train[1])
        if tok_s is not None:
            print(f"tokens/s {tok_s}", flush=True)
        return
    sizes = [int(s) for s in args.sizes]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.mpi_rank:  # one rank of the mpi measurement
        dist.init_process_group("mpi")
        rows = measure(sizes, args.repeats)
        if dist.get_rank() == 0:
            print(json.dumps(rows), flush=True)
        dist.destroy_process_group()
        return
    results = {"local": local_rows(args.ranks, sizes, args.repeats)}
    mpi = mpi_rows(args.ranks, sizes, args.repeats)
    if mpi is not None:
        results["mpi"] = mpi
    print(f"all_reduce(float32, sum) over {args.ranks} ranks, median of {args.repeats}")
    print(f"{'transport':>9} {'elements':>10} {'MB':>8} {'time':>10} {'bus GB/s':>9}")
    for name, rows in results.items():
        for r in rows:
            print(
                f"{name:>9} {r['n']:>10,} {r['n'] * 4 / 1e6:>8.3f} "
                f"{r['s'] * 1e3:>8.3f}ms {r['busbw'] / 1e9:>9.2f}"
            )
    models = [("shakespeare-char", 12, 64, args.train_steps)]
    if args.train_steps and args.big_steps:
        models.append(("124m", args.big_batch, args.big_block, args.big_steps))
    for model, batch, block, steps in models if args.train_steps else []:
        P = args.ranks
        one = timed_train(train_sets(model, batch, block, 1, steps), steps)
        local = timed_train(
            [*train_sets(model, batch, block, P, steps), f"train.processes={P}"], steps
        )
        mpi = mpi_tokens_per_s(P, train_sets(model, batch, block, P, steps), steps)
        print(f"{model}, global batch {batch} x {block}, {steps} steps (1 untimed):")
        print(f"  1 process          {one:>10,.0f} tokens/s")
        print(f"  {P} local ranks      {local:>10,.0f} tokens/s")
        figure = "mpirun missing" if mpi is None else f"{mpi:>10,.0f} tokens/s"
        print(f"  {P} MPI ranks        {figure}")


if __name__ == "__main__":
    main()
