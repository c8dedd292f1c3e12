"""Fused ops in handgrad.nn.functional: forward values and gradients against PyTorch."""

from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from _torchref import DTYPES, assert_close, compare, numerical_grad

import handgrad as hg
import handgrad.nn.functional as F
from handgrad import backend as B
from handgrad.nn import _threads
from handgrad.nn import attention as A


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5,), (4, 5), (2, 3, 5), (1, 1, 5)], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_linear(shape, bias, dtype, rng):
    x, w, b = rng.standard_normal(shape), rng.standard_normal((3, 5)), rng.standard_normal(3)
    if bias:
        compare(F.linear, TF.linear, x, w, b, dtype=dtype, rng=rng)
    else:
        compare(F.linear, TF.linear, x, w, dtype=dtype, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("idx_shape", [(6,), (2, 4), ()], ids=str)
def test_embedding_with_repeated_indices(idx_shape, dtype, rng):
    w = rng.standard_normal((5, 3))
    idx = rng.integers(0, 5, size=idx_shape)
    if idx.size > 1:
        idx.flat[0] = idx.flat[-1]  # at least one repeat
    compare(F.embedding, TF.embedding, idx, w, dtype=dtype, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("approximate", ["tanh", "none"])
@pytest.mark.parametrize("shape", [(3, 4), (7,), ()], ids=str)
def test_gelu(approximate, shape, dtype, rng):
    x = rng.standard_normal(shape) * 3
    compare(
        lambda t: F.gelu(t, approximate=approximate),
        lambda t: TF.gelu(t, approximate=approximate),
        x,
        dtype=dtype,
        rng=rng,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,dim", [((3, 5), -1), ((3, 5), 0), ((2, 3, 4), 1), ((4,), 0), ((2, 1), -1)], ids=str
)
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax(name, shape, dim, dtype, rng):
    x = rng.standard_normal(shape) * 3
    compare(
        lambda t: getattr(F, name)(t, dim=dim),
        lambda t: getattr(TF, name)(t, dim=dim),
        x,
        dtype=dtype,
        rng=rng,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_large_logits_are_stable(dtype, rng):
    x = rng.standard_normal((3, 6)) * 30 + 500
    compare(lambda t: F.softmax(t, -1), lambda t: TF.softmax(t, -1), x, dtype=dtype, rng=rng)
    compare(
        lambda t: F.log_softmax(t, -1), lambda t: TF.log_softmax(t, -1), x, dtype=dtype, rng=rng
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fn", ["relu", "tanh", "sigmoid"])
def test_activation_aliases(fn, dtype, rng):
    compare(
        getattr(F, fn),
        getattr(TF, fn) if fn == "relu" else getattr(torch, fn),
        rng.standard_normal((3, 4)),
        dtype=dtype,
        rng=rng,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,norm",
    [((4, 6), (6,)), ((2, 3, 6), (6,)), ((2, 3, 4), (3, 4)), ((5,), (5,)), ((2, 1), (1,))],
    ids=str,
)
@pytest.mark.parametrize("affine", ["none", "weight", "both"])
def test_layer_norm(shape, norm, affine, dtype, rng):
    x = rng.standard_normal(shape) * 2 + 1
    params = [rng.standard_normal(norm) for _ in range({"none": 0, "weight": 1, "both": 2}[affine])]
    compare(
        lambda t, *p: F.layer_norm(t, norm if len(norm) > 1 else norm[0], *p),
        lambda t, *p: TF.layer_norm(t, norm, *p),
        x,
        *params,
        dtype=dtype,
        rng=rng,
    )


@pytest.fixture
def small_pieces(monkeypatch):
    """gelu and layer_norm split big inputs into pieces shared over threads: make the pieces
    tiny (20 elements) and the threads 3, so that small test inputs go the same way."""
    monkeypatch.setattr(_threads, "ELEMENTWISE_CHUNK", 20)
    monkeypatch.setattr(B, "_num_threads", 3)
    monkeypatch.setattr(_threads, "PARALLEL_MIN_WORK", 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_in_pieces_on_threads(dtype, rng, small_pieces):
    x = rng.standard_normal((3, 5, 7)) * 3  # 105 elements: 5 pieces of 20 and one of 5
    compare(
        lambda t: F.gelu(t, approximate="tanh"),
        lambda t: TF.gelu(t, approximate="tanh"),
        x,
        dtype=dtype,
        rng=rng,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "norm,n_params",
    [((8,), 2), ((8,), 1), ((5, 8), 2)],  # 15 rows of 8: blocks of 2 rows and a last of 1;
    ids=str,  # rows of 40, wider than a piece: one row per block
)
def test_layer_norm_in_pieces_on_threads(norm, n_params, dtype, rng, small_pieces):
    x = rng.standard_normal((3, 5, 8)) * 2 + 1
    params = [rng.standard_normal(norm) for _ in range(n_params)]
    compare(
        lambda t, *p: F.layer_norm(t, norm, *p),
        lambda t, *p: TF.layer_norm(t, norm, *p),
        x,
        *params,
        dtype=dtype,
        rng=rng,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_custom_eps(dtype, rng):
    x = rng.standard_normal((3, 4)) * 0.01
    compare(
        lambda t: F.layer_norm(t, 4, eps=1e-3),
        lambda t: TF.layer_norm(t, (4,), eps=1e-3),
        x,
        dtype=dtype,
        rng=rng,
    )


CE_SHAPES = [
    ((6, 5), (6,)),
    ((5,), ()),
    ((3, 5, 4), (3, 4)),
    ((2, 5, 3, 2), (2, 3, 2)),
    ((1, 1), (1,)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", CE_SHAPES, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("ignore_index", [-100, 2])
def test_cross_entropy(shapes, reduction, label_smoothing, ignore_index, dtype, rng):
    x_shape, t_shape = shapes
    c = x_shape[1] if len(x_shape) > 1 else x_shape[0]
    x = rng.standard_normal(x_shape) * 2
    target = rng.integers(0, c, size=t_shape)
    if target.size > 2:
        target.flat[0] = ignore_index if ignore_index < 0 else min(ignore_index, c - 1)
        target.flat[1] = 0 if c > 1 else target.flat[1]  # a counted row

    def call(lib):
        return lambda x, t: lib.cross_entropy(
            x, t, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
        )

    compare(call(F), call(TF), x, target, dtype=dtype, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_many_ignored_rows_mean_divides_by_counted(dtype, rng):
    x = rng.standard_normal((8, 4))
    target = np.array([1, -100, -100, 3, -100, 0, -100, -100])
    compare(F.cross_entropy, TF.cross_entropy, x, target, dtype=dtype, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_all_ignored_is_nan_like_torch(dtype, rng):
    x = rng.standard_normal((3, 4)).astype(dtype)
    t = np.full(3, -100)
    ours = F.cross_entropy(hg.tensor(x), hg.tensor(t))
    ref = TF.cross_entropy(torch.from_numpy(x), torch.from_numpy(t))
    assert torch.isnan(ref) and np.isnan(ours.item())
    for reduction in ("sum", "none"):
        ours = F.cross_entropy(hg.tensor(x), hg.tensor(t), reduction=reduction)
        ref = TF.cross_entropy(torch.from_numpy(x), torch.from_numpy(t), reduction=reduction)
        np.testing.assert_array_equal(ours.data, ref.numpy())


SDPA_CASES = {
    "plain": ((2, 3, 4, 8), (2, 3, 4, 8), {}),
    "causal": ((2, 3, 5, 8), (2, 3, 5, 8), {"is_causal": True}),
    "causal_L_lt_S": ((2, 4, 6), (2, 7, 6), {"is_causal": True}),
    "causal_L_gt_S": ((2, 7, 6), (2, 4, 6), {"is_causal": True}),
    "L_ne_S": ((2, 3, 8), (2, 5, 8), {}),
    "2d": ((4, 8), (6, 8), {}),
    "broadcast_batch": ((2, 1, 4, 8), (2, 3, 5, 8), {}),
    "broadcast_kv": ((2, 3, 4, 8), (1, 3, 5, 8), {"is_causal": True}),
    "scale": ((2, 4, 8), (2, 4, 8), {"scale": 0.3}),
    "bool_mask": ((2, 3, 4, 8), (2, 3, 5, 8), {"mask": "bool"}),
    "float_mask": ((2, 3, 4, 8), (2, 3, 5, 8), {"mask": "float"}),
    "bool_mask_broadcast": ((2, 3, 4, 8), (2, 3, 5, 8), {"mask": "bool_row"}),
}


def _sdpa_mask(kind, rng, L, S):
    if kind == "bool":
        m = rng.random((L, S)) > 0.4
        m[:, 0] = True  # no fully masked row
        return m
    if kind == "bool_row":
        m = rng.random((1, 3, 1, S)) > 0.5
        m[..., 0] = True
        return m
    return rng.standard_normal((2, 1, L, S))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(SDPA_CASES))
def test_scaled_dot_product_attention(name, dtype, rng):
    q_shape, kv_shape, kw = SDPA_CASES[name]
    kw = dict(kw)
    q, k = rng.standard_normal(q_shape), rng.standard_normal(kv_shape)
    v = rng.standard_normal((*kv_shape[:-1], 3))
    _compare_sdpa([q, k, v], kw, dtype, rng)


def _compare_sdpa(arrays, kw, dtype, rng):
    """Our attention against torch's on (q, k, v); kw may hold mask="bool" or "float"."""
    mask_kind = kw.pop("mask", None)
    mask_t = mask_r = None
    if mask_kind is not None:
        mask = _sdpa_mask(mask_kind, rng, arrays[0].shape[-2], arrays[1].shape[-2])
        # a float mask is data, not a parameter: keep it out of the gradient check
        mask_t = hg.tensor(mask.astype(dtype) if mask.dtype.kind == "f" else mask)
        mask_r = torch.from_numpy(mask.astype(np.float64) if mask.dtype.kind == "f" else mask)
    compare(
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask_t, **kw),
        lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, attn_mask=mask_r, **kw),
        *arrays,
        dtype=dtype,
        rng=rng,
    )


def test_sdpa_blocks_give_the_same_result_as_one_block(rng, monkeypatch):
    """Forward and backward loop over tiles of queries (keys), one head per item, items shared
    out over threads; neither that nor the thread count may change the result."""
    q, k, v = (rng.standard_normal((3, 4, 6, 5)) for _ in range(3))
    g = rng.standard_normal((3, 4, 6, 5))
    results = []
    # all heads in one untiled item (as small problems run), then one item per head in tiles
    # of 4 rows (6 = 4 + 2) on 5 threads, then the same as if threadpoolctl were missing (so
    # BLAS cannot be limited and one thread is used)
    for batch_all, workers, can_limit_blas in (
        (1 << 20, 1, True),
        (0, 5, True),
        (0, 5, False),
    ):
        monkeypatch.setattr(A, "_ATTN_BATCH_ALL", batch_all)
        monkeypatch.setattr(A, "_ATTN_TILE", 4)
        monkeypatch.setattr(B, "_num_threads", workers)
        monkeypatch.setattr(_threads, "PARALLEL_MIN_WORK", 0)
        monkeypatch.setattr(B, "can_limit_blas", lambda can=can_limit_blas: can)
        ts = [hg.tensor(a, requires_grad=True) for a in (q, k, v)]
        out = F.scaled_dot_product_attention(*ts, is_causal=True)
        out.backward(hg.tensor(g))
        results.append([out.data] + [t.grad.data for t in ts])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_sdpa_kept_probabilities_match_recomputed_ones(rng):
    """A small causal problem keeps p from forward for backward; with the same causal mask
    given as a boolean matrix, backward recomputes p from q, k and the saved lse instead.
    Both must give the same output and gradients."""
    q, k, v, g = (rng.standard_normal((3, 4, 6, 5)) for _ in range(4))
    tril = hg.tensor(np.tril(np.ones((6, 6), dtype=bool)))
    results = []
    for kw in ({"is_causal": True}, {"attn_mask": tril}):
        ts = [hg.tensor(a, requires_grad=True) for a in (q, k, v)]
        out = F.scaled_dot_product_attention(*ts, **kw)
        out.backward(hg.tensor(g))
        results.append([out.data] + [t.grad.data for t in ts])
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("magnitude", [1.0, 8.0])
@pytest.mark.parametrize("no_shift", [0.0, 64.0])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sdpa_softmax_with_and_without_the_row_max(
    dtype, no_shift, magnitude, tiled, rng, monkeypatch
):
    """Tiles whose raw scores all lie within +-_SOFTMAX_NO_SHIFT skip the row max; others
    subtract it. Scores of ~1 and of ~60 and more (rows whose exp would overflow or vanish
    without the max), with the limit at 0 (always subtract) and at its default: torch's
    attention must agree in every case, forward and backward."""
    monkeypatch.setattr(A, "_SOFTMAX_NO_SHIFT", no_shift)
    if tiled:
        monkeypatch.setattr(A, "_ATTN_BATCH_ALL", 0)
        monkeypatch.setattr(A, "_ATTN_TILE", 4)
    q = rng.standard_normal((2, 3, 9, 8)) * magnitude
    k = rng.standard_normal((2, 3, 9, 8)) * magnitude
    v = rng.standard_normal((2, 3, 9, 5))
    q[0, 0, 2] -= 30.0 * magnitude  # one query far from the others (its scores: hundreds)
    for kw in ({"is_causal": True}, {}):
        compare(
            partial(F.scaled_dot_product_attention, **kw),
            partial(TF.scaled_dot_product_attention, **kw),
            q,
            k,
            v,
            dtype=dtype,
            rng=rng,
        )


# (q shape, k shape, options): lengths that are not multiples of the tile (4 in the test)
SDPA_TILED_CASES = {
    "causal_T_not_multiple": ((2, 3, 11, 8), (2, 3, 11, 8), {"is_causal": True}),
    "causal_L_lt_S": ((2, 6, 8), (2, 11, 8), {"is_causal": True}),
    "causal_L_gt_S": ((2, 11, 8), (2, 6, 8), {"is_causal": True}),
    "bool_mask_L_ne_S": ((2, 3, 7, 8), (2, 3, 10, 8), {"mask": "bool"}),
    "float_mask_L_ne_S": ((2, 3, 10, 8), (2, 3, 7, 8), {"mask": "float"}),
    "no_mask_L_ne_S": ((2, 9, 8), (2, 5, 8), {}),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(SDPA_TILED_CASES))
def test_sdpa_tiled_matches_torch(name, dtype, rng, monkeypatch):
    """Small tiles (4) and several threads: causal tiles skip keys in the future and mask only
    across the diagonal (top-left aligned when L != S, as torch); explicit masks are sliced
    per tile. All of it must agree with torch's untiled attention."""
    monkeypatch.setattr(A, "_ATTN_BATCH_ALL", 0)  # one head per item, however small
    monkeypatch.setattr(A, "_ATTN_TILE", 4)
    monkeypatch.setattr(B, "_num_threads", 3)
    monkeypatch.setattr(_threads, "PARALLEL_MIN_WORK", 0)
    q_shape, kv_shape, kw = SDPA_TILED_CASES[name]
    kw = dict(kw)
    arrays = [rng.standard_normal(q_shape), rng.standard_normal(kv_shape)]
    arrays.append(rng.standard_normal((*kv_shape[:-1], 5)))
    _compare_sdpa(arrays, kw, dtype, rng)


@pytest.mark.parametrize("per_head", [False, True])
def test_sdpa_dropout_gradient_matches_finite_differences(per_head, rng, monkeypatch):
    """With dropout the mask comes from handgrad's generator (torch's RNG differs), so the
    gradient is checked against central differences with the same generator state; both
    with all heads in one item and with one item per head in tiles of 2."""
    if per_head:
        monkeypatch.setattr(A, "_ATTN_BATCH_ALL", 0)
        monkeypatch.setattr(A, "_ATTN_TILE", 2)
    q, k, v = (rng.standard_normal((2, 3, 4)) for _ in range(3))
    g = rng.standard_normal((2, 3, 4))
    hg.manual_seed(123)
    state = hg.get_rng_state()

    def loss(q_, k_, v_):
        hg.set_rng_state(state)
        out = F.scaled_dot_product_attention(q_, k_, v_, dropout_p=0.3, is_causal=True)
        return (out * hg.tensor(g)).sum()

    leaves = [hg.tensor(a, requires_grad=True) for a in (q, k, v)]
    loss(*leaves).backward()
    arrays = [q, k, v]
    for i, leaf in enumerate(leaves):

        def f(x, i=i):
            args = [hg.tensor(x if j == i else a) for j, a in enumerate(arrays)]
            with hg.no_grad():
                return loss(*args).item()

        assert_close(leaf.grad.data, numerical_grad(f, arrays[i]), 1e-6, f"input {i}")

    # the dropout actually dropped something: output differs from p=0
    hg.set_rng_state(state)
    with hg.no_grad():
        dropped = F.scaled_dot_product_attention(*map(hg.tensor, arrays), dropout_p=0.3)
        clean = F.scaled_dot_product_attention(*map(hg.tensor, arrays))
    assert np.abs(dropped.data - clean.data).max() > 1e-3


def test_sdpa_dropout_is_unbiased(rng):
    """E[dropout attention] = attention: average over many independent masks (batch copies)."""
    q, k, v = (rng.standard_normal((1, 3, 4)) for _ in range(3))
    n = 20000
    hg.manual_seed(7)
    with hg.no_grad():
        queries, keys, values = (hg.tensor(np.broadcast_to(a, (n, 3, 4)).copy()) for a in (q, k, v))
        out = F.scaled_dot_product_attention(queries, keys, values, dropout_p=0.25).data
        clean = F.scaled_dot_product_attention(*map(hg.tensor, (q, k, v))).data[0]
    mean, sem = out.mean(axis=0), out.std(axis=0) / np.sqrt(n)
    assert np.all(np.abs(mean - clean) < 5 * sem + 1e-9)
    assert np.abs(out - clean).max() > 0.1  # individual draws do differ


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_statistics_and_gradient(p, rng):
    x = hg.tensor(rng.uniform(1.0, 2.0, size=(400, 500)), requires_grad=True)
    y = F.dropout(x, p=p, generator=np.random.default_rng(0))
    zeroed = y.data == 0
    assert abs(zeroed.mean() - p) < 0.01
    kept = ~zeroed
    np.testing.assert_allclose(y.data[kept], x.data[kept] / (1 - p), rtol=1e-12)
    assert abs(y.data.mean() / x.data.mean() - 1) < 0.01  # mean preserved
    g = rng.standard_normal(x.shape)
    y.backward(hg.tensor(g))
    np.testing.assert_allclose(x.grad.data, g * kept / (1 - p), rtol=1e-12)


def test_dropout_uses_global_generator_reproducibly(rng):
    x = hg.tensor(rng.standard_normal((50, 40)))
    hg.manual_seed(5)
    a = F.dropout(x, 0.3).data
    hg.manual_seed(5)
    b = F.dropout(x, 0.3).data
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, F.dropout(x, 0.3).data)


def test_dropout_eval_mode_and_edge_probabilities(rng):
    x = hg.tensor(rng.standard_normal((3, 4)), requires_grad=True)
    for y in (F.dropout(x, 0.5, training=False), F.dropout(x, 0.0)):
        np.testing.assert_array_equal(y.data, x.data)
        x.grad = None
        g = rng.standard_normal((3, 4))
        y.backward(hg.tensor(g))
        np.testing.assert_array_equal(x.grad.data, g)
    y = F.dropout(x, 1.0)
    assert not np.any(y.data)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shapes", [((3, 4), (3, 4)), ((5,), (5,)), ((2, 3), (3,))], ids=str)
def test_mse_loss(reduction, shapes, dtype, rng):
    a, b = rng.standard_normal(shapes[0]), rng.standard_normal(shapes[1])
    if shapes[0] != shapes[1]:
        b = np.broadcast_to(b, shapes[0]).copy()  # torch warns on broadcasting targets
    compare(
        lambda x, y: F.mse_loss(x, y, reduction=reduction),
        lambda x, y: TF.mse_loss(x, y, reduction=reduction),
        a,
        b,
        dtype=dtype,
        rng=rng,
    )


@pytest.mark.parametrize("shape", [(5,), (2, 3), ()], ids=str)
def test_one_hot(shape, rng):
    idx = rng.integers(0, 4, size=shape)
    ours = F.one_hot(hg.tensor(idx), num_classes=4)
    ref = TF.one_hot(torch.from_numpy(idx), num_classes=4)
    assert ours.dtype == np.int64
    np.testing.assert_array_equal(ours.data, ref.numpy())


def test_layer_norm_row_does_not_depend_on_its_batch(rng):
    """A row's output is bit-for-bit the same alone or among other rows (evaluation batches
    requests together and compares with unbatched scoring). A BLAS matrix-vector product for
    the row means fails this at these sizes; a NumPy reduction does not."""
    for rows, n in ((8, 64), (37, 16), (5, 128)):
        x = rng.standard_normal((rows, n)).astype(np.float32)
        w, b = (hg.tensor(rng.standard_normal(n).astype(np.float32)) for _ in range(2))
        full = F.layer_norm(hg.tensor(x), n, w, b).data
        for i in range(rows):
            alone = F.layer_norm(hg.tensor(x[i : i + 1]), n, w, b).data
            np.testing.assert_array_equal(alone[0], full[i], err_msg=f"row {i} of {rows} x {n}")
