"""``handgrad.nn.functional`` (import it as ``F``): the layers of a GPT as functions.

Each op here is one graph node with a forward and a backward written by hand, so that a
layer costs one pass over its data instead of the many temporaries that composing it from
primitive ops would create. Names and arguments follow ``torch.nn.functional``.

Notation in the derivations: ``g = dL/dy`` is the gradient of the output; sums run over
the normalised (last) axis unless said otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from handgrad import backend as B
from handgrad.backend import xp
from handgrad.tensor import Function, Tensor, default_generator

# ----------------------------------------------------------------------------------------
# linear and embedding


class _Linear(Function):
    # y = x W^T + b with x: (..., in), W: (out, in), b: (out,)
    # dx = g W;  dW = g^T x (summed over all leading dims);  db = sum of g over leading dims.
    # The leading dims are folded into one so each product is a single GEMM.
    def forward(self, x, w, b=None):
        if x.shape[-1] != w.shape[1]:
            raise ValueError(
                f"linear: input has {x.shape[-1]} features (shape {x.shape}) but weight "
                f"expects {w.shape[1]} (shape {w.shape})"
            )
        self.x, self.w = x, w
        y = x @ w.T
        if b is not None:
            y += b
        return y

    def backward(self, g):
        x, w = self.x, self.w
        g2 = g.reshape(-1, g.shape[-1])
        dx = (g @ w) if self.needs_input_grad[0] else None
        dw = (g2.T @ x.reshape(-1, x.shape[-1])) if self.needs_input_grad[1] else None
        if len(self.needs_input_grad) == 3:
            db = g2.sum(axis=0) if self.needs_input_grad[2] else None
            return dx, dw, db
        return dx, dw


def linear(input: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = input @ weight.T + bias.  input (..., in), weight (out, in), bias (out,) -> (..., out)."""
    if bias is None:
        return _Linear.apply(input, weight)
    return _Linear.apply(input, weight, bias)


class _Embedding(Function):
    # y[i] = W[idx[i]] (a gather)  =>  dW[j] = sum of g[i] over all i with idx[i] == j
    # (its adjoint is a scatter-add; np.add.at accumulates repeated indices correctly)
    def forward(self, idx, w):
        if idx.dtype.kind not in "iu":
            raise TypeError(f"embedding: indices must be integers, got {idx.dtype}")
        if idx.size and (idx.min() < 0 or idx.max() >= w.shape[0]):
            bad = int(idx.max() if idx.max() >= w.shape[0] else idx.min())
            raise IndexError(f"embedding: index {bad} out of range for {w.shape[0]} embeddings")
        self.idx, self.wshape = idx, w.shape
        return w[idx]

    def backward(self, g):
        dw = xp.zeros(self.wshape, dtype=g.dtype)
        xp.add.at(dw, self.idx.reshape(-1), g.reshape(-1, self.wshape[1]))
        return None, dw


def embedding(input: Tensor, weight: Tensor) -> Tensor:
    """Rows of ``weight`` (num, dim) picked by integer ``input`` (...) -> (..., dim)."""
    return _Embedding.apply(input, weight)


# ----------------------------------------------------------------------------------------
# activations


_GELU_C = math.sqrt(2.0 / math.pi)


class _GeluTanh(Function):
    # y = x/2 (1 + tanh(u)),  u = c (x + 0.044715 x^3),  c = sqrt(2/pi)
    # dy/dx = (1 + t)/2 + x/2 (1 - t^2) c (1 + 3 * 0.044715 x^2),  t = tanh(u)
    def forward(self, x):
        self.x = x
        self.t = xp.tanh(_GELU_C * (x + 0.044715 * x * x * x))
        return 0.5 * x * (1.0 + self.t)

    def backward(self, g):
        x, t = self.x, self.t
        dudx = _GELU_C * (1.0 + 3 * 0.044715 * x * x)
        return (g * (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * dudx),)


_erf = np.vectorize(math.erf, otypes=[np.float64])


class _GeluErf(Function):
    # y = x Phi(x), Phi the standard normal CDF  =>  dy/dx = Phi(x) + x phi(x)
    # NumPy has no vectorised erf, so this exact form is slow; GPT-2 uses the tanh form.
    def forward(self, x):
        self.x = x
        self.cdf = (0.5 * (1.0 + _erf(x / math.sqrt(2.0)))).astype(x.dtype)
        return x * self.cdf

    def backward(self, g):
        x = self.x
        pdf = xp.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return (g * (self.cdf + x * pdf),)


def gelu(input: Tensor, approximate: str = "none") -> Tensor:
    """GELU. ``approximate='tanh'`` is GPT-2's form; ``'none'`` is the exact erf form."""
    if approximate == "tanh":
        return _GeluTanh.apply(input)
    if approximate == "none":
        return _GeluErf.apply(input)
    raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")


def relu(input: Tensor) -> Tensor:
    return input.relu()


def tanh(input: Tensor) -> Tensor:
    return input.tanh()


def sigmoid(input: Tensor) -> Tensor:
    return input.sigmoid()


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


# ----------------------------------------------------------------------------------------
# dropout


class _Dropout(Function):
    # y = x m / (1 - p), m ~ Bernoulli(1 - p)  =>  dx = g m / (1 - p)
    def forward(self, x, p, gen):
        keep = gen.random(x.shape, dtype=np.float32) >= p
        self.scale = (keep / (1.0 - p)).astype(x.dtype)
        return x * self.scale

    def backward(self, g):
        return (g * self.scale,)


def dropout(
    input: Tensor,
    p: float = 0.5,
    training: bool = True,
    generator: np.random.Generator | None = None,
) -> Tensor:
    """Zero each element with probability ``p`` and scale the rest by 1/(1-p) (in training)."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: probability must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return input
    if p == 1.0:
        return input * 0.0
    return _Dropout.apply(input, p=p, gen=generator or default_generator())


# ----------------------------------------------------------------------------------------
# layer norm


class _LayerNorm(Function):
    # Over the last k axes (the normalised shape), with n elements each:
    #   mu = mean(x), rstd = 1/sqrt(var(x) + eps) (biased variance), xhat = (x - mu) rstd
    #   y = xhat w + b
    # Backward, with dxhat = g w:
    #   dx = rstd (dxhat - mean(dxhat) - xhat mean(dxhat xhat))
    #   dw = sum over leading axes of g xhat;  db = sum over leading axes of g
    def forward(self, x, w=None, b=None, *, k, eps):
        axes = tuple(range(x.ndim - k, x.ndim))
        self.axes = axes
        mu = x.mean(axis=axes, keepdims=True)
        xc = x - mu
        var = (xc * xc).mean(axis=axes, keepdims=True)
        self.rstd = 1.0 / xp.sqrt(var + eps)
        xc *= self.rstd
        self.xhat, self.w = xc, w
        y = xc * w if w is not None else xc.copy()
        if b is not None:
            y += b
        return y

    def backward(self, g):
        xhat, w, axes = self.xhat, self.w, self.axes
        lead = tuple(range(g.ndim - len(axes)))
        dxhat = g * w if w is not None else g
        dx = None
        if self.needs_input_grad[0]:
            m1 = dxhat.mean(axis=axes, keepdims=True)
            m2 = (dxhat * xhat).mean(axis=axes, keepdims=True)
            dx = (dxhat - m1 - xhat * m2) * self.rstd
        grads = [dx]
        if len(self.needs_input_grad) > 1:
            grads.append((g * xhat).sum(axis=lead) if self.needs_input_grad[1] else None)
        if len(self.needs_input_grad) > 2:
            grads.append(g.sum(axis=lead) if self.needs_input_grad[2] else None)
        return tuple(grads)


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


# ----------------------------------------------------------------------------------------
# cross entropy


class _CrossEntropy(Function):
    # Rows x (N, C), targets t (N,), smoothing e, lse = log sum_c e^(x_c):
    #   loss_i = (1 - e) (lse - x_{t_i}) + e (lse - mean_c x_c)
    #   dloss_i/dx_ic = softmax(x_i)_c - (1 - e) [c == t_i] - e / C
    # Rows whose target is ignore_index contribute nothing. 'mean' divides by the number of
    # counted rows. Only the logits (by reference) and lse are kept for backward; softmax
    # is recomputed there, so no (N, C) temporary outlives the forward pass.
    def forward(self, x, target, ignore_index, reduction, label_smoothing):
        n, c = x.shape
        valid = target != ignore_index
        safe_t = xp.where(valid, target, 0)
        if valid.any() and (safe_t.min() < 0 or safe_t.max() >= c):
            bad = safe_t[(safe_t < 0) | (safe_t >= c)][0]
            raise IndexError(f"cross_entropy: target {int(bad)} is out of bounds for {c} classes")
        m = x.max(axis=1, keepdims=True)
        e = x - m
        xp.exp(e, out=e)
        lse = (m[:, 0] + xp.log(e.sum(axis=1))).astype(x.dtype, copy=False)
        del e
        rows = xp.arange(n)
        loss = lse - x[rows, safe_t]
        if label_smoothing > 0:
            loss = (1 - label_smoothing) * loss + label_smoothing * (lse - x.mean(axis=1))
        loss = xp.where(valid, loss, 0).astype(x.dtype, copy=False)
        self.x, self.lse, self.t, self.valid = x, lse, safe_t, valid
        self.reduction, self.smoothing = reduction, label_smoothing
        self.count = int(valid.sum())
        if reduction == "none":
            return loss
        total = loss.sum(dtype=x.dtype)
        if reduction == "sum":
            return xp.asarray(total)
        # torch returns nan when every target is ignored (0 / 0); so do we
        with np.errstate(invalid="ignore", divide="ignore"):
            return xp.asarray(total / x.dtype.type(self.count))

    def backward(self, g):
        x, lse, t, valid = self.x, self.lse, self.t, self.valid
        n, c = x.shape
        dx = x - lse[:, None]
        xp.exp(dx, out=dx)
        dx[xp.arange(n), t] -= 1 - self.smoothing
        if self.smoothing > 0:
            dx -= self.smoothing / c
        if self.reduction == "none":
            scale = (g * valid)[:, None]
        elif self.reduction == "sum":
            scale = (valid * g)[:, None]
        else:
            scale = (valid * (g / max(self.count, 1)))[:, None]
        dx *= scale.astype(dx.dtype, copy=False)
        return dx, None


def cross_entropy(
    input: Tensor,
    target: Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> Tensor:
    """Softmax cross entropy of logits against class indices, in one fused op.

    input (N, C) or (C,) or (N, C, d1, ...), as torch: the class axis is 1.
    target (N,) or () or (N, d1, ...) integer class indices.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(
            f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"cross_entropy: label_smoothing must be in [0, 1], got {label_smoothing}")
    if target.dtype.kind not in "iu":
        raise TypeError(
            f"cross_entropy: target must hold integer class indices, got {target.dtype}"
        )
    x, t = input, target
    if x.ndim == 1:
        x, t = x.reshape(1, -1), t.reshape(1)
    elif x.ndim > 2:
        # (N, C, d...) -> (N * d..., C)
        perm = (0, *range(2, x.ndim), 1)
        x = x.permute(*perm).reshape(-1, x.shape[1])
        t = t.reshape(-1)
    expected = (input.shape[0],) + tuple(input.shape[2:]) if input.ndim > 1 else ()
    if tuple(target.shape) != expected:
        raise ValueError(
            f"cross_entropy: target shape {target.shape} does not match input shape "
            f"{input.shape} (expected target shape {expected})"
        )
    out = _CrossEntropy.apply(
        x, t, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
    )
    if reduction == "none":
        return out.reshape(*expected)
    return out


def mse_loss(input: Tensor, target: Tensor, reduction: str = "mean") -> Tensor:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"mse_loss: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    d = input - target
    sq = d * d
    return sq.mean() if reduction == "mean" else sq.sum() if reduction == "sum" else sq


# ----------------------------------------------------------------------------------------
# attention


_ATTN_CHUNK_ELEMENTS = 1 << 22  # score elements per block: bounds the (L, S) temporaries


class _SDPA(Function):
    # Per (batch, head), with s = q k^T * scale (L, S), p = softmax(s) (masked), o = p v:
    #   dv = p^T do;  dp = do v^T;  ds = p (dp - D), D = rowsum(dp p) = rowsum(do o)
    #   dq = ds k * scale;  dk = ds^T q * scale
    # Like FlashAttention, forward keeps only o and the row log-sum-exp; backward recomputes
    # p block by block. So memory grows with L*E, not with L*S per layer.
    def forward(self, q, k, v, mask, is_causal, scale, dropout_p, gen):
        *lead, L, E = q.shape
        S = k.shape[-2]
        self.shapes = (q.shape, k.shape, v.shape)
        self.scale = scale
        q3, k3, v3 = (a.reshape(-1, *a.shape[-2:]) for a in (q, k, v))
        n = q3.shape[0]
        allowed = None
        if is_causal:
            allowed = xp.tril(xp.ones((L, S), dtype=bool))
        self.mask3 = None
        if mask is not None:
            m = xp.broadcast_to(mask, (*lead, L, S)).reshape(n, L, S)
            self.mask3 = m
        self.allowed = allowed
        out = xp.empty((n, L, v.shape[-1]), dtype=q.dtype)
        lse = xp.empty((n, L), dtype=q.dtype)
        step = max(1, _ATTN_CHUNK_ELEMENTS // max(L * S, 1))
        self.keeps = [] if dropout_p > 0 else None
        self.dropout_p, self.gen = dropout_p, gen
        # One score buffer reused by every block: a fresh multi-MB array per block costs
        # more in page faults than the matmul that fills it.
        buf = xp.empty((min(step, n), L, S), dtype=q.dtype)
        for i in range(0, n, step):
            sl = slice(i, i + step)
            s = self._scores(q3[sl], k3[sl], sl, out=buf[: min(step, n - i)])
            m_ = s.max(axis=-1, keepdims=True)
            m_ = xp.where(xp.isfinite(m_), m_, 0)  # fully masked rows stay finite
            s -= m_
            xp.exp(s, out=s)
            denom = s.sum(axis=-1, keepdims=True)
            s /= denom
            lse[sl] = (m_ + xp.log(denom))[..., 0]
            if dropout_p > 0:
                keep = (gen.random(s.shape, dtype=np.float32) >= dropout_p) / (1 - dropout_p)
                keep = keep.astype(s.dtype)
                self.keeps.append(keep)
                s *= keep
            xp.matmul(s, v3[sl], out=out[sl])
        self.q3, self.k3, self.v3, self.out, self.lse, self.step = q3, k3, v3, out, lse, step
        return out.reshape(*lead, L, v.shape[-1])

    def _scores(self, q, k, sl, out):
        s = xp.matmul(q, xp.swapaxes(k, -1, -2), out=out)
        s *= q.dtype.type(self.scale)
        if self.allowed is not None:
            xp.copyto(s, -xp.inf, where=~self.allowed)
        if self.mask3 is not None:
            m = self.mask3[sl]
            if m.dtype == bool:
                xp.copyto(s, -xp.inf, where=~m)
            else:
                s += m
        return s

    def backward(self, g):
        q3, k3, v3, o, lse, step = self.q3, self.k3, self.v3, self.out, self.lse, self.step
        g3 = g.reshape(o.shape)
        dq, dk, dv = xp.empty_like(q3), xp.empty_like(k3), xp.empty_like(v3)
        D = (g3 * o).sum(axis=-1, keepdims=True)
        scale = q3.dtype.type(self.scale)
        n, L, S = q3.shape[0], q3.shape[1], k3.shape[1]
        p_buf = xp.empty((min(step, n), L, S), dtype=q3.dtype)  # reused, as in forward
        dp_buf = xp.empty_like(p_buf)
        for j, i in enumerate(range(0, n, step)):
            sl, m = slice(i, i + step), min(step, n - i)
            p = self._scores(q3[sl], k3[sl], sl, out=p_buf[:m])
            p -= lse[sl][..., None]
            xp.exp(p, out=p)
            dp = xp.matmul(g3[sl], xp.swapaxes(v3[sl], -1, -2), out=dp_buf[:m])
            if self.keeps is not None:
                keep = self.keeps[j]
                xp.matmul(xp.swapaxes(p * keep, -1, -2), g3[sl], out=dv[sl])
                dp *= keep
            else:
                xp.matmul(xp.swapaxes(p, -1, -2), g3[sl], out=dv[sl])
            dp -= D[sl]
            dp *= p  # ds
            xp.matmul(dp, k3[sl], out=dq[sl])
            xp.matmul(xp.swapaxes(dp, -1, -2), q3[sl], out=dk[sl])
        dq *= scale
        dk *= scale
        sq, sk, sv = self.shapes
        return dq.reshape(sq), dk.reshape(sk), dv.reshape(sv)


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """softmax(q k^T * scale + mask) v, fused, as ``torch.nn.functional`` defines it.

    query (..., L, E), key (..., S, E), value (..., S, Ev) -> (..., L, Ev). ``is_causal``
    masks with a lower-triangular (L, S) matrix aligned at the top left, as torch does
    (for a KV cache with L < S, pass an explicit ``attn_mask`` instead). A boolean mask is
    True where attention is allowed; a float mask is added to the scores.
    """
    if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]:
        raise ValueError(
            f"scaled_dot_product_attention: incompatible shapes q {query.shape}, "
            f"k {key.shape}, v {value.shape}"
        )
    if attn_mask is not None and is_causal:
        raise ValueError("scaled_dot_product_attention: pass attn_mask or is_causal, not both")
    lead = np.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    q = query if query.shape[:-2] == lead else query.expand(*lead, *query.shape[-2:])
    k = key if key.shape[:-2] == lead else key.expand(*lead, *key.shape[-2:])
    v = value if value.shape[:-2] == lead else value.expand(*lead, *value.shape[-2:])
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    mask = None if attn_mask is None else attn_mask.data
    if mask is not None:
        try:
            np.broadcast_shapes(mask.shape, (*lead, query.shape[-2], key.shape[-2]))
        except ValueError:
            raise ValueError(
                f"scaled_dot_product_attention: attn_mask of shape {mask.shape} does not "
                f"broadcast to the scores' shape {(*lead, query.shape[-2], key.shape[-2])}"
            ) from None
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(
            f"scaled_dot_product_attention: dropout_p must be in [0, 1), got {dropout_p}"
        )
    return _SDPA.apply(
        q,
        k,
        v,
        mask=mask,
        is_causal=is_causal,
        scale=scale,
        dropout_p=dropout_p,
        gen=default_generator(),
    )


def one_hot(tensor: Tensor, num_classes: int) -> Tensor:
    idx = tensor.data
    if idx.size and (idx.min() < 0 or idx.max() >= num_classes):
        bad = int(idx.min() if idx.min() < 0 else idx.max())
        raise ValueError(f"one_hot: class values must be in [0, {num_classes}), got {bad}")
    return Tensor._make((tensor.data[..., None] == xp.arange(num_classes)).astype(B.int64))


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
