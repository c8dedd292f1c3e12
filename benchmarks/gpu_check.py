"""One command that checks handgrad on an NVIDIA GPU and prints one summary.

    python benchmarks/gpu_check.py              # on a GPU machine; under 8 minutes on an H200
    python benchmarks/gpu_check.py --cpu-smoke  # tiny shapes on the CPU: tests this script

Parts, each in its own process with its own time budget (one failing or running out of time
still leaves the others' results):

  0. warmup       one step of a one-layer GPT-2 in each setting the timed parts use, so that
                  CuPy's first-use kernel compiles land in its disk cache before them
  a. cuda_tests   pytest -m cuda, the CUDA kernel tests first (each kernel against its NumPy
                  reference, each op's kernel path against CuPy's generic path), then the
                  device tests
  b. parity       20 training steps of a small float32 GPT-2 on the GPU and on the CPU, same
                  weights and batches: every loss within 1e-4 relative. Run with the CUDA
                  kernels on; when that fails, again with them off, so that a kernel bug does
                  not hide whether the device plumbing works. Also whether
                  ``set_matmul_precision("high")`` reached cuBLAS (TF32); and one step
                  under bf16 autocast against torch.autocast with the same weights (loss
                  within 5e-3, gradients within 5e-2)
  c. throughput   GPT-2 124M, bfloat16 parameters, the forward under bf16 autocast (as
                  ``[train] autocast = "auto"`` on a GPU), T = 1024, micro batch 16 (the shape of
                  the memory target: <= 1.2x PyTorch's peak), 8 if 16 does not fit, kernels
                  on: tokens/s, MFU (against 989 TFLOP/s dense bf16, FLOPs per token from
                  handgrad.models.gpt2.flops_per_token), peak device memory, the attention
                  path and the FLOPs of the matrix products that ran, by operand dtype
                  (float32 ones through TF32); then
                  ``kernels_ratio``, a short run at micro batch 8 with kernels on and off;
                  beside PyTorch eager (benchmarks/torch_gpt2.py) on the same shapes, in
                  nanoGPT's recipe: float32 parameters, torch.autocast bf16
  d. shakespeare  configs/shakespeare-char.toml on the GPU: wall time and final val loss
                  (<= 1.90), with tiny Shakespeare from $HANDGRAD_SHAKESPEARE, shared/data in
                  the repo or ../shared/data beside it (``shakespeare_candidates``)
  e. nccl         the nccl transport (never run on a GPU before this part): under
                  ``mpirun -n 1`` (one GPU: NCCL cannot put two ranks on one), every
                  collective on CuPy arrays through CuPy's NCCL bindings checked against its
                  expected values, then 10 training steps with ``train.device=cuda`` in that
                  MPI job; "skipped" without mpi4py or an MPI launcher. --cpu-smoke runs it
                  on 2 ranks with the CuPy and NCCL stand-ins of tests/ (data parallel)

Every part catches its own failure: the summary shows the error's last lines (a traceback,
or the tail of the part's output when it ran out of time) and the JSON holds everything.
Before the parts, a child process records the environment (Python, NumPy, ml_dtypes, CuPy,
PyTorch, the CUDA runtime, driver and NVRTC versions, each GPU's name and memory, whether
CuPy holds bfloat16 arrays); every GPU part also reports which code paths ran (kernels
compiled, bfloat16 products, the attention path), also when it fails.

The summary goes to stdout and, as JSON, to $OUT/gpu_check.json when $OUT is set (or to
--json PATH); the JSON is rewritten after every part ("complete": false until the end), so
a run killed by a time limit keeps the parts it finished. The GPU paths use the device API
(``hg.device``, ``Tensor.to``, ``Module.to``, ``[train] device``); where a piece is missing,
its part says which.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from gpu_check_nccl import part_nccl  # noqa: E402, F401  (run_part finds part_*)
from gpu_check_probes import (  # noqa: E402
    attention_path,
    environment,
    error_record,
    gpu_state,
    matmul_tflops,
    model_dtype,
    output_tail,
    tf32_reaches_cublas,
)

H200_BF16_FLOPS = 989e12  # dense bf16 tensor-core peak of an H100/H200 SXM

# seconds per part on the GPU: 465 s in all, so the run ends within 8 minutes
BUDGET = {"warmup": 30, "cuda_tests": 75, "parity": 55, "throughput_handgrad": 95,
          "kernels_ratio": 40, "throughput_torch": 50, "shakespeare": 100, "nccl": 30}  # fmt: skip
SMOKE_BUDGET = {name: 120 for name in BUDGET}


def _device(smoke: bool) -> str:
    return "cpu" if smoke else "cuda"


def _to(obj: Any, device: str) -> Any:
    """``obj.to(device)``; on the CPU, objects without ``.to(device)`` stay as they are."""
    try:
        return obj.to(device)
    except (AttributeError, TypeError) as e:
        if device == "cpu":
            return obj
        raise RuntimeError(
            f"{type(obj).__name__}.to({device!r}) is missing (device plumbing): {e}"
        ) from e


def _sync(device: str) -> None:
    if device != "cpu":
        from handgrad.backend import cuda

        cuda.synchronize()


def _peak_device_bytes(device: str) -> int | None:
    """Bytes CuPy's memory pool holds (it keeps what it once needed: the peak reserved)."""
    if device == "cpu":
        return None
    from handgrad.backend import cuda

    return int(cuda.require().get_default_memory_pool().total_bytes())


# ----------------------------------------------------------------------------------------
# a. the CUDA-marked tests


def part_cuda_tests(smoke: bool, budget: float) -> dict[str, Any]:
    # pytest runs each test once, in the order of the paths: the kernel tests come first
    paths = (
        ["tests/kernels", "tests/device"] if smoke else ["tests/kernels", "tests/device", "tests"]
    )
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *paths]
    if importlib.util.find_spec("pytest_timeout") is not None:  # one hung test is one failure
        cmd.append(f"--timeout={max(10, int(budget / 3))}")
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget)
    except subprocess.TimeoutExpired as e:
        return {"ok": False, "error": f"pytest over its time budget of {budget:.0f} s",
                "output_tail": output_tail(e.stdout, e.stderr)}  # fmt: skip
    tail = (r.stdout + r.stderr).strip().splitlines()
    counts = {k: 0 for k in ("passed", "failed", "skipped", "error", "deselected")}
    for n, word in re.findall(
        r"(\d+) (passed|failed|skipped|errors?|deselected)", tail[-1] if tail else ""
    ):
        counts[word.rstrip("s") if word.startswith("error") else word] += int(n)
    failures = [line for line in tail if line.startswith(("FAILED", "ERROR"))]
    ok = r.returncode in (0, 5) and counts["failed"] == counts["error"] == 0
    if not smoke:
        ok = ok and counts["passed"] > 0
    res = {"ok": ok, **counts, "returncode": r.returncode, "failures": failures[:20],
           "summary": tail[-1] if tail else ""}  # fmt: skip
    if not ok:
        res["output_tail"] = "\n".join(tail[-60:])
    return res


# ----------------------------------------------------------------------------------------
# b. GPU against CPU: the same 20 steps


def _train_losses(device: str, steps: int, cfg: dict[str, Any], batch: int, deadline: float):
    import numpy as np

    import handgrad as hg
    from handgrad.models.gpt2 import GPT2, GPT2Config
    from handgrad.nn.utils import clip_grad_norm_
    from handgrad.optim import AdamW

    hg.manual_seed(0)
    model = _to(GPT2(GPT2Config(**cfg)), device)
    opt = AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        x = rng.integers(0, cfg["vocab_size"], (batch, cfg["block_size"]))
        y = rng.integers(0, cfg["vocab_size"], (batch, cfg["block_size"]))
        _, loss = model(_to(hg.tensor(x), device), _to(hg.tensor(y), device))
        opt.zero_grad()
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.item()))
        if time.monotonic() > deadline:
            raise TimeoutError(f"{device}: out of time after {len(losses)} steps")
    return losses


def _autocast_against_torch(device: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """One forward and backward of the same weights and batch under bf16 autocast, handgrad's
    against PyTorch's (``torch.autocast``): the loss within 5e-3 relative and every gradient
    within 5e-2 (relative norm). The tolerance is that of the CPU test
    (tests/core/test_core_autocast.py) widened for flash attention's other rounding."""
    import numpy as np
    import torch
    from torch_gpt2 import TorchGPT2

    import handgrad as hg
    from handgrad.models.gpt2 import GPT2, GPT2Config

    config = GPT2Config(**cfg)
    hg.manual_seed(1)
    model = _to(GPT2(config), device)
    rng = np.random.default_rng(1)
    x = rng.integers(0, cfg["vocab_size"], (4, cfg["block_size"]))
    y = rng.integers(0, cfg["vocab_size"], (4, cfg["block_size"]))
    with hg.autocast(hg.device(device).type):
        _, loss = model(_to(hg.tensor(x), device), _to(hg.tensor(y), device))
    loss.backward()
    ours = {k: p.grad.to("cpu").numpy() for k, p in model.named_parameters()}
    ref = TorchGPT2(**config.to_dict()).to(device)
    state = {k: torch.tensor(v.to("cpu").numpy()) for k, v in model.state_dict().items()}
    ref.load_state_dict(state, strict=False)
    with torch.autocast(device_type=device, dtype=torch.bfloat16):
        _, ref_loss = ref(torch.tensor(x, device=device), torch.tensor(y, device=device))
    ref_loss.backward()
    worst = 0.0
    for k, p in ref.named_parameters():
        g = p.grad.float().cpu().numpy()
        worst = max(worst, float(np.linalg.norm(ours[k] - g) / max(np.linalg.norm(g), 1e-30)))
    rel = abs(float(loss.item()) - float(ref_loss.item())) / abs(float(ref_loss.item()))
    note = (
        {}
        if device != "cpu"
        else {
            "note": "on the CPU torch.autocast keeps layer norm "
            "in bf16, so the tolerance does not apply"
        }
    )
    return {"ok": rel <= 5e-3 and worst <= 5e-2, **note, "loss": float(loss.item()),
            "loss_torch": float(ref_loss.item()), "loss_rel_diff": rel,
            "worst_grad_rel_diff": worst}  # fmt: skip


def part_parity(smoke: bool, budget: float) -> dict[str, Any]:
    from handgrad.backend import cuda

    deadline = time.monotonic() + budget - 2
    cfg = dict(n_layer=2, n_head=4, n_embd=128, block_size=64, vocab_size=512, dropout=0.0)
    steps = 3 if smoke else 20
    cpu = _train_losses("cpu", steps, cfg, 4, deadline)
    print(f"cpu losses: {cpu}", flush=True)
    res: dict[str, Any] = {"steps": steps, "device": _device(smoke), "losses_cpu": cpu}
    for kernels in (True, False):
        name = "kernels_on" if kernels else "kernels_off"
        cuda.use_kernels(kernels)
        try:
            dev = _train_losses(_device(smoke), steps, cfg, 4, deadline)
            rel = max(abs(a - b) / abs(b) for a, b in zip(dev, cpu))
            res[name] = {"ok": rel <= 1e-4, "max_rel_diff": rel, "losses_device": dev}
        except Exception as e:  # noqa: BLE001  (reported; the other setting still runs)
            res[name] = error_record(e)
        print(f"{name}: {res[name]}", flush=True)
        if res[name]["ok"]:
            break  # kernels on and matching: nothing more to learn from kernels off
    on = res["kernels_on"]
    res.update(ok=on["ok"], max_rel_diff=on.get("max_rel_diff"))
    cuda.use_kernels(True)
    try:
        res["autocast_vs_torch"] = _autocast_against_torch(_device(smoke), cfg)
    except Exception as e:  # noqa: BLE001  (reported; the float32 parity stands)
        res["autocast_vs_torch"] = error_record(e)
    print(f"autocast_vs_torch: {res['autocast_vs_torch']}", flush=True)
    if not smoke:
        res["tf32"] = tf32_reaches_cublas()
        res["gpu"] = gpu_state()
    return res


# ----------------------------------------------------------------------------------------
# c. throughput: GPT-2 124M in bf16, T = 1024, beside PyTorch


def _throughput_shapes(smoke: bool) -> tuple[dict[str, Any], list[int], int, int]:
    """model config, micro batches to try (largest first), T, timed steps."""
    if smoke:
        cfg = dict(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=256)
        return cfg, [4, 2], 32, 2
    from handgrad.models.gpt2 import GPT2Config

    cfg = GPT2Config.from_preset("gpt2-124m").to_dict()
    return cfg, [16, 8], 1024, 10


def _is_oom(e: BaseException) -> bool:
    return "OutOfMemory" in type(e).__name__ or "out of memory" in str(e).lower()


def part_throughput_handgrad(smoke: bool, budget: float) -> dict[str, Any]:
    import numpy as np

    import handgrad as hg
    from handgrad.models.gpt2 import GPT2, GPT2Config, flops_per_token
    from handgrad.optim import AdamW

    deadline = time.monotonic() + budget - 5
    device = _device(smoke)
    if device != "cpu":  # float32 products that remain go through TF32 tensor cores
        from handgrad.backend import cuda

        cuda.set_matmul_precision("high")
        cuda.GEMM_FLOPS.clear()
    cfg, batches, T, steps = _throughput_shapes(smoke)
    dtype, why = model_dtype(device)
    config = GPT2Config(**{**cfg, "dtype": dtype, "dropout": 0.0})
    hg.manual_seed(0)
    model = _to(GPT2(config), device)
    opt = AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    rng = np.random.default_rng(0)
    tried: dict[int, str] = {}
    extra = {"dtype": dtype, **({"bf16_arrays_error": why} if why else {})}
    for B in batches:
        try:
            x = _to(hg.tensor(rng.integers(0, config.vocab_size, (B, T))), device)
            y = _to(hg.tensor(rng.integers(0, config.vocab_size, (B, T))), device)

            def step() -> float:
                with hg.autocast(hg.device(device).type):  # as [train] autocast = "auto"
                    _, loss = model(x, y)  # noqa: B023
                opt.zero_grad()
                loss.backward()
                opt.step()
                return loss

            step()  # warm-up: kernels compile, the memory pool fills
            _sync(device)
            t0, done = time.perf_counter(), 0
            while done < steps and time.monotonic() < deadline:
                loss = step()
                done += 1
            _sync(device)
            dt = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001
            if not _is_oom(e):
                raise
            tried[B] = "out of memory"
            opt.zero_grad()
            if device != "cpu":
                from handgrad.backend import cuda

                cuda.require().get_default_memory_pool().free_all_blocks()
            continue
        tps = B * T * done / dt
        fpt = flops_per_token(config, T)
        return {"ok": True, "micro_batch": B, "seq_len": T, "steps": done, "tokens_per_s": tps,
                "mfu": tps * fpt / H200_BF16_FLOPS, "flops_per_token": fpt,
                "peak_device_bytes": _peak_device_bytes(device), "loss": float(loss.item()),
                "tried": tried, **extra, "autocast": "bf16",
                "attention": attention_path(config, B, T, autocast=device != "cpu"),
                **_gpu_paths(device)}  # fmt: skip
    return {"ok": False, "error": f"no micro batch fits: {tried}", **extra, **_gpu_paths(device)}


def _gpu_paths(device: str) -> dict[str, Any]:
    """Which GPU code paths ran (``gpu_state``) and the CuPy matmul rates."""
    if device == "cpu":
        return {}
    try:
        tflops = matmul_tflops()
    except Exception as e:  # noqa: BLE001  (reported; the part's own numbers stand)
        tflops = f"{type(e).__name__}: {e}"[:300]
    return {**gpu_state(), "matmul_tflops": tflops}


def part_kernels_ratio(smoke: bool, budget: float) -> dict[str, Any]:
    """124M bf16 at micro batch 8 (smoke: 2), a few steps with the kernels on, then off:
    what the kernels buy over the generic CuPy code."""
    import numpy as np

    import handgrad as hg
    from handgrad.backend import cuda
    from handgrad.models.gpt2 import GPT2, GPT2Config
    from handgrad.optim import AdamW

    deadline = time.monotonic() + budget - 5
    device = _device(smoke)
    cfg, _, T, _ = _throughput_shapes(smoke)
    B, steps = (2, 1) if smoke else (8, 2)
    dtype, _ = model_dtype(device)
    config = GPT2Config(**{**cfg, "dtype": dtype, "dropout": 0.0})
    hg.manual_seed(0)
    model = _to(GPT2(config), device)
    opt = AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    rng = np.random.default_rng(0)
    x = _to(hg.tensor(rng.integers(0, config.vocab_size, (B, T))), device)
    y = _to(hg.tensor(rng.integers(0, config.vocab_size, (B, T))), device)
    res: dict[str, Any] = {"micro_batch": B, "seq_len": T, "dtype": dtype,
                           "attention": attention_path(config, B, T, autocast=device != "cpu")}  # fmt: skip
    for kernels in (True, False):
        name = "kernels_on" if kernels else "kernels_off"
        cuda.use_kernels(kernels)
        try:
            done, dt = 0, 0.0
            for i in range(steps + 1):  # the first: warm-up
                if time.monotonic() > deadline:
                    break
                t0 = time.perf_counter()
                with hg.autocast(hg.device(device).type):
                    _, loss = model(x, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                _sync(device)
                if i > 0:
                    done, dt = done + 1, dt + time.perf_counter() - t0
            res[name] = {"steps": done, "tokens_per_s": B * T * done / dt if done else None}
        except Exception as e:  # noqa: BLE001
            res[name] = error_record(e)
        print(f"{name}: {res[name]}", flush=True)
    on, off = res["kernels_on"].get("tokens_per_s"), res["kernels_off"].get("tokens_per_s")
    res["on_over_off"] = on / off if on and off else None
    res["ok"] = bool(on)
    return res


def part_throughput_torch(smoke: bool, budget: float, micro_batch: int | None) -> dict[str, Any]:
    import torch
    from torch_gpt2 import TorchGPT2

    from handgrad.models.gpt2 import GPT2Config, flops_per_token

    deadline = time.monotonic() + budget - 5
    device = _device(smoke)
    cfg, batches, T, steps = _throughput_shapes(smoke)
    config = GPT2Config(**{**cfg, "dropout": 0.0})
    if micro_batch is not None:  # the same shape as handgrad's run, then smaller if need be
        batches = [b for b in batches if b <= micro_batch] or [micro_batch]
    torch.manual_seed(0)
    # nanoGPT's recipe: float32 parameters, forward under bf16 autocast (fused AdamW)
    model = TorchGPT2(**config.to_dict()).to(device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=device == "cuda")
    tried: dict[int, str] = {}
    for B in batches:
        try:
            x = torch.randint(0, config.vocab_size, (B, T), device=device)
            y = torch.randint(0, config.vocab_size, (B, T), device=device)

            def step() -> Any:
                with torch.autocast(device_type=device, dtype=torch.bfloat16):
                    _, loss = model(x, y)  # noqa: B023
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                return loss

            step()
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0, done = time.perf_counter(), 0
            while done < steps and time.monotonic() < deadline:
                loss = step()
                done += 1
            if device == "cuda":
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        except torch.OutOfMemoryError:
            tried[B] = "out of memory"
            opt.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            continue
        tps = B * T * done / dt
        peak = torch.cuda.max_memory_reserved() if device == "cuda" else None
        return {"ok": True, "micro_batch": B, "seq_len": T, "steps": done, "tokens_per_s": tps,
                "mfu": tps * flops_per_token(config, T) / H200_BF16_FLOPS,
                "peak_device_bytes": peak, "loss": float(loss.item()), "tried": tried,
                "torch": torch.__version__, "torch_cuda": torch.version.cuda}  # fmt: skip
    return {"ok": False, "error": f"no micro batch fits: {tried}", "torch": torch.__version__}


# ----------------------------------------------------------------------------------------
# d. the shakespeare-char recipe on the GPU


def shakespeare_candidates() -> list[Path]:
    """Where tiny Shakespeare may be, first found wins: $HANDGRAD_SHAKESPEARE, then a
    ``shared/data`` inside the repo (it travels with a copy of the repo sent to a GPU
    machine, where a ``../shared`` beside the checkout does not), then ``../shared/data``."""
    found = (
        [Path(os.environ["HANDGRAD_SHAKESPEARE"])] if os.environ.get("HANDGRAD_SHAKESPEARE") else []
    )
    return found + [
        base / "shared" / "data" / "tinyshakespeare.txt" for base in (ROOT, ROOT.parent)
    ]


def part_shakespeare(smoke: bool, budget: float) -> dict[str, Any]:
    text = next((p for p in shakespeare_candidates() if p.is_file()), None)
    fallback = None
    if text is None:  # never fail for want of data: CPython's own docs, at character level
        looked = ", ".join(str(p) for p in shakespeare_candidates())
        fallback = f"tiny Shakespeare not found (looked at {looked}): the pydocs corpus instead"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        sets = ["train.processes=1", "train.micro_batch_size=12"]
        if fallback:
            sets += ["data.source=pydocs"]
        if not smoke:
            sets.append("train.device=cuda")
        else:
            sets += ["train.max_steps=10", "optim.warmup_steps=2", "eval.interval=10", "eval.batches=2",
                     "train.checkpoint_interval=0", "train.sample_tokens=8"]  # fmt: skip
        cmd = [sys.executable, "-m", "handgrad.cli", "train", "shakespeare-char", "--out", str(out)]
        for s in sets:
            cmd += ["--set", s]
        env = {**os.environ, "HANDGRAD_CACHE": tmp,
               **({"HANDGRAD_SHAKESPEARE": str(text)} if text else {}),
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
        t0 = time.perf_counter()
        r = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=max(10, budget - 8)
        )
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            return {"ok": False, "wall_s": wall, "error": (r.stderr or r.stdout)[-2000:]}
        recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        vocab = json.loads((out / "config.json").read_text())["model"]["vocab_size"]
    vals = [rec for rec in recs if rec.get("val_loss") is not None]
    final = vals[-1]["val_loss"] if vals else None
    if fallback:  # another corpus: no 1.90 to meet, but it must beat a uniform guess, ln V
        ok = final is not None and final < math.log(vocab) - (0.2 if smoke else 1.0)
    else:
        ok = final is not None and (smoke or final <= 1.90)
    return {"ok": ok, "wall_s": wall, "final_val_loss": final, "steps": recs[-1].get("step"),
            "device": _device(smoke), **({"data": fallback} if fallback else {})}  # fmt: skip


# ----------------------------------------------------------------------------------------
# the driver: each part in a child process with a time limit


def part_warmup(smoke: bool, budget: float) -> dict[str, Any]:
    """One step of a one-layer GPT-2 (the 124M model's widths) in each setting the timed parts
    use: float32, and bf16 parameters under autocast, each with the kernels on and off. CuPy
    compiles a kernel for each new elementwise op and reduction on first use (a CUB one takes
    seconds) and keeps it in its on-disk cache, which the later parts, each a process of its
    own, then read instead of compiling inside their timed loops."""
    import numpy as np

    import handgrad as hg
    from handgrad.backend import cuda
    from handgrad.models.gpt2 import GPT2, GPT2Config
    from handgrad.nn.utils import clip_grad_norm_
    from handgrad.optim import AdamW

    deadline = time.monotonic() + budget - 5
    device, t0, done = _device(smoke), time.perf_counter(), []
    cfg = dict(n_layer=1, n_head=12, n_embd=768, block_size=64, vocab_size=50257, dropout=0.0)
    if smoke:
        cfg.update(n_head=2, n_embd=64, vocab_size=256)
    for dtype, autocast in (("float32", False), ("bfloat16", True)):
        for kernels in (True, False):
            if time.monotonic() > deadline:
                break
            if device != "cpu":
                cuda.use_kernels(kernels)
            model = _to(GPT2(GPT2Config(**cfg, dtype=dtype)), device)
            opt = AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
            x = _to(hg.tensor(np.zeros((2, cfg["block_size"]), dtype=np.int64)), device)
            with hg.autocast(hg.device(device).type, enabled=autocast):
                _, loss = model(x, x)
            loss.backward()
            clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            float(loss.item())
            done.append(f"{dtype}{' autocast' if autocast else ''}, kernels {kernels}")
    return {"ok": len(done) == 4, "warmed": done, "s": time.perf_counter() - t0}


PARTS = ["warmup", "cuda_tests", "parity", "throughput_handgrad", "kernels_ratio", "throughput_torch",
         "shakespeare", "nccl"]  # fmt: skip


def run_part(name: str, smoke: bool, budget: float, extra: dict[str, Any]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, __file__, "--part", name, "--result", str(result),
               "--budget", str(budget), "--extra", json.dumps(extra)]  # fmt: skip
        if smoke:
            cmd.append("--cpu-smoke")
        t0 = time.perf_counter()
        try:
            # the part keeps its own deadline (budget - 5 s); this kill is the backstop
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=budget + 5)
        except subprocess.TimeoutExpired as e:
            return {"ok": False, "error": f"over its time budget of {budget:.0f} s",
                    "time_s": budget, "output_tail": output_tail(e.stdout, e.stderr)}  # fmt: skip
        out = {"time_s": round(time.perf_counter() - t0, 1)}
        if result.is_file():
            out.update(json.loads(result.read_text()))
        else:  # killed (out of memory, a crash in a CUDA library ...) before it wrote
            out.update(ok=False, error=f"exit status {r.returncode}",
                       output_tail=output_tail(r.stdout, r.stderr))  # fmt: skip
        return out


def child(name: str, smoke: bool, budget: float, extra: dict[str, Any], result: Path) -> None:
    try:
        if name == "throughput_torch":
            res = part_throughput_torch(smoke, budget, extra.get("micro_batch"))
        else:
            res = globals()[f"part_{name}"](smoke, budget)
    except subprocess.TimeoutExpired as e:
        res = {"ok": False, "error": f"over its time budget of {budget:.0f} s: {e.cmd[:3]}"}
    except Exception as e:  # noqa: BLE001  (reported in the summary, not raised)
        res = error_record(e)
        if not smoke and name != "throughput_torch":
            res["gpu"] = gpu_state()
    result.write_text(json.dumps(res, default=str))


def run_environment(timeout: float = 60) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--environment"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return {"error": f"over {timeout:.0f} s", "output_tail": output_tail(e.stdout, e.stderr)}
    lines = r.stdout.strip().splitlines()
    try:
        return json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        return {
            "error": f"exit status {r.returncode}",
            "output_tail": output_tail(r.stdout, r.stderr),
        }


def _fmt(v: Any) -> str:
    if isinstance(v, dict):  # a nested result: its tails and loss lists are printed apart
        skip = ("traceback", "output_tail", "losses_device")
        return "{" + ", ".join(f"{k}={_fmt(x)}" for k, x in v.items() if k not in skip) + "}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    h, t = results.get("throughput_handgrad", {}), results.get("throughput_torch", {})
    if h.get("ok") and t.get("ok"):
        same = h["micro_batch"] == t["micro_batch"]
        results["throughput_ratio"] = {
            "ok": True, "handgrad_over_torch_tokens_per_s": h["tokens_per_s"] / t["tokens_per_s"],
            "same_micro_batch": same,
            "memory_ratio": (h["peak_device_bytes"] / t["peak_device_bytes"]
                             if h.get("peak_device_bytes") and t.get("peak_device_bytes") else None),
        }  # fmt: skip
        ratio = results["throughput_ratio"]["memory_ratio"]
        if ratio is not None and same:  # the target: at most 1.2x PyTorch's peak memory
            results["throughput_ratio"]["memory_within_1.2x"] = ratio <= 1.2
    return results


def print_summary(
    results: dict[str, dict[str, Any]],
    smoke: bool,
    total: float,
    env: dict[str, Any] | None = None,
) -> None:
    print(f"\n=== handgrad gpu_check {'(--cpu-smoke) ' if smoke else ''}in {total:.0f} s ===")
    if env is not None:
        print("[env ] " + ", ".join(f"{k}={_fmt(v)}" for k, v in env.items() if k != "output_tail"))
    for name, res in results.items():
        status = "ok  " if res.get("ok") else "FAIL"
        keys = [k for k in res if k not in ("ok", "traceback", "losses_device", "losses_cpu",
                                            "failures", "output_tail")]  # fmt: skip
        print(f"[{status}] {name}: " + ", ".join(f"{k}={_fmt(res[k])}" for k in keys))
        for line in res.get("failures", []):
            print(f"         {line}")
        tails = [(name, res)] + [(f"{name}.{k}", v) for k, v in res.items() if isinstance(v, dict)]
        for where, r in tails:
            for key in ("traceback", "output_tail"):
                if r.get(key):
                    lines = r[key].strip().splitlines()[-25:]
                    print(f"         [{where} {key}, last lines]")
                    print("         " + "\n         ".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS)
    ap.add_argument("--json", type=Path, default=None, help="where to write the JSON summary")
    ap.add_argument("--part", choices=PARTS, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--extra", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--environment", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.environment:
        print(json.dumps(environment(), default=str))
        return 0
    if args.part:
        child(args.part, args.cpu_smoke, args.budget, json.loads(args.extra), args.result)
        return 0
    budgets = SMOKE_BUDGET if args.cpu_smoke else BUDGET
    t0 = time.perf_counter()
    env = run_environment()
    print("environment: " + ", ".join(f"{k}={_fmt(v)}" for k, v in env.items()), flush=True)
    target = args.json or (
        Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None
    )
    results: dict[str, dict[str, Any]] = {}

    def write(summary: dict[str, Any]) -> None:
        # after every part, so that a run cut short (the device's time limit) keeps what it
        # has; written here rather than by handgrad.fileio because this process imports no
        # handgrad (the parts do, in children), so a handgrad that fails to import on the GPU
        # machine still leaves a summary saying so
        if target is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(summary, indent=2, default=str))
            os.replace(tmp, target)

    for name in args.parts:
        extra = {}
        if name == "throughput_torch" and results.get("throughput_handgrad", {}).get("ok"):
            extra["micro_batch"] = results["throughput_handgrad"]["micro_batch"]
        print(f"--- {name} (budget {budgets[name]} s)", flush=True)
        results[name] = run_part(name, args.cpu_smoke, budgets[name], extra)
        print(f"    {'ok' if results[name].get('ok') else 'FAIL'} in {results[name].get('time_s')} s",
              flush=True)  # fmt: skip
        write({"cpu_smoke": args.cpu_smoke, "complete": False, "environment": env,
               "parts": results, "all_ok": False})  # fmt: skip
    results = summarize(results)
    total = time.perf_counter() - t0
    print_summary(results, args.cpu_smoke, total, env)
    summary = {"cpu_smoke": args.cpu_smoke, "complete": True, "total_s": total,
               "environment": env, "parts": results,
               "all_ok": all(r.get("ok") for r in results.values())}  # fmt: skip
    write(summary)
    if target is not None:
        print(f"JSON summary: {target}")
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
