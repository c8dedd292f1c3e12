"""``handgrad.nn.functional`` (import it as ``F``): the layers of a GPT as functions.

Each op here is one graph node with a forward and a backward written by hand, so that a
layer costs one pass over its data instead of the many temporaries that composing it from
primitive ops would create. Names and arguments follow ``torch.nn.functional``.

Notation in the derivations: ``g = dL/dy`` is the gradient of the output; sums run over
the normalised (last) axis unless said otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import lru_cache, partial

import numpy as np

from handgrad import backend as B
from handgrad.backend import xp
from handgrad.function import Function
from handgrad.ops.softmax import LogSoftmax as _LogSoftmax
from handgrad.ops.softmax import Softmax as _Softmax
from handgrad.random import default_generator
from handgrad.tensor import Tensor

# ----------------------------------------------------------------------------------------
# threads
#
# NumPy runs each ufunc on one core, but releases the GIL inside ufuncs and BLAS. The big
# elementwise ops and attention therefore cut their work into cache-sized pieces and share
# the pieces out over a few threads, each with its own scratch buffers.

_PARALLEL_MIN_WORK = 1 << 21  # elements; smaller ops run on one thread (see _parallel_map)
_pool: ThreadPoolExecutor | None = None
_pool_workers = 0


def _parallel_map(
    fn: Callable[..., None],
    items: Sequence,
    buffer_size: int,
    n_buffers: int,
    dtype,
    uses_blas: bool = False,
    *,
    work: int,
) -> None:
    """Call ``fn(item, *buffers)`` for every item, with the items shared out over threads.

    ``work`` is the op's size in elements: below ``_PARALLEL_MIN_WORK`` everything runs on
    the calling thread, since handing small pieces to threads (which then compete with BLAS's
    own threads for the same cores) cost more than it saved: on the shakespeare-char model
    (768 tokens x 128 wide) one thread made the whole training step ~25% faster.

    Each thread owns ``n_buffers`` flat scratch arrays of ``buffer_size`` elements, reused for
    every item it runs. With ``uses_blas``, BLAS is held to one thread meanwhile: the products
    inside one item (e.g. (128, 64) x (64, 1024) in attention) are too small to split across
    cores, and BLAS threads competing with ours or with other processes made them ~3x slower
    than one thread per core. Without threadpoolctl to set that limit, such work stays on one
    thread of ours.
    """
    global _pool, _pool_workers
    workers = max(1, min(len(items), B.get_num_threads()))
    if work < _PARALLEL_MIN_WORK or (uses_blas and not B.can_limit_blas()):
        workers = 1

    def run(w: int) -> None:
        buffers = [xp.empty(buffer_size, dtype=dtype) for _ in range(n_buffers)]
        for item in items[w::workers]:
            fn(item, *buffers)

    if workers == 1:
        run(0)
        return
    if _pool_workers != workers:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(workers, thread_name_prefix="handgrad")
        _pool_workers = workers
    with B.num_threads(1) if uses_blas else nullcontext():
        list(_pool.map(run, range(workers)))  # list() re-raises a worker's exception


# ----------------------------------------------------------------------------------------
# linear and embedding


class _Linear(Function):
    # y = x W^T + b with x: (..., in), W: (out, in), b: (out,)
    # dx = g W;  dW = g^T x (summed over all leading dims);  db = sum of g over leading dims.
    # The leading dims are folded into one, so each product is a single 2-D GEMM (NumPy would
    # otherwise run one small GEMM per leading index).
    def forward(self, x, w, b=None):
        if x.shape[-1] != w.shape[1]:
            raise ValueError(
                f"linear: input has {x.shape[-1]} features (shape {x.shape}) but weight "
                f"expects {w.shape[1]} (shape {w.shape})"
            )
        self.lead = x.shape[:-1]
        self.x2, self.w = x.reshape(-1, x.shape[-1]), w
        y = self.x2 @ w.T
        if b is not None:
            y += b
        return y.reshape(*self.lead, w.shape[0])

    def backward(self, g):
        x2, w = self.x2, self.w
        g2 = g.reshape(-1, g.shape[-1])
        dx = (g2 @ w).reshape(*self.lead, w.shape[1]) if self.needs_input_grad[0] else None
        dw = (g2.T @ x2) if self.needs_input_grad[1] else None
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
    # (its adjoint is a scatter-add). Backward sorts the rows of g by token id and sums each
    # run of equal ids with one reduceat: several times faster than np.add.at when ids repeat
    # (a small vocabulary), as fast when they do not, and the sums come in a fixed order.
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
        idx = self.idx.reshape(-1)
        if idx.size:
            order = xp.argsort(idx, kind="stable")
            ids = idx[order]
            starts = xp.flatnonzero(xp.concatenate(([True], ids[1:] != ids[:-1])))
            rows = g.reshape(-1, self.wshape[1])[order]
            dw[ids[starts]] = xp.add.reduceat(rows, starts, axis=0)
        return None, dw


def embedding(input: Tensor, weight: Tensor) -> Tensor:
    """Rows of ``weight`` (num, dim) picked by integer ``input`` (...) -> (..., dim)."""
    return _Embedding.apply(input, weight)


# ----------------------------------------------------------------------------------------
# activations


_GELU_C = math.sqrt(2.0 / math.pi)


_ELEMENTWISE_CHUNK = 1 << 18  # elements per piece of a big elementwise op; big enough
# that threads seldom wait for the GIL between NumPy calls, small enough to stay in cache


def _chunks(n: int) -> list[slice]:
    """Cut range(n) into pieces of at most _ELEMENTWISE_CHUNK, all of (nearly) one size, so
    that no thread is left with a long piece after the others finish."""
    count = -(-n // _ELEMENTWISE_CHUNK)
    return [slice(n * i // count, n * (i + 1) // count) for i in range(count)]


class _GeluTanh(Function):
    # y = x s,  s = (1 + tanh(u))/2 = sigmoid(2u),  u = c x (1 + a x^2),  c = sqrt(2/pi),
    # a = 0.044715. With tanh' = 1 - tanh^2 = 4 s (1 - s):
    #   dy/dx = s + x s'(x) = s + 2 s (1 - s) x c (1 + 3 a x^2)
    # Forward keeps x and s: backward is then 9 passes over the data and no tanh (recomputing
    # s would double it). Both passes run piece by piece on scratch buffers (few full-size
    # temporaries, data stays in cache) with the pieces shared over threads.
    def forward(self, x):
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

        _parallel_map(piece, _chunks(xf.size), 0, 0, x.dtype, work=xf.size)
        if self.needs_input_grad:
            self.x, self.s = x, sv
        return y

    def backward(self, g):
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

        _parallel_map(piece, _chunks(xf.size), _ELEMENTWISE_CHUNK, 1, xf.dtype, work=xf.size)
        return (dx,)


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
    def forward(self, x, w=None, b=None, *, k, eps):
        self.shape, self.wshape = x.shape, x.shape[x.ndim - k :]
        n = math.prod(self.wshape)
        self.x = x2 = xp.asarray(x, order="C").reshape(-1, n)
        self.w = wf = None if w is None else w.reshape(n)
        bf = None if b is None else b.reshape(n)
        self.mu = xp.empty((x2.shape[0], 1), dtype=x.dtype)
        self.rstd = xp.empty_like(self.mu)
        y = xp.empty_like(x2)

        def block(rows):
            xs, ys, mu, rstd = x2[rows], y[rows], self.mu[rows], self.rstd[rows]
            # an einsum, not a GEMV: BLAS may round a row's sum differently depending on how
            # many rows share the call, and a row's output must not depend on its batch
            xp.einsum("ij->i", xs, out=mu[:, 0])
            mu *= 1.0 / n
            xp.subtract(xs, mu, out=ys)  # xc
            xp.einsum("ij,ij->i", ys, ys, out=rstd[:, 0])  # n var
            rstd *= 1.0 / n
            rstd += eps
            xp.sqrt(rstd, out=rstd)
            xp.reciprocal(rstd, out=rstd)
            ys *= rstd
            if wf is not None:
                ys *= wf
            if bf is not None:
                ys += bf

        _parallel_map(block, self._blocks(n), 0, 0, x.dtype, work=x.size)
        return y.reshape(x.shape)

    def _blocks(self, n: int) -> list[slice]:
        rows, step = self.x.shape[0], max(1, _ELEMENTWISE_CHUNK // max(n, 1))
        return [slice(i, min(i + step, rows)) for i in range(0, rows, step)]

    def backward(self, g):
        x, n = self.x, self.x.shape[1]
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
        _parallel_map(block, range(len(blocks)), size, 2, g.dtype, work=g.size)
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


_ATTN_TILE = 128  # query rows (forward) or key columns (backward) per score tile
_ATTN_BATCH_ALL = 1 << 20  # up to this many scores in all, all heads go in one untiled item
_SOFTMAX_NO_SHIFT = 64.0  # e^64 ~ 6e27: a sum of 2^30 of them is still far below float32's max


def _tile(buffer, *shape: int):
    """A contiguous view of the front of a flat scratch buffer, in the given shape."""
    return buffer[: math.prod(shape)].reshape(shape)


def _mT(a):
    """Swap the last two axes (the matrix transpose of a stack of matrices)."""
    return xp.swapaxes(a, -1, -2)


@lru_cache(maxsize=64)
def _future_bias(r0: int, c0: int, rows: int, cols: int, dtype) -> object:
    """(rows, cols) array, -inf where key c0 + j comes after query r0 + i, else 0 (read-only).

    Cached: the same few tile positions recur every step, and adding a bias is ~2x faster
    than ``copyto(..., where=)``."""
    future = xp.arange(c0, c0 + cols) > xp.arange(r0, r0 + rows)[:, None]
    bias = xp.where(future, -xp.inf, 0).astype(dtype)
    bias.flags.writeable = False
    return bias


def _mask_future(s, r0: int, c0: int) -> None:
    """Causal mask (top-left aligned, as torch): s[..., i, j] = -inf where key c0 + j comes
    after query r0 + i. Only the part of the tile that crosses the diagonal is touched."""
    rows, cols = s.shape[-2:]
    i_end = min(rows, c0 + cols - 1 - r0)  # rows from here on see every key of the tile
    j_start = max(0, r0 + 1 - c0)  # columns before this are seen by every row
    if i_end <= 0 or j_start >= cols:
        return
    if 2 * i_end * (cols - j_start) > rows * cols:
        # most of the tile: adding over all of it (zeros included) is one contiguous pass,
        # ~2x faster than the same add over a strided sub-block
        s += _future_bias(r0, c0, rows, cols, s.dtype)
    else:
        s[..., :i_end, j_start:] += _future_bias(r0, c0 + j_start, i_end, cols - j_start, s.dtype)


class _SDPA(Function):
    # Per (batch, head), with s = q k^T * scale (L, S), p = softmax(s) (masked), o = p v:
    #   dv = p^T do;  dp = do v^T;  ds = p (dp - D), D = rowsum(dp p) = rowsum(do o)
    #   dq = ds k * scale;  dk = ds^T q * scale
    # Like FlashAttention, forward keeps only o and the row log-sum-exp (lse), and backward
    # recomputes p = exp(s - lse) tile by tile, so memory grows with L*E, not L*S. Tiles:
    #   forward: a block of query rows against every key they may see. Softmax needs whole
    #     rows; o = (e v) / rowsum(e) with e = exp(s - rowmax) divides the small (rows, Ev)
    #     product instead of the (rows, S) tile.
    #   backward: a block of keys against every query that may see them, so dk and dv of the
    #     block are finished in one go and only dq is accumulated across tiles.
    # With is_causal, query i sees keys j <= i: tiles skip the keys (queries) that lie wholly
    # in the future (past), which halves the work, and only tiles crossing the diagonal are
    # masked. The heads are shared out over threads, one head per item; small problems (one
    # new token against a KV cache) instead run all heads as one item, one tile each, since
    # there per-head NumPy calls would cost more than the arithmetic; being small, their p
    # (all of it, one tile) is kept from forward for backward instead of being recomputed.
    # Dropout masks are drawn per item from a seed, and drawn again in backward.
    # softmax(s) = softmax(s - m) for any row constant m; the usual m = rowmax(s) only keeps
    # exp from overflowing. When every raw score of a tile lies within +-_SOFTMAX_NO_SHIFT,
    # exp(s) cannot overflow and no row can underflow to 0, so the tile skips the row max and
    # the subtraction (in NumPy a max along a short last axis costs more than the exp).
    def forward(self, q, k, v, mask, is_causal, scale, dropout_p, gen):
        *lead, L, _ = q.shape
        S, Ev = k.shape[-2], v.shape[-1]
        self.q, self.k, self.v = q, k, v
        self.mask = None if mask is None else xp.broadcast_to(mask, (*lead, L, S))
        self.is_causal, self.scale, self.dropout_p = is_causal, scale, dropout_p
        small = math.prod(lead) * L * S <= _ATTN_BATCH_ALL
        if small:
            self.items, self.tile, self.heads_per_item = [()], max(L, S, 1), math.prod(lead)
        else:
            self.items, self.tile, self.heads_per_item = list(np.ndindex(*lead)), _ATTN_TILE, 1
        # NumPy's stacked matmul of small square-ish matrices (64 x 64 scores from 64-wide
        # heads) is ~1.7x slower when the second operand is a transposed view, as in q k^T
        # and do v^T; small self-attention problems (L == S, as in training) therefore
        # transpose k (and in backward v) into contiguous copies once, k's carrying the scale
        # (then q is used as it is). Elsewhere the copy costs more than it saves (decoding one
        # query against a KV cache of 1,000 keys: 5x slower), and large tiles scale q.
        self.kT = None
        if small and L == S:
            self.kT = xp.empty((*lead, k.shape[-1], S), dtype=k.dtype)
            xp.multiply(_mT(k), k.dtype.type(scale), out=self.kT)
        self.seeds = None
        if dropout_p > 0:
            self.seeds = dict(zip(self.items, gen.integers(2**63, size=len(self.items))))
        # A small problem (one item, one tile) keeps p for backward when a backward will
        # follow, p covers every key (causal with L < S leaves keys unseen) and no row can be
        # fully masked (there p = 0/0 = nan, where recomputing it gives 0).
        self.p = None
        self.keep_p = (
            len(self.items) == 1
            and self.tile >= max(L, S)
            and any(self.needs_input_grad)
            and mask is None
            and (not is_causal or L >= S)
        )
        self.out = xp.empty((*lead, L, Ev), dtype=q.dtype)
        self.lse = xp.empty((*lead, L), dtype=q.dtype)
        size = self.heads_per_item * min(self.tile, L) * S
        _parallel_map(
            self._forward_item,
            self.items,
            size,
            1,
            q.dtype,
            uses_blas=True,
            work=L * S * math.prod(lead),
        )
        return self.out

    def _scores(self, item, qs, r0: int, r1: int, c0: int, c1: int, buffer, in_range=None):
        """s = (q * scale)[r0:r1] k[c0:c1]^T with the causal or given mask applied (``qs`` is
        q * scale, or q when the scale is in self.kT). With ``in_range`` (a list), appends
        whether every score before masking lies within +-_SOFTMAX_NO_SHIFT (see forward)."""
        s = _tile(buffer, *qs.shape[:-2], r1 - r0, c1 - c0)
        kt = _mT(self.k[item][..., c0:c1, :]) if self.kT is None else self.kT[item][..., c0:c1]
        xp.matmul(qs[..., r0:r1, :], kt, out=s)
        if in_range is not None:
            float_mask = self.mask is not None and self.mask.dtype != bool
            in_range.append(
                not float_mask and -_SOFTMAX_NO_SHIFT <= s.min() and s.max() <= _SOFTMAX_NO_SHIFT
            )
        if self.is_causal:
            _mask_future(s, r0, c0)
        elif self.mask is not None:
            m = self.mask[item][..., r0:r1, c0:c1]
            if m.dtype == bool:
                xp.copyto(s, -xp.inf, where=~m)
            else:
                s += m
        return s

    def _dropout_keep(self, item):
        """The item's (..., L, S) dropout multiplier: 0 or 1/(1-p), the same in both passes."""
        if self.seeds is None:
            return None
        rng = np.random.default_rng(self.seeds[item])
        shape = self.q[item].shape[:-1] + self.k.shape[-2:-1]
        keep = rng.random(shape, dtype=np.float32) >= self.dropout_p
        return (keep / (1.0 - self.dropout_p)).astype(self.q.dtype)

    def _forward_item(self, item, buffer):
        q, v, out, lse = self.q[item], self.v[item], self.out[item], self.lse[item]
        L, S = q.shape[-2], v.shape[-2]
        qs = q if self.kT is not None else q * q.dtype.type(self.scale)
        keep = self._dropout_keep(item)
        for r0 in range(0, L, self.tile):
            r1 = min(r0 + self.tile, L)
            c1 = min(r1, S) if self.is_causal else S  # keys this block of queries may see
            in_range = []
            s = self._scores(item, qs, r0, r1, 0, c1, buffer, in_range)
            if in_range[0]:  # exp(s) can neither overflow nor vanish for a whole row
                xp.exp(s, out=s)
                denom = xp.einsum("...j->...", s)[..., None]
                lse[..., r0:r1] = xp.log(denom)[..., 0]
            else:
                m = s.max(axis=-1, keepdims=True)
                if self.mask is not None:
                    m[~xp.isfinite(m)] = 0  # a fully masked row stays finite (gives nan, as torch)
                s -= m
                xp.exp(s, out=s)  # e
                denom = xp.einsum("...j->...", s)[..., None]  # rowsum(e); einsum beats sum here
                lse[..., r0:r1] = (m + xp.log(denom))[..., 0]
            o = out[..., r0:r1, :]
            if self.keep_p:  # one tile: normalise e into p and keep it (the buffer is ours)
                s /= denom
                self.p = s
                xp.matmul(s if keep is None else s * keep, v, out=o)
                continue
            if keep is not None:
                s *= keep[..., r0:r1, :c1]
            xp.matmul(s, v[..., :c1, :], out=o)
            o /= denom

    def backward(self, g):
        q, k, v = self.q, self.k, self.v
        dq, dk, dv = xp.empty_like(q), xp.empty_like(k), xp.empty_like(v)
        each_item = partial(self._backward_item, g=g, dq=dq, dk=dk, dv=dv)
        size = self.heads_per_item * q.shape[-2] * min(self.tile, k.shape[-2])
        work = self.lse.size * k.shape[-2]  # number of scores
        _parallel_map(each_item, self.items, size, 2, q.dtype, uses_blas=True, work=work)
        return dq, dk, dv

    def _backward_item(self, item, p_buffer, dp_buffer, *, g, dq, dk, dv):
        q, k, v, g = self.q[item], self.k[item], self.v[item], g[item]
        dq, dk, dv = dq[item], dk[item], dv[item]
        L, S = q.shape[-2], k.shape[-2]
        scale = q.dtype.type(self.scale)
        D = xp.einsum("...ij,...ij->...i", g, self.out[item])[..., None]  # rowsum(do o)
        lse = self.lse[item][..., None]
        keep = self._dropout_keep(item)
        one_tile = S <= self.tile  # then dq is written once, not accumulated over tiles
        if not one_tile:
            dq[...] = 0
        if self.p is not None:
            qs = None
        else:  # the query operand of _scores: q itself when the scale is in kT
            qs = q if self.kT is not None else q * scale
        vt = _mT(v) if self.kT is None else xp.ascontiguousarray(_mT(v))
        for c0 in range(0, S, self.tile):
            c1 = min(c0 + self.tile, S)
            r0 = c0 if self.is_causal else 0  # the first query that may see these keys
            if r0 >= L:
                dk[..., c0:c1, :] = 0
                dv[..., c0:c1, :] = 0
                continue
            if self.p is not None:  # the one tile, kept from forward
                p = self.p
            else:
                p = self._scores(item, qs, r0, L, c0, c1, p_buffer)
                p -= lse[..., r0:, :]
                xp.exp(p, out=p)
            dp = _tile(dp_buffer, *p.shape)
            gq = g[..., r0:, :]  # the gradient of the queries that see these keys
            xp.matmul(gq, vt[..., c0:c1], out=dp)
            if keep is not None:
                xp.matmul(_mT(p * keep[..., r0:, c0:c1]), gq, out=dv[..., c0:c1, :])
                dp *= keep[..., r0:, c0:c1]
            else:
                xp.matmul(_mT(p), gq, out=dv[..., c0:c1, :])
            dp -= D[..., r0:, :]
            dp *= p  # ds; the scale of dq and dk is applied once, at the end
            xp.matmul(_mT(dp), q[..., r0:, :], out=dk[..., c0:c1, :])
            if one_tile:
                xp.matmul(dp, k[..., c0:c1, :], out=dq[..., r0:, :])
            else:
                dq[..., r0:, :] += dp @ k[..., c0:c1, :]
        dq *= scale
        dk *= scale


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
