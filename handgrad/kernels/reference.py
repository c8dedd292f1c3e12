"""NumPy references for the CUDA kernels in ``handgrad.kernels.cuda``: the same signatures,
the same math, float32 in and out. Each docstring gives the math and the shapes.

These are written for clarity, not speed: they define what the kernels must compute.
Where a kernel takes bfloat16 (``ml_dtypes.bfloat16``) arrays, its reference widens them to
float32, computes in float32 (or float64) and rounds a bfloat16 result once, to nearest even.
"""

from __future__ import annotations

import math

import numpy as np

GELU_C = math.sqrt(2.0 / math.pi)
GELU_A = 0.044715


# ----------------------------------------------------------------------------------------
# layer norm over the last axis


def layer_norm_forward(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, eps: float = 1e-5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x (N, C) -> y (N, C), mean (N,), rstd (N,):

    mean = sum_c x / C,  var = sum_c (x - mean)^2 / C (biased),  rstd = 1 / sqrt(var + eps),
    y = (x - mean) rstd w + b.
    """
    mean = x.mean(axis=1, dtype=np.float32)
    d = x - mean[:, None]
    rstd = (1.0 / np.sqrt((d * d).mean(axis=1) + np.float32(eps))).astype(np.float32)
    y = d * rstd[:, None] * weight
    if bias is not None:
        y += bias
    return y.astype(np.float32), mean, rstd


def layer_norm_backward(
    dy: np.ndarray, x: np.ndarray, weight: np.ndarray, mean: np.ndarray, rstd: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dy, x (N, C) -> dx (N, C), dweight (C,), dbias (C,). With xhat = (x - mean) rstd and
    g = dy w:  dx = rstd (g - mean_c(g) - xhat mean_c(g xhat)),  dw = sum_n dy xhat,
    db = sum_n dy."""
    xhat = (x - mean[:, None]) * rstd[:, None]
    g = dy * weight
    a = g.mean(axis=1, keepdims=True)
    b = (g * xhat).mean(axis=1, keepdims=True)
    dx = rstd[:, None] * (g - a - xhat * b)
    return dx.astype(np.float32), (dy * xhat).sum(axis=0), dy.sum(axis=0)


def residual_layer_norm_forward(
    x: np.ndarray,
    r: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray | None,
    eps: float = 1e-5,
    out_dtype: object = np.float32,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """x (N, C) float32, r (N, C) float32 or bfloat16 -> h (N, C) float32, y (N, C) in
    ``out_dtype``, mean (N,), rstd (N,):  h = x + r,  (y, mean, rstd) = layer_norm(h)."""
    h = (x + r.astype(np.float32)).astype(np.float32)
    y, mean, rstd = layer_norm_forward(h, weight, bias, eps)
    return h, y.astype(out_dtype), mean, rstd


def residual_layer_norm_backward(
    dy: np.ndarray,
    dh: np.ndarray | None,
    h: np.ndarray,
    weight: np.ndarray,
    mean: np.ndarray,
    rstd: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dy (N, C) float32 or bfloat16, dh (N, C) float32 or None (zeros) -> dx (N, C),
    dweight (C,), dbias (C,) float32:  dx = dh + layer_norm_backward(dy, h)'s dx, the
    gradient of both x and r (h = x + r); dweight, dbias as ``layer_norm_backward``'s."""
    dx, dw, db = layer_norm_backward(dy.astype(np.float32), h, weight, mean, rstd)
    if dh is not None:
        dx = (dx + dh).astype(np.float32)
    return dx, dw.astype(np.float32), db.astype(np.float32)


# ----------------------------------------------------------------------------------------
# GELU, tanh form


def gelu_tanh_forward(x: np.ndarray) -> np.ndarray:
    """y = x (1 + tanh(u)) / 2,  u = c (x + a x^3),  c = sqrt(2 / pi),  a = 0.044715."""
    u = np.float32(GELU_C) * (x + np.float32(GELU_A) * x * x * x)
    return (np.float32(0.5) * x * (1 + np.tanh(u))).astype(np.float32)


def gelu_tanh_backward(dy: np.ndarray, x: np.ndarray) -> np.ndarray:
    """dx = dy (s + x s (1 - s) 2 c (1 + 3 a x^2)),  s = (1 + tanh(u)) / 2; the same as
    dy (s + x (1 - tanh^2(u)) c (1 + 3 a x^2) / 2)."""
    u = np.float32(GELU_C) * (x + np.float32(GELU_A) * x * x * x)
    t = np.tanh(u)
    du = np.float32(GELU_C) * (1 + np.float32(3 * GELU_A) * x * x)
    return (dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * du)).astype(np.float32)


def bias_gelu_forward(x: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """x (..., C) float32 or bfloat16, bias (C,) float32 or bfloat16 -> y in x's dtype:
    y = gelu_tanh(x + bias), in float32."""
    u = x.astype(np.float32) + bias.astype(np.float32)
    return gelu_tanh_forward(u).astype(x.dtype)


def bias_gelu_backward(
    dy: np.ndarray, x: np.ndarray, bias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """-> dx (..., C) float32 = dy gelu_tanh'(x + bias) (``gelu_tanh_backward`` at x + bias),
    dbias (C,) float32 = dx summed over all but the last axis."""
    u = x.astype(np.float32) + bias.astype(np.float32)
    dx = gelu_tanh_backward(dy.astype(np.float32), u)
    C = x.shape[-1] if x.ndim else 1
    return dx, dx.reshape(-1, C).sum(axis=0, dtype=np.float32)


# ----------------------------------------------------------------------------------------
# causal softmax over attention scores, and attention built from it


def causal_softmax_forward(scores: np.ndarray, scale: float) -> np.ndarray:
    """scores (..., T, T) -> p (..., T, T): row i is softmax_j(scale s_ij) over j <= i, and
    0 for j > i (the future). bfloat16 scores give bfloat16 p (float32 math)."""
    T = scores.shape[-1]
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    z = np.where(future, -np.inf, scores.astype(np.float32) * np.float32(scale))
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32).astype(scores.dtype)


def causal_softmax_backward(dp: np.ndarray, p: np.ndarray, scale: float) -> np.ndarray:
    """dscores = scale p (dp - sum_j p dp) (0 in the future, where p is 0), in p's dtype
    (float32 math for bfloat16 dp and p)."""
    dp32, p32 = dp.astype(np.float32), p.astype(np.float32)
    dot = (p32 * dp32).sum(axis=-1, keepdims=True)
    return (np.float32(scale) * p32 * (dp32 - dot)).astype(np.float32).astype(p.dtype)


def causal_softmax_lse_forward(scores: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """scores (..., T, T) -> p (..., T, T) as ``causal_softmax_forward`` gives it, and
    lse (..., T) float32, the log-sum-exp of each row's kept scaled scores:

    lse_i = m_i + log sum_{j <= i} exp(scale s_ij - m_i),  m_i = max_{j <= i} scale s_ij,

    so that p_ij = exp(scale s_ij - lse_i) for j <= i. float32 math for bfloat16 scores."""
    T = scores.shape[-1]
    if scores.size == 0:
        return np.zeros(scores.shape, scores.dtype), np.zeros(scores.shape[:-1], np.float32)
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    z = np.where(future, -np.inf, scores.astype(np.float32) * np.float32(scale))
    m = z.max(axis=-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(z - m).sum(axis=-1))
    return causal_softmax_forward(scores, scale), lse.astype(np.float32)


def causal_softmax_recompute(scores: np.ndarray, lse: np.ndarray, scale: float) -> np.ndarray:
    """scores (..., T, T), lse (..., T) float32 -> p (..., T, T) in scores' dtype:
    p_ij = exp(scale s_ij - lse_i) for j <= i, 0 for j > i (float32 math; with
    ``causal_softmax_lse_forward``'s lse, its p again)."""
    T = scores.shape[-1]
    future = np.triu(np.ones((T, T), dtype=bool), k=1)
    z = scores.astype(np.float32) * np.float32(scale) - lse.astype(np.float32)[..., None]
    return np.exp(np.where(future, -np.inf, z)).astype(np.float32).astype(scores.dtype)


def attention_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Causal attention: q, k, v (..., T, D) -> out (..., T, D) and p (..., T, T), with
    p = causal_softmax(q k^T, 1/sqrt(D)) and out = p v."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    p = causal_softmax_forward(q @ np.swapaxes(k, -1, -2), scale)
    return (p @ v).astype(np.float32), p


def attention_backward(
    dout: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, p: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """dv = p^T dout,  dp = dout v^T,  ds = causal_softmax_backward(dp, p),  dq = ds k,
    dk = ds^T q."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    dv = np.swapaxes(p, -1, -2) @ dout
    ds = causal_softmax_backward(dout @ np.swapaxes(v, -1, -2), p, scale)
    return ds @ k, np.swapaxes(ds, -1, -2) @ q, dv


# ----------------------------------------------------------------------------------------
# cross entropy over a padded vocabulary


def cross_entropy_forward(
    logits: np.ndarray, targets: np.ndarray, vocab_size: int, ignore_index: int = -1
) -> tuple[np.ndarray, np.ndarray]:
    """logits (N, Vp), only the first ``vocab_size`` columns real (Vp >= V is the padded
    width), targets (N,) -> loss (N,), lse (N,):

    lse_n = log sum_{c < V} exp(x_nc),  loss_n = lse_n - x_{n, t_n}  (0 where t_n is
    ignore_index). Only lse is kept for backward: no probabilities are stored.
    """
    x = logits[:, :vocab_size].astype(np.float64)
    m = x.max(axis=1)
    lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
    valid = targets != ignore_index
    t = np.where(valid, targets, 0)
    if np.any((t < 0) | (t >= vocab_size)):
        bad = t[(t < 0) | (t >= vocab_size)][0]
        raise IndexError(f"cross_entropy_forward: target {bad} out of range [0, {vocab_size})")
    loss = np.where(valid, lse - x[np.arange(len(t)), t], 0.0)
    return loss.astype(np.float32), lse.astype(np.float32)


def cross_entropy_backward(
    logits: np.ndarray,
    lse: np.ndarray,
    targets: np.ndarray,
    dloss: np.ndarray,
    vocab_size: int,
    ignore_index: int = -1,
) -> np.ndarray:
    """dlogits (N, Vp) = dloss_n (exp(x_nc - lse_n) - [c == t_n]) for c < V; 0 in the
    padding columns and in ignored rows. ``dloss`` (N,) is the upstream gradient per row
    (1 / count for a mean). The kernel may write it over the logits."""
    n, vp = logits.shape
    valid = targets != ignore_index
    d = np.zeros((n, vp), dtype=np.float32)
    d[:, :vocab_size] = np.exp(logits[:, :vocab_size] - lse[:, None])
    rows = np.flatnonzero(valid)
    d[rows, targets[rows]] -= 1
    d *= np.where(valid, dloss, 0).astype(np.float32)[:, None]
    return d


def fused_classifier(
    logits: np.ndarray,
    targets: np.ndarray,
    vocab_size: int,
    ignore_index: int = -1,
    scale: np.ndarray | float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cross entropy's loss and gradient together (llm.c's fused_classifier). logits
    (N, Vp) float32 or bfloat16, the first V = ``vocab_size`` columns real, targets (N,),
    ``scale`` a (1,) array or a number (None: 1) -> losses (N,) float32, dlogits (N, Vp) in
    logits' dtype:

    lse_n = log sum_{c < V} exp(x_nc),  loss_n = lse_n - x_{n, t_n},
    dlogits_nc = scale (exp(x_nc - lse_n) - [c == t_n])  for c < V, 0 for c >= V;

    a row whose target is ignore_index has loss 0 and dlogits 0; one whose target is outside
    [0, V) (and not ignore_index) has loss NaN and dlogits NaN in its first V columns."""
    n, vp = logits.shape
    g = 1.0 if scale is None else float(np.asarray(scale, np.float32).reshape(-1)[0])
    x = logits[:, :vocab_size].astype(np.float64)
    m = x.max(axis=1, initial=-np.inf)
    lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
    ignored = targets == ignore_index
    bad = ~ignored & ((targets < 0) | (targets >= vocab_size))
    ok = ~ignored & ~bad
    rows = np.flatnonzero(ok)
    loss = np.zeros(n)
    loss[rows] = lse[rows] - x[rows, targets[rows]]
    loss[bad] = np.nan
    d = np.zeros((n, vp))
    d[:, :vocab_size] = np.exp(x - lse[:, None])
    d[rows, targets[rows]] -= 1
    d *= g
    d[ignored] = 0
    d[bad, :vocab_size] = np.nan
    return loss.astype(np.float32), d.astype(np.float32).astype(logits.dtype)


# ----------------------------------------------------------------------------------------
# embedding backward


def embedding_backward(idx: np.ndarray, dout: np.ndarray, num_embeddings: int) -> np.ndarray:
    """idx (N,) integer rows, dout (N, C) -> dweight (num_embeddings, C) with
    dweight[j] = sum of dout[n] over all n with idx[n] == j (a scatter-add). An id outside
    [0, num_embeddings) is skipped: its row adds nowhere (no negative-index wrap-around)."""
    dw = np.zeros((num_embeddings, dout.shape[1]), dtype=np.float32)
    ok = (idx >= 0) & (idx < num_embeddings)
    np.add.at(dw, idx[ok], dout[ok])
    return dw


# ----------------------------------------------------------------------------------------
# AdamW over one flat buffer, with gradient clipping by the global norm


def sum_squares(g: np.ndarray) -> np.float64:
    """sum_i g_i^2 over a flat buffer (accumulated in float64): the global norm is its root."""
    return np.float64(np.dot(g.astype(np.float64), g.astype(np.float64)))


def clip_coefficient(norm_sq: float, max_norm: float) -> float:
    """min(1, max_norm / (sqrt(norm_sq) + 1e-6)), as ``torch.nn.utils.clip_grad_norm_``; 1
    when max_norm <= 0 (no clipping)."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (math.sqrt(norm_sq) + 1e-6))


def adamw_flat(
    w: np.ndarray,
    g: np.ndarray,
    m: np.ndarray,
    v: np.ndarray,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
    n_decay: int,
    norm_sq: float,
    max_norm: float,
    out_bf16: np.ndarray | None = None,
) -> None:
    """One AdamW step (torch.optim.AdamW's order of operations) over flat float32 buffers,
    in place on w, m, v. Parameters are laid out so that the first ``n_decay`` elements are
    the decayed ones (matrices) and the rest are not (biases, LayerNorm gains). The gradient
    is first scaled by the clipping coefficient of the global norm sqrt(norm_sq):

        g <- g * clip_coefficient(norm_sq, max_norm)
        w <- w (1 - lr wd)                          (i < n_decay only)
        m <- m + (1 - b1)(g - m),  v <- b2 v + (1 - b2) g^2
        w <- w - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    ``out_bf16`` (bfloat16, same size) receives w rounded to nearest even when given.
    """
    f32 = np.float32
    coef = f32(clip_coefficient(norm_sq, max_norm))
    gs = g * coef
    w[:n_decay] *= f32(1 - lr * weight_decay)
    m += f32(1 - beta1) * (gs - m)
    v *= f32(beta2)
    v += f32(1 - beta2) * gs * gs
    denom = np.sqrt(v) / f32(math.sqrt(1 - beta2**step)) + f32(eps)
    w -= f32(lr / (1 - beta1**step)) * m / denom
    if out_bf16 is not None:
        out_bf16[...] = w.astype(out_bf16.dtype)
