"""In-place initialisers, as ``torch.nn.init``: they overwrite ``t.data`` with draws from the
global generator (so ``handgrad.manual_seed`` makes them reproducible) and record no graph.

Samples are drawn in float32 (float64 for float64 tensors) and cast to the tensor's dtype.
"""

from __future__ import annotations

import math
from typing import Any

from handgrad import backend as B
from handgrad.random import default_generator
from handgrad.tensor import Tensor


def _check(t: Tensor, fn: str) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"init.{fn}: expected a Tensor, got {type(t).__name__}")


def _draw_dtype(t: Tensor) -> Any:
    return B.float64 if t.dtype == B.float64 else B.float32


def normal_(t: Tensor, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """Fill ``t`` with samples of N(mean, std^2)."""
    _check(t, "normal_")
    if std < 0:
        raise ValueError(f"init.normal_: std must be >= 0, got {std}")
    sample = default_generator().standard_normal(t.shape, dtype=_draw_dtype(t))
    sample *= std
    sample += mean
    t.data[...] = B.from_host(sample, like=t.data).astype(t.dtype, copy=False)
    return t


def uniform_(t: Tensor, a: float = 0.0, b: float = 1.0) -> Tensor:
    """Fill ``t`` with samples of U(a, b)."""
    _check(t, "uniform_")
    if not a <= b:
        raise ValueError(f"init.uniform_: need a <= b, got a={a}, b={b}")
    sample = default_generator().random(t.shape, dtype=_draw_dtype(t))
    sample *= b - a
    sample += a
    t.data[...] = B.from_host(sample, like=t.data).astype(t.dtype, copy=False)
    return t


def constant_(t: Tensor, value: float) -> Tensor:
    _check(t, "constant_")
    t.data[...] = value
    return t


def zeros_(t: Tensor) -> Tensor:
    return constant_(t, 0.0)


def ones_(t: Tensor) -> Tensor:
    return constant_(t, 1.0)


def linear_uniform_(weight: Tensor, bias: Tensor | None = None) -> None:
    """torch's default ``nn.Linear`` init: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    (torch writes it as kaiming_uniform_ with a = sqrt(5): gain = sqrt(2 / (1 + a^2)) =
    sqrt(1/3), bound = gain * sqrt(3 / fan_in) = 1/sqrt(fan_in).)
    """
    fan_in = weight.shape[1] if weight.ndim > 1 else weight.shape[0]
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    uniform_(weight, -bound, bound)
    if bias is not None:
        uniform_(bias, -bound, bound)
