"""``handgrad.backend.cuda``: is a CUDA GPU usable here, how many, and the CuPy module that drives it.

CuPy is optional (``pip install handgrad[cuda]``): this module imports without it, and
``is_available()`` is then False. Asking for a CUDA device without one raises one clear
error that says which piece is missing: CuPy itself, or a GPU that CuPy can see.
(Untested on a GPU: the machines this was written on have none.)
"""

from __future__ import annotations

import importlib
import os
from typing import Any

_cupy: Any = None
_cupy_error: str | None = None


def _import_cupy() -> Any:
    """CuPy, or None when it is not installed (or fails to load its CUDA libraries)."""
    global _cupy, _cupy_error
    if _cupy is None and _cupy_error is None:
        try:
            _cupy = importlib.import_module("cupy")
        except ImportError as e:  # not installed, or its CUDA libraries are missing
            _cupy_error = str(e) or type(e).__name__
    return _cupy


def _set_cupy_module(module: Any) -> Any:
    """Use ``module`` as CuPy (a stand-in in tests; None forgets it); returns the previous."""
    global _cupy, _cupy_error
    previous = _cupy
    _cupy, _cupy_error = module, None
    return previous


def device_count() -> int:
    """How many CUDA GPUs CuPy sees (0 without CuPy, a driver or a GPU)."""
    cp = _import_cupy()
    if cp is None:
        return 0
    try:
        return int(cp.cuda.runtime.getDeviceCount())
    except Exception:  # CUDARuntimeError: no driver, no device, or a broken install
        return 0


def is_available() -> bool:
    """True when CuPy is installed and sees at least one GPU (as ``torch.cuda.is_available``)."""
    return device_count() > 0


def require(index: int | None = None) -> Any:
    """The CuPy module, after checking that GPU ``index`` (default 0) exists; otherwise a
    RuntimeError that says what is missing."""
    cp = _import_cupy()
    if cp is None:
        raise RuntimeError(
            "CUDA is not available: no CuPy (install the wheel for your CUDA version, e.g. "
            f"`pip install cupy-cuda12x` or `cupy-cuda13x`; import failed with: {_cupy_error})"
        )
    n = device_count()
    if n == 0:
        raise RuntimeError(
            "CUDA is not available: no GPU (CuPy is installed but finds no CUDA device or driver)"
        )
    i = 0 if index is None else index
    if not 0 <= i < n:
        raise RuntimeError(
            f"CUDA device cuda:{i} does not exist: {n} GPU{'s' if n != 1 else ''} visible "
            f"(cuda:0 .. cuda:{n - 1})"
        )
    return cp


def synchronize(index: int | None = None) -> None:
    """Wait until every kernel queued on GPU ``index`` (default: the current one) has run."""
    cp = require(index)
    if index is None:
        cp.cuda.Device().synchronize()
    else:
        cp.cuda.Device(index).synchronize()


_PRECISIONS = ("highest", "high")


def set_matmul_precision(precision: str) -> None:
    """How float32 matmuls run on CUDA, as ``torch.set_float32_matmul_precision``: "highest"
    computes them in float32; "high" lets cuBLAS use TF32 tensor cores (inputs rounded to a
    10-bit mantissa, float32 accumulation; ~8x the float32 throughput on an A100/H100).

    CuPy reads ``CUPY_TF32`` when a dtype's cuBLAS compute type is first needed, so the
    variable is set for that, and the compute type of float32 is set directly where this
    CuPy exposes it (a cached choice would otherwise win). Without CuPy only the variable
    changes: a no-op on the CPU. (Untested on a GPU.)"""
    if precision not in _PRECISIONS:
        raise ValueError(
            f"set_matmul_precision: expected one of {list(_PRECISIONS)}, got {precision!r}"
        )
    tf32 = precision == "high"
    os.environ["CUPY_TF32"] = "1" if tf32 else "0"
    cp = _import_cupy()
    if cp is None:
        return
    try:
        linalg = importlib.import_module("cupy._core._routines_linalg")
        kind = linalg.COMPUTE_TYPE_TF32 if tf32 else linalg.COMPUTE_TYPE_DEFAULT
        linalg.set_compute_type(cp.float32, kind)
    except (ImportError, AttributeError):  # a CuPy without the setter, or a stand-in
        pass


__all__ = ["device_count", "is_available", "require", "set_matmul_precision", "synchronize"]
