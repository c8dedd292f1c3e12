"""Both fused attention paths (untiled, tiled) against ``attention_reference``, the same
formula written with primitive Tensor ops; and that reference against PyTorch."""

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import handgrad as hg
from handgrad import backend as B
from handgrad.nn import _threads
from handgrad.nn import attention as A

# (q shape, k shape, options); v has k's shape with a last axis of 5
CASES = {
    "plain": ((2, 3, 6, 8), (2, 3, 6, 8), {}),
    "causal": ((2, 3, 9, 8), (2, 3, 9, 8), {"is_causal": True}),
    "L_lt_S": ((2, 5, 8), (2, 11, 8), {}),
    "L_gt_S": ((2, 11, 8), (2, 5, 8), {}),
    "causal_L_lt_S": ((2, 5, 8), (2, 11, 8), {"is_causal": True}),
    "causal_L_gt_S": ((2, 11, 8), (2, 5, 8), {"is_causal": True}),
    "bool_mask_L_ne_S": ((2, 3, 7, 8), (2, 3, 10, 8), {"mask": "bool"}),
    "float_mask_L_ne_S": ((2, 3, 10, 8), (2, 3, 7, 8), {"mask": "float"}),
    "scale": ((2, 6, 8), (2, 6, 8), {"scale": 0.3, "is_causal": True}),
}


@pytest.fixture(params=["untiled", "tiled"])
def path(request, monkeypatch):
    """Run attention on one path: untiled (all heads in one item, the default for small
    problems), or tiled with tiles of 4 and items shared over 3 threads."""
    if request.param == "tiled":
        monkeypatch.setattr(A, "_ATTN_BATCH_ALL", 0)
        monkeypatch.setattr(A, "_ATTN_TILE", 4)
        monkeypatch.setattr(B, "_num_threads", 3)
        monkeypatch.setattr(_threads, "PARALLEL_MIN_WORK", 0)
    return request.param


def _inputs(name, rng):
    q_shape, k_shape, kw = CASES[name]
    kw = dict(kw)
    q, k = rng.standard_normal(q_shape), rng.standard_normal(k_shape)
    v = rng.standard_normal((*k_shape[:-1], 5))
    mask_kind, mask = kw.pop("mask", None), None
    L, S = q_shape[-2], k_shape[-2]
    if mask_kind == "bool":
        mask = rng.random((L, S)) > 0.4
        mask[:, 0] = True  # no fully masked row
    elif mask_kind == "float":
        mask = rng.standard_normal((2, 1, L, S))
    return (q, k, v), mask, kw


def _run(fn, arrays, mask, kw, g):
    """fn's output and the gradients of q, k, v for the output gradient g."""
    leaves = [hg.tensor(a, requires_grad=True) for a in arrays]
    out = fn(*leaves, attn_mask=None if mask is None else hg.tensor(mask), **kw)
    out.backward(hg.tensor(g))
    return [out.data] + [t.grad.data for t in leaves]


@pytest.mark.parametrize("name", list(CASES))
def test_fused_paths_match_the_reference(name, path, rng):
    arrays, mask, kw = _inputs(name, rng)
    g = rng.standard_normal((*arrays[0].shape[:-1], 5))
    ours = _run(A.scaled_dot_product_attention, arrays, mask, kw, g)
    ref = _run(A.attention_reference, arrays, mask, kw, g)
    for what, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert a.shape == b.shape, what
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=f"{path} {what}")


@pytest.mark.parametrize("name", list(CASES))
def test_fused_paths_match_the_reference_in_float32(name, path, rng):
    arrays, mask, kw = _inputs(name, rng)
    arrays = [a.astype(np.float32) for a in arrays]
    mask = mask if mask is None or mask.dtype == bool else mask.astype(np.float32)
    g = rng.standard_normal((*arrays[0].shape[:-1], 5)).astype(np.float32)
    ours = _run(A.scaled_dot_product_attention, arrays, mask, kw, g)
    ref = _run(A.attention_reference, arrays, mask, kw, g)
    for what, a, b in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert a.dtype == np.float32, what
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5, err_msg=f"{path} {what}")


def test_the_paths_are_what_the_fixture_says(path, rng):
    """The fixture really switches paths: the tiled one runs several items in tiles."""
    ts = [hg.tensor(rng.standard_normal((2, 3, 9, 8)), requires_grad=True) for _ in range(3)]
    out = A.scaled_dot_product_attention(*ts, is_causal=True)
    node = out._ctx
    assert type(node).__name__ == {"untiled": "_AttentionUntiled", "tiled": "_AttentionTiled"}[path]
    if path == "tiled":
        assert len(node.items) == 6 and node.tile == 4


@pytest.mark.parametrize("name", list(CASES))
def test_the_reference_matches_torch(name, rng):
    arrays, mask, kw = _inputs(name, rng)
    g = rng.standard_normal((*arrays[0].shape[:-1], 5))
    ref = _run(A.attention_reference, arrays, mask, kw, g)
    leaves = [torch.tensor(a, requires_grad=True) for a in arrays]
    mask_t = None if mask is None else torch.from_numpy(mask)
    out = TF.scaled_dot_product_attention(*leaves, attn_mask=mask_t, **kw)
    out.backward(torch.from_numpy(g))
    torch_results = [out.detach().numpy()] + [t.grad.numpy() for t in leaves]
    for what, a, b in zip(("out", "dq", "dk", "dv"), ref, torch_results):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12, err_msg=what)
