"""The shakespeare-char recipe end to end: handgrad vs a PyTorch eager nanoGPT-style loop.

Both sides train the same model (configs/shakespeare-char.toml: 4 layers, 4 heads, 128 wide,
block 64, batch 12, AdamW lr 1e-3 betas (0.9, 0.99), warmup 100 + cosine to 1e-4, clip 1.0)
from the same initial weights on the same batches (one NumPy generator seeded alike), and
evaluate the same fixed validation batches at the same steps. handgrad runs its real trainer
(`handgrad.train.train`, checkpoints and metrics included); PyTorch runs the loop nanoGPT's
train.py runs (fp32, eager, no compile). Each side is a separate process.

    .venv/bin/python benchmarks/bench_shakespeare.py                 # 2,000 steps, 3 runs a side
    .venv/bin/python benchmarks/bench_shakespeare.py --steps 300     # a shorter comparison
    .venv/bin/python benchmarks/bench_shakespeare.py --repeats 1     # one run per side
    .venv/bin/python benchmarks/bench_shakespeare.py --threads 1     # both sides single-threaded
    .venv/bin/python benchmarks/bench_shakespeare.py --set train.processes=1 train.micro_batch_size=12
    .venv/bin/python benchmarks/bench_shakespeare.py --torch-processes 2   # PyTorch DDP as well

handgrad runs the shipped config: the batch of 12 split over 2 processes (one per core,
``handgrad/parallel/ddp.py``); PyTorch runs one process with its intra-op threads on all 12
windows, as nanoGPT's train.py does. ``--set`` changes handgrad's split (same batches);
``--torch-processes 2`` splits PyTorch's the same way (DistributedDataParallel, gloo).

Prints a table: median (and fastest, slowest) wall time of the whole run per side, and the
final val and train losses, which must agree.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def _config(steps: int, cache: str | None, extra: list[str] = ()):
    from handgrad.train.config import load_config

    sets = [f"train.max_steps={steps}", "train.sample_tokens=0", *extra]
    if steps != 2000:
        sets.append(f"train.checkpoint_interval={max(steps // 4, 1)}")
    if cache:
        sets.append(f'data.cache_dir="{cache}"')
    return load_config("shakespeare-char", sets)


def run_handgrad(steps: int, cache: str | None, extra: list[str]) -> dict:
    from handgrad.train import train

    cfg = _config(steps, cache, extra)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        res = train(cfg, out, progress=False, log=lambda m: None)
        wall = time.perf_counter() - start
        recs = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["val_loss"] for r in recs if "val_loss" in r}
    return {"wall_s": wall, "val_loss": res.final_eval.loss, "evals": evals,
            "train_loss": res.train_losses[res.step]}  # fmt: skip


def run_torch(
    steps: int, cache: str | None, extra: list[str], rank: int = 0, world: int = 1, port: int = 0
) -> dict:
    """PyTorch's side; with ``world`` > 1 this is one rank of a DistributedDataParallel run
    (gloo, one thread per process), each rank taking its rows of every global batch."""
    import torch
    from torch_gpt2 import TorchGPT2

    import handgrad
    from handgrad.data import TokenShards, get_batch, iter_batches_sequential
    from handgrad.data.cache import prepared_data_dir
    from handgrad.models.gpt2 import GPT2
    from handgrad.optim import cosine_with_warmup
    from handgrad.train.config import resolve_model_config

    cfg = _config(steps, cache, extra)
    t, o, e = cfg.train, cfg.optim, cfg.eval
    start = time.perf_counter()
    if world > 1:
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
        )
    data = TokenShards(prepared_data_dir(cfg.data))
    mc = resolve_model_config(cfg.model, data.vocab_size)
    # the same initial weights as the handgrad run (same seed, same init code)
    handgrad.manual_seed(t.seed)
    init = {k: torch.from_numpy(np.array(v.numpy())) for k, v in GPT2(mc).state_dict().items()}
    torch.manual_seed(t.seed)
    model = TorchGPT2(**mc.to_dict())
    model.load_state_dict(init)
    trained = model
    if world > 1:  # averages the ranks' gradients in backward
        trained = torch.nn.parallel.DistributedDataParallel(model)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=False, foreach=True,
    )  # fmt: skip
    rng = np.random.default_rng(t.seed)
    # the global batch in one piece (handgrad's config may split it over processes)
    block, batch = mc.block_size, cfg.global_batch_size
    share = slice(rank * batch // world, (rank + 1) * batch // world)

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        losses = [
            model(torch.from_numpy(x), torch.from_numpy(y))[1].item()
            for x, y in iter_batches_sequential(data.val, batch, block, e.batches)
        ]
        model.train()
        return sum(losses) / len(losses)

    evals, train_time = {}, 0.0
    for step in range(t.max_steps):
        t0 = time.perf_counter()
        lr = cosine_with_warmup(step, max_lr=o.lr, min_lr=o.min_lr, warmup_steps=o.warmup_steps,
                                decay_steps=cfg.decay_steps)  # fmt: skip
        for g in optimizer.param_groups:
            g["lr"] = lr
        x, y = get_batch(data.train, batch, block, rng)
        _, loss = trained(torch.from_numpy(x[share]), torch.from_numpy(y[share]))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = loss.item()
        train_time += time.perf_counter() - t0
        done = step + 1
        if rank == 0 and (done == t.max_steps or done % e.interval == 0):
            evals[done] = evaluate()  # the other ranks wait at the next step's all-reduce
    wall = time.perf_counter() - start
    if world > 1:  # the last step's loss over the whole batch, as the other side reports it
        mean = torch.tensor([train_loss])
        dist.all_reduce(mean)
        train_loss = mean.item() / world
        dist.destroy_process_group()
    return {"wall_s": wall, "val_loss": evals.get(t.max_steps), "evals": evals,
            "train_loss": train_loss}  # fmt: skip


def _torch_rank(rank: int, world: int, port: int, args: Any, out: str) -> None:
    result = run_torch(args.steps, args.cache, args.set, rank, world, port)
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def run_torch_ddp(args: Any) -> dict:
    import socket

    import torch.multiprocessing

    with socket.socket() as s:  # a free port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        world = args.torch_processes
        torch.multiprocessing.spawn(_torch_rank, args=(world, port, args, out), nprocs=world)
        return json.loads(Path(out).read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--cache", default=None, help="data cache directory (default: handgrad's)")
    p.add_argument(
        "--repeats", type=int, default=3, help="alternating runs per side; medians are reported"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="BLAS/OpenMP threads for both sides (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS and "
        "torch.set_num_threads); default: each library's own default",
    )
    p.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides for both sides, e.g. train.processes=1 train.micro_batch_size=12 "
        "(handgrad in one process; PyTorch always runs one process on the global batch)",
    )
    p.add_argument(
        "--torch-processes",
        type=int,
        default=1,
        help="run PyTorch as DistributedDataParallel over this many processes (gloo, one "
        "thread each) instead of one process",
    )
    p.add_argument("--worker", choices=["handgrad", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        if args.threads and args.worker == "torch":
            import torch

            torch.set_num_threads(args.threads)
        if args.worker == "torch" and args.torch_processes > 1:
            print(json.dumps(run_torch_ddp(args)))
        else:
            fn = run_handgrad if args.worker == "handgrad" else run_torch
            print(json.dumps(fn(args.steps, args.cache, args.set)))
        return
    # prepare the data once, outside the timings
    from handgrad.data.cache import prepared_data_dir

    cfg = _config(args.steps, args.cache, args.set)
    prepared_data_dir(cfg.data)
    # The sides alternate (torch, handgrad, torch, ...) and each figure is the median of its
    # runs: on a shared 2-core VM the same run varies by 10-30% from minute to minute, so
    # one run per side can decide the ratio either way.
    walls: dict[str, list[float]] = {"torch": [], "handgrad": []}
    results = {}
    for rep in range(args.repeats):
        for side in ("torch", "handgrad"):
            cmd = [sys.executable, __file__, "--worker", side, "--steps", str(args.steps)]
            if args.cache:
                cmd += ["--cache", args.cache]
            if args.set:
                cmd += ["--set", *args.set]
            cmd += ["--torch-processes", str(args.torch_processes)]
            env = dict(os.environ)
            if side == "torch":  # glibc's malloc defaults, as a PyTorch user has them
                env["HANDGRAD_KEEP_MALLOC_DEFAULTS"] = "1"
            if args.threads:
                cmd += ["--threads", str(args.threads)]
                env.update(
                    OPENBLAS_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads)
                )
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{side} worker failed:\n{proc.stderr[-3000:]}")
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
            walls[side].append(results[side]["wall_s"])
            print(f"run {rep + 1}/{args.repeats} {side:8s} {walls[side][-1]:7.1f} s", flush=True)
    h, t = results["handgrad"], results["torch"]
    hw, tw = statistics.median(walls["handgrad"]), statistics.median(walls["torch"])
    threads = args.threads or "default"
    print(
        f"shakespeare-char, {args.steps} steps (batch 12 x 64), fp32, same init and batches, "
        f"threads: {threads}, median of {args.repeats} alternating run(s) per side"
    )
    print(
        f"handgrad: {cfg.train.processes} process(es) x {cfg.train.micro_batch_size} windows; "
        f"PyTorch: {args.torch_processes} process(es) x "
        f"{cfg.global_batch_size // args.torch_processes} windows"
    )
    print(f"{'':28}{'handgrad':>12}{'pytorch':>12}{'ratio':>10}")
    print(f"{'wall time end to end (s)':28}{hw:>12.1f}{tw:>12.1f}{hw / tw:>10.2f}")
    if args.repeats > 1:
        print(f"{'  fastest run (s)':28}{min(walls['handgrad']):>12.1f}{min(walls['torch']):>12.1f}"
              f"{min(walls['handgrad']) / min(walls['torch']):>10.2f}")  # fmt: skip
        print(f"{'  slowest run (s)':28}{max(walls['handgrad']):>12.1f}{max(walls['torch']):>12.1f}"
              f"{max(walls['handgrad']) / max(walls['torch']):>10.2f}")  # fmt: skip
    print(f"{'final val loss':28}{h['val_loss']:>12.4f}{t['val_loss']:>12.4f}")
    print(f"{'final train loss':28}{h['train_loss']:>12.4f}{t['train_loss']:>12.4f}")
    steps = sorted(set(h["evals"]) & set(t["evals"]), key=int)
    print("val loss by step: " + ", ".join(
        f"{s}: {h['evals'][s]:.3f}/{t['evals'][s]:.3f}" for s in steps))  # fmt: skip
    if not math.isfinite(h["val_loss"]):
        sys.exit("handgrad diverged")


if __name__ == "__main__":
    main()
