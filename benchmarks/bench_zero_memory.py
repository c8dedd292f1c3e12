"""Where a rank's peak memory comes from in one training step, phase by phase: plain data
parallelism (bucketed all-reduce, clip, AdamW) against ZeRO-1 (reduce-scatter, clip on the
shard, AdamW on the shard, parameter all-gather), on GPT-2 124M.

    .venv/bin/python benchmarks/bench_zero_memory.py                 # mpirun -n 2, B=1, T=256
    .venv/bin/python benchmarks/bench_zero_memory.py --block 1024 --ranks 2
    .venv/bin/python benchmarks/bench_zero_memory.py --checkpoint-after 1   # + a checkpoint

Each rank runs three steps of each mode in a fresh process (so the peaks are the mode's own)
and reports, for every step, per phase: resident memory at the phase's start and end and
its peak inside the phase (Linux's VmHWM, reset before each phase by writing 5 to
``/proc/self/clear_refs``), and the peak of the bytes NumPy allocated inside the phase
(tracemalloc; NumPy reports its data buffers to it), which tells our arrays from buffers MPI
allocates itself. Figures in MiB. ``--checkpoint-after N`` adds a phase after step N that
assembles the optimizer's whole state dict on rank 0 as a checkpoint does (ZeRO-1 gathers
its shards; the dict is dropped where the files would have been written).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MIB = 1 << 20


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


class Phases:
    """Per-phase resident memory: start, peak, end; and the traced NumPy peak above the
    phase's start."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.current: str | None = None

    def begin(self, name: str) -> None:
        self.end()
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM <- VmRSS
        tracemalloc.reset_peak()
        self.current = name
        self._start = _status("VmRSS")
        self._traced = tracemalloc.get_traced_memory()[0]

    def end(self) -> None:
        if self.current is None:
            return
        self.rows.append(
            {
                "phase": self.current,
                "start": self._start,
                "peak": _status("VmHWM"),
                "end": _status("VmRSS"),
                "numpy_peak": tracemalloc.get_traced_memory()[1] - self._traced,
            }
        )
        self.current = None


def checkpoint_state(optimizer: object, zero: object, rank: int) -> None:
    """What a checkpoint holds of the optimizer, assembled on rank 0 and dropped."""
    import inspect

    if zero is not None:
        to_rank_0 = "dst" in inspect.signature(zero.gather_state).parameters
        zero.gather_state(dst=0) if to_rank_0 else zero.gather_state()
    if rank == 0:
        sd = (zero or optimizer).state_dict()
        del sd  # written


def rank_main(mode: str, block: int, steps: int, checkpoint_after: int = 0) -> None:
    import handgrad.distributed as dist
    from handgrad import manual_seed
    from handgrad.distributed.reducer import GradientReducer
    from handgrad.models.gpt2 import GPT2, GPT2Config
    from handgrad.nn.utils import clip_grad_norm_
    from handgrad.optim import AdamW, param_groups_for_weight_decay
    from handgrad.parallel.zero import FlatShards, ZeroAdamW

    dist.init_process_group("mpi")
    group = dist.group()
    manual_seed(0)
    cfg = GPT2Config(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304)
    model = GPT2(cfg)
    optimizer = AdamW(param_groups_for_weight_decay(model, 0.1), lr=1e-4)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    zero = ZeroAdamW(optimizer, group) if mode == "zero" else None
    reducer = GradientReducer(params, group) if mode == "dp" else None
    if reducer is not None:  # as DistributedDataParallel: gradients go into the buckets
        reducer.attach()
    rng = np.random.default_rng(group.rank)
    phases = Phases()
    tracemalloc.start()
    if zero is not None:  # the gather is inside step(): time it as its own phase
        real_gather = FlatShards.all_gather_parameters

        def gather(self, shard):  # noqa: ANN001, ANN202
            phases.begin(phases.current.split(":")[0] + ": all_gather")
            return real_gather(self, shard)

        FlatShards.all_gather_parameters = gather
    for step in range(1, steps + 1):
        x = rng.integers(0, 50304, size=(1, block + 1))
        phases.begin(f"{step}: forward+backward")
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        del loss
        if zero is not None:
            phases.begin(f"{step}: reduce_scatter+clip")
            zero.reduce_and_clip(1.0)
            phases.begin(f"{step}: adamw")
            zero.step()
        else:
            phases.begin(f"{step}: all_reduce")
            reducer.reduce("sum")
            phases.begin(f"{step}: clip")
            clip_grad_norm_(params, 1.0)
            phases.begin(f"{step}: adamw")
            optimizer.step()
        phases.begin(f"{step}: zero_grad")
        (zero or optimizer).zero_grad(set_to_none=True)
        if step == checkpoint_after:
            phases.begin(f"{step}: checkpoint")
            checkpoint_state(optimizer, zero, group.rank)
            group.barrier()
        phases.end()
    import resource

    record = {
        "rank": group.rank,
        "mode": mode,
        "rows": phases.rows,
        "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "state": zero.state_bytes()
        if zero
        else sum(a.nbytes for st in optimizer.state.values() for a in st.values()
                 if isinstance(a, np.ndarray)),
    }  # fmt: skip
    print("RECORD " + json.dumps(record), flush=True)
    dist.destroy_process_group()


def run_mode(mode: str, ranks: int, block: int, steps: int, checkpoint_after: int) -> list[dict]:
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    mpirun = shutil.which("mpirun", path=path)
    if mpirun is None:
        raise SystemExit("mpirun not found: pip install 'handgrad[mpi]'")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMPI_ALLOW_RUN_AS_ROOT": "1"}
    env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    cmd = [mpirun, "-n", str(ranks), "--oversubscribe", sys.executable, __file__]
    cmd += ["--rank-mode", mode, "--block", str(block), "--steps", str(steps)]
    cmd += ["--checkpoint-after", str(checkpoint_after)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    records = [
        json.loads(line[7:]) for line in run.stdout.splitlines() if line.startswith("RECORD ")
    ]
    if run.returncode or len(records) != ranks:
        raise SystemExit(f"mpirun failed ({run.returncode}):\n{run.stdout}{run.stderr}")
    return sorted(records, key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--block", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--checkpoint-after", type=int, default=0, help="0: no checkpoint")
    ap.add_argument("--modes", nargs="+", default=["dp", "zero"], choices=["dp", "zero"])
    ap.add_argument("--rank-mode", choices=["dp", "zero"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank_mode:
        rank_main(args.rank_mode, args.block, args.steps, args.checkpoint_after)
        return
    for mode in args.modes:
        records = run_mode(mode, args.ranks, args.block, args.steps, args.checkpoint_after)
        name = {"dp": "plain data parallel", "zero": "ZeRO-1"}[mode]
        print(f"\n{name}, {args.ranks} MPI ranks, GPT-2 124M, B=1 T={args.block}")
        for rec in records:
            print(
                f" rank {rec['rank']}: peak RSS (whole run) {rec['maxrss'] / MIB:,.0f} MiB, "
                f"optimizer state {rec['state'] / MIB:,.1f} MiB"
            )
            print(f"  {'phase':<22}{'start':>8}{'peak':>8}{'end':>8}{'numpy peak':>12}")
            for r in rec["rows"]:
                print(
                    f"  {r['phase']:<22}{r['start'] / MIB:>8,.0f}{r['peak'] / MIB:>8,.0f}"
                    f"{r['end'] / MIB:>8,.0f}{r['numpy_peak'] / MIB:>12,.0f}"
                )


if __name__ == "__main__":
    main()
