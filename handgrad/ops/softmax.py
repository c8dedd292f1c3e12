"""Softmax and log-softmax along one axis, computed stably (the row maximum subtracted)."""

from __future__ import annotations

from handgrad import backend as B
from handgrad.function import Function


class Softmax(Function):
    autocast = "float32"  # inside hg.autocast (handgrad.amp)

    # y = e^(x - max) / sum e^(x - max)  =>  dx = y (g - sum(g y))
    def forward(self, x, dim):
        self.dim = dim
        e = B.get_array_module(x).exp(x - x.max(axis=dim, keepdims=True))
        e /= e.sum(axis=dim, keepdims=True)
        self.y = e
        return e

    def backward(self, g):
        y = self.y
        return (y * (g - (g * y).sum(axis=self.dim, keepdims=True)),)


class LogSoftmax(Function):
    autocast = "float32"  # inside hg.autocast (handgrad.amp)

    # y = x - logsumexp(x)  =>  dx = g - softmax(x) sum(g)
    def forward(self, x, dim):
        self.dim = dim
        xp = B.get_array_module(x)
        shifted = x - x.max(axis=dim, keepdims=True)
        y = shifted - xp.log(xp.exp(shifted).sum(axis=dim, keepdims=True))
        self.y = y
        return y

    def backward(self, g):
        return (g - B.get_array_module(g).exp(self.y) * g.sum(axis=self.dim, keepdims=True),)
