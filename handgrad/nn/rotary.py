"""Rotary position embeddings (RoPE, Su et al. 2021), in the rotate-half convention of
Llama and Hugging Face's ``LlamaForCausalLM``.

A query or key x (..., T, D) at position t is split into halves x1 = x[..., :D/2] and
x2 = x[..., D/2:]; pair i (x1_i, x2_i) is rotated by the angle t * theta^(-2i/D):

    y1 = x1 cos - x2 sin,   y2 = x2 cos + x1 sin

which is HF's ``x * cos + rotate_half(x) * sin`` with its (T, D) tables cat(cos, cos) and
cat(sin, sin). The dot product of a rotated query and key then depends on their positions
only through the difference, and no position embedding is added to the residual stream.
"""

from __future__ import annotations

from typing import Any

from handgrad import backend as B
from handgrad.backend import get_array_module
from handgrad.function import Function
from handgrad.tensor import Tensor


def rope_tables(head_dim: int, length: int, theta: float = 10000.0) -> tuple[Any, Any]:
    """cos and sin of the angles t * theta^(-2i/D) for t < ``length``, i < D/2: two host
    (length, D/2) float32 arrays (computed in float64)."""
    if head_dim % 2:
        raise ValueError(f"rope_tables: head_dim must be even, got {head_dim}")
    xp = get_array_module()
    inv_freq = 1.0 / theta ** (xp.arange(0, head_dim, 2, dtype=B.float64) / head_dim)
    angles = xp.arange(length, dtype=B.float64)[:, None] * inv_freq[None, :]
    return xp.cos(angles).astype(B.float32), xp.sin(angles).astype(B.float32)


class _Rotary(Function):
    # Forward rotates each pair by +angle (see the module docstring). A rotation is
    # orthogonal, so its adjoint is its inverse, the rotation by -angle:
    #   dx1 = g1 cos + g2 sin,   dx2 = g2 cos - g1 sin
    # cos and sin are constants (no gradient).
    def forward(self, x, *, cos, sin):
        self.cos, self.sin = cos.astype(x.dtype, copy=False), sin.astype(x.dtype, copy=False)
        return self._rotate(x, self.sin)

    def _rotate(self, x, sin):
        xp = get_array_module(x)
        n = x.shape[-1] // 2
        x1, x2 = x[..., :n], x[..., n:]
        y = xp.empty(x.shape, dtype=x.dtype)
        y1, y2 = y[..., :n], y[..., n:]
        xp.multiply(x1, self.cos, out=y1)
        y1 -= x2 * sin
        xp.multiply(x2, self.cos, out=y2)
        y2 += x1 * sin
        return y

    def backward(self, g):
        return (self._rotate(g, -self.sin),)


def rotary_embedding(input: Tensor, cos: Any, sin: Any) -> Tensor:
    """Rotate ``input`` (..., T, D) by the angles whose cos and sin are (T, D/2) (arrays or
    Tensors on the input's device, e.g. rows start..start+T of ``rope_tables``)."""
    cos = cos.data if isinstance(cos, Tensor) else cos
    sin = sin.data if isinstance(sin, Tensor) else sin
    T, D = input.shape[-2:] if input.ndim >= 2 else (None, None)
    if D is None or D % 2 or tuple(cos.shape) != (T, D // 2) or cos.shape != sin.shape:
        raise ValueError(
            f"rotary_embedding: input (..., T, D) with D even and cos, sin (T, D/2); got "
            f"input {tuple(input.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)}"
        )
    return _Rotary.apply(input, cos=cos, sin=sin)
