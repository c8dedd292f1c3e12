"""Forward + backward time of handgrad's fused ops against PyTorch eager, float32, GPT-2 shapes.

    .venv/bin/python benchmarks/bench_ops.py            # all ops
    .venv/bin/python benchmarks/bench_ops.py --ops gelu sdpa --repeats 5 --no-memory

Both libraries run in this process on the same inputs (torch uses every core, NumPy's BLAS
uses its default threads). Time is the median of ``--repeats`` runs after one warm-up.
Peak memory is measured per (op, library) in a fresh subprocess as the growth of the
resident set's high-water mark over one forward + backward, after the inputs exist and a
small warm-up has loaded the kernels (Linux only: reads /proc/self/status).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as TF

import handgrad as hg
import handgrad.nn.functional as F

# name -> (input shapes of the float arrays, description)
OPS = {
    "linear": "x (4096, 768) @ W (3072, 768)^T + b",
    "layer_norm": "(4, 1024, 768), affine",
    "gelu": "(4, 1024, 3072), tanh approximation",
    "cross_entropy": "logits (4096, 50257), mean",
    "sdpa": "(4, 12, 1024, 64), causal",
}


def make_inputs(op: str, scale: float = 1.0) -> tuple[list[np.ndarray], dict]:
    """Float32 arrays (and extra non-differentiable data) for one op; scale shrinks dims."""
    rng = np.random.default_rng(0)

    def n(x: int) -> int:
        return max(1, int(x * scale))

    def randn(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape, dtype=np.float32)

    if op == "linear":
        return [randn(n(4096), 768), randn(3072, 768) * 0.02, randn(3072)], {}
    if op == "layer_norm":
        return [randn(4, n(1024), 768), randn(768), randn(768)], {}
    if op == "gelu":
        return [randn(4, n(1024), 3072)], {}
    if op == "cross_entropy":
        v = n(50257)
        return [randn(n(4096), v)], {"target": rng.integers(0, v, n(4096))}
    if op == "sdpa":
        return [randn(4, 12, n(1024), 64) for _ in range(3)], {}
    raise ValueError(f"unknown op {op!r}; expected one of {list(OPS)}")


def hg_step(op: str, arrays: list[np.ndarray], extra: dict) -> Callable[[], None]:
    xs = [hg.tensor(a, requires_grad=True) for a in arrays]
    target = hg.tensor(extra["target"]) if "target" in extra else None

    def forward() -> hg.Tensor:
        if op == "linear":
            return F.linear(*xs)
        if op == "layer_norm":
            return F.layer_norm(xs[0], 768, xs[1], xs[2])
        if op == "gelu":
            return F.gelu(xs[0], approximate="tanh")
        if op == "cross_entropy":
            return F.cross_entropy(xs[0], target)
        return F.scaled_dot_product_attention(*xs, is_causal=True)

    def step() -> None:
        for x in xs:
            x.grad = None
        out = forward()
        out.backward(hg.ones(out.shape) if out.ndim else None)

    return step


def torch_step(op: str, arrays: list[np.ndarray], extra: dict) -> Callable[[], None]:
    xs = [torch.from_numpy(a).requires_grad_() for a in arrays]
    target = torch.from_numpy(extra["target"]) if "target" in extra else None

    def forward() -> torch.Tensor:
        if op == "linear":
            return TF.linear(*xs)
        if op == "layer_norm":
            return TF.layer_norm(xs[0], (768,), xs[1], xs[2])
        if op == "gelu":
            return TF.gelu(xs[0], approximate="tanh")
        if op == "cross_entropy":
            return TF.cross_entropy(xs[0], target)
        return TF.scaled_dot_product_attention(*xs, is_causal=True)

    def step() -> None:
        for x in xs:
            x.grad = None
        out = forward()
        out.backward(torch.ones_like(out) if out.ndim else None)

    return step


def median_ms(step: Callable[[], None], repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise KeyError(field)


def memory_child(op: str, lib: str) -> None:
    """Run in a subprocess: print the peak RSS growth (MB) of one forward + backward.

    ru_maxrss would include the parent's peak (Linux keeps it across exec), so this reads
    the high-water mark VmHWM from /proc after resetting it (clear_refs 5) to the current RSS.
    """
    make = hg_step if lib == "handgrad" else torch_step
    make(op, *make_inputs(op, scale=0.05))()  # load kernels and libraries first
    step = make(op, *make_inputs(op))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_mb("VmRSS")
    step()
    print(f"{_status_mb('VmHWM') - base:.0f}")


def peak_mb(op: str, lib: str) -> str:
    cmd = [sys.executable, __file__, "--memory-child", op, lib]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        return "error"
    return res.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=list(OPS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess RSS runs")
    parser.add_argument("--memory-child", nargs=2, metavar=("OP", "LIB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    if args.memory_child:
        memory_child(*args.memory_child)
        return

    print(
        f"float32, forward+backward, median of {args.repeats}; torch threads {torch.get_num_threads()}"
    )
    header = f"{'op':<14}{'shape':<40}{'handgrad ms':>12}{'torch ms':>10}{'ratio':>7}"
    if not args.no_memory:
        header += f"{'hg peak MB':>12}{'torch peak MB':>15}"
    print(header)
    for op in args.ops:
        arrays, extra = make_inputs(op)
        ours = median_ms(hg_step(op, arrays, extra), args.repeats)
        theirs = median_ms(torch_step(op, arrays, extra), args.repeats)
        row = f"{op:<14}{OPS[op]:<40}{ours:>12.1f}{theirs:>10.1f}{ours / theirs:>7.2f}"
        if not args.no_memory:
            row += f"{peak_mb(op, 'handgrad'):>12}{peak_mb(op, 'torch'):>15}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
