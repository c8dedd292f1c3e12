"""GPT-2 training-step throughput and memory: handgrad against PyTorch eager, side by side.

Each side runs in its own subprocess (so peak RSS is its own: ``os.wait4`` returns the
child's ``ru_maxrss``) on the same shapes in float32, with all cores
(``torch.set_num_threads(os.cpu_count())``; NumPy's BLAS uses all cores by default).
A step is forward + backward (+ an AdamW update with ``--adamw``). Matmul peak is the best
float32 GEMM rate of NumPy measured in the same run; FLOPs per token are
6 N + 12 n_layer n_embd T (``handgrad.models.gpt2.flops_per_token``).

    python benchmarks/bench_gpt2.py                            # B = 1..4, T = 1024, 124M
    python benchmarks/bench_gpt2.py --batch-sizes 1 --steps 2  # quick
    python benchmarks/bench_gpt2.py --profile                  # cProfile one handgrad step
    python benchmarks/bench_gpt2.py --lm-head                  # LM head: row slice vs padded
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def gemm_gflops(n: int = 2048, reps: int = 5) -> tuple[float, float]:
    """Best float32 n x n x n GEMM rate of NumPy and of torch, in GFLOP/s."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    rates = []
    for mm in (np.matmul, torch.matmul):
        x = a if mm is np.matmul else torch.from_numpy(a)
        mm(x, x)
        best = min(_timed(lambda: mm(x, x)) for _ in range(reps))  # noqa: B023
        rates.append(2 * n**3 / best / 1e9)
    return rates[0], rates[1]


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


# ---- workers (run in a subprocess each)


def make_step(side: str, config, batch_size: int, seq_len: int, adamw: bool):
    """Build the model of ``side`` and return a function running one training step."""
    rng = np.random.default_rng(0)
    idx = rng.integers(0, config.vocab_size, (batch_size, seq_len))
    targets = rng.integers(0, config.vocab_size, (batch_size, seq_len))
    if side == "ours":
        import handgrad as hg
        from handgrad.models.gpt2 import GPT2

        hg.manual_seed(0)
        model = GPT2(config)
        x, y = hg.tensor(idx), hg.tensor(targets)
        opt = None
        if adamw:
            from handgrad.optim import AdamW

            opt = AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    else:
        import torch
        from torch_gpt2 import TorchGPT2

        torch.set_num_threads(os.cpu_count() or 1)
        torch.manual_seed(0)
        model = TorchGPT2(**config.to_dict())
        x, y = torch.from_numpy(idx), torch.from_numpy(targets)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1) if adamw else None

    def step() -> float:
        _, loss = model(x, y)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad()
        else:
            model.zero_grad()
        return loss.item()

    return step


def worker(args: argparse.Namespace) -> None:
    from handgrad.models.gpt2 import GPT2Config

    config = GPT2Config.from_preset(args.preset, dtype="float32", block_size=args.seq_len)
    step = make_step(args.worker, config, args.batch_size, args.seq_len, args.adamw)
    loss = step()  # warm-up: first-touch allocations, BLAS thread start
    times = []
    for _ in range(args.steps):
        times.append(_timed(step))
    print(json.dumps({"step_s": float(np.median(times)), "loss": loss}))


def profile(args: argparse.Namespace) -> None:
    from handgrad.models.gpt2 import GPT2Config

    config = GPT2Config.from_preset(args.preset, dtype="float32", block_size=args.seq_len)
    step = make_step("ours", config, args.batch_sizes[0], args.seq_len, args.adamw)
    step()
    prof = cProfile.Profile()
    prof.runcall(step)
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def lm_head(args: argparse.Namespace) -> None:
    """The two ways to get logits over the real vocabulary, forward + backward with the loss,
    at GPT-2 124M shapes: time and peak NumPy memory (tracemalloc) of each."""
    import handgrad as hg
    import handgrad.nn.functional as F

    V, Vp, C, T = 50257, 50304, 768, args.seq_len
    rng = np.random.default_rng(0)
    wte = hg.tensor(rng.standard_normal((Vp, C), dtype=np.float32) * 0.02, requires_grad=True)
    x0 = rng.standard_normal((1, T, C), dtype=np.float32)
    targets = hg.tensor(rng.integers(0, V, T))

    def sliced():
        x = hg.tensor(x0, requires_grad=True)
        logits = F.linear(x, wte[:V])
        F.cross_entropy(logits.reshape(-1, V), targets).backward()

    def padded():
        x = hg.tensor(x0, requires_grad=True)
        logits = F.linear(x, wte)[..., :V]
        F.cross_entropy(logits.reshape(-1, V), targets).backward()

    print(f"LM head at B=1, T={T}, V={V} (padded {Vp}), C={C}: forward + backward")
    for name, fn in (("row slice wte[:V]", sliced), ("padded matmul, slice", padded)):
        fn()
        wte.grad = None
        best = min(_timed(fn) for _ in range(3))
        wte.grad = None
        tracemalloc.start()
        fn()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        wte.grad = None
        print(f"  {name:22s} {best * 1e3:8.1f} ms   peak {peak / 2**20:8.1f} MiB")


def run_side(side: str, b: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, "--batch-size", str(b)]
    cmd += ["--steps", str(args.steps), "--seq-len", str(args.seq_len), "--preset", args.preset]
    cmd += ["--adamw"] if args.adamw else []
    # The torch worker imports handgrad (configs, initial weights); keep glibc's malloc
    # defaults there, as a PyTorch user has them (handgrad.backend tunes them on import).
    env = dict(os.environ, HANDGRAD_KEEP_MALLOC_DEFAULTS="1") if side == "torch" else None
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{side} worker failed (exit {proc.returncode}): {' '.join(cmd)}")
    result = json.loads(out.strip().splitlines()[-1])
    result["rss_gib"] = usage.ru_maxrss / 2**20  # ru_maxrss is in KiB on Linux
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--adamw", action="store_true", help="include an AdamW update in the step")
    p.add_argument("--profile", action="store_true", help="cProfile one handgrad step")
    p.add_argument("--lm-head", action="store_true", help="compare the two LM head forms")
    p.add_argument("--worker", choices=["ours", "torch"], help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.profile:
        return profile(args)
    if args.lm_head:
        return lm_head(args)

    from handgrad.models.gpt2 import GPT2Config, flops_per_token

    config = GPT2Config.from_preset(args.preset, dtype="float32", block_size=args.seq_len)
    flops = flops_per_token(config, args.seq_len)
    np_peak, torch_peak = gemm_gflops()
    print(
        f"{args.preset} fp32, T={args.seq_len}, {os.cpu_count()} cores, step = fwd+bwd"
        f"{' + AdamW' if args.adamw else ''}, median of {args.steps} steps after 1 warm-up"
    )
    print(
        f"float32 GEMM peak (2048^3): numpy {np_peak:.1f} GFLOP/s, torch {torch_peak:.1f} GFLOP/s"
    )
    print(f"FLOPs/token {flops / 1e9:.3f} GFLOP\n")
    head = f"{'B':>2} | {'tok/s ours':>10} {'torch':>8} {'ratio':>6} | {'MFU ours':>8} {'torch':>6}"
    head += f" | {'RSS GiB ours':>12} {'torch':>6} {'ratio':>6} | {'loss ours':>9} {'torch':>7}"
    print(head)
    print("-" * len(head))
    for b in args.batch_sizes:
        r = {side: run_side(side, b, args) for side in ("ours", "torch")}
        tps = {s: b * args.seq_len / r[s]["step_s"] for s in r}
        mfu = {s: tps[s] * flops / (np_peak * 1e9) for s in r}
        print(
            f"{b:>2} | {tps['ours']:>10.1f} {tps['torch']:>8.1f} {tps['ours'] / tps['torch']:>6.2f} | "
            f"{mfu['ours']:>8.1%} {mfu['torch']:>6.1%} | {r['ours']['rss_gib']:>12.2f} "
            f"{r['torch']['rss_gib']:>6.2f} {r['ours']['rss_gib'] / r['torch']['rss_gib']:>6.2f} | "
            f"{r['ours']['loss']:>9.4f} {r['torch']['loss']:>7.4f}",
            flush=True,
        )
    print("\nMFU = tokens/s * FLOPs/token / numpy GEMM peak (the same peak for both sides).")


if __name__ == "__main__":
    main()
