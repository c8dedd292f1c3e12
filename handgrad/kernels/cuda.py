"""The kernels of ``handgrad.kernels.reference`` on a CUDA GPU, as CuPy ``RawKernel``s.

Same signatures and results as the references (to float32 rounding; the scatter-add and
the norm use atomics, so their sums run in no fixed order). Inputs are CuPy arrays,
C-contiguous float32 (int64 for indices); outputs are new CuPy arrays unless an ``out``
is given. The CUDA C is in ``cuda_sources``; each kernel compiles on first use (NVRTC)
and is cached. Importing this module needs no CuPy.

``tests/kernels`` runs each kernel, launched by these launchers, against its reference in a CPU
emulation of CUDA (docs/gpu.md), and on a GPU wherever one is present; what has run where is
README's "GPUs" section.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from handgrad.backend import cuda
from handgrad.kernels.cuda_sources import SOURCES

# NVRTC options of every kernel. CuPy adds the rest itself: -arch=sm_XY for the current
# GPU's compute capability (sm_90 on an H100/H200; NVRTC 13 builds machine code up to
# sm_121, so no PTX is left for the driver to compile), -ftz=true (denormals flushed to zero:
# no kernel here depends on values below 1.2e-38) and --device-as-default-execution-space.
# C++17 is NVRTC's default dialect since CUDA 11 and nvcc's, which the tests compile with.
NVRTC_OPTIONS = ("--std=c++17",)

_compiled: dict[str, Any] = {}


def _kernel(name: str) -> Any:
    """Kernel ``name``, compiled by NVRTC the first time it is asked for (CuPy caches the
    binary on disk, ~/.cupy/kernel_cache, and per device)."""
    if name not in _compiled:
        cp = cuda.require()
        _compiled[name] = cp.RawKernel(SOURCES[name], name, options=NVRTC_OPTIONS)
    return _compiled[name]


def _launch(name: str, grid: tuple, block: tuple, args: tuple) -> None:
    """Kernel ``name`` over ``grid``, or nothing when the grid is empty (a zero-row batch,
    a zero-width row): that is no work, and CUDA refuses a grid with a zero dimension
    ("invalid configuration argument") where CuPy would raise."""
    if min(grid) > 0:
        _kernel(name)(grid, block, args)


def compiled() -> list[str]:
    """The names of the kernels compiled in this process so far (which ones have run)."""
    return sorted(_compiled)


def _check(name: str, **arrays: Any) -> Any:
    """The CuPy module, after checking dtypes and contiguity (a clear error, not garbage)."""
    cp = cuda.require()
    for arg, a in arrays.items():
        if not isinstance(a, cp.ndarray):
            raise TypeError(f"{name}: {arg} must be a CuPy array, got {type(a).__name__}")
        want = np.int64 if arg in ("targets", "idx") else np.float32
        if a.dtype != want:
            raise TypeError(f"{name}: {arg} must be {np.dtype(want)}, got {a.dtype}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{name}: {arg} of shape {a.shape} must be C-contiguous")
    return cp


def _row_threads(width: int) -> int:
    """Threads for one block per row: a multiple of 32, enough to cover ``width``."""
    return max(32, min(1024, 32 * math.ceil(width / 32 / 4)))  # ~4 elements per thread


def _grid_for(n: int, threads: int = 256) -> int:
    """Blocks for ``n`` elements (0 for none: ``_launch`` then launches nothing)."""
    return min(math.ceil(n / threads), 65536)  # grid-stride loops cover the rest


# ---- layer norm


def layer_norm_forward(x: Any, weight: Any, bias: Any | None, eps: float = 1e-5) -> tuple:
    """x (N, C) -> y (N, C), mean (N,), rstd (N,); see ``reference.layer_norm_forward``."""
    extra = {} if bias is None else {"bias": bias}
    cp = _check("layer_norm_forward", x=x, weight=weight, **extra)
    N, C = x.shape
    y = cp.empty_like(x)
    mean, rstd = cp.empty(N, np.float32), cp.empty(N, np.float32)
    args = (x, weight, bias if bias is not None else weight, np.int32(bias is not None))
    _launch(
        "layer_norm_forward",
        (N,),
        (_row_threads(C),),
        (*args, y, mean, rstd, np.int32(C), np.float32(eps)),
    )
    return y, mean, rstd


def layer_norm_backward(dy: Any, x: Any, weight: Any, mean: Any, rstd: Any) -> tuple:
    """-> dx (N, C), dweight (C,), dbias (C,); see ``reference.layer_norm_backward``."""
    cp = _check("layer_norm_backward", dy=dy, x=x, weight=weight, mean=mean, rstd=rstd)
    N, C = x.shape
    dx = cp.empty_like(x)
    _launch(
        "layer_norm_backward_input",
        (N,),
        (_row_threads(C),),
        (dy, x, weight, mean, rstd, dx, np.int32(C)),
    )
    dw, db = cp.zeros(C, np.float32), cp.zeros(C, np.float32)
    chunks = max(1, min(N, 128))
    rows = max(1, math.ceil(N / chunks))  # N = 0: no chunk (and no division by zero)
    _launch(
        "layer_norm_backward_params",
        (math.ceil(C / 256), math.ceil(N / rows)),
        (256,),
        (dy, x, mean, rstd, dw, db, np.int32(N), np.int32(C), np.int32(rows)),
    )
    return dx, dw, db


# ---- GELU


def gelu_tanh_forward(x: Any) -> Any:
    cp = _check("gelu_tanh_forward", x=x)
    y = cp.empty_like(x)
    _launch("gelu_tanh_forward", (_grid_for(x.size),), (256,), (x, y, np.int64(x.size)))
    return y


def gelu_tanh_backward(dy: Any, x: Any) -> Any:
    cp = _check("gelu_tanh_backward", dy=dy, x=x)
    dx = cp.empty_like(x)
    _launch("gelu_tanh_backward", (_grid_for(x.size),), (256,), (dy, x, dx, np.int64(x.size)))
    return dx


# ---- causal softmax and attention


def causal_softmax_forward(scores: Any, scale: float) -> Any:
    """scores (..., T, T) -> p; see ``reference.causal_softmax_forward``."""
    cp = _check("causal_softmax_forward", scores=scores)
    T = scores.shape[-1]
    p = cp.empty_like(scores)
    rows = scores.size // T if T else 0
    _launch(
        "causal_softmax_forward",
        (rows,),
        (_row_threads(T),),
        (scores, p, np.int32(T), np.float32(scale)),
    )
    return p


def causal_softmax_backward(dp: Any, p: Any, scale: float) -> Any:
    cp = _check("causal_softmax_backward", dp=dp, p=p)
    T = p.shape[-1]
    ds = cp.empty_like(p)
    _launch(
        "causal_softmax_backward",
        (p.size // T if T else 0,),
        (_row_threads(T),),
        (dp, p, ds, np.int32(T), np.float32(scale)),
    )
    return ds


def attention_forward(q: Any, k: Any, v: Any) -> tuple:
    """Causal attention, q k v (..., T, D) -> out, p: matmuls by cuBLAS, the softmax fused."""
    cp = cuda.require()
    p = causal_softmax_forward(
        cp.ascontiguousarray(q @ cp.swapaxes(k, -1, -2)), 1.0 / math.sqrt(q.shape[-1])
    )
    return p @ v, p


def attention_backward(dout: Any, q: Any, k: Any, v: Any, p: Any) -> tuple:
    cp = cuda.require()
    dv = cp.swapaxes(p, -1, -2) @ dout
    dp = cp.ascontiguousarray(dout @ cp.swapaxes(v, -1, -2))
    ds = causal_softmax_backward(dp, p, 1.0 / math.sqrt(q.shape[-1]))
    return ds @ k, cp.swapaxes(ds, -1, -2) @ q, dv


# ---- cross entropy


def cross_entropy_forward(
    logits: Any, targets: Any, vocab_size: int, ignore_index: int = -1
) -> tuple:
    """logits (N, Vp), targets (N,) int64 -> loss (N,), lse (N,). A target out of range
    gives a NaN loss (checking it on the host would cost a synchronisation)."""
    cp = _check("cross_entropy_forward", logits=logits, targets=targets)
    N, Vp = logits.shape
    if not 0 < vocab_size <= Vp:
        raise ValueError(f"cross_entropy_forward: vocab_size {vocab_size} not in [1, {Vp}]")
    loss, lse = cp.empty(N, np.float32), cp.empty(N, np.float32)
    _launch(
        "cross_entropy_forward",
        (N,),
        (_row_threads(vocab_size),),
        (logits, targets, loss, lse, np.int32(vocab_size), np.int32(Vp), np.int64(ignore_index)),
    )
    return loss, lse


def cross_entropy_backward(
    logits: Any,
    lse: Any,
    targets: Any,
    dloss: Any,
    vocab_size: int,
    ignore_index: int = -1,
    out: Any | None = None,
) -> Any:
    """dlogits (N, Vp); ``out=logits`` overwrites the logits (no second (N, Vp) buffer)."""
    cp = _check("cross_entropy_backward", logits=logits, lse=lse, targets=targets, dloss=dloss)
    N, Vp = logits.shape
    d = cp.empty_like(logits) if out is None else out
    _launch(
        "cross_entropy_backward",
        (N,),
        (_row_threads(Vp),),
        (
            logits,
            lse,
            targets,
            dloss,
            d,
            np.int32(vocab_size),
            np.int32(Vp),
            np.int64(ignore_index),
        ),
    )
    return d


# ---- embedding backward


def embedding_backward(idx: Any, dout: Any, num_embeddings: int) -> Any:
    cp = _check("embedding_backward", idx=idx, dout=dout)
    N, C = dout.shape
    dw = cp.zeros((num_embeddings, C), np.float32)
    _launch(
        "embedding_backward", (_grid_for(N * C),), (256,), (idx, dout, dw, np.int64(N), np.int32(C))
    )
    return dw


# ---- global norm and AdamW


def sum_squares(g: Any) -> Any:
    """sum g^2 over a flat float32 buffer, as a 1-element float64 device array (no sync)."""
    cp = _check("sum_squares", g=g)
    out = cp.zeros(1, np.float64)
    _launch("sum_squares", (_grid_for(g.size, 1024),), (256,), (g, np.int64(g.size), out))
    return out


def adamw_flat(
    w: Any,
    g: Any,
    m: Any,
    v: Any,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    n_decay: int,
    norm_sq: Any,
    max_norm: float,
    out_bf16: Any | None = None,
) -> None:
    """One AdamW step over flat float32 buffers, in place; ``norm_sq`` is the 1-element
    float64 device array from ``sum_squares`` (read by the kernel: no host round trip).
    ``out_bf16`` is a bfloat16 (or uint16) array of the same size, or None."""
    cp = _check("adamw_flat", w=w, g=g, m=m, v=v)
    if out_bf16 is not None and (out_bf16.size != w.size or out_bf16.itemsize != 2):
        raise ValueError(f"adamw_flat: out_bf16 must hold {w.size} 16-bit values")
    out = out_bf16.view(np.uint16) if out_bf16 is not None else cp.empty(1, np.uint16)
    _launch(
        "adamw_flat",
        (_grid_for(w.size),),
        (256,),
        (
            w, g, m, v, out, np.int32(out_bf16 is not None), np.int64(w.size),
            np.int64(n_decay), norm_sq, np.float32(max_norm), np.float32(lr),
            np.float32(beta1), np.float32(beta2), np.float32(eps), np.float32(weight_decay),
            np.float32(lr / (1 - beta1**step)), np.float32(math.sqrt(1 - beta2**step)),
        ),
    )  # fmt: skip


__all__ = [
    "NVRTC_OPTIONS",
    "adamw_flat",
    "attention_backward",
    "attention_forward",
    "causal_softmax_backward",
    "causal_softmax_forward",
    "compiled",
    "cross_entropy_backward",
    "cross_entropy_forward",
    "embedding_backward",
    "gelu_tanh_backward",
    "gelu_tanh_forward",
    "layer_norm_backward",
    "layer_norm_forward",
    "sum_squares",
]
