"""All-reduce throughput of handgrad.distributed's transports on this machine, and the
training speed of data parallelism (shakespeare-char, tokens/s).

    .venv/bin/python benchmarks/bench_distributed.py                     # local and mpi, 2 ranks
    .venv/bin/python benchmarks/bench_distributed.py --ranks 3 --sizes 1e3 1e6
    .venv/bin/python benchmarks/bench_distributed.py --train-steps 20 --big-steps 3

For each float32 array size: the median time of one in-place ``all_reduce(a, "sum")`` over
``--repeats`` calls (after two warm-up calls), and the bus bandwidth it amounts to, as NCCL's
tests define it: 2 (P - 1) / P x bytes / time (each byte crosses the ranks' links that
often in a ring all-reduce), so transports and rank counts compare on one scale. The mpi
rows come from the same measurement run by every rank under ``mpirun -n P`` (skipped when
mpi4py or mpirun is missing).

``--train-steps N`` also trains for N steps and reports, for the ways to run the same
global batch (one process; ``[train] processes = P`` forked local ranks; ``mpirun -n P``
MPI ranks, whose gradient reduction overlaps backward; the same with the reduction after
backward; overlapped without polling the requests from the hooks; ``[train] zero = 1``;
``--ways`` picks some), each run in fresh processes:

- tokens/s over steps 2 .. N (the first warms up), from rank 0's step times (a mode's gradients, clip and update);
- comm share per rank: time inside the gradient collectives (``GradientReducer.reduce``;
  overlapped: the hooks that pack and start buckets and poll them, ``flush`` and ``wait``;
  ZeRO-1's reduce-scatter and parameter all-gather; neither counts the one-number
  all-reduces of the losses or of ZeRO's gradient norm) / rank 0's step time.
  Forked ranks reduce to rank 0, MPI ranks all-reduce; either way the time includes waiting
  for the slower rank to arrive;
- tail share per rank: the part of it after backward (``reduce``, or ``flush`` + ``wait``),
  which is what the overlap can hide;
- peak RSS per rank (``getrusage`` ru_maxrss after the last step, before the final
  checkpoint; forked ranks share the parameters' pages, counted in each);
- optimizer state per rank: AdamW's moments and fp32 masters (ZeRO-1: this rank's shards).

Two models: shakespeare-char (global batch 12 x 64) and GPT-2 124M on the same characters
(12 layers, 768 wide, vocab 50,304, global batch ``--big-batch`` x ``--big-block``;
``--big-steps`` steps, 0 to skip). Targets printed beside the figures: P MPI ranks within
10% of P local ranks' tokens/s; ZeRO-1 ~P x less optimizer state per rank.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
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


def train_sets(
    model: str, batch: int, block: int, ways: int, steps: int, processes: int = 1
) -> list[str]:
    """--set overrides: ``batch`` windows of ``block`` tokens per step over ``ways`` ranks,
    ``processes`` of them forked (the recipe's own ``processes = 2`` is always overridden:
    under mpirun the ranks are the processes, and 1 means one process without MPI)."""
    sets = [f"train.max_steps={steps}", "train.sample_tokens=0", "eval.batches=0"]
    sets += [f"train.processes={processes}"]
    sets += [f"train.micro_batch_size={batch // ways}", "train.grad_accum_steps=1"]
    sets += ["train.checkpoint_interval=0", f"train.block_size={block}", "optim.warmup_steps=1"]
    if model == "124m":
        sets += ["model.n_layer=12", "model.n_head=12", "model.n_embd=768"]
        sets += ["model.block_size=1024", "model.vocab_size=50304"]  # GPT-2 124M's shape
    return sets


class Probe:
    """Instruments this process's training (every rank installs one): the wall time of each
    step (rank 0 of forked ranks, every MPI rank), the time inside the gradient
    collectives during each step (``GradientReducer.reduce``, or its hooks, ``flush`` and
    ``wait`` when the reduction overlaps backward; for ZeRO-1 the reduce-scatter
    and the parameters' all-gather), peak RSS after the last step
    (before the final checkpoint, whose gathering of ZeRO's state is not a training cost) and
    the optimizer's state bytes. A forked worker makes no optimizer step: its collective time is
    counted per ``DistributedDataParallel._step`` call. Each rank writes ``rank<r>.json``
    into ``out``."""

    def __init__(self, out: Path) -> None:
        self.out, self.rank = out, 0
        self.step_s: list[float] = []  # per optimizer step (or worker _step)
        self.comm_s: list[float] = []  # collective time inside each of them
        self.tail_s: list[float] = []  # the part of it after backward
        self._comm = self._tail = 0.0
        self.peak_rss = 0
        self.state_bytes = 0

    def install(self) -> None:
        from handgrad.distributed.reducer import GradientReducer
        from handgrad.parallel import ddp as parallel
        from handgrad.parallel import modes
        from handgrad.parallel.zero import FlatShards

        def timed(fn, tail=False):  # noqa: ANN001, ANN202
            def wrapper(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
                start = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    took = time.perf_counter() - start
                    self._comm += took
                    self._tail += took if tail else 0.0

            return wrapper

        real_hook = GradientReducer._hook
        GradientReducer._hook = lambda reducer, i: timed(real_hook(reducer, i))
        for name in ("reduce", "flush", "wait"):
            setattr(GradientReducer, name, timed(getattr(GradientReducer, name), tail=True))
        overlap, poll = (os.environ.get("HANDGRAD_BENCH_OVERLAP", "on:poll") + ":").split(":")[:2]
        real_init = parallel.DistributedDataParallel.__init__

        def init(dp, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            real_init(dp, *args, **{"overlap": overlap == "on", **kwargs})
            if dp.reducer is not None:  # ZeRO-1 reduce-scatters instead
                dp.reducer.poll = poll == "poll"

        parallel.DistributedDataParallel.__init__ = init
        FlatShards.reduce_scatter_gradients = timed(FlatShards.reduce_scatter_gradients)
        FlatShards.all_gather_parameters = timed(FlatShards.all_gather_parameters)
        started: list[tuple[float, float, float]] = []

        def gradients_of(real):  # noqa: ANN001, ANN202
            def gradients(mode, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
                started.append((self._comm, self._tail, time.perf_counter()))
                return real(mode, *args, **kwargs)

            return gradients

        for cls in (modes.RunMode, modes.ForkedRanks, modes.MPIRanks):
            if "gradients" in vars(cls):
                cls.gradients = gradients_of(cls.gradients)
        real_step = modes.RunMode.clip_and_step

        def clip_and_step(mode, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            result = real_step(mode, *args, **kwargs)
            comm, tail, start = started.pop()  # a step: its gradients, clip and update
            self.step_s.append(time.perf_counter() - start)
            self.comm_s.append(self._comm - comm)
            self.tail_s.append(self._tail - tail)
            self.peak_rss = peak_rss_bytes()
            self.state_bytes = optimizer_state_bytes(mode.optimizer)
            return result

        modes.RunMode.clip_and_step = clip_and_step
        real_serve, real_inner = (
            parallel.DistributedDataParallel._serve,
            parallel.DistributedDataParallel._step,
        )

        def worker_step(dp):  # noqa: ANN001, ANN202
            comm, tail, start = self._comm, self._tail, time.perf_counter()
            losses = real_inner(dp)
            if dp._forked and dp.group.rank > 0 and losses:
                self.step_s.append(time.perf_counter() - start)
                self.comm_s.append(self._comm - comm)
                self.tail_s.append(self._tail - tail)
            return losses

        def serve(dp, group):  # noqa: ANN001, ANN202
            real_serve(dp, group)
            self.rank, self.peak_rss = group.rank, peak_rss_bytes()
            self.write()

        parallel.DistributedDataParallel._step = worker_step
        parallel.DistributedDataParallel._serve = serve

    def write(self) -> None:
        record = {
            "rank": self.rank, "step_s": self.step_s, "comm_s": self.comm_s,
            "tail_s": self.tail_s,
            "peak_rss": self.peak_rss, "state_bytes": self.state_bytes,
        }  # fmt: skip
        (self.out / f"rank{self.rank}.json").write_text(json.dumps(record))


def peak_rss_bytes() -> int:
    """This process's peak resident set so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def optimizer_state_bytes(optimizer: object) -> int:
    """Bytes of moments and fp32 masters this rank's optimizer holds."""
    if hasattr(optimizer, "state_bytes"):  # ZeroAdamW: its shards
        return int(optimizer.state_bytes())
    return sum(
        int(a.nbytes)
        for st in optimizer.state.values()
        for key, a in st.items()
        if key in ("exp_avg", "exp_avg_sq", "master")
    )


def probed_train(sets: list[str], out: Path) -> None:
    """Train the shakespeare-char recipe with ``sets`` on this rank (every rank of an MPI
    job calls it with the same ``out``, a fresh directory), writing each rank's probe."""
    from handgrad.train import train
    from handgrad.train.config import load_config

    probe = Probe(out)
    probe.install()
    result = train(load_config("shakespeare-char", sets), out / "run", progress=False,
                   log=lambda m: None)  # fmt: skip
    probe.rank = result.rank
    probe.write()


def measure_training(
    ranks: str, sets: list[str], tokens_per_step: int, overlap: str = "on:poll"
) -> dict | None:
    """One training measurement in fresh processes (so peak RSS is this run's alone):
    ``ranks`` "1", "local" (forked, ``sets`` has processes = P) or "mpi:P"; ``overlap``
    "on:poll", "on:nopoll" or "off" (the reduction after backward). Returns the summary of
    the ranks' probes, or None when mpirun is missing or the run failed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        cmd = [sys.executable, __file__, "--probe-train", str(out), *sets]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HANDGRAD_BENCH_OVERLAP": overlap}
        if ranks.startswith("mpi:"):
            mpirun = _mpirun()
            if mpirun is None:
                return None
            env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
            cmd = [mpirun, "-n", ranks[4:], "--oversubscribe", *cmd]
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        probes = sorted(
            (json.loads(f.read_text()) for f in out.glob("rank*.json")), key=lambda r: r["rank"]
        )
        if run.returncode or not probes:
            print(f"training failed ({run.returncode}):\n{run.stdout}{run.stderr}", file=sys.stderr)
            return None
    return summarize(probes, tokens_per_step)


def summarize(probes: list[dict], tokens_per_step: int) -> dict:
    """tokens/s over the timed steps (all but the first, which warms up), each rank's
    collective time as a share of rank 0's step time, peak RSS and optimizer state bytes
    per rank."""
    timed = len(probes[0]["step_s"]) - 1
    if timed < 1:
        raise SystemExit("--train-steps and --big-steps must be >= 2 (the first is untimed)")
    step_s = sum(probes[0]["step_s"][1:])
    return {
        "tokens_per_s": tokens_per_step * timed / step_s,
        "step_s": step_s / timed,
        "comm_share": [sum(p["comm_s"][1:]) / step_s for p in probes],
        "tail_share": [sum(p["tail_s"][1:]) / step_s for p in probes],
        "peak_rss": [p["peak_rss"] for p in probes],
        "state_bytes": [p["state_bytes"] for p in probes],
    }


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
    ap.add_argument(
        "--ways",
        nargs="+",
        choices=list(WAYS),
        default=list(WAYS),
        help="which training runs to make, in this order (default: all)",
    )
    ap.add_argument("--mpi-rank", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--probe-train", nargs="+", help=argparse.SUPPRESS)  # out, sets
    args = ap.parse_args()
    if args.probe_train:  # one rank of a training measurement
        probed_train(args.probe_train[1:], Path(args.probe_train[0]))
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
        print_training(model, batch, block, steps, args.ranks, args.ways)


# --ways: (row label with P for the rank count, how the ranks run, overlap)
WAYS = {
    "1": ("1 process", "1", "off"),
    "local": ("{P} local ranks", "local", "off"),
    "mpi": ("{P} MPI ranks", "mpi", "on:poll"),
    "mpi-after": ("{P} MPI, after bwd", "mpi", "off"),
    "mpi-nopoll": ("{P} MPI, no polling", "mpi", "on:nopoll"),
    "zero": ("{P} MPI ranks ZeRO-1", "mpi", "off"),
}


def print_training(
    model: str, batch: int, block: int, steps: int, P: int, ways: Sequence[str] = tuple(WAYS)
) -> None:
    """The training table of one model: the runs ``ways`` names (1 process, P forked ranks,
    P MPI ranks with the reduction overlapped with backward, after it, overlapped without
    polling, ZeRO-1), and how they compare with the targets."""
    sets = train_sets(model, batch, block, P, steps)
    runs = {
        "1": ("1", train_sets(model, batch, block, 1, steps)),
        "local": ("1", train_sets(model, batch, block, P, steps, processes=P)),
        "mpi": (f"mpi:{P}", sets),
        "zero": (f"mpi:{P}", [*sets, "train.zero=1"]),
    }
    results = {}
    for way in ways:
        label, kind, overlap = WAYS[way]
        how, s = runs[way if kind != "mpi" or way == "zero" else "mpi"]
        results[label.format(P=P)] = measure_training(how, s, batch * block, overlap)
    print(f"\n{model}, global batch {batch} x {block}, {steps} steps (the first untimed):")
    print(
        f"  {'':<22}{'tokens/s':>10}{'step s':>9}  {'comm share/rank':<17}{'tail share':<13}"
        f"{'peak RSS MiB/rank':<20}{'optim state MiB/rank'}"
    )
    mib = 1 << 20
    for name, r in results.items():
        if r is None:
            print(f"  {name:<22}{'(mpirun missing or the run failed)':>10}")
            continue
        one = "1 process" in name
        share = " ".join(f"{x:.1%}" for x in r["comm_share"]) if not one else "-"
        tail = " ".join(f"{x:.1%}" for x in r["tail_share"]) if not one else "-"
        rss = " ".join(f"{x / mib:,.0f}" for x in r["peak_rss"])
        state = " ".join(f"{x / mib:,.1f}" for x in r["state_bytes"])
        print(
            f"  {name:<22}{r['tokens_per_s']:>10,.0f}{r['step_s']:>9.2f}  {share:<17}{tail:<13}"
            f"{rss:<20}{state}"
        )
    local, mpi, zero, after = (
        results.get(WAYS[k][0].format(P=P)) for k in ("local", "mpi", "zero", "mpi-after")
    )
    if mpi and after:
        ratio = mpi["tokens_per_s"] / after["tokens_per_s"]
        print(f"  MPI overlapped / after backward tokens/s: {ratio:.2f}")
    if local and mpi:
        ratio = mpi["tokens_per_s"] / local["tokens_per_s"]
        print(f"  MPI / local tokens/s: {ratio:.2f} (target: within 10%, >= 0.90)")
    if mpi and zero:
        state = max(mpi["state_bytes"]) / max(max(zero["state_bytes"]), 1)
        rss = max(mpi["peak_rss"]) / max(zero["peak_rss"])
        print(
            f"  plain / ZeRO-1 per-rank optimizer state: {state:.2f}x (target ~{P}x); "
            f"peak RSS: {rss:.2f}x"
        )


if __name__ == "__main__":
    main()
