"""Layers against torch.nn layers holding the same weights: outputs and gradients; init."""

import math

import numpy as np
import pytest
import torch

import handgrad as hg
from handgrad import nn
from handgrad.nn import init


def copy_weights(ours, theirs):
    theirs.load_state_dict({k: torch.tensor(v.numpy()) for k, v in ours.state_dict().items()})


def check_grads(ours, theirs, rtol=1e-10):
    for (name, p), (tname, q) in zip(ours.named_parameters(), theirs.named_parameters()):
        assert name == tname
        np.testing.assert_allclose(p.grad.data, q.grad.numpy(), rtol=rtol, atol=rtol, err_msg=name)


def run_both(ours, theirs, x, rtol=1e-10):
    """Forward a float64 input through both, backprop a fixed random cotangent, compare."""
    ours.double()
    theirs.double()
    copy_weights(ours, theirs)
    xo = hg.tensor(x, dtype=hg.float64, requires_grad=True)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    yo, yt = ours(xo), theirs(xt)
    np.testing.assert_allclose(yo.data, yt.detach().numpy(), rtol=rtol, atol=rtol)
    g = np.random.default_rng(1).standard_normal(yo.shape)
    yo.backward(hg.tensor(g, dtype=hg.float64))
    yt.backward(torch.tensor(g))
    np.testing.assert_allclose(xo.grad.data, xt.grad.numpy(), rtol=rtol, atol=rtol)
    check_grads(ours, theirs, rtol)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_matches_torch(bias):
    ours, theirs = nn.Linear(5, 3, bias=bias), torch.nn.Linear(5, 3, bias=bias)
    assert ours.weight.shape == (3, 5)
    x = np.random.default_rng(0).standard_normal((2, 4, 5))
    run_both(ours, theirs, x)


def test_layer_norm_matches_torch():
    ours, theirs = nn.LayerNorm(6), torch.nn.LayerNorm(6)
    rng = np.random.default_rng(2)
    ours.weight.data[...] = rng.standard_normal(6)  # non-trivial affine parameters
    ours.bias.data[...] = rng.standard_normal(6)
    run_both(ours, theirs, rng.standard_normal((3, 4, 6)) * 3 + 1)
    ours, theirs = (
        nn.LayerNorm((2, 3), eps=1e-3, bias=False),
        torch.nn.LayerNorm((2, 3), eps=1e-3, bias=False),
    )
    assert ours.bias is None and [n for n, _ in ours.named_parameters()] == ["weight"]
    run_both(ours, theirs, rng.standard_normal((4, 2, 3)))
    ours = nn.LayerNorm(4, elementwise_affine=False)
    assert list(ours.parameters()) == []
    run_both(ours, torch.nn.LayerNorm(4, elementwise_affine=False), rng.standard_normal((3, 4)))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_matches_torch(approximate):
    x = np.linspace(-6, 6, 49).reshape(7, 7)
    run_both(nn.GELU(approximate), torch.nn.GELU(approximate), x)
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        nn.GELU("erf")


def test_relu_tanh_match_torch():
    x = np.random.default_rng(3).standard_normal((4, 5))
    run_both(nn.ReLU(), torch.nn.ReLU(), x)
    run_both(nn.Tanh(), torch.nn.Tanh(), x)


def test_embedding_matches_torch():
    ours, theirs = nn.Embedding(10, 4), torch.nn.Embedding(10, 4)
    ours.double()
    theirs.double()
    copy_weights(ours, theirs)
    idx = np.array([[1, 3, 3, 9], [0, 1, 1, 1]])  # repeated ids must accumulate gradient
    yo, yt = ours(hg.tensor(idx)), theirs(torch.tensor(idx))
    np.testing.assert_array_equal(yo.data, yt.detach().numpy())
    g = np.random.default_rng(4).standard_normal(yo.shape)
    yo.backward(hg.tensor(g, dtype=hg.float64))
    yt.backward(torch.tensor(g))
    check_grads(ours, theirs, 1e-12)


def test_dropout_train_and_eval():
    hg.manual_seed(0)
    drop = nn.Dropout(0.25)
    x = hg.ones(200, 100, requires_grad=True)
    y = drop(x)
    kept = y.data != 0
    assert 0.72 < kept.mean() < 0.78  # ~ 1 - p of 20,000 elements
    np.testing.assert_allclose(y.data[kept], 1 / 0.75, rtol=1e-6)  # inverted-dropout scaling
    y.sum().backward()
    np.testing.assert_allclose(x.grad.data, kept / 0.75, rtol=1e-6)  # grad flows through kept
    drop.eval()
    assert np.array_equal(drop(x).data, x.data)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        nn.Dropout(1.5)
    assert repr(drop) == repr(torch.nn.Dropout(0.25))


def test_linear_init_is_torch_like_and_seeded():
    hg.manual_seed(123)
    a = nn.Linear(400, 300)
    hg.manual_seed(123)
    b = nn.Linear(400, 300)
    np.testing.assert_array_equal(a.weight.data, b.weight.data)
    np.testing.assert_array_equal(a.bias.data, b.bias.data)
    bound = 1 / math.sqrt(400)
    w = a.weight.data
    assert w.dtype == np.float32 and np.abs(w).max() <= bound
    # U(-b, b) has mean 0 and std b/sqrt(3); 120,000 samples pin both down tightly
    assert abs(w.mean()) < 0.01 * bound
    assert abs(w.std() - bound / math.sqrt(3)) < 0.01 * bound
    assert np.abs(a.bias.data).max() <= bound and a.bias.data.std() > 0.4 * bound
    c = nn.Linear(400, 300)  # the generator moved on: different weights
    assert not np.array_equal(a.weight.data, c.weight.data)
    assert nn.Linear(3, 2, dtype=hg.bfloat16).weight.dtype == hg.bfloat16


def test_embedding_and_layer_norm_init():
    hg.manual_seed(5)
    e = nn.Embedding(500, 200)
    assert abs(e.weight.data.mean()) < 0.01 and abs(e.weight.data.std() - 1) < 0.01
    ln = nn.LayerNorm(7)
    assert ln.weight.data.tolist() == [1.0] * 7 and ln.bias.data.tolist() == [0.0] * 7


def test_init_helpers_in_place_seeded_and_graph_free():
    t = nn.Parameter(hg.zeros(300, 400))
    data = t.data
    hg.manual_seed(9)
    assert init.normal_(t, mean=0.5, std=0.02) is t
    assert t.data is data and t.grad is None and t.is_leaf  # in place, nothing recorded
    assert abs(t.data.mean() - 0.5) < 1e-3 and abs(t.data.std() - 0.02) < 1e-3
    first = t.data.copy()
    hg.manual_seed(9)
    init.normal_(t, mean=0.5, std=0.02)
    np.testing.assert_array_equal(t.data, first)
    init.uniform_(t, -2.0, 3.0)
    assert t.data.min() >= -2.0 and t.data.max() < 3.0 and abs(t.data.mean() - 0.5) < 0.02
    init.zeros_(t)
    assert not t.data.any()
    init.ones_(t)
    assert (t.data == 1).all()
    t16 = nn.Parameter(hg.zeros(10, dtype=hg.bfloat16))
    init.normal_(t16)
    assert t16.dtype == hg.bfloat16 and t16.data.astype(np.float32).std() > 0.3
    with pytest.raises(ValueError, match="std must be >= 0"):
        init.normal_(t, std=-1.0)
    with pytest.raises(TypeError, match="expected a Tensor"):
        init.zeros_(np.zeros(3))
