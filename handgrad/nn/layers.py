"""The layers GPT-2 needs, as ``Module`` s holding their parameters: ``Linear``, ``Embedding``,
``LayerNorm``, ``Dropout``, ``GELU``, plus ``RMSNorm`` (Llama's), ``ReLU`` and ``Tanh``. The
math lives in ``handgrad.nn.functional``; these classes only own weights and settings.
Shapes, defaults, initialisation and printed form follow ``torch.nn``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from handgrad import backend as B
from handgrad.creation import empty
from handgrad.nn import functional as F
from handgrad.nn import init
from handgrad.nn.module import Module, Parameter
from handgrad.tensor import Tensor


def _float_dtype(dtype: Any) -> Any:
    dtype = B.to_dtype(dtype) if dtype is not None else B.default_float
    if not B.is_floating(dtype):
        raise TypeError(f"parameters need a floating dtype, got {B.dtype_name(dtype)}")
    return dtype


class Linear(Module):
    """y = x W^T + b.

    Shapes: x (..., in_features) -> y (..., out_features); weight (out_features, in_features)
    and bias (out_features,), as torch. Init: W, b ~ U(-1/sqrt(in_features), 1/sqrt(in_features)).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, dtype: Any = None
    ) -> None:
        super().__init__()
        if in_features < 0 or out_features < 0:
            raise ValueError(f"Linear: sizes must be >= 0, got ({in_features}, {out_features})")
        self.in_features, self.out_features = in_features, out_features
        dtype = _float_dtype(dtype)
        self.weight = Parameter(empty(out_features, in_features, dtype=dtype))
        if bias:
            self.bias = Parameter(empty(out_features, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.linear_uniform_(self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}"
        )


class Embedding(Module):
    """A lookup table: idx (...) of ints in [0, num_embeddings) -> (..., embedding_dim).
    weight (num_embeddings, embedding_dim) ~ N(0, 1), as torch."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: Any = None) -> None:
        super().__init__()
        if num_embeddings <= 0 or embedding_dim <= 0:
            raise ValueError(
                f"Embedding: sizes must be > 0, got ({num_embeddings}, {embedding_dim})"
            )
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.weight = Parameter(empty(num_embeddings, embedding_dim, dtype=_float_dtype(dtype)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init.normal_(self.weight)

    def forward(self, idx: Tensor) -> Tensor:
        return F.embedding(idx, self.weight)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


class LayerNorm(Module):
    """Normalise over the last ``len(normalized_shape)`` dims, then scale and shift:
    y = (x - mean) / sqrt(var + eps) * weight + bias, with the biased variance.
    weight starts at 1, bias at 0."""

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
        self.normalized_shape = tuple(int(n) for n in shape)
        if eps < 0:
            raise ValueError(f"LayerNorm: eps must be >= 0, got {eps}")
        self.eps, self.elementwise_affine = eps, elementwise_affine
        dtype = _float_dtype(dtype)
        for name, wanted in (("weight", elementwise_affine), ("bias", elementwise_affine and bias)):
            param = Parameter(empty(self.normalized_shape, dtype=dtype)) if wanted else None
            self.register_parameter(name, param)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            init.ones_(self.weight)
        if self.bias is not None:
            init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}"
        )


class RMSNorm(Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last ``len(normalized_shape)`` dims
    (Llama's norm, torch's ``nn.RMSNorm``); weight starts at 1."""

    def __init__(
        self, normalized_shape: int | Sequence[int], eps: float = 1e-6, dtype: Any = None
    ) -> None:
        super().__init__()
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape
        self.normalized_shape = tuple(int(n) for n in shape)
        if eps < 0:
            raise ValueError(f"RMSNorm: eps must be >= 0, got {eps}")
        self.eps = eps
        self.weight = Parameter(empty(self.normalized_shape, dtype=_float_dtype(dtype)))
        init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}"


class Dropout(Module):
    """In training, zero each element with probability p and scale the rest by 1/(1-p);
    the identity in eval mode."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}, inplace=False"


class GELU(Module):
    """x * Phi(x) (``approximate='none'``) or GPT-2's tanh approximation
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (``approximate='tanh'``)."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(x, approximate=self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class ReLU(Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.relu()


class Tanh(Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.tanh()
