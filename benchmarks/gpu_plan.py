"""What one GPT-2 124M training step would cost a GPU, measured without one, beside PyTorch.

handgrad runs on the CuPy stand-in (tests/fakecupy.py) with its CUDA kernel path (the
launchers done by their NumPy references) and bfloat16 cuBLAS products, so every array
operation, kernel launch, cuBLAS call, device allocation and host synchronisation that a
GPU would see is counted (``fakecupy.stats``, ``backend.cuda.gemm_flops``). One training
step (forward, backward, gradient clipping, AdamW) of the 124M model (bfloat16 parameters,
vocabulary padded to 50,304) at T = 1,024 runs at micro batch 1 and at 2, each in its own
subprocess, after one warm-up step (AdamW's state exists, as in training); the figures are
extrapolated linearly to micro batches 16 and 60. Under bfloat16 autocast when handgrad
has ``hg.autocast`` (torch's semantics); otherwise without, and the table says so.

PyTorch (benchmarks/torch_gpt2.py, float32 parameters, CPU bfloat16 autocast, AdamW with
fused=True), in its own process: one transformer block and the embedding + head (with the
loss) are measured apart and the block scaled by the 12 layers (PyTorch's CPU bfloat16 is
too slow for a whole step here). Its "launches" are the leaf aten ops of the step under
``torch.profiler`` that compute (views, ``empty`` and other metadata ops excluded); its
peak memory is the activations that autograd saves (``saved_tensors_hooks``, each storage
once, parameters excluded) plus parameters, gradients and AdamW's two moments: a lower
bound of what its caching allocator would hold (the transients of backward are not in it).

    python benchmarks/gpu_plan.py                   # 124M, T = 1024 (~minutes per side)
    python benchmarks/gpu_plan.py --json plan.json  # also the figures as JSON
    python benchmarks/gpu_plan.py --smoke           # a tiny model, seconds (the test's)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

GPU_BYTES = {"H100 80 GB": 80e9, "H200 141 GB": 141e9}
EXTRAPOLATE = (16, 60)
TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=200,
            padded_vocab_size=256, dropout=0.0)  # fmt: skip


def _config(smoke: bool) -> tuple[dict[str, Any], int]:
    from handgrad.models.gpt2 import GPT2Config

    if smoke:
        return dict(TINY), 64
    return GPT2Config.from_preset("gpt2-124m").to_dict(), 1024


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---- handgrad on the CuPy stand-in (a subprocess per micro batch)


class _Patch:
    """The ``monkeypatch.setattr`` that ``fakecupy.reference_kernels`` needs, for good."""

    def setattr(self, obj: Any, name: str, value: Any) -> None:
        setattr(obj, name, value)


def run_handgrad(smoke: bool, batch: int, steps: int, recompute: bool = False) -> dict[str, Any]:
    """``steps`` training steps (1 or 2) of handgrad at micro batch ``batch`` on the stand-in,
    each measured by phase: forward + backward, then clipping + AdamW."""
    sys.path.insert(0, str(ROOT / "tests"))
    import contextlib

    import fakecupy
    import numpy as np

    import handgrad as hg
    from handgrad.backend import cuda
    from handgrad.models.gpt2 import GPT2, GPT2Config
    from handgrad.nn.utils import clip_grad_norm_
    from handgrad.optim import AdamW

    cfg, T = _config(smoke)
    autocast = getattr(hg, "autocast", None)
    fakecupy.install(kernels=True, bf16_matmul=True)
    fakecupy.reference_kernels(_Patch())
    assert cuda.bf16_matmul_enabled()  # its one-time probe reads the device: not in a step
    config = GPT2Config(**{**cfg, "dtype": "bfloat16", "dropout": 0.0, "recompute": recompute})
    hg.manual_seed(0)
    model = GPT2(config).to("cuda")
    params = list(model.parameters())
    opt = AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    x = hg.tensor(rng.integers(0, config.vocab_size, (batch, T))).to("cuda")
    y = hg.tensor(rng.integers(0, config.vocab_size, (batch, T))).to("cuda")
    stats = fakecupy.stats

    def step() -> tuple[dict[str, Any], Any]:
        cuda.GEMM_FLOPS.clear()
        stats.reset()
        live_before = stats.live_bytes
        t0 = time.perf_counter()
        ctx = autocast("cuda", dtype=hg.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            _, loss = model(x, y)
        loss.backward()
        peak_fb = stats.peak_bytes
        stats.reset_peak()
        clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()  # as nanoGPT: the gradients go as soon as the step is done
        snap = stats.snapshot()
        top = sorted(snap["launches_by"].items(), key=lambda kv: -kv[1])[:12]
        return {"gemm_flops": cuda.gemm_flops(), "launches": snap["launches"],
                "launches_top": dict(top), "peak_bytes": max(peak_fb, snap["peak_bytes"]),
                "peak_forward_backward": peak_fb, "peak_optimizer": snap["peak_bytes"],
                "live_before": live_before, "live_after": snap["live_bytes"],
                "allocations": snap["allocations"], "syncs": snap["syncs"],
                "uploads": snap["uploads"], "s": time.perf_counter() - t0}, loss  # fmt: skip

    first, loss = step()
    res = {"framework": "handgrad", "micro_batch": batch, "seq_len": T,
           "autocast": bool(autocast), "params": sum(p.numel() for p in params),
           "first": first}  # fmt: skip
    if steps > 1:
        res["steady"], loss = step()
    res["loss"] = float(loss.item())  # after the counts: the one sync a logging loop adds
    res["max_rss_mib"] = _rss_mib()
    return res


def steady_row(r: dict[str, Any], ref: dict[str, Any] | None) -> dict[str, Any]:
    """The figures of a steady-state step (AdamW's state exists) of the child result ``r``:
    measured when it ran a second step; else derived from its first step (which makes the
    state after backward): peak = max(forward + backward peak + the state made, optimizer
    peak), and the launches of ``ref``'s steady step (a child that ran two) plus what this
    first step launched beyond ``ref``'s first."""
    row = {k: v for k, v in r.items() if k not in ("first", "steady")}
    if "steady" in r:
        return {**row, **r["steady"], "derived": False}
    f = r["first"]
    state = f["live_after"] - f["live_before"]
    peak = max(f["peak_forward_backward"] + state, f["peak_optimizer"])
    launches = f["launches"]
    if ref is not None and "steady" in ref:
        launches = ref["steady"]["launches"] + f["launches"] - ref["first"]["launches"]
    return {**row, **f, "peak_bytes": peak, "launches": launches, "live_before": f["live_after"],
            "derived": True}  # fmt: skip


# ---- PyTorch on the CPU under bfloat16 autocast (one process, both micro batches)

_NO_KERNEL = {
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::as_strided", "aten::t",
    "aten::transpose", "aten::permute", "aten::expand", "aten::slice", "aten::select",
    "aten::split", "aten::split_with_sizes", "aten::unsqueeze", "aten::squeeze", "aten::detach",
    "aten::alias", "aten::empty", "aten::empty_like", "aten::empty_strided", "aten::resize_",
    "aten::lift_fresh", "aten::result_type", "aten::set_", "aten::contiguous", "aten::unbind",
    "aten::numpy_T", "aten::expand_as", "aten::view_as", "aten::chunk", "aten::narrow",
    "aten::is_nonzero", "aten::resolve_conj", "aten::resolve_neg", "aten::to", "aten::item",
    "aten::_local_scalar_dense", "aten::_has_compatible_shallow_copy_type",
}  # fmt: skip


def _leaf_ops(prof: Any) -> tuple[int, dict[str, int]]:
    """Leaf aten ops of a profile that compute (see ``_NO_KERNEL``), in all and by name."""
    by: dict[str, int] = {}
    for e in prof.events():
        if not e.name.startswith("aten::") or e.name in _NO_KERNEL:
            continue
        if any(c.name.startswith("aten::") for c in e.cpu_children):
            continue
        by[e.name] = by.get(e.name, 0) + 1
    return sum(by.values()), by


class _GemmFlops:
    """GEMM FLOPs by operand dtype of the aten ops dispatched (a TorchDispatchMode)."""

    def __init__(self) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.flops: dict[str, float] = {}

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
                counter.count(func, args)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def add(self, dtype: Any, flops: float) -> None:
        name = {"torch.bfloat16": "bfloat16", "torch.float32": "float32"}.get(
            str(dtype), str(dtype)
        )
        self.flops[name] = self.flops.get(name, 0.0) + flops

    def count(self, func: Any, args: Any) -> None:
        name = func.__name__.split(".")[0]
        if name in ("mm", "bmm"):
            a, b = args[0], args[1]
            self.add(a.dtype, 2 * math.prod(a.shape) * b.shape[-1])
        elif name in ("addmm", "baddbmm"):
            a, b = args[1], args[2]
            self.add(a.dtype, 2 * math.prod(a.shape) * b.shape[-1])
        elif name.startswith("_scaled_dot_product") and "backward" not in name:
            q, k = args[0], args[1]  # (B, H, T, D): q k^T and p v
            self.add(q.dtype, 4 * math.prod(q.shape) * k.shape[-2])
        elif name.startswith("_scaled_dot_product") and "backward" in name:
            q, k = args[1], args[2]  # grad_out first: dv, dp, dq, dk
            self.add(q.dtype, 8 * math.prod(q.shape) * k.shape[-2])


def _torch_part(module: Any, inputs: tuple, params: list, loss_fn: Any) -> dict[str, Any]:
    """Forward (bf16 autocast) and backward of ``module`` once: leaf ops, GEMM FLOPs by
    dtype and the bytes autograd saves (storages counted once, parameters excluded)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in param_ptrs:
            saved[s.data_ptr()] = s.nbytes()
        return t

    def run() -> None:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = module(*inputs)
            loss = loss_fn(out)
        if isinstance(loss, tuple):  # (output, its gradient): no loss ops counted
            loss[0].backward(loss[1])
        else:
            loss.backward()

    run()  # warm-up (first-call costs out of the profile)
    for p in params:
        p.grad = None
    saved.clear()
    flops = _GemmFlops()
    with profile(activities=[ProfilerActivity.CPU]) as prof, flops.mode:
        run()
    n, by = _leaf_ops(prof)
    return {"launches": n, "launches_by": by, "gemm_flops": flops.flops,
            "saved_bytes": sum(saved.values())}  # fmt: skip


def run_torch(smoke: bool, batches: list[int]) -> dict[str, Any]:
    import torch
    from torch.nn import functional as F
    from torch.profiler import ProfilerActivity, profile
    from torch_gpt2 import Block, TorchGPT2

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    cfg, T = _config(smoke)
    C, L, V = cfg["n_embd"], cfg["n_layer"], cfg["vocab_size"]
    model = TorchGPT2(**cfg)  # float32: the weights autocast casts
    params = list(model.parameters())
    n_params = sum(p.numel() for p in params)
    state_bytes = 16 * n_params  # float32 weights, gradients, exp_avg, exp_avg_sq
    # AdamW (fused) over the whole model: its launches do not depend on the micro batch
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    opt.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        opt.step()
    opt_launches, opt_by = _leaf_ops(prof)
    for p in params:
        p.grad = None
    block: Block = model.transformer.h[0]
    block_params = list(block.parameters())
    tr = model.transformer

    def head(idx: torch.Tensor) -> torch.Tensor:  # the model without its blocks
        x = tr.wte(idx) + tr.wpe(torch.arange(idx.shape[1]))
        return F.linear(tr.ln_f(x), tr.wte.weight[:V])

    rows = []
    for B in batches:
        t0 = time.perf_counter()
        x = torch.randn(B, T, C, requires_grad=True)
        g = torch.randn(B, T, C)  # the block's output is float32 (the residual stream)
        b = _torch_part(block, (x,), block_params, lambda out, g=g: (out, g.to(out.dtype)))
        idx = torch.randint(0, V, (B, T))
        tgt = torch.randint(0, V, (B, T))
        h = _torch_part(
            head, (idx,), params,
            lambda lg, tgt=tgt: F.cross_entropy(lg.float().view(-1, V), tgt.view(-1)),
        )  # fmt: skip
        flops: dict[str, float] = {}
        for d, f in b["gemm_flops"].items():
            flops[d] = flops.get(d, 0.0) + L * f
        for d, f in h["gemm_flops"].items():
            flops[d] = flops.get(d, 0.0) + f
        saved = L * b["saved_bytes"] + h["saved_bytes"]
        rows.append({"framework": "torch", "micro_batch": B, "seq_len": T, "autocast": True,
                     "params": n_params, "gemm_flops": flops,
                     "launches": L * b["launches"] + h["launches"] + opt_launches,
                     "n_layer": L, "launches_block": b["launches"],
                     "launches_embedding_head": h["launches"],
                     "launches_optimizer": opt_launches,
                     "launches_top_block": dict(sorted(b["launches_by"].items(),
                                                       key=lambda kv: -kv[1])[:12]),
                     "peak_bytes": saved + state_bytes, "saved_bytes": saved,
                     "state_bytes": state_bytes, "syncs": None,
                     "step_s": time.perf_counter() - t0, "max_rss_mib": _rss_mib()})  # fmt: skip
    return {"rows": rows, "optimizer_ops": opt_by}


# ---- the parent: children, extrapolation, the table


def _start(args: list[str], out: Path) -> subprocess.Popen:
    # freed arrays go back to the OS (handgrad keeps them by default): RSS follows what lives
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HANDGRAD_KEEP_MALLOC_DEFAULTS": "1"}
    return subprocess.Popen([sys.executable, __file__, *args, "--result", str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=ROOT)  # fmt: skip


def _finish(p: subprocess.Popen, out: Path, timeout: float) -> dict[str, Any]:
    try:
        log, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        log, _ = p.communicate()
        raise RuntimeError(f"{' '.join(p.args)} ran past {timeout:.0f} s:\n{log[-3000:]}") from None
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(p.args)} failed:\n{log[-6000:]}")
    return json.loads(out.read_text())


def run_children(jobs: list[list[str]], timeout: float, parallel: bool) -> list[dict[str, Any]]:
    """Each job in its own process (all at once with ``parallel``, else one after another)."""
    with tempfile.TemporaryDirectory() as d:
        outs = [Path(d) / f"{i}.json" for i in range(len(jobs))]
        if parallel:
            procs = [_start(job, out) for job, out in zip(jobs, outs, strict=True)]
            return [_finish(p, out, timeout) for p, out in zip(procs, outs, strict=True)]
        results = []
        for job, out in zip(jobs, outs, strict=True):
            results.append(_finish(_start(job, out), out, timeout))
            print(f"[{job[1]}] done: max RSS {_max_rss(results[-1]):.0f} MiB", flush=True)
        return results


def _max_rss(result: dict[str, Any]) -> float:
    rows = result.get("rows", [result])
    return max(r["max_rss_mib"] for r in rows)


def _fit(rows: list[dict[str, Any]], key: str) -> tuple[float, float]:
    """(fixed, per micro batch) of a figure measured at two micro batches."""
    (b1, y1), (b2, y2) = ((r["micro_batch"], float(r[key])) for r in rows[:2])
    per = (y2 - y1) / (b2 - b1)
    return y1 - per * b1, per


def _bf16_share(flops: dict[str, float]) -> float:
    total = sum(flops.values())
    return flops.get("bfloat16", 0.0) / total if total else 0.0


def summarize(hg_rows: list[dict[str, Any]], torch_rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"handgrad": hg_rows, "torch": torch_rows, "extrapolated": {}}
    for side, rows in (("handgrad", hg_rows), ("torch", torch_rows)):
        if len(rows) < 2:
            continue
        fixed, per = _fit(rows, "peak_bytes")
        if side == "handgrad" and rows[1].get("derived") and "peak_derived" in rows[0]:
            # the slope between two figures derived alike; the intercept through the measured
            per = (rows[1]["peak_bytes"] - rows[0]["peak_derived"]) / (
                rows[1]["micro_batch"] - rows[0]["micro_batch"]
            )
            fixed = rows[0]["peak_bytes"] - per * rows[0]["micro_batch"]
        lfix, lper = _fit(rows, "launches")
        ext = {}
        for B in EXTRAPOLATE:
            flops = {d: f / rows[0]["micro_batch"] * B for d, f in rows[0]["gemm_flops"].items()}
            ext[B] = {"peak_bytes": fixed + per * B, "launches": lfix + lper * B,
                      "gemm_flops": flops}  # fmt: skip
        fits = {gpu: max(0, math.floor((cap - fixed) / per)) if per > 0 else None
                for gpu, cap in GPU_BYTES.items()}  # fmt: skip
        out["extrapolated"][side] = {"peak_fixed_bytes": fixed, "peak_per_sample_bytes": per,
                                     "by_micro_batch": ext, "largest_micro_batch": fits}  # fmt: skip
    ratios = {}
    for h, t in zip(hg_rows, torch_rows, strict=False):
        ratios[h["micro_batch"]] = h["peak_bytes"] / t["peak_bytes"] if t["peak_bytes"] else None
    for B in EXTRAPOLATE:
        e = out["extrapolated"]
        if "handgrad" in e and "torch" in e:
            ratios[B] = (e["handgrad"]["by_micro_batch"][B]["peak_bytes"]
                         / e["torch"]["by_micro_batch"][B]["peak_bytes"])  # fmt: skip
    out["memory_ratio"] = ratios
    return out


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _gb(x: float) -> str:
    return f"{_si(x)}B"


def _flops(f: dict[str, float]) -> str:
    total = sum(f.values())
    return f"{_si(total)}FLOP, bf16 {100 * _bf16_share(f):.1f}%"


def print_table(summary: dict[str, Any]) -> None:
    hg_rows, t_rows = summary["handgrad"], summary["torch"]
    ext = summary["extrapolated"]
    if hg_rows and not hg_rows[0]["autocast"]:
        print("NOTE: hg.autocast is not available in this handgrad: handgrad ran WITHOUT "
              "autocast (bfloat16 parameters, float32 where ops compute in float32)")  # fmt: skip
    T = (hg_rows or t_rows)[0]["seq_len"]
    print(f"\n=== one training step, GPT-2 ({(hg_rows or t_rows)[0]['params']:,} params), "
          f"T = {T}: handgrad on the CuPy stand-in vs PyTorch (bf16 autocast) ===")  # fmt: skip
    head = f"{'micro batch':<14}{'figure':<24}{'handgrad':>30}   {'torch':>30}"
    print(head)
    print("-" * len(head))
    batches = [r["micro_batch"] for r in hg_rows] + list(EXTRAPOLATE)
    for B in batches:
        h = next((r for r in hg_rows if r["micro_batch"] == B), None)
        t = next((r for r in t_rows if r["micro_batch"] == B), None)
        tag = f"{B}" if h is not None else f"{B} (extrap.)"
        if h is not None and h.get("derived"):
            tag = f"{B} (1st step)"
        if h is None:
            h = ext.get("handgrad", {}).get("by_micro_batch", {}).get(B)
            t = ext.get("torch", {}).get("by_micro_batch", {}).get(B)
        if h is None:
            continue
        cells = [
            ("GEMM FLOPs", _flops(h["gemm_flops"]), _flops(t["gemm_flops"]) if t else "-"),
            *(
                (
                    f"  {d}",
                    _si(h["gemm_flops"].get(d, 0)) + "FLOP",
                    _si(t["gemm_flops"].get(d, 0)) + "FLOP" if t else "-",
                )
                for d in sorted({*h["gemm_flops"], *(t["gemm_flops"] if t else {})})
            ),
            ("kernel launches", f"{h['launches']:.0f}", f"{t['launches']:.0f}" if t else "-"),
            ("peak device bytes", _gb(h["peak_bytes"]), _gb(t["peak_bytes"]) if t else "-"),
        ]
        if "syncs" in h:
            cells.append(("host syncs", str(h["syncs"]), "n/a (CPU)"))
        ratio = summary["memory_ratio"].get(B)
        if ratio is not None:
            cells.append(("memory hg / torch", f"{ratio:.2f}x (target <= 1.2x)", ""))
        for i, (name, a, b) in enumerate(cells):
            print(f"{tag if i == 0 else '':<14}{name:<24}{a:>30}   {b:>30}")  # fmt: skip
    for side, e in ext.items():
        fits = ", ".join(f"{gpu}: {b}" for gpu, b in e["largest_micro_batch"].items())
        print(f"{side}: peak = {_gb(e['peak_fixed_bytes'])} + {_gb(e['peak_per_sample_bytes'])}"
              f" per sample; largest micro batch that fits {fits}")  # fmt: skip
    if t_rows:
        print("torch's peak is a lower bound: saved activations + parameters, gradients and "
              "AdamW state (16 B a parameter), no transients of backward")  # fmt: skip
    if hg_rows and "peak_derived" in hg_rows[0]:
        h0 = hg_rows[0]
        print(f"handgrad micro batch {h0['micro_batch']}: steady-state peak "
              f"{_gb(h0['peak_bytes'])} measured, {_gb(h0['peak_derived'])}"
              " derived from its first step (as the '(1st step)' rows are)")  # fmt: skip
    if hg_rows:
        print("handgrad launches by name (micro batch 1, top 12):", hg_rows[0]["launches_top"])
    if t_rows:
        t0 = t_rows[0]
        print(f"torch launches = {t0['n_layer']} x {t0['launches_block']} (block) + "
              f"{t0['launches_embedding_head']} (embedding, head, loss) + "
              f"{t0['launches_optimizer']} (clip + fused AdamW)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="a tiny model: seconds")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--batches", type=int, nargs=2, default=[1, 2])
    ap.add_argument("--no-torch", action="store_true", help="handgrad only")
    ap.add_argument(
        "--recompute",
        action="store_true",
        help="handgrad with [model] recompute = true (activation recompute)",
    )
    ap.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["handgrad", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        if args.child == "handgrad":
            res = run_handgrad(args.smoke, args.batches[0], args.steps, args.recompute)
        else:
            res = run_torch(args.smoke, args.batches)
        args.result.write_text(json.dumps(res))
        return 0
    smoke = ["--smoke"] if args.smoke else []
    timeout = 120 if args.smoke else 900
    t0 = time.perf_counter()
    # the first micro batch runs two steps (the second is the steady state); the others one,
    # whose steady figures are derived (``steady_row``): a second step of a 124M model at
    # micro batch 2 would hold ~1.5 GB more of the stand-in's memory at once
    recompute = ["--recompute"] if args.recompute else []
    jobs = [["--child", "handgrad", "--batches", str(B), str(B), "--steps", str(1 if i else 2),
             *smoke, *recompute] for i, B in enumerate(args.batches)]  # fmt: skip
    if not args.no_torch:
        jobs.append(["--child", "torch", "--batches", *map(str, args.batches), *smoke])
    results = run_children(jobs, timeout, parallel=args.smoke)
    hg_runs = results[: len(args.batches)]
    hg_rows = [steady_row(r, hg_runs[0]) for r in hg_runs]
    if "steady" in hg_runs[0]:  # the derivation checked where both are measured
        check = steady_row({k: v for k, v in hg_runs[0].items() if k != "steady"}, None)
        hg_rows[0]["peak_derived"] = check["peak_bytes"]
    t_rows: list[dict[str, Any]] = [] if args.no_torch else results[-1]["rows"]
    summary = summarize(hg_rows, t_rows)
    summary["smoke"] = args.smoke
    summary["total_s"] = time.perf_counter() - t0
    print_table(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
