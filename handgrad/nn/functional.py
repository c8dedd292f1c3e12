"""``handgrad.nn.functional`` (import it as ``F``): the layers of a GPT as functions.

Each op is one graph node with a forward and a backward written by hand, so that a layer
costs one pass over its data instead of the many temporaries that composing it from primitive
ops would create. Names and arguments follow ``torch.nn.functional``. The ops live in one
module per concept and are gathered here:

==========================  ===============================================================
``handgrad.nn.linear``      ``linear``, ``embedding``
``handgrad.nn.activations`` ``gelu``, ``bias_gelu``, ``swiglu``, ``relu``, ``tanh``, ``sigmoid``
``handgrad.nn.dropout``     ``dropout``
``handgrad.nn.normalization`` ``layer_norm``, ``residual_layer_norm``, ``rms_norm``
``handgrad.nn.rotary``      ``rotary_embedding`` (RoPE), ``rope_tables``
``handgrad.nn.losses``      ``cross_entropy``, ``mse_loss``, ``one_hot``
``handgrad.nn.attention``   ``scaled_dot_product_attention`` (and its reference)
==========================  ===============================================================

Notation in the derivations: ``g = dL/dy`` is the gradient of the output; sums run over
the normalised (last) axis unless said otherwise.
"""

from __future__ import annotations

from handgrad.nn.activations import bias_gelu, gelu, relu, sigmoid, swiglu, tanh
from handgrad.nn.attention import scaled_dot_product_attention
from handgrad.nn.dropout import dropout
from handgrad.nn.linear import embedding, linear
from handgrad.nn.losses import cross_entropy, mse_loss, one_hot
from handgrad.nn.normalization import layer_norm, residual_layer_norm, rms_norm
from handgrad.nn.rotary import rope_tables, rotary_embedding
from handgrad.ops.softmax import LogSoftmax as _LogSoftmax
from handgrad.ops.softmax import Softmax as _Softmax
from handgrad.tensor import Tensor

# ----------------------------------------------------------------------------------------
# softmax


def softmax(input: Tensor, dim: int = -1) -> Tensor:
    return _Softmax.apply(input, dim=dim)


def log_softmax(input: Tensor, dim: int = -1) -> Tensor:
    return _LogSoftmax.apply(input, dim=dim)


__all__ = [
    "bias_gelu",
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
    "residual_layer_norm",
    "rms_norm",
    "rope_tables",
    "rotary_embedding",
    "scaled_dot_product_attention",
    "sigmoid",
    "softmax",
    "swiglu",
    "tanh",
]
