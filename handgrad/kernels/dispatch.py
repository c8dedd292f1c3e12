"""The one test every fused op makes before it runs a CUDA kernel: ``cuda_kernels(*arrays)``.

An op asks it with its input arrays and gets ``handgrad.kernels.cuda`` (the launchers) when
the arrays live on a CUDA GPU, the kernels are switched on (``handgrad.backend.cuda.
use_kernels``, env ``HANDGRAD_CUDA_KERNELS``) and every floating array is float32 (what the
kernels compute in; 16-bit tensors reach ops already cast to float32); otherwise None, and
the op runs its generic array code, the same on NumPy and CuPy.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

from handgrad import backend as B
from handgrad.backend import cuda
from handgrad.kernels import cuda as launchers


def cuda_kernels(*arrays: Any, cast_16bit: bool = False) -> ModuleType | None:
    """``handgrad.kernels.cuda`` when ``arrays`` (None entries skipped) may go to the CUDA
    kernels, else None. Integer arrays (indices) pass; they are converted by the op.
    ``cast_16bit``: 16-bit floats pass too (asked before ``Function.apply`` casts them to
    float32)."""
    present = [a for a in arrays if a is not None]
    if not present:
        return None
    xp = B.get_array_module(*present)
    if B.is_numpy(xp) or not cuda.is_cupy(xp) or not cuda.kernels_enabled():
        return None
    ok = (B.float32, B.bfloat16, B.float16) if cast_16bit else (B.float32,)
    if any(B.is_floating(a.dtype) and a.dtype not in ok for a in present):
        return None
    return launchers


def f32(a: Any) -> Any:
    """``a`` as a C-contiguous float32 array of its namespace (itself when it is one): what
    the kernels read."""
    return B.get_array_module(a).ascontiguousarray(a, dtype=B.float32)


def i64(a: Any) -> Any:
    """``a`` as a C-contiguous int64 array of its namespace (itself when it is one)."""
    return B.get_array_module(a).ascontiguousarray(a, dtype=B.int64)


__all__ = ["cuda_kernels", "f32", "i64"]
