"""Neural network building blocks, mirroring ``torch.nn``.

``Module``/``Parameter`` and containers live in ``module``, layers in ``layers``, the math
in ``functional`` (``from handgrad.nn import functional as F``), initialisers in ``init``,
and ``clip_grad_norm_`` in ``utils``.
"""

from handgrad.nn import functional, init, utils
from handgrad.nn.layers import (
    GELU,
    Dropout,
    Embedding,
    LayerNorm,
    Linear,
    ReLU,
    RMSNorm,
    Tanh,
)
from handgrad.nn.module import Module, ModuleDict, ModuleList, Parameter, Sequential

__all__ = [
    "GELU",
    "Dropout",
    "Embedding",
    "LayerNorm",
    "Linear",
    "Module",
    "ModuleDict",
    "ModuleList",
    "Parameter",
    "ReLU",
    "RMSNorm",
    "Sequential",
    "Tanh",
    "functional",
    "init",
    "utils",
]
