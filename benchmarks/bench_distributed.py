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

``--train-steps N`` also trains the shakespeare-char config for N steps with
``[train] processes`` = 1 and = P (same global batch of 12 windows), and prints tokens/s.
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


def train_tokens_per_s(processes: int, steps: int) -> float:
    from handgrad.train import train
    from handgrad.train.config import load_config

    sets = [f"train.max_steps={steps}", "train.sample_tokens=0", f"train.processes={processes}"]
    sets += [f"train.micro_batch_size={12 // processes}", "eval.batches=0"]
    cfg = load_config("shakespeare-char", sets)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = train(cfg, Path(out), progress=False, log=lambda m: None)
        elapsed = time.perf_counter() - start
    return result.tokens_seen / elapsed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--sizes", type=float, nargs="+", default=[1e3, 1e5, 1e6, 1e7])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--train-steps", type=int, default=0)
    ap.add_argument("--mpi-rank", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
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
    if args.train_steps:
        for p in (1, args.ranks):
            tok_s = train_tokens_per_s(p, args.train_steps)
            print(f"shakespeare-char, processes = {p}: {tok_s:,.0f} tokens/s")


if __name__ == "__main__":
    main()
