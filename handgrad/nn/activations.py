"""Activations: ``gelu`` (GPT-2's tanh form and the exact erf form) and ``swiglu`` (Llama's
gated unit) with hand-written backward, and ``relu``, ``tanh``, ``sigmoid`` as the Tensor
methods."""

from __future__ import annotations

import math

from handgrad import backend as B
from handgrad.backend import get_array_module
from handgrad.function import Function
from handgrad.kernels.dispatch import cuda_kernels, f32
from handgrad.nn import _threads
from handgrad.tensor import Tensor

_GELU_C = math.sqrt(2.0 / math.pi)


class _GeluTanh(Function):
    # y = x s,  s = (1 + tanh(u))/2 = sigmoid(2u),  u = c x (1 + a x^2),  c = sqrt(2/pi),
    # a = 0.044715. With tanh' = 1 - tanh^2 = 4 s (1 - s):
    #   dy/dx = s + x s'(x) = s + 2 s (1 - s) x c (1 + 3 a x^2)
    # Forward keeps x and s: backward is then 9 passes over the data and no tanh (recomputing
    # s would double it). Both passes run piece by piece on scratch buffers (few full-size
    # temporaries, data stays in cache) with the pieces shared over threads.
    # On a GPU with kernels on, each pass is one fused kernel that keeps only x (recomputing
    # tanh there is cheaper than a second full-size read).
    def forward(self, x):
        self.kernels = cuda_kernels(x) if x.dtype == B.float32 else None
        if self.kernels is not None:
            xc = f32(x)
            if self.needs_input_grad:
                self.x = xc
            return self.kernels.gelu_tanh_forward(xc)
        xp = get_array_module(x)
        x = xp.asarray(x, order="C")
        xf, y, sv = x.reshape(-1), xp.empty(x.shape, dtype=x.dtype), xp.empty(x.size, x.dtype)
        yf, dt = y.reshape(-1), x.dtype.type
        ac, c = dt(_GELU_C * 0.044715), dt(_GELU_C)

        def piece(sl):
            xs, s, ys = xf[sl], sv[sl], yf[sl]
            xp.multiply(xs, xs, out=s)
            s *= ac
            s += c
            s *= xs  # u
            xp.tanh(s, out=s)
            s += 1
            s *= 0.5  # s
            xp.multiply(xs, s, out=ys)

        _threads.map_items(xp, piece, _threads.chunks(xf.size), 0, 0, x.dtype, work=xf.size)
        if self.needs_input_grad:
            self.x, self.s = x, sv
        return y

    def backward(self, g):
        if self.kernels is not None:
            return (self.kernels.gelu_tanh_backward(f32(g), self.x),)
        xp = get_array_module(g)
        xf, sv, gf = self.x.reshape(-1), self.s, xp.asarray(g, order="C").reshape(-1)
        dx = xp.empty(self.x.shape, dtype=g.dtype)
        dxf, dt = dx.reshape(-1), xf.dtype.type
        ac6, c2 = dt(6 * 0.044715 * _GELU_C), dt(2 * _GELU_C)

        def piece(sl, w_buffer):
            xs, s, w, out = xf[sl], sv[sl], w_buffer[: sl.stop - sl.start], dxf[sl]
            xp.multiply(xs, xs, out=w)
            w *= ac6
            w += c2
            w *= xs  # 2 x c (1 + 3 a x^2)
            xp.subtract(1, s, out=out)
            w *= out
            w *= s
            w += s  # dy/dx
            xp.multiply(w, gf[sl], out=out)

        pieces, size = _threads.chunks(xf.size), _threads.ELEMENTWISE_CHUNK
        _threads.map_items(xp, piece, pieces, size, 1, xf.dtype, work=xf.size)
        return (dx,)


class _GeluErf(Function):
    # y = x Phi(x), Phi the standard normal CDF  =>  dy/dx = Phi(x) + x phi(x)
    # NumPy has no vectorised erf, so this exact form is slow; GPT-2 uses the tanh form.
    def forward(self, x):
        self.x = x
        self.cdf = (0.5 * (1.0 + B.erf(x / math.sqrt(2.0)))).astype(x.dtype)
        return x * self.cdf

    def backward(self, g):
        x = self.x
        pdf = get_array_module(x).exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return (g * (self.cdf + x * pdf),)


class _BiasGeluTanh(_GeluTanh):
    # y = gelu_tanh(x + b), b (C,) along the last axis:  dx = g gelu'(x + b);  db = sum of dx
    # over every axis but the last. A linear layer's bias folded into its GELU saves a pass
    # over the (B, T, 4C) activations. On a GPU with kernels one kernel per pass
    # (``bias_gelu_forward``/``_backward``) reads bfloat16 x as it is and writes y in x's
    # dtype; elsewhere x + b then the tanh GELU above, in float32 (y back in x's dtype).
    @classmethod
    def keeps_low_precision(cls, arrays):
        return arrays[0].dtype == B.bfloat16

    def forward(self, x, b):
        kernels = cuda_kernels(x, b, cast_16bit=True)
        self.bias_kernels = kernels
        if kernels is not None:
            if self.needs_input_grad:
                self.x, self.b = x, b
            return kernels.bias_gelu_forward(x, b)
        u = x.astype(B.float32) + b if x.dtype == B.bfloat16 else x + b
        y = super().forward(u.astype(B.compute_dtype(u.dtype), copy=False))
        return y.astype(x.dtype, copy=False)

    def backward(self, g):
        if self.bias_kernels is not None:
            return self.bias_kernels.bias_gelu_backward(g, self.x, self.b)
        (dx,) = super().backward(g.astype(self.x.dtype, copy=False))
        return dx, dx.reshape(-1, dx.shape[-1]).sum(axis=0)


def bias_gelu(input: Tensor, bias: Tensor) -> Tensor:
    """gelu(input + bias, approximate='tanh') as one op: input (..., C), bias (C,) -> (..., C)
    in input's dtype (bfloat16 stays bfloat16)."""
    if bias.shape != (input.shape[-1],):
        raise ValueError(
            f"bias_gelu: bias of shape {tuple(bias.shape)} for input of shape {tuple(input.shape)}"
        )
    return _BiasGeluTanh.apply(input, bias)


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """GELU. ``approximate='tanh'`` is GPT-2's form; ``'none'`` is the exact erf form."""
    if approximate == "tanh":
        return _GeluTanh.apply(input)
    if approximate == "none":
        return _GeluErf.apply(input)
    raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


class _SwiGLU(Function):
    # x = [a | b] along the last axis (n each), y = silu(a) b = a s b with s = sigmoid(a)
    # (Shazeer 2020). With s' = s (1 - s):
    #   da = g b s (1 + a (1 - s)),  db = g a s
    # Forward keeps only x; backward recomputes s (one tanh) rather than keep another array.
    def forward(self, x):
        xp = get_array_module(x)
        n = x.shape[-1] // 2
        self.x = x
        a, b = x[..., :n], x[..., n:]
        y = _sigmoid(xp, a)
        y *= a
        y *= b
        return y

    def backward(self, g):
        xp = get_array_module(g)
        n = self.x.shape[-1] // 2
        a, b = self.x[..., :n], self.x[..., n:]
        s = _sigmoid(xp, a)
        dx = xp.empty(self.x.shape, dtype=g.dtype)
        da, db = dx[..., :n], dx[..., n:]
        xp.multiply(a, s, out=db)  # silu(a)
        xp.subtract(a, db, out=da)  # a (1 - s)
        da += 1
        da *= s
        da *= b
        da *= g
        db *= g
        return (dx,)


def _sigmoid(xp, a):
    """1 / (1 + e^-a) in the overflow-free form 0.5 (1 + tanh(a / 2)), a new array."""
    s = a * a.dtype.type(0.5)
    xp.tanh(s, out=s)
    s += 1
    s *= 0.5
    return s


def swiglu(input: Tensor) -> Tensor:
    """SwiGLU's gate: input (..., 2n) holds [a | b] (Llama's gate and up projections side by
    side) -> silu(a) * b, (..., n)."""
    if input.ndim == 0 or input.shape[-1] % 2:
        raise ValueError(f"swiglu: the last axis must have an even size, got {input.shape}")
    return _SwiGLU.apply(input)


def relu(input: Tensor) -> Tensor:
    return input.relu()


def tanh(input: Tensor) -> Tensor:
    return input.tanh()


def sigmoid(input: Tensor) -> Tensor:
    return input.sigmoid()
