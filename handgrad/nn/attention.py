"""Scaled dot-product attention: softmax(q k^T * scale + mask) v, as ``torch.nn.functional``.

Two fused paths with hand-written backward compute it, and ``attention_reference`` writes
the same formula with primitive Tensor ops for the tests to check both against:

* untiled (small problems: training a small model, one new token against a KV cache): all
  heads in one batched product over the whole (L, S) score matrix, which forward keeps for
  backward when it can;
* tiled (everything else), in the manner of FlashAttention: one head per work item, items
  shared over threads, score tiles recomputed in backward so that memory grows with L*E,
  not L*S.

Per (batch, head), with s = q k^T * scale (L, S), p = softmax(s) (masked), o = p v:
  dv = p^T do;  dp = do v^T;  ds = p (dp - D), D = rowsum(dp p) = rowsum(do o)
  dq = ds k * scale;  dk = ds^T q * scale
Forward keeps o and the row log-sum-exp lse = log sum_j e^(s_ij), so p = exp(s - lse) can
be recomputed. Dropout multiplies p by a mask drawn per work item from a seed, drawn again in
backward.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache, partial
from typing import Any

from handgrad import amp
from handgrad import backend as B
from handgrad.backend import cuda, get_array_module
from handgrad.creation import arange, where
from handgrad.function import Function
from handgrad.kernels.dispatch import cuda_kernels
from handgrad.nn import _threads
from handgrad.nn._threads import tile as _tile
from handgrad.random import default_generator
from handgrad.tensor import Tensor

_ATTN_TILE = 128  # query rows (forward) or key columns (backward) per score tile
_ATTN_BATCH_ALL = 1 << 20  # up to this many scores in all, the untiled path runs
# On a GPU the untiled path keeps p, (..., L, S) float32, from forward to backward; above
# this many scores the tiled path runs there instead (see ``scaled_dot_product_attention``).
_DEVICE_KEEP_SCORES = 1 << 26
_SOFTMAX_NO_SHIFT = 64.0  # e^64 ~ 6e27: a sum of 2^30 of them is still far below float32's max


def _mT(a: Any) -> Any:
    """Swap the last two axes (the matrix transpose of a stack of matrices)."""
    return a.swapaxes(-1, -2)


@lru_cache(maxsize=64)
def _future_bias(xp: Any, r0: int, c0: int, rows: int, cols: int, dtype: Any) -> Any:
    """(rows, cols) array, -inf where key c0 + j comes after query r0 + i, else 0 (read-only).

    Cached: the same few tile positions recur every step, and adding a bias is faster than
    ``copyto(..., where=)`` (benchmarks/README.md)."""
    future = xp.arange(c0, c0 + cols) > xp.arange(r0, r0 + rows)[:, None]
    return B.make_read_only(xp.where(future, -xp.inf, 0).astype(dtype))


def _mask_future(xp: Any, s: Any, r0: int, c0: int) -> None:
    """Causal mask (top-left aligned, as torch): s[..., i, j] = -inf where key c0 + j comes
    after query r0 + i. Only the part of the tile that crosses the diagonal is touched."""
    rows, cols = s.shape[-2:]
    i_end = min(rows, c0 + cols - 1 - r0)  # rows from here on see every key of the tile
    j_start = max(0, r0 + 1 - c0)  # columns before this are seen by every row
    if i_end <= 0 or j_start >= cols:
        return
    if 2 * i_end * (cols - j_start) > rows * cols:
        # most of the tile: adding over all of it (zeros included) is one contiguous pass,
        # faster than the same add over a strided sub-block (benchmarks/README.md)
        s += _future_bias(xp, r0, c0, rows, cols, s.dtype)
    else:
        s[..., :i_end, j_start:] += _future_bias(
            xp, r0, c0 + j_start, i_end, cols - j_start, s.dtype
        )


class _Attention(Function):
    """What both fused paths share: the inputs, masked score tiles, the softmax of a tile,
    and dropout masks. A work item is an index into the leading (batch, head) axes: ``()``
    for all heads at once."""

    autocast = "lower"  # inside hg.autocast (handgrad.amp)

    def _setup(self, q, k, v, mask, is_causal, scale, dropout_p):
        self.xp = get_array_module(q, k, v)
        *lead, L, _ = q.shape
        S = k.shape[-2]
        self.q, self.k, self.v = q, k, v
        self.mask = None if mask is None else self.xp.broadcast_to(mask, (*lead, L, S))
        self.is_causal, self.scale, self.dropout_p = is_causal, scale, dropout_p
        self.k_t_scaled = None  # (..., E, S) contiguous copy of k^T * scale (untiled path)
        self.seeds = None
        self.out = self.xp.empty((*lead, L, v.shape[-1]), dtype=q.dtype)
        self.lse = self.xp.empty((*lead, L), dtype=q.dtype)
        return lead, L, S

    def _query_operand(self, q):
        """The left operand of the score product: q when the scale is already in
        ``k_t_scaled``, else q * scale."""
        return q if self.k_t_scaled is not None else q * q.dtype.type(self.scale)

    def _scores(self, item, q_operand, r0, r1, c0, c1, buffer=None, in_range=None):
        """s = (q * scale)[r0:r1] k[c0:c1]^T with the causal or given mask applied, in the
        front of ``buffer`` (a new array without one). With ``in_range`` (a list), appends
        whether every score before masking lies within +-_SOFTMAX_NO_SHIFT (see
        ``_exp_rows``)."""
        xp = self.xp
        shape = (*q_operand.shape[:-2], r1 - r0, c1 - c0)
        s = xp.empty(shape, dtype=q_operand.dtype) if buffer is None else _tile(buffer, *shape)
        if self.k_t_scaled is None:
            kt = _mT(self.k[item][..., c0:c1, :])
        else:
            kt = self.k_t_scaled[item][..., c0:c1]
        xp.matmul(q_operand[..., r0:r1, :], kt, out=s)
        if in_range is not None:
            # on another namespace (a GPU) reading s.min() would wait for the device, and
            # the saving is NumPy's: there the row max is always subtracted
            float_mask = self.mask is not None and self.mask.dtype != bool
            in_range.append(
                not float_mask
                and B.is_numpy(xp)
                and (s.size == 0 or -_SOFTMAX_NO_SHIFT <= s.min() and s.max() <= _SOFTMAX_NO_SHIFT)
            )
        if self.is_causal:
            _mask_future(xp, s, r0, c0)
        elif self.mask is not None:
            m = self.mask[item][..., r0:r1, c0:c1]
            if m.dtype == bool:
                xp.copyto(s, -xp.inf, where=~m)
            else:
                s += m
        return s

    def _exp_rows(self, s, in_range: bool):
        """Turn the score tile s into e = exp(s - m) in place, m a per-row constant; return
        (rowsum(e) as (..., rows, 1), the rows' lse as (..., rows)).

        softmax(s) = softmax(s - m) for any row constant m; the usual m = rowmax(s) only
        keeps exp from overflowing. When every raw score lies within +-_SOFTMAX_NO_SHIFT,
        exp(s) can neither overflow nor underflow to 0 for a whole row, so m = 0 and the row
        max and the subtraction are skipped (in NumPy a max along a short last axis costs
        more than the exp)."""
        xp = self.xp
        if in_range:
            xp.exp(s, out=s)
            denom = xp.einsum("...j->...", s)[..., None]
            return denom, xp.log(denom)[..., 0]
        m = s.max(axis=-1, keepdims=True)
        if self.mask is not None:
            m[~xp.isfinite(m)] = 0  # a fully masked row stays finite (gives nan, as torch)
        s -= m
        xp.exp(s, out=s)  # e
        denom = xp.einsum("...j->...", s)[..., None]  # rowsum(e); einsum beats sum here
        return denom, (m + xp.log(denom))[..., 0]

    def _dropout_keep(self, item):
        """The item's (..., L, S) dropout multiplier: 0 or 1/(1-p), the same in both passes.
        ``()`` without a seed of its own (the tiled path's one item on a GPU): every (batch,
        head)'s multiplier from that head's seed, stacked to (*lead, L, S)."""
        if self.seeds is None:
            return None
        if item not in self.seeds:
            heads = [self._dropout_keep(h) for h in self.seeds]  # (L, S) each, in C order
            lead = self.q.shape[:-2]
            return self.xp.stack(heads).reshape(*lead, *heads[0].shape)
        rng = B.host_generator(self.seeds[item])
        shape = self.q[item].shape[:-1] + self.k.shape[-2:-1]
        return B.dropout_scale(rng, shape, self.dropout_p, like=self.q)


class _AttentionUntiled(_Attention):
    # All heads as one item and the whole (L, S) score matrix as one tile, since for small
    # problems per-head NumPy calls would cost more than the arithmetic.
    # NumPy's stacked matmul of small square-ish matrices is slower when the second operand
    # is a transposed view, as in q k^T and do v^T; self-attention (L == S, as in training)
    # therefore transposes k (and in backward v) into contiguous copies once, k's carrying the
    # scale (then q is used as it is). Elsewhere (decoding one query against a KV cache) the
    # copy costs more than it saves (benchmarks/README.md).
    # p is kept from forward for backward when a backward will follow, p covers every key
    # (causal with L < S leaves keys unseen) and no row can be fully masked (there p = 0/0 =
    # nan, where recomputing it gives 0).
    # On a GPU with kernels on, causal self-attention without mask or dropout takes the
    # softmax step from one fused kernel per pass (``_cuda_forward``), p kept for backward
    # (float32).
    # bfloat16 q, k, v there (autocast) stay bfloat16: products on tensor cores, and only
    # the row lse is kept (backward recomputes p).
    @classmethod
    def keeps_low_precision(cls, arrays):
        return all(a.dtype == B.bfloat16 for a in arrays) and _bf16_kernels(*arrays)

    def forward(self, q, k, v, mask, is_causal, scale, dropout_p, gen):
        xp = self.xp = get_array_module(q, k, v)
        self.kernels = _causal_kernels(q, k, v, mask, is_causal, dropout_p, cast_16bit=True)
        if self.kernels is not None:
            return self._cuda_forward(q, k, v, scale)
        if q.dtype == B.bfloat16:  # kept by keeps_low_precision, but no kernel path here
            out = self.forward(*(a.astype(B.float32) for a in (q, k, v)), mask, is_causal,
                               scale, dropout_p, gen)  # fmt: skip
            return out.astype(B.bfloat16)
        lead, L, S = self._setup(q, k, v, mask, is_causal, scale, dropout_p)
        if L == S:
            self.k_t_scaled = xp.empty((*lead, k.shape[-1], S), dtype=k.dtype)
            xp.multiply(_mT(k), k.dtype.type(scale), out=self.k_t_scaled)
        if dropout_p > 0:
            self.seeds = {(): gen.integers(2**63, size=1)[0]}
        self.p = None
        keep_p = any(self.needs_input_grad) and mask is None and (not is_causal or L >= S)
        c1 = min(L, S) if is_causal else S  # keys any query may see
        in_range = []
        s = self._scores((), self._query_operand(q), 0, L, 0, c1, in_range=in_range)
        denom, self.lse[...] = self._exp_rows(s, in_range[0])
        keep = self._dropout_keep(())
        if keep_p:  # normalise e into p and keep it
            s /= denom
            self.p = s
            xp.matmul(s if keep is None else s * keep, v, out=self.out)
            return self.out
        if keep is not None:
            s *= keep[..., :c1]
        xp.matmul(s, v[..., :c1, :], out=self.out)
        self.out /= denom
        return self.out

    def _mm(self, a, b, out_dtype=None):
        """a @ b on the GPU, counted: bfloat16 operands through ``backend.matmul_bf16``
        (cuBLAS's strided-batched GEMM, float32 accumulation; the result in ``out_dtype``,
        by default bfloat16), float32 ones through CuPy."""
        if a.dtype == B.bfloat16:
            return B.matmul_bf16(a, b, B.bfloat16 if out_dtype is None else out_dtype)
        cuda.count_gemm(a.dtype, 2 * math.prod(a.shape) * b.shape[-1])
        return self.xp.matmul(a, b)

    def _cuda_forward(self, q, k, v, scale):
        """s = q k^T (cuBLAS), p = causal_softmax(s * scale) (one kernel), o = p v.

        float32: p is kept for backward. bfloat16 (autocast): only the row log-sum-exp is
        kept, (B, H, T) float32, and backward recomputes s and p = exp(scale s - lse): one
        more q k^T product instead of a (B, H, T, T) array per layer held from forward to
        backward (at micro batch 60 it would be 1.5 GB a layer for GPT-2 124M)."""
        xp = self.xp
        self.lse = self.p = None
        if q.dtype == B.bfloat16:
            # one batch stride per operand for the strided-batched GEMM: heads cut from a
            # packed (B, T, 3C) projection have none, so each is copied once, here
            q, k, v = (xp.ascontiguousarray(a) for a in (q, k, v))
        self.q, self.k, self.v, self.scale = q, k, v, scale
        s = xp.ascontiguousarray(self._mm(q, _mT(k)))
        if q.dtype == B.bfloat16:
            p, lse = self.kernels.causal_softmax_lse_forward(s, scale)
            self.lse = lse if any(self.needs_input_grad) else None
        else:
            p = self.kernels.causal_softmax_forward(s, scale)
            self.p = p if any(self.needs_input_grad) else None
        del s
        return self._mm(p, v)

    def _cuda_backward(self, g):
        """dv = p^T g, dp = g v^T, ds = scale p (dp - rowsum(p dp)) (one kernel; the scale
        is in ds), dq = ds k, dk = ds^T q. bfloat16 operands give float32 dq, dk, dv."""
        xp, q, k, v, p = self.xp, self.q, self.k, self.v, self.p
        if p is None:  # bfloat16: p recomputed from s = q k^T and the row lse
            s = xp.ascontiguousarray(self._mm(q, _mT(k)))
            p = self.kernels.causal_softmax_recompute(s, self.lse, self.scale)
            del s
        g = xp.ascontiguousarray(g, dtype=q.dtype)  # the products' operand
        f32 = B.float32
        dv = self._mm(_mT(p), g, f32)
        dp = xp.ascontiguousarray(self._mm(g, _mT(v)))
        ds = self.kernels.causal_softmax_backward(dp, p, self.scale)
        del dp
        return self._mm(ds, k, f32), self._mm(_mT(ds), q, f32), dv

    def backward(self, g):
        if self.kernels is not None:
            return self._cuda_backward(g)
        xp, q, k, v = self.xp, self.q, self.k, self.v
        L, S = q.shape[-2], k.shape[-2]
        scale = q.dtype.type(self.scale)
        D = xp.einsum("...ij,...ij->...i", g, self.out)[..., None]  # rowsum(do o)
        keep = self._dropout_keep(())
        p = self.p
        if p is None:
            p = self._scores((), self._query_operand(q), 0, L, 0, S)
            p -= self.lse[..., None]
            xp.exp(p, out=p)
        vt = _mT(v) if self.k_t_scaled is None else xp.ascontiguousarray(_mT(v))
        dp = xp.matmul(g, vt)
        if keep is not None:
            dv = xp.matmul(_mT(p * keep), g)
            dp *= keep
        else:
            dv = xp.matmul(_mT(p), g)
        dp -= D
        dp *= p  # ds; the scale of dq and dk is applied once, at the end
        dk = xp.matmul(_mT(dp), q)
        dq = xp.matmul(dp, k)
        dq *= scale
        dk *= scale
        return dq, dk, dv


class _AttentionTiled(_Attention):
    # One (batch, head) per item, items shared over threads, each in tiles:
    #   forward: a block of query rows against every key they may see. Softmax needs whole
    #     rows; o = (e v) / rowsum(e) with e = exp(s - m) divides the small (rows, Ev)
    #     product instead of the (rows, S) tile.
    #   backward: a block of keys against every query that may see them, so dk and dv of the
    #     block are finished in one go and only dq is accumulated across tiles; p is
    #     recomputed there as exp(s - lse).
    # With is_causal, query i sees keys j <= i: tiles skip the keys (queries) that lie wholly
    # in the future (past), which halves the work, and only tiles crossing the diagonal are
    # masked.
    # On a GPU (any namespace but NumPy) all heads form one item, so that each tile is one
    # batched product and a few elementwise kernels over (..., tile, S) rather than a launch
    # per head (a tile of the 124M model at B = 16 is (16, 12, 128, 1024)).
    def forward(self, q, k, v, mask, is_causal, scale, dropout_p, gen):
        lead, L, S = self._setup(q, k, v, mask, is_causal, scale, dropout_p)
        self.tile = _ATTN_TILE
        self.per_item = 1 if B.is_numpy(self.xp) else math.prod(lead)  # (batch, head)s
        heads = list(itertools.product(*map(range, lead)))
        self.items = heads if self.per_item == 1 else [()]
        if dropout_p > 0:  # a seed per (batch, head) on every device: the CPU's masks and draws
            self.seeds = dict(zip(heads, gen.integers(2**63, size=len(heads))))
        size = min(self.tile, L) * S * self.per_item
        work = L * S * math.prod(lead)
        _threads.map_items(
            self.xp, self._forward_item, self.items, size, 1, q.dtype, uses_blas=True, work=work
        )
        return self.out

    def _forward_item(self, item, buffer):
        xp = self.xp
        q, v, out, lse = self.q[item], self.v[item], self.out[item], self.lse[item]
        L, S = q.shape[-2], v.shape[-2]
        q_operand = self._query_operand(q)
        keep = self._dropout_keep(item)
        for r0 in range(0, L, self.tile):
            r1 = min(r0 + self.tile, L)
            c1 = min(r1, S) if self.is_causal else S  # keys this block of queries may see
            in_range = []
            s = self._scores(item, q_operand, r0, r1, 0, c1, buffer, in_range)
            denom, lse[..., r0:r1] = self._exp_rows(s, in_range[0])
            if keep is not None:
                s *= keep[..., r0:r1, :c1]
            o = out[..., r0:r1, :]
            xp.matmul(s, v[..., :c1, :], out=o)
            o /= denom

    def backward(self, g):
        xp, q, k, v = self.xp, self.q, self.k, self.v
        dq, dk, dv = xp.empty_like(q), xp.empty_like(k), xp.empty_like(v)
        each_item = partial(self._backward_item, g=g, dq=dq, dk=dk, dv=dv)
        size = q.shape[-2] * min(self.tile, k.shape[-2]) * self.per_item
        work = self.lse.size * k.shape[-2]  # number of scores
        _threads.map_items(xp, each_item, self.items, size, 2, q.dtype, uses_blas=True, work=work)
        return dq, dk, dv

    def _backward_item(self, item, p_buffer, dp_buffer, *, g, dq, dk, dv):
        xp = self.xp
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
        q_operand, vt = self._query_operand(q), _mT(v)
        for c0 in range(0, S, self.tile):
            c1 = min(c0 + self.tile, S)
            r0 = c0 if self.is_causal else 0  # the first query that may see these keys
            if r0 >= L:
                dk[..., c0:c1, :] = 0
                dv[..., c0:c1, :] = 0
                continue
            p = self._scores(item, q_operand, r0, L, c0, c1, p_buffer)
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


def _bf16_kernels(*arrays) -> bool:
    """Whether bfloat16 attention on these arrays' device runs bfloat16 products and the
    bfloat16 softmax kernels (a GPU with kernels and bf16 products on)."""
    return bool(cuda_kernels(*arrays, cast_16bit=True)) and cuda.bf16_matmul_enabled()


def _causal_kernels(q, k, v, mask, is_causal, dropout_p, cast_16bit=False):
    """The CUDA launchers when causal self-attention (L == S, no mask, no dropout) of float32
    arrays on a GPU may use the fused softmax kernels; else None."""
    if not is_causal or mask is not None or dropout_p > 0 or q.shape[-2] != k.shape[-2]:
        return None
    return cuda_kernels(q, k, v, cast_16bit=cast_16bit)


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
    lead = B.broadcast_shapes(query.shape[:-2], key.shape[:-2], value.shape[:-2])
    q = query if query.shape[:-2] == lead else query.expand(*lead, *query.shape[-2:])
    k = key if key.shape[:-2] == lead else key.expand(*lead, *key.shape[-2:])
    v = value if value.shape[:-2] == lead else value.expand(*lead, *value.shape[-2:])
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    mask = None if attn_mask is None else attn_mask.data
    L, S = query.shape[-2], key.shape[-2]
    if mask is not None:
        try:
            B.broadcast_shapes(mask.shape, (*lead, L, S))
        except ValueError:
            raise ValueError(
                f"scaled_dot_product_attention: attn_mask of shape {mask.shape} does not "
                f"broadcast to the scores' shape {(*lead, L, S)}"
            ) from None
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(
            f"scaled_dot_product_attention: dropout_p must be in [0, 1), got {dropout_p}"
        )
    scores = math.prod(lead) * L * S
    small = scores <= _ATTN_BATCH_ALL
    # On a GPU the untiled path with the fused softmax kernels runs up to _DEVICE_KEEP_SCORES
    # scores, the tiled one (all heads per tile, p recomputed in backward) above: the p that
    # the untiled path keeps for backward would dominate a GPU's memory (the estimate for
    # GPT-2 124M: benchmarks/README.md, "GPU memory of a 124M step, on paper").
    device = not B.is_numpy(get_array_module(q.data, k.data, v.data))
    if device and not small:
        kernels = bool(_causal_kernels(q.data, k.data, v.data, mask, is_causal, dropout_p, True))
        # bfloat16 (autocast, or bf16 tensors) keeps only the row lse at any size: backward
        # recomputes p (see _cuda_forward)
        low = q.dtype == B.bfloat16 or amp.get_autocast_dtype(q.device.type) == B.bfloat16
        bf16 = low and kernels and _bf16_kernels(q.data)
        small = bf16 or (scores <= _DEVICE_KEEP_SCORES and kernels)
    path = _AttentionUntiled if small else _AttentionTiled
    return path.apply(
        q,
        k,
        v,
        mask=mask,
        is_causal=is_causal,
        scale=scale,
        dropout_p=dropout_p,
        gen=default_generator(),
    )


def attention_reference(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
) -> Tensor:
    """softmax(q k^T * scale + mask) v from primitive Tensor ops (autograd gives backward).

    Slow and memory-hungry (every intermediate is a full (..., L, S) tensor), but short enough
    to check by eye: the tests hold both fused paths to it. Shapes and masks as
    ``scaled_dot_product_attention`` (no dropout)."""
    L, S = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale  # (..., L, S)
    if is_causal:  # query i sees keys j <= i
        attn_mask = arange(S).reshape(1, S) <= arange(L).reshape(L, 1)
    if attn_mask is not None and attn_mask.dtype == B.bool_:
        scores = where(attn_mask, scores, -math.inf)
    elif attn_mask is not None:
        scores = scores + attn_mask
    # softmax along keys; the row max (a constant per row) only keeps exp from overflowing
    e = (scores - scores.max(dim=-1, keepdim=True).detach()).exp()
    return (e / e.sum(dim=-1, keepdim=True)) @ value
