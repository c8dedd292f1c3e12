"""Where one training step of the shakespeare-char model spends its time, op by op, in handgrad
and in PyTorch (eager, fp32), measured the same way for both.

    .venv/bin/python benchmarks/profile_step.py                # 8 blocks of 25 steps per side
    .venv/bin/python benchmarks/profile_step.py --blocks 4

Both sides train the recipe's model (4 layers, 4 heads, 128 wide, block 64, batch 12, no bias)
on one fixed batch: forward, backward, clip_grad_norm_, AdamW, zero_grad. handgrad's ops are
timed by wrapping ``Function.apply`` and each op's backward; PyTorch's with torch.profiler
(self CPU time per aten op). Steps are timed in blocks and the fastest block is reported, with
its op times: on a shared VM the same work runs up to ~1.5x slower from minute to minute, so
the fastest block is the most comparable figure. Profiling adds a little time on both sides.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

SIZES = dict(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, padded_vocab_size=128)
BATCH, STEPS_PER_BLOCK = 12, 25


def _batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x, y = (rng.integers(0, SIZES["vocab_size"], (BATCH, SIZES["block_size"])) for _ in range(2))
    return x, y


def profile_handgrad(blocks: int) -> dict:
    import handgrad
    from handgrad.models.gpt2 import GPT2, GPT2Config
    from handgrad.nn.utils import clip_grad_norm_
    from handgrad.optim import AdamW, param_groups_for_weight_decay

    T = importlib.import_module("handgrad.function")
    times: collections.Counter = collections.Counter()
    apply = T.Function.apply.__func__

    def timed_apply(cls, *args, **kwargs):
        t0 = time.perf_counter()
        out = apply(cls, *args, **kwargs)
        times[cls.__name__ + " fwd"] += time.perf_counter() - t0
        ctx = out._ctx
        if ctx is not None:
            backward = ctx.backward

            def timed_backward(g, backward=backward, name=cls.__name__ + " bwd"):
                t1 = time.perf_counter()
                r = backward(g)
                times[name] += time.perf_counter() - t1
                return r

            ctx.backward = timed_backward
        return out

    T.Function.apply = classmethod(timed_apply)
    handgrad.manual_seed(0)
    model = GPT2(GPT2Config(**SIZES, dropout=0.0, bias=False, dtype="float32"))
    opt = AdamW(param_groups_for_weight_decay(model, 0.1), lr=1e-3, betas=(0.9, 0.99))
    params = list(model.parameters())
    x, y = (handgrad.tensor(a) for a in _batch())

    def step() -> None:
        _, loss = model(x, y)
        loss.backward()
        t0 = time.perf_counter()
        clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times["clip + AdamW + zero_grad"] += time.perf_counter() - t0

    return _blocks(step, times, blocks)


def profile_torch(blocks: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile
    from torch_gpt2 import TorchGPT2

    torch.manual_seed(0)
    model = TorchGPT2(**SIZES, bias=False)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-3, betas=(0.9, 0.99), foreach=True,
    )  # fmt: skip
    x, y = (torch.from_numpy(a) for a in _batch())

    def step() -> None:
        _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(10):  # warm up
        step()
    best = None
    for _ in range(blocks):  # each block under the profiler; the fastest block is reported
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(STEPS_PER_BLOCK):
                step()
            ms = (time.perf_counter() - t0) / STEPS_PER_BLOCK * 1e3
        if best is None or ms < best[0]:
            # self CPU time of each aten op on the calling thread, us -> ms per step
            ops = {
                e.key: e.self_cpu_time_total / 1e3 / STEPS_PER_BLOCK for e in prof.key_averages()
            }
            best = (ms, dict(sorted(ops.items(), key=lambda kv: -kv[1])[:12]))
    return {"step_ms": best[0], "ops": best[1]}


def _blocks(step, times: collections.Counter, blocks: int) -> dict:
    for _ in range(10):  # warm up
        step()
    best = None
    for _ in range(blocks):
        times.clear()
        t0 = time.perf_counter()
        for _ in range(STEPS_PER_BLOCK):
            step()
        ms = (time.perf_counter() - t0) / STEPS_PER_BLOCK * 1e3
        if best is None or ms < best[0]:
            best = (ms, {k: v / STEPS_PER_BLOCK * 1e3 for k, v in times.items()})
    return {"step_ms": best[0], "ops": dict(sorted(best[1].items(), key=lambda kv: -kv[1]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--blocks", type=int, default=8, help="blocks of 25 steps per side")
    p.add_argument("--worker", choices=["handgrad", "torch"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        fn = profile_handgrad if args.worker == "handgrad" else profile_torch
        print(json.dumps(fn(args.blocks)))
        return
    for side in ("handgrad", "torch"):
        env = dict(os.environ)
        if side == "torch":  # glibc's malloc defaults, as a PyTorch user has them
            env["HANDGRAD_KEEP_MALLOC_DEFAULTS"] = "1"
        cmd = [sys.executable, __file__, "--worker", side, "--blocks", str(args.blocks)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"{side} worker failed:\n{proc.stderr[-3000:]}")
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{side}: fastest block {res['step_ms']:.1f} ms/step (batch 12 x 64)")
        for name, ms in res["ops"].items():
            print(f"  {name:58s} {ms:7.2f} ms/step")


if __name__ == "__main__":
    main()
