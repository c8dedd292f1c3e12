"""clip_grad_norm_ against torch.nn.utils.clip_grad_norm_."""

import math

import numpy as np
import pytest
import torch

import handgrad as hg
from handgrad.nn import Parameter
from handgrad.nn.utils import clip_grad_norm_

SHAPES = [(4, 3), (3,), (2, 5, 2)]


def pair(seed, dtype=np.float64, scale=1.0):
    rng = np.random.default_rng(seed)
    grads = [rng.standard_normal(s) * scale for s in SHAPES]
    ours = []
    for g in grads:
        p = Parameter(hg.zeros(g.shape, dtype=dtype))
        p.grad = hg.tensor(g, dtype=dtype)
        ours.append(p)
    theirs = []
    for g in grads:
        q = torch.zeros(g.shape, dtype=torch.float64 if dtype == np.float64 else torch.float32)
        q.grad = torch.tensor(g, dtype=q.dtype)
        theirs.append(q)
    return ours, theirs


@pytest.mark.parametrize("norm_type", [2.0, 1.0, 3.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipping and a no-op
def test_clip_grad_norm_matches_torch(norm_type, max_norm):
    ours, theirs = pair(0)
    total = clip_grad_norm_(ours, max_norm, norm_type)
    ref = torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type)
    assert isinstance(total, hg.Tensor) and total.shape == ()
    assert total.item() == pytest.approx(ref.item(), rel=1e-12)
    for p, q in zip(ours, theirs):
        np.testing.assert_allclose(p.grad.data, q.grad.numpy(), rtol=1e-12)


def test_clip_grad_norm_by_hand_and_float32():
    p = Parameter(hg.zeros(2))
    p.grad = hg.tensor([3.0, 4.0])
    total = clip_grad_norm_([p], max_norm=1.0)
    assert total.dtype == np.float32 and total.item() == 5.0  # norm before clipping
    # grads scaled by 1 / (5 + 1e-6)
    np.testing.assert_allclose(p.grad.data, [3 / (5 + 1e-6), 4 / (5 + 1e-6)], rtol=1e-6)
    assert p.grad.dtype == np.float32

    ours, theirs = pair(1, dtype=np.float32, scale=10.0)
    total = clip_grad_norm_(iter(ours), 1.0)  # a generator is fine
    ref = torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    assert total.item() == pytest.approx(ref.item(), rel=1e-6)
    for p, q in zip(ours, theirs):
        np.testing.assert_allclose(p.grad.data, q.grad.numpy(), rtol=1e-6)


def test_clip_grad_norm_skips_params_without_grad():
    ours, theirs = pair(2)
    ours[1].grad, theirs[1].grad = None, None
    total = clip_grad_norm_(ours + [Parameter(hg.zeros(3))], 0.1)
    ref = torch.nn.utils.clip_grad_norm_(theirs, 0.1)
    assert total.item() == pytest.approx(ref.item(), rel=1e-12)
    assert ours[1].grad is None


def test_clip_grad_norm_bad_input():
    # no gradients at all: total norm 0, as torch, and nothing to scale
    assert clip_grad_norm_([Parameter(hg.zeros(3))], 1.0).item() == 0.0
    assert clip_grad_norm_([], 1.0).item() == 0.0
    p = Parameter(hg.zeros(2))
    p.grad = hg.tensor([float("nan"), 1.0])
    with pytest.raises(RuntimeError, match="total norm of order 2.0 of the gradients is nan"):
        clip_grad_norm_(p, 1.0, error_if_nonfinite=True)
    with pytest.raises(TypeError, match="parameter 0 is a ndarray"):
        clip_grad_norm_([np.zeros(2)], 1.0)
    with pytest.raises(ValueError, match="norm_type must be > 0"):
        clip_grad_norm_([p], 1.0, norm_type=0)
