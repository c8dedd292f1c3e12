"""``handgrad.nn.functional`` (import it as ``F``): the layers of a GPT as functions.

Each op is one graph node with a forward and a backward written by hand, so that a layer
costs one pass over its data instead of the many temporaries that composing it from primitive
ops would create. Names and arguments follow ``torch.nn.functional``. The ops live in one
module per concept and are gathered here:

==========================  ===============================================================
``handgrad.nn.linear``      ``linear``, ``embedding``
``handgrad.nn.activations`` ``gelu``, ``relu``, ``tanh``, ``sigmoid``
``handgrad.nn.dropout``     ``dropout``
``handgrad.nn.normalization`` ``layer_norm``
``handgrad.nn.losses``      ``cross_entropy``, ``mse_loss``, ``one_hot``
``handgrad.nn.attention``   ``scaled_dot_product_attention`` (and its reference)
==========================  ===============================================================

Notation in the derivations: ``g = dL/dy`` is the gradient of the output; sums run over
the normalised (last) axis unless said otherwise.
"""

from __future__ import annotations

from handgrad.backend import xp  # for _Softmax and _LogSoftmax only
from handgrad.nn.activations import gelu, relu, sigmoid, tanh
from handgrad.nn.attention import scaled_dot_product_attention
from handgrad.nn.dropout import dropout
from handgrad.nn.linear import embedding, linear
from handgrad.nn.losses import cross_entropy, mse_loss, one_hot
from handgrad.nn.normalization import layer_norm
from handgrad.tensor import Function, Tensor

# ----------------------------------------------------------------------------------------
# softmax


class _Softmax(Function):
    # y = e^(x - max) / sum e^(x - max)  =>  dx = y (g - sum(g y))
    def forward(self, x, dim):
        self.dim = dim
        e = xp.exp(x - x.max(axis=dim, keepdims=True))
        e /= e.sum(axis=dim, keepdims=True)
        self.y = e
        return e

    def backward(self, g):
        y = self.y
        return (y * (g - (g * y).sum(axis=self.dim, keepdims=True)),)


class _LogSoftmax(Function):
    # y = x - logsumexp(x)  =>  dx = g - softmax(x) sum(g)
    def forward(self, x, dim):
        self.dim = dim
        shifted = x - x.max(axis=dim, keepdims=True)
        y = shifted - xp.log(xp.exp(shifted).sum(axis=dim, keepdims=True))
        self.y = y
        return y

    def backward(self, g):
        return (g - xp.exp(self.y) * g.sum(axis=self.dim, keepdims=True),)


def softmax(input: Tensor, dim: int = -1) -> Tensor:
    return _Softmax.apply(input, dim=dim)


def log_softmax(input: Tensor, dim: int = -1) -> Tensor:
    return _LogSoftmax.apply(input, dim=dim)


__all__ = [
    "cross_entropy",
    "dropout",
    "embedding",
    "gelu",
    "layer_norm",
    "linear",
    "log_softmax",
    "mse_loss",
    "one_hot",
    "relu",
    "scaled_dot_product_attention",
    "sigmoid",
    "softmax",
    "tanh",
]
