"""Activation recompute: peak memory and time of a GPT-2 124M training step with and
without ``[model] recompute``, each in its own process (peak RSS is each process's own
``ru_maxrss``), at T = 1,024 on the CPU.

    python benchmarks/bench_recompute.py                     # B = 1, 2 timed steps a side
    python benchmarks/bench_recompute.py --batch-size 2 --steps 3

A step is forward + backward of one micro batch (no optimizer). The gradients of the two
sides are the same bits (tests/nn/test_nn_recompute.py); this measures what that costs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def worker(recompute: bool, batch: int, seq: int, steps: int) -> dict:
    import numpy as np

    import handgrad as hg
    from handgrad.models.gpt2 import GPT2, GPT2Config

    hg.manual_seed(0)
    model = GPT2(GPT2Config.from_preset("gpt2-124m", recompute=recompute, block_size=seq))
    model.train()
    rng = np.random.default_rng(0)
    times = []
    for i in range(steps + 1):  # the first warms up
        x, y = rng.integers(0, 50257, (batch, seq)), rng.integers(0, 50257, (batch, seq))
        start = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        took = time.perf_counter() - start
        for p in model.parameters():
            p.grad = None
        if i:
            times.append(took)
    return {"step_s": sorted(times)[len(times) // 2], "loss": float(loss.item())}


def run_side(recompute: bool, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", str(int(recompute)), "--batch-size",
           str(args.batch_size), "--seq-len", str(args.seq_len), "--steps", str(args.steps)]  # fmt: skip
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss_gib"] = result.pop("rss_kib") / 2**20
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up")
    p.add_argument("--worker", choices=["0", "1"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker is not None:
        import resource

        result = worker(args.worker == "1", args.batch_size, args.seq_len, args.steps)
        result["rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps(result))
        return
    sides = {name: run_side(flag, args) for name, flag in (("plain", False), ("recompute", True))}
    a, b = sides["plain"], sides["recompute"]
    print(
        f"gpt2-124m fp32, B={args.batch_size}, T={args.seq_len}, fwd + bwd, median of "
        f"{args.steps} steps after 1 warm-up, {os.cpu_count()} cores"
    )
    print(f"{'':12} {'step s':>8} {'peak RSS GiB':>13} {'loss':>9}")
    for name, r in sides.items():
        print(f"{name:12} {r['step_s']:8.2f} {r['peak_rss_gib']:13.2f} {r['loss']:9.4f}")
    print(
        f"recompute / plain: time {b['step_s'] / a['step_s']:.2f}x, "
        f"peak RSS {b['peak_rss_gib'] / a['peak_rss_gib']:.2f}x"
    )


if __name__ == "__main__":
    main()
