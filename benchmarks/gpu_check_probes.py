"""What benchmarks/gpu_check.py reports beside its timings: the environment (versions and
devices), which GPU code paths a process used, and small probes (CuPy's matmul rates,
whether ``set_matmul_precision`` reaches cuBLAS). Each returns its error instead of raising,
so that a report is never lost to the thing it reports on."""

from __future__ import annotations

import time
import traceback
from typing import Any


def _error_text(e: BaseException, limit: int = 300) -> str:
    return f"{type(e).__name__}: {e}"[:limit]


def environment() -> dict[str, Any]:
    """Versions and devices, as the summary's first line: read in a child process, so that
    a CuPy that crashes on import or a GPU that hangs costs this record, not the run."""
    import platform

    info: dict[str, Any] = {"python": platform.python_version()}
    try:
        from handgrad.backend import cuda

        info.update(cuda.describe())
        if cuda.is_available():
            ok, why = cuda.bf16_arrays_supported()
            info["bf16_arrays"] = True if ok else f"no: {why}"
    except Exception as e:  # noqa: BLE001
        info["handgrad_cuda"] = _error_text(e, 500)
    try:
        import torch

        info.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
                    torch_sees_gpu=torch.cuda.is_available())  # fmt: skip
    except Exception as e:  # noqa: BLE001
        info["torch"] = _error_text(e)
    return info


def gpu_state() -> dict[str, Any]:
    """Which GPU code paths this process used or would use: whether CuPy imported (or why
    not), kernels switched on and which compiled, bfloat16 products (or why not) and
    bfloat16 arrays. Never raises: what cannot be read holds the error."""
    out: dict[str, Any] = {}
    try:
        from handgrad.backend import cuda
        from handgrad.kernels import cuda as kernels

        out["cupy_import_error"] = cuda.import_error()
        out["kernels"] = cuda.kernels_enabled()
        out["kernels_compiled"] = kernels.compiled()
        # what ran: FLOPs of matrix products by operand dtype, counted as they were queued
        out["gemm_flops"] = cuda.gemm_flops()
        out["bf16_products_ran"] = cuda.gemm_flops().get("bfloat16", 0.0) > 0
        if cuda.is_available():
            out["bf16_matmul_allowed"] = cuda.bf16_matmul_enabled()
            out["bf16_matmul_error"] = cuda.bf16_matmul_error()
            out["bf16_arrays"] = cuda.bf16_arrays_supported()[0]
    except Exception as e:  # noqa: BLE001
        out["gpu_state_error"] = _error_text(e)
    return out


def model_dtype(device: str) -> tuple[str, str | None]:
    """bfloat16, or float32 with the reason when this CuPy cannot hold bfloat16 arrays."""
    if device == "cpu":
        return "bfloat16", None
    from handgrad.backend import cuda

    ok, why = cuda.bf16_arrays_supported()
    if not ok:
        print(f"CuPy holds no bfloat16 arrays here ({why}): the model runs in float32",
              flush=True)  # fmt: skip
    return ("bfloat16", None) if ok else ("float32", why)


def attention_path(config: Any, B: int, T: int, autocast: bool = False) -> str:
    """Which attention path a (B, T) batch of ``config`` takes on this device, by the rule
    of ``scaled_dot_product_attention`` (causal self-attention, no dropout); ``autocast``:
    under bf16 autocast."""
    from handgrad.backend import cuda
    from handgrad.nn import attention as A

    scores = B * config.n_head * T * T
    if autocast and cuda.kernels_enabled() and cuda.bf16_matmul_enabled():
        return f"untiled, bf16 products, p recomputed from the row lse ({scores} scores a layer)"
    if scores <= A._ATTN_BATCH_ALL or (scores <= A._DEVICE_KEEP_SCORES and cuda.kernels_enabled()):
        return f"untiled, p kept ({scores} scores a layer)"
    return f"tiled over all heads, tile {A._ATTN_TILE} ({scores} scores a layer)"


def matmul_tflops(n: int = 4096, reps: int = 5) -> dict[str, Any]:
    """TFLOP/s of an (n, n) @ (n, n) CuPy product in float32 and in bfloat16: a bfloat16
    product that runs far below the float32 one is not using tensor cores (set
    HANDGRAD_CUDA_BF16_MATMUL=0 then)."""
    import ml_dtypes

    from handgrad.backend import cuda

    cp, out = cuda.require(), {}
    for name, dtype in (("float32", "float32"), ("bfloat16", ml_dtypes.bfloat16)):
        try:
            a = cp.ones((n, n), dtype="float32").astype(dtype)
            a @ a  # warm-up: the cuBLAS handle and heuristics
            cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ a
            cuda.synchronize()
            out[name] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12
        except Exception as e:  # noqa: BLE001
            out[name] = _error_text(e)
    return out


def tf32_reaches_cublas() -> dict[str, Any]:
    """Whether ``set_matmul_precision("high")`` changed CuPy's float32 compute type to TF32
    (and "highest" changed it back)."""
    from handgrad.backend import cuda

    try:
        import cupy
        from cupy._core import _routines_linalg as linalg

        cuda.set_matmul_precision("high")
        high = linalg.get_compute_type(cupy.float32)
        cuda.set_matmul_precision("highest")
        back = linalg.get_compute_type(cupy.float32)
        ok = high == linalg.COMPUTE_TYPE_TF32 and back != linalg.COMPUTE_TYPE_TF32
        return {"ok": bool(ok), "high": int(high), "highest": int(back)}
    except Exception as e:  # noqa: BLE001
        return {"ok": False, "error": _error_text(e, 2000)}


def error_record(e: BaseException) -> dict[str, Any]:
    """A failure as the summary shows it: the error and the last lines of its traceback."""
    return {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000],
            "traceback": traceback.format_exc()[-3000:]}  # fmt: skip


def output_tail(stdout: Any, stderr: Any, chars: int = 3000) -> str:
    """The last ``chars`` characters of a child's output (str or bytes, either may be None)."""
    parts = [p.decode(errors="replace") if isinstance(p, bytes) else p for p in (stdout, stderr)]
    return "\n".join(p for p in parts if p)[-chars:]
