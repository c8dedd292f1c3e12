"""``dropout``: zero elements at random in training, scaling the rest to keep the mean."""

from __future__ import annotations

from typing import Any

from handgrad import backend as B
from handgrad.function import Function
from handgrad.random import default_generator
from handgrad.tensor import Tensor


class _Dropout(Function):
    # y = x m / (1 - p), m ~ Bernoulli(1 - p)  =>  dx = g m / (1 - p)
    def forward(self, x, p, gen):
        self.scale = B.dropout_scale(gen, x.shape, p, like=x)
        return x * self.scale

    def backward(self, g):
        return (g * self.scale,)


def dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    generator: Any = None,
) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1/(1-p) (in training).

    The mask is drawn from ``generator`` (a ``numpy.random.Generator``; default: handgrad's
    global generator, seeded by ``handgrad.manual_seed``)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return input
    if p == 1.0:
        return input * 0.0
    return _Dropout.apply(input, p=p, gen=generator or default_generator())
