"""Reductions over axes: sum, mean, max, var.

Each backward re-inserts the reduced axes (size 1) into ``g`` so it broadcasts against the
input, then applies the reduction's derivative.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from handgrad import backend as B
from handgrad.function import Function


def norm_axes(dim: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    """``dim`` (None: all axes; negative counts from the end) as sorted non-negative axes;
    IndexError naming the dimension when one is out of range."""
    if dim is None:
        return tuple(range(ndim))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    out = []
    for d in dims:
        if not -max(ndim, 1) <= d < max(ndim, 1):
            raise IndexError(f"dimension {d} out of range for a tensor with {ndim} dimensions")
        out.append(d % max(ndim, 1))
    return tuple(sorted(set(out))) if ndim else ()


def _expand_reduced(g: Any, axes: tuple[int, ...], keepdim: bool) -> Any:
    """Re-insert the reduced axes (size 1) so ``g`` broadcasts against the input."""
    if not keepdim:
        xp = B.get_array_module(g)
        for ax in axes:
            g = xp.expand_dims(g, ax)
    return g


class Sum(Function):
    autocast = "float32"  # inside hg.autocast (handgrad.amp)

    # out = sum_i a_i  =>  da_i = g (broadcast back over the reduced axes)
    def forward(self, a, axes, keepdim):
        self.shape, self.axes, self.keepdim = a.shape, axes, keepdim
        return a.sum(axis=axes, keepdims=keepdim)

    def backward(self, g):
        g = _expand_reduced(g, self.axes, self.keepdim)
        return (B.get_array_module(g).broadcast_to(g, self.shape),)


class Mean(Function):
    # out = (1/n) sum_i a_i  =>  da_i = g / n
    def forward(self, a, axes, keepdim):
        self.shape, self.axes, self.keepdim = a.shape, axes, keepdim
        self.n = math.prod(a.shape[ax] for ax in axes)
        return a.mean(axis=axes, keepdims=keepdim)

    def backward(self, g):
        g = _expand_reduced(g, self.axes, self.keepdim)
        return (B.get_array_module(g).broadcast_to(g / self.n, self.shape),)


class Max(Function):
    # out = max_i a_i  =>  da_i = g * [a_i == out] / (number of maxima), so ties share g
    # (the subgradient torch uses for full reductions; for dim reductions torch picks one
    # index, which differs only when values tie exactly)
    def forward(self, a, axes, keepdim):
        self.shape, self.axes, self.keepdim = a.shape, axes, keepdim
        out = a.max(axis=axes, keepdims=True)
        self.mask = a == out
        return out if keepdim else out.squeeze(axis=axes)

    def backward(self, g):
        g = _expand_reduced(g, self.axes, self.keepdim)
        count = self.mask.sum(axis=self.axes, keepdims=True).astype(g.dtype)  # int would promote
        return (g * self.mask / count,)


class Var(Function):
    # out = sum_i (a_i - m)^2 / (n - c) with m the mean  =>  da_i = g * 2 (a_i - m) / (n - c)
    # (the m-dependence drops out because sum_i (a_i - m) = 0)
    def forward(self, a, axes, keepdim, correction):
        self.shape, self.axes, self.keepdim = a.shape, axes, keepdim
        n = math.prod(a.shape[ax] for ax in axes)
        self.denom = float(max(n - correction, 0))  # 0 gives nan/inf as in torch, not an error
        self.centered = a - a.mean(axis=axes, keepdims=True)
        with B.ignore_float_errors():
            out = (self.centered * self.centered).sum(axis=axes, keepdims=keepdim) / self.denom
        return out.astype(a.dtype, copy=False)

    def backward(self, g):
        g = _expand_reduced(g, self.axes, self.keepdim)
        with B.ignore_float_errors():
            return (g * self.centered * (2.0 / self.denom if self.denom else math.inf),)
