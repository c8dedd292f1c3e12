"""``layer_norm`` and ``rms_norm``: normalise over the trailing axes, then scale (and shift)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from handgrad import backend as B
from handgrad.backend import get_array_module
from handgrad.function import Function
from handgrad.kernels.dispatch import cuda_kernels, f32
from handgrad.nn import _threads
from handgrad.nn._threads import tile as _tile
from handgrad.tensor import Tensor


class _LayerNorm(Function):
    autocast = "float32"  # inside hg.autocast (handgrad.amp)

    # Over the last k axes (the normalised shape), with n elements each:
    #   mu = mean(x), rstd = 1/sqrt(var(x) + eps) (biased variance), xc = x - mu,
    #   xhat = xc rstd,  y = xhat w + b
    # Backward, with dxhat = g w:
    #   dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))
    #   dw = sum over leading axes of g xhat;  db = sum over leading axes of g
    # Like torch, only x (by reference), mu and rstd are kept; backward recomputes xc.
    # Written for NumPy: an op between a full array and a row or column vector costs ~2.5x
    # an op between two full arrays, and a sum along a short last axis more still, so the
    # sums are einsums (forward) or matrix-vector products (backward, one BLAS GEMV each)
    # and the per-row factors are folded together first. Per row i, with r = rstd_i and
    # t = g xc (so dxhat xhat = r t w):
    #   m1 = sum_j g w,  m2 = sum_j t w,  dw = sum_i r t
    #   dx = r (dxhat - (xc r^2 m2 / n + m1 / n))
    # (the difference is taken before scaling by r, as in the formula: when n = 1 it is
    # exactly 0, as torch's).
    # Rows are processed in cache-sized blocks shared over threads.
    # On a GPU with kernels on, one fused kernel per pass does it all (``_cuda_forward``).
    def forward(self, x, w=None, b=None, *, k, eps):
        self.shape, self.wshape = x.shape, x.shape[x.ndim - k :]
        n = math.prod(self.wshape)
        self.kernels = cuda_kernels(x, w, b)
        if self.kernels is not None:
            return self._cuda_forward(x, w, b, n, eps)
        xp = get_array_module(x)
        self.x = x2 = xp.asarray(x, order="C").reshape(-1, n)
        self.w = wf = None if w is None else w.reshape(n)
        bf = None if b is None else b.reshape(n)
        self.mu = xp.empty((x2.shape[0], 1), dtype=x.dtype)
        self.rstd = xp.empty_like(self.mu)
        y = xp.empty_like(x2)
        host = B.is_numpy(xp)

        def block(rows):
            xs, ys, mu, rstd = x2[rows], y[rows], self.mu[rows], self.rstd[rows]
            # an einsum, not a GEMV: BLAS may round a row's sum differently depending on how
            # many rows share the call, and a row's output must not depend on its batch
            if host:
                xp.einsum("ij->i", xs, out=mu[:, 0])
            else:  # CuPy's einsum takes no out=
                mu[:, 0] = xp.einsum("ij->i", xs)
            mu *= 1.0 / n
            xp.subtract(xs, mu, out=ys)  # xc
            if host:
                xp.einsum("ij,ij->i", ys, ys, out=rstd[:, 0])  # n var
            else:
                rstd[:, 0] = xp.einsum("ij,ij->i", ys, ys)
            rstd *= 1.0 / n
            rstd += eps
            xp.sqrt(rstd, out=rstd)
            xp.reciprocal(rstd, out=rstd)
            ys *= rstd
            if wf is not None:
                ys *= wf
            if bf is not None:
                ys += bf

        _threads.map_items(xp, block, self._blocks(n), 0, 0, x.dtype, work=x.size)
        return y.reshape(x.shape)

    def _cuda_forward(self, x, w, b, n, eps):
        """x (..., *wshape) seen as (N, n): one block per row computes mu, rstd and y
        (``handgrad.kernels.cuda.layer_norm_forward``)."""
        self.x = f32(x).reshape(-1, n)
        self.w = get_array_module(x).ones(n, dtype=x.dtype) if w is None else f32(w).reshape(n)
        bf = None if b is None else f32(b).reshape(n)
        y, self.mu, self.rstd = self.kernels.layer_norm_forward(self.x, self.w, bf, eps)
        return y.reshape(self.shape)

    def _cuda_backward(self, g):
        """dx, dw, db from one row kernel and one column kernel."""
        g2 = f32(g).reshape(self.x.shape)
        dx, dw, db = self.kernels.layer_norm_backward(g2, self.x, self.w, self.mu, self.rstd)
        wants = self.needs_input_grad
        grads = [dx.reshape(self.shape) if wants[0] else None]
        for i, d in ((1, dw), (2, db)):
            if len(wants) > i:
                grads.append(d.reshape(self.wshape) if wants[i] else None)
        return tuple(grads)

    def _blocks(self, n: int) -> list[slice]:
        rows, step = self.x.shape[0], max(1, _threads.ELEMENTWISE_CHUNK // max(n, 1))
        return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]

    def backward(self, g):
        if self.kernels is not None:
            return self._cuda_backward(g)
        x, n = self.x, self.x.shape[1]
        xp = get_array_module(g)
        w = xp.ones(n, dtype=g.dtype) if self.w is None else self.w
        g2 = xp.asarray(g, order="C").reshape(x.shape)
        blocks = self._blocks(n)
        dx = xp.empty_like(x) if self.needs_input_grad[0] else None
        want_dw = len(self.needs_input_grad) > 1 and self.needs_input_grad[1]
        dw_parts = xp.empty((len(blocks), n), dtype=g.dtype) if want_dw else None

        def block(i, xc, t):
            rows = blocks[i]
            gs, r = g2[rows], self.rstd[rows]
            xc, t = _tile(xc, *gs.shape), _tile(t, *gs.shape)
            xp.subtract(x[rows], self.mu[rows], out=xc)
            xp.multiply(gs, xc, out=t)
            if want_dw:
                xp.matmul(r[:, 0], t, out=dw_parts[i])
            if dx is None:
                return
            m2 = t @ w
            m1 = gs @ w
            m2 *= r[:, 0] ** 2 * (1.0 / n)  # r^2 m2 / n
            m1 *= 1.0 / n
            out = dx[rows]
            xp.multiply(gs, w, out=out)  # dxhat
            xc *= m2[:, None]
            xc += m1[:, None]
            out -= xc
            out *= r

        size = (blocks[0].stop - blocks[0].start) * n if blocks else 0
        _threads.map_items(xp, block, range(len(blocks)), size, 2, g.dtype, work=g.size)
        grads = [None if dx is None else dx.reshape(self.shape)]
        if len(self.needs_input_grad) > 1:
            dw = None
            if want_dw:
                dw = dw_parts[0] if len(blocks) == 1 else dw_parts.sum(axis=0)
                dw = dw.reshape(self.wshape)
            grads.append(dw)
        if len(self.needs_input_grad) > 2:
            ones = xp.ones(g2.shape[0], dtype=g.dtype)
            db = (ones @ g2).reshape(self.wshape) if self.needs_input_grad[2] else None
            grads.append(db)
        return tuple(grads)


class _ResidualLayerNorm(Function):
    autocast = "float32"  # inside hg.autocast (handgrad.amp)

    # Two outputs: the residual stream h = x + r and its norm y = layer_norm(h) w + b.
    #   dh_total = dh + d layer_norm / dh (dy);  dx = dr = dh_total;  dw, db: layer norm's
    # (dh: the gradient reaching h past the norm). On a GPU with kernels on, one kernel per
    # pass (``residual_layer_norm_forward``/``_backward``) reads a bfloat16 r as it is;
    # elsewhere the sum, then layer norm's own forward and backward (``_LayerNorm``).
    @classmethod
    def keeps_low_precision(cls, arrays):
        return cls._kernels(*arrays) is not None

    @staticmethod
    def _kernels(x, r, w=None, b=None):
        floats = [a for a in (x, w, b) if a is not None]
        if r.dtype not in (B.float32, B.bfloat16) or any(a.dtype != B.float32 for a in floats):
            return None
        return cuda_kernels(x, r, w, b, cast_16bit=True)

    def forward(self, x, r, w=None, b=None, *, eps):
        self.kernels = self._kernels(x, r, w, b)
        self.shape, C = x.shape, x.shape[-1]
        if self.kernels is None:
            h = x + r
            self.ln = _LayerNorm()
            self.ln.needs_input_grad = (True,) * (1 + (w is not None) + (b is not None))
            return h, self.ln.forward(h, *(a for a in (w, b) if a is not None), k=1, eps=eps)
        xp = get_array_module(x)
        self.w = xp.ones(C, dtype=B.float32) if w is None else w
        rc = xp.ascontiguousarray(r).reshape(-1, C)
        h, y, self.mu, self.rstd = self.kernels.residual_layer_norm_forward(
            f32(x).reshape(-1, C), rc, self.w, b, eps
        )
        self.h = h
        return h.reshape(self.shape), y.reshape(self.shape)

    def backward(self, g):
        dh, dy = g
        wants = self.needs_input_grad
        dw = db = None
        if dy is None:  # the norm went unused: h's gradient is all there is
            dx = dh
        elif self.kernels is not None:
            C = self.shape[-1]
            dy2 = get_array_module(dy).ascontiguousarray(dy).reshape(-1, C)
            dh2 = None if dh is None else f32(dh).reshape(-1, C)
            dx, dw, db = self.kernels.residual_layer_norm_backward(
                dy2, dh2, self.h, self.w, self.mu, self.rstd
            )
            dx = dx.reshape(self.shape)
        else:
            dx, *params = self.ln.backward(dy)
            dw, db = (params + [None, None])[:2]
            if dh is not None:
                dx += dh
        return (dx, dx, dw, db)[: len(wants)]


def residual_layer_norm(
    input: Tensor,
    residual: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """(h, layer_norm(h)) with h = input + residual, in one op: input, residual (..., C);
    weight, bias (C,). A pre-norm transformer adds a sub-layer's output to its residual
    stream and normalises the sum for the next sub-layer: one pass over the data, not two."""
    C = input.shape[-1]
    if tuple(residual.shape) != tuple(input.shape):
        raise ValueError(
            f"residual_layer_norm: residual of shape {residual.shape} for input {input.shape}"
        )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (C,):
            raise ValueError(f"residual_layer_norm: {name} has shape {p.shape}, expected ({C},)")
    if weight is None and bias is not None:
        raise ValueError("residual_layer_norm: a bias without a weight is not supported")
    args = [a for a in (weight, bias) if a is not None]
    return _ResidualLayerNorm.apply(input, residual, *args, eps=eps)


def layer_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Normalise over the trailing ``normalized_shape`` axes; input (..., *normalized_shape)."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if tuple(input.shape[input.ndim - len(shape) :]) != shape:
        raise ValueError(
            f"layer_norm: input shape {input.shape} does not end with normalized_shape {shape}"
        )
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != shape:
            raise ValueError(f"layer_norm: {name} has shape {p.shape}, expected {shape}")
    if weight is None and bias is not None:
        raise ValueError("layer_norm: a bias without a weight is not supported")
    args = [a for a in (weight, bias) if a is not None]
    return _LayerNorm.apply(input, *args, k=len(shape), eps=eps)


class _RMSNorm(Function):
    autocast = "float32"  # inside hg.autocast (handgrad.amp)

    # Over the last k axes (n elements each), with no mean subtracted (Zhang & Sennrich 2019):
    #   rstd = 1/sqrt(mean(x^2) + eps),  xhat = x rstd,  y = xhat w
    # Backward, with dxhat = g w and d rstd / dx_j = -rstd^3 x_j / n:
    #   dx = rstd (dxhat - xhat mean(dxhat xhat))
    #   dw = sum over leading axes of g xhat
    # Only x (by reference) and rstd are kept; backward recomputes xhat.
    def forward(self, x, w=None, *, k, eps):
        xp = get_array_module(x)
        self.shape, self.wshape = x.shape, x.shape[x.ndim - k :]
        n = math.prod(self.wshape)
        self.x = x2 = xp.asarray(x, order="C").reshape(-1, n)
        self.w = None if w is None else w.reshape(n)
        rstd = xp.einsum("ij,ij->i", x2, x2)[:, None]  # n mean(x^2), one row each
        rstd *= 1.0 / n
        rstd += eps
        xp.sqrt(rstd, out=rstd)
        xp.reciprocal(rstd, out=rstd)
        self.rstd = rstd
        y = x2 * rstd
        if self.w is not None:
            y *= self.w
        return y.reshape(x.shape)

    def backward(self, g):
        xp = get_array_module(g)
        x, rstd, n = self.x, self.rstd, self.x.shape[1]
        g2 = xp.asarray(g, order="C").reshape(x.shape)
        xhat = x * rstd
        dxhat = g2 if self.w is None else g2 * self.w
        grads = [None]
        if self.needs_input_grad[0]:
            m = xp.einsum("ij,ij->i", dxhat, xhat)[:, None]  # n mean(dxhat xhat)
            m *= 1.0 / n
            dx = xhat * m
            xp.subtract(dxhat, dx, out=dx)
            dx *= rstd
            grads[0] = dx.reshape(self.shape)
        if len(self.needs_input_grad) > 1:
            dw = None
            if self.needs_input_grad[1]:
                dw = xp.einsum("ij,ij->j", g2, xhat).reshape(self.wshape)
            grads.append(dw)
        return tuple(grads)


def rms_norm(
    input: Tensor,
    normalized_shape: int | Sequence[int],
    weight: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor:
    """Root-mean-square normalisation over the trailing ``normalized_shape`` axes (as
    ``torch.nn.functional.rms_norm``, Llama's norm): x / sqrt(mean(x^2) + eps) * weight."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if tuple(input.shape[input.ndim - len(shape) :]) != shape:
        raise ValueError(
            f"rms_norm: input shape {input.shape} does not end with normalized_shape {shape}"
        )
    if weight is not None and tuple(weight.shape) != shape:
        raise ValueError(f"rms_norm: weight has shape {weight.shape}, expected {shape}")
    args = [] if weight is None else [weight]
    return _RMSNorm.apply(input, *args, k=len(shape), eps=eps)
