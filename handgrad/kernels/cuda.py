"""The kernels of ``handgrad.kernels.reference`` on a CUDA GPU, as CuPy ``RawKernel``s.

Same signatures and results as the references (to float32 rounding; the scatter-add and
the norm use atomics, so their sums run in no fixed order). Inputs are CuPy arrays,
C-contiguous float32 (int64 for indices), or bfloat16 (``ml_dtypes.bfloat16``) where a
launcher's docstring says so: a kernel reads and writes bfloat16 as its raw 16 bits and
computes in float32 (one kernel variant per storage type). Outputs are new CuPy arrays
unless an ``out`` is given. Empty inputs launch nothing and return empty results. The CUDA
C is in ``cuda_sources``; each kernel compiles on first use (NVRTC) and is cached. Importing
this module needs no CuPy. ``tests/kernels`` runs each kernel, through these launchers, in a
CPU emulation of CUDA (docs/gpu.md) and on a GPU where one is present.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from handgrad.backend import bfloat16 as BF16
from handgrad.backend import cuda
from handgrad.kernels.cuda_sources import BF, F32, SOURCES, variant_name

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


def _check(name: str, *, allow_bf16: tuple[str, ...] = (), **arrays: Any) -> Any:
    """The CuPy module, after checking dtypes and contiguity (a clear error, not garbage):
    float32 arrays (int64 for ``targets`` and ``idx``), or bfloat16 too for the arguments
    named in ``allow_bf16``."""
    cp = cuda.require()
    for arg, a in arrays.items():
        if not isinstance(a, cp.ndarray):
            raise TypeError(f"{name}: {arg} must be a CuPy array, got {type(a).__name__}")
        want = np.int64 if arg in ("targets", "idx") else np.float32
        if a.dtype != want and not (arg in allow_bf16 and a.dtype == BF16):
            also = " or bfloat16" if arg in allow_bf16 else ""
            raise TypeError(f"{name}: {arg} must be {np.dtype(want)}{also}, got {a.dtype}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{name}: {arg} of shape {a.shape} must be C-contiguous")
    return cp


def _raw(a: Any) -> Any:
    """What a kernel's pointer gets: a bfloat16 array as its raw 16 bits (``unsigned
    short``), any other as it is."""
    return a.view(np.uint16) if a.dtype == BF16 else a


def _storage(a: Any) -> str:
    """The storage type of ``a`` as the kernel variants name it (F32 or BF)."""
    return BF if a.dtype == BF16 else F32


def _same_shape(name: str, **arrays: Any) -> None:
    shapes = {k: tuple(a.shape) for k, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{name}: shapes differ: {shapes}")


def _chunks(N: int) -> tuple[int, int]:
    """Rows per chunk and chunks, for a column kernel whose row chunks meet by atomicAdd
    (at most 128 chunks; N = 0: no chunk, and no division by zero)."""
    rows = max(1, math.ceil(N / max(1, min(N, 128))))
    return rows, math.ceil(N / rows)


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
    _launch(  # the residual form's kernel with no residual gradient (has_dh = 0)
        variant_name("residual_layer_norm_backward_input", F32),
        (N,),
        (_row_threads(C),),
        (dy, x, np.int32(0), x, weight, mean, rstd, dx, np.int32(C)),
    )
    dw, db = _layer_norm_params(dy, x, mean, rstd)
    return dx, dw, db


def _layer_norm_params(dy: Any, x: Any, mean: Any, rstd: Any) -> tuple:
    """dweight, dbias (C,) float32 = sum_n dy xhat, sum_n dy; dy float32 or bfloat16."""
    cp = cuda.require()
    N, C = x.shape
    dw, db = cp.zeros(C, np.float32), cp.zeros(C, np.float32)
    rows, chunks = _chunks(N)
    name = "layer_norm_backward_params" + ("_bf16" if dy.dtype == BF16 else "")
    _launch(
        name,
        (math.ceil(C / 256), chunks),
        (256,),
        (_raw(dy), x, mean, rstd, dw, db, np.int32(N), np.int32(C), np.int32(rows)),
    )
    return dw, db


# ---- residual add + layer norm


def residual_layer_norm_forward(
    x: Any, r: Any, weight: Any, bias: Any | None, eps: float = 1e-5, out_dtype: Any = np.float32
) -> tuple:
    """h = x + r and y = layer_norm(h) weight + bias in one pass (one block per row).

    x (N, C) float32 (the residual stream); r (N, C) float32 or bfloat16 (a block's output
    under autocast); weight, bias (C,) float32 (bias may be None). Returns h (N, C) float32,
    y (N, C) in ``out_dtype`` (float32 or bfloat16, rounded to nearest even), mean (N,) and
    rstd (N,) float32; see ``reference.residual_layer_norm_forward``."""
    extra = {} if bias is None else {"bias": bias}
    name = "residual_layer_norm_forward"
    cp = _check(name, allow_bf16=("r",), x=x, r=r, weight=weight, **extra)
    _same_shape(name, x=x, r=r)
    out_dtype = np.dtype(out_dtype)
    if out_dtype not in (np.float32, BF16):
        raise TypeError(f"{name}: out_dtype must be float32 or bfloat16, got {out_dtype}")
    N, C = x.shape
    if weight.shape != (C,) or (bias is not None and bias.shape != (C,)):
        raise ValueError(f"{name}: weight and bias must have shape ({C},)")
    h, y = cp.empty_like(x), cp.empty((N, C), out_dtype)
    mean, rstd = cp.empty(N, np.float32), cp.empty(N, np.float32)
    if x.size == 0:  # no launch; the mean of no columns is NaN
        mean.fill(np.nan)
        rstd.fill(np.nan)
        return h, y, mean, rstd
    kernel = variant_name(name, _storage(r), _storage(y))
    args = (x, _raw(r), weight, bias if bias is not None else weight, np.int32(bias is not None))
    _launch(
        kernel,
        (N,),
        (_row_threads(C),),
        (*args, h, _raw(y), mean, rstd, np.int32(C), np.float32(eps)),
    )
    return h, y, mean, rstd


def residual_layer_norm_backward(
    dy: Any, dh: Any | None, h: Any, weight: Any, mean: Any, rstd: Any
) -> tuple:
    """The gradients of ``residual_layer_norm_forward``: dx = dh + d layer_norm / dh (dy),
    the gradient reaching x and r alike (h = x + r), dweight = sum_n dy xhat, dbias =
    sum_n dy.

    dy (N, C) float32 or bfloat16 (the gradient of y); dh (N, C) float32, the gradient
    reaching h by the residual path, or None for none; h (N, C), weight (C,), mean, rstd
    (N,) float32 as the forward returned them. Returns dx (N, C), dweight (C,), dbias (C,)
    float32; see ``reference.residual_layer_norm_backward``."""
    extra = {} if dh is None else {"dh": dh}
    name = "residual_layer_norm_backward"
    cp = _check(name, allow_bf16=("dy",), dy=dy, h=h, weight=weight, mean=mean, rstd=rstd, **extra)
    _same_shape(name, dy=dy, h=h, **extra)
    N, C = h.shape
    dx = cp.empty_like(h)
    if h.size == 0:
        return dx, cp.zeros(C, np.float32), cp.zeros(C, np.float32)
    _launch(
        variant_name("residual_layer_norm_backward_input", _storage(dy)),
        (N,),
        (_row_threads(C),),
        (
            _raw(dy), dh if dh is not None else h, np.int32(dh is not None), h, weight, mean,
            rstd, dx, np.int32(C),
        ),
    )  # fmt: skip
    dw, db = _layer_norm_params(dy, h, mean, rstd)
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


# ---- bias + GELU


def bias_gelu_forward(x: Any, bias: Any) -> Any:
    """y = gelu_tanh(x + bias), bias added along the last axis.

    x (..., C) float32 or bfloat16, bias (C,) float32 or bfloat16 -> y in x's dtype
    (float32 math; bfloat16 rounded to nearest even); see ``reference.bias_gelu_forward``."""
    name = "bias_gelu_forward"
    cp = _check(name, allow_bf16=("x", "bias"), x=x, bias=bias)
    C = x.shape[-1] if x.ndim else 1
    if bias.shape != (C,):
        raise ValueError(f"{name}: bias of shape {bias.shape} for x of shape {x.shape}")
    y = cp.empty_like(x)
    if x.size == 0:
        return y
    b = bias.astype(np.float32)  # C values: the kernel reads float32
    _launch(
        variant_name(name, _storage(x)),
        (_grid_for(x.size),),
        (256,),
        (_raw(x), b, _raw(y), np.int64(x.size), np.int32(C)),
    )
    return y


def bias_gelu_backward(dy: Any, x: Any, bias: Any) -> tuple:
    """The gradients of ``bias_gelu_forward``: dx = dy gelu_tanh'(x + bias) and dbias =
    sum of dx over all but the last axis.

    dy, x (..., C) float32 or bfloat16 (each either), bias (C,) float32 or bfloat16 ->
    dx (..., C) float32, dbias (C,) float32; see ``reference.bias_gelu_backward``."""
    name = "bias_gelu_backward"
    cp = _check(name, allow_bf16=("dy", "x", "bias"), dy=dy, x=x, bias=bias)
    _same_shape(name, dy=dy, x=x)
    C = x.shape[-1] if x.ndim else 1
    if bias.shape != (C,):
        raise ValueError(f"{name}: bias of shape {bias.shape} for x of shape {x.shape}")
    dx, db = cp.empty(x.shape, np.float32), cp.zeros(C, np.float32)
    if x.size == 0:
        return dx, db
    N = x.size // C
    rows, chunks = _chunks(N)
    _launch(
        variant_name(name, _storage(dy), _storage(x)),
        (math.ceil(C / 256), chunks),
        (256,),
        (_raw(dy), _raw(x), bias.astype(np.float32), dx, db, np.int32(N), np.int32(C),
         np.int32(rows)),
    )  # fmt: skip
    return dx, db


# ---- causal softmax and attention


def causal_softmax_forward(scores: Any, scale: float) -> Any:
    """scores (..., T, T) float32 or bfloat16 -> p in the same dtype (float32 math); see
    ``reference.causal_softmax_forward``."""
    name = "causal_softmax_forward"
    cp = _check(name, allow_bf16=("scores",), scores=scores)
    T = scores.shape[-1]
    p = cp.empty_like(scores)
    rows = scores.size // T if T else 0
    if rows == 0 or T == 0:
        return p
    _launch(
        name + ("_bf16" if scores.dtype == BF16 else ""),
        (rows,),
        (_row_threads(T),),
        (_raw(scores), _raw(p), np.int32(T), np.float32(scale)),
    )
    return p


def causal_softmax_backward(dp: Any, p: Any, scale: float) -> Any:
    """dp, p (..., T, T), both float32 or both bfloat16 -> ds in their dtype (float32 math);
    see ``reference.causal_softmax_backward``."""
    name = "causal_softmax_backward"
    cp = _check(name, allow_bf16=("dp", "p"), dp=dp, p=p)
    _same_shape(name, dp=dp, p=p)
    if dp.dtype != p.dtype:
        raise TypeError(f"{name}: dp is {dp.dtype} and p {p.dtype}: give both one dtype")
    T = p.shape[-1]
    ds = cp.empty_like(p)
    if p.size == 0:
        return ds
    _launch(
        name + ("_bf16" if p.dtype == BF16 else ""),
        (p.size // T,),
        (_row_threads(T),),
        (_raw(dp), _raw(p), _raw(ds), np.int32(T), np.float32(scale)),
    )
    return ds


def _square_scores(name: str, scores: Any) -> int:
    """T, for scores of shape (..., T, T)."""
    if scores.ndim < 2 or scores.shape[-2] != scores.shape[-1]:
        raise ValueError(f"{name}: scores must have shape (..., T, T), got {scores.shape}")
    return scores.shape[-1]


def causal_softmax_lse_forward(scores: Any, scale: float) -> tuple:
    """``causal_softmax_forward``'s p, and each row's log-sum-exp for a backward pass that
    recomputes p (``causal_softmax_recompute``) instead of keeping it.

    scores (..., T, T) float32 or bfloat16 -> p (..., T, T) in scores' dtype (float32 math,
    bfloat16 rounded to nearest even; 0 for j > i), lse (..., T) float32 with
    lse_i = log sum_{j <= i} exp(scale s_ij); see ``reference.causal_softmax_lse_forward``."""
    name = "causal_softmax_lse_forward"
    cp = _check(name, allow_bf16=("scores",), scores=scores)
    T = _square_scores(name, scores)
    p, lse = cp.empty_like(scores), cp.empty(scores.shape[:-1], np.float32)
    if scores.size == 0:
        return p, lse
    _launch(
        variant_name(name, _storage(scores)),
        (scores.size // T,),
        (_row_threads(T),),
        (_raw(scores), _raw(p), lse, np.int32(T), np.float32(scale)),
    )
    return p, lse


def causal_softmax_recompute(scores: Any, lse: Any, scale: float) -> Any:
    """p_ij = exp(scale s_ij - lse_i) for j <= i, 0 for j > i: the causal softmax of
    ``causal_softmax_lse_forward`` again, from its lse (no reduction over the row).

    scores (..., T, T) float32 or bfloat16, lse (..., T) float32 -> p in scores' dtype
    (float32 math, bfloat16 rounded to nearest even); see ``reference.causal_softmax_recompute``."""
    name = "causal_softmax_recompute"
    cp = _check(name, allow_bf16=("scores",), scores=scores, lse=lse)
    T = _square_scores(name, scores)
    if tuple(lse.shape) != tuple(scores.shape[:-1]):
        raise ValueError(f"{name}: lse of shape {lse.shape} for scores of shape {scores.shape}")
    p = cp.empty_like(scores)
    if scores.size == 0:
        return p
    _launch(
        variant_name(name, _storage(scores)),
        (scores.size // T,),
        (_row_threads(T),),
        (_raw(scores), lse, _raw(p), np.int32(T), np.float32(scale)),
    )
    return p


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


# ---- fused classifier


def fused_classifier(
    logits: Any,
    targets: Any,
    vocab_size: int,
    ignore_index: int = -1,
    scale: Any | None = None,
    out: Any | None = None,
) -> tuple:
    """Cross entropy's loss and its gradient in one kernel, one block per row (llm.c's
    fused_classifier): no float32 probabilities are stored.

    logits (N, Vp) float32 or bfloat16, of which the first ``vocab_size`` columns are real
    (Vp >= vocab_size: a padded vocabulary); targets (N,) int64; ``scale`` a (1,) float32
    device array read by the kernel (the loss's upstream gradient, e.g. 1 / the number of
    counted rows, computed on the device: no host sync), or None for 1. Returns

    - losses (N,) float32: lse - logit[target], lse over the first vocab_size columns; 0
      where the target is ``ignore_index``; NaN where it is outside [0, vocab_size) (checked
      on the device, not raised: that would cost a sync);
    - dlogits (N, Vp) in logits' dtype: scale (softmax - onehot(target)) in the first
      vocab_size columns, 0 in the padding and in ignored rows (NaN in the first vocab_size
      columns of a row whose target is out of range).

    dlogits is a new array, or ``out`` (same shape and dtype as logits); ``out=logits``
    writes the gradient over the logits (no second (N, Vp) buffer). See
    ``reference.fused_classifier``."""
    name = "fused_classifier"
    extra = {} if scale is None else {"scale": scale}
    cp = _check(name, allow_bf16=("logits",), logits=logits, targets=targets, **extra)
    N, Vp = logits.shape
    if not 0 < vocab_size <= Vp:
        raise ValueError(f"{name}: vocab_size {vocab_size} not in [1, {Vp}]")
    if targets.shape != (N,):
        raise ValueError(f"{name}: targets of shape {targets.shape} for {N} rows")
    if scale is not None and scale.size != 1:
        raise ValueError(f"{name}: scale must hold one value, got shape {scale.shape}")
    if out is None:
        out = cp.empty_like(logits)
    elif out is not logits:
        _check(name, allow_bf16=("out",), out=out)
        if out.shape != logits.shape or out.dtype != logits.dtype:
            raise ValueError(f"{name}: out must be {logits.dtype} of shape {logits.shape}")
    losses = cp.empty(N, np.float32)
    if N == 0:
        return losses, out
    _launch(
        variant_name(name, _storage(logits)),
        (N,),
        (_row_threads(Vp),),
        (_raw(logits), targets, scale if scale is not None else losses, np.int32(scale is not None),
         losses, _raw(out), np.int32(vocab_size), np.int32(Vp), np.int64(ignore_index)),
    )  # fmt: skip
    return losses, out


# ---- embedding backward


def embedding_backward(idx: Any, dout: Any, num_embeddings: int) -> Any:
    """idx (N,) int64, dout (N, C) float32 -> dweight (num_embeddings, C) float32, the
    scatter-add of dout's rows; an id outside [0, num_embeddings) is skipped (its row adds
    nowhere, nothing is written out of bounds), as ``reference.embedding_backward`` does."""
    cp = _check("embedding_backward", idx=idx, dout=dout)
    N, C = dout.shape
    dw = cp.zeros((num_embeddings, C), np.float32)
    if N * C == 0 or num_embeddings == 0:
        return dw
    _launch(
        "embedding_backward",
        (_grid_for(N * C),),
        (256,),
        (idx, dout, dw, np.int64(N), np.int32(C), np.int64(num_embeddings)),
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
    "NVRTC_OPTIONS", "adamw_flat", "attention_backward", "attention_forward", "bias_gelu_backward",
    "bias_gelu_forward", "causal_softmax_backward", "causal_softmax_forward",
    "causal_softmax_lse_forward", "causal_softmax_recompute", "compiled", "cross_entropy_backward",
    "cross_entropy_forward", "embedding_backward", "fused_classifier", "gelu_tanh_backward",
    "gelu_tanh_forward", "layer_norm_backward", "layer_norm_forward",
    "residual_layer_norm_backward", "residual_layer_norm_forward", "sum_squares",
]  # fmt: skip
