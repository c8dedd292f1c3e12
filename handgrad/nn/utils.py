"""Gradient utilities: ``clip_grad_norm_``, and ``checkpoint`` (activation recompute, as
``torch.utils.checkpoint``; ``nn/recompute.py``)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from handgrad import backend as B
from handgrad.backend import get_array_module
from handgrad.nn.recompute import checkpoint
from handgrad.tensor import Tensor

__all__ = ["checkpoint", "clip_grad_norm_"]


def _vector_norm(a: Any, norm_type: float) -> Any:
    """||a||_p over all elements, in a's dtype: (sum |a_i|^p)^(1/p); max |a_i| for p = inf."""
    xp = get_array_module(a)
    if a.size == 0:
        return a.dtype.type(0)
    if norm_type == math.inf:
        return xp.abs(a).max()
    if norm_type == 2.0:
        flat = a.reshape(-1)
        return xp.sqrt(xp.dot(flat, flat))  # one BLAS dot, no |a|^2 temporary
    if norm_type == 1.0:
        return xp.abs(a).sum()
    return (xp.abs(a) ** norm_type).sum() ** (1.0 / norm_type)


def _squared(g: Any, dtype: Any) -> Any:
    """sum g_i^2 of one gradient, a 0-d array of ``dtype`` (one BLAS dot)."""
    if g.size == 0:
        return get_array_module(g).zeros((), dtype=dtype)
    flat = g.reshape(-1)
    return get_array_module(g).dot(flat, flat).astype(dtype, copy=False)


def clip_grad_norm_(
    parameters: Tensor | Iterable[Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    error_if_nonfinite: bool = False,
) -> Tensor:
    """Rescale gradients so that their joint p-norm is at most ``max_norm``, as torch.

    total = || (||g_1||_p, ..., ||g_n||_p) ||_p over the parameters that have a grad,
    clip_coef = min(max_norm / (total + 1e-6), 1), and every grad is multiplied in place by
    clip_coef. Returns ``total`` (before clipping) as a 0-d Tensor in the grads' dtype; 0.0
    when no parameter has a gradient.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    params = list(parameters)
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"clip_grad_norm_: parameter {i} is a {type(p).__name__}, not a Tensor")
    norm_type = float(norm_type)
    if not norm_type > 0:
        raise ValueError(f"clip_grad_norm_: norm_type must be > 0 (or inf), got {norm_type}")
    max_norm = float(max_norm)
    grads = [p.grad.data for p in params if p.grad is not None]
    if not grads:
        return Tensor(0.0)
    xp = get_array_module(*grads)
    dtype = xp.result_type(*grads)
    on_host = B.is_numpy(xp)
    if norm_type == 2.0 and not on_host:
        # on a GPU one launch per gradient: total^2 = sum_i ||g_i||^2 (the squares are not
        # rooted one by one and squared again)
        squares = xp.stack([_squared(g, dtype) for g in grads])
        total = xp.sqrt(squares.sum())
    else:
        # stacked where the grads live (a list of device scalars must not go through the host)
        norms = xp.stack([xp.asarray(_vector_norm(g, norm_type), dtype=dtype) for g in grads])
        total = _vector_norm(norms, norm_type)
    if error_if_nonfinite and not math.isfinite(float(total)):
        raise RuntimeError(
            f"clip_grad_norm_: the total norm of order {norm_type} of the gradients is {total}; "
            "pass error_if_nonfinite=False to clip anyway"
        )
    clip_coef = dtype.type(max_norm) / (total + dtype.type(1e-6))
    if B.is_numpy(xp):
        if clip_coef < 1.0:
            for g in grads:
                g *= clip_coef.astype(g.dtype)
    else:
        # on a GPU, `clip_coef < 1` would wait for the device; multiplying by
        # min(clip_coef, 1) gives the same grads (x * 1 is exact) with no read
        coef = xp.minimum(clip_coef, dtype.type(1.0))
        for g in grads:
            g *= coef if g.dtype == coef.dtype else coef.astype(g.dtype)
    return Tensor._make(xp.asarray(total, dtype=dtype))
