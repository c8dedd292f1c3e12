"""The autograd engine: accumulation, graph reuse and freeing, grad modes, deep graphs,
and finite-difference gradient checks that do not rely on torch."""

import gc
import sys

import numpy as np
import pytest
from _torchref import gradcheck

import handgrad as hg
import handgrad.nn.functional as F


def leaf(rng, *shape):
    return hg.tensor(rng.standard_normal(shape), requires_grad=True)


def test_gradient_accumulates_across_backward_calls_until_zeroed(rng):
    x = leaf(rng, 3)
    (x * 2.0).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad.data, np.full(3, 5.0))
    x.grad.zero_()
    (x * 4.0).sum().backward()
    np.testing.assert_array_equal(x.grad.data, np.full(3, 4.0))
    x.grad = None
    (x * 7.0).sum().backward()
    np.testing.assert_array_equal(x.grad.data, np.full(3, 7.0))


def test_accumulated_grad_is_not_aliased_to_the_upstream_gradient(rng):
    x = leaf(rng, 3)
    g = hg.tensor(np.ones(3))
    x.backward(g)
    x.backward(g)
    np.testing.assert_array_equal(x.grad.data, np.full(3, 2.0))
    np.testing.assert_array_equal(g.data, np.ones(3))  # the caller's gradient is untouched


def test_tensor_used_twice_gets_summed_gradients(rng):
    x = leaf(rng, 4)
    (x * x).sum().backward()
    np.testing.assert_allclose(x.grad.data, 2 * x.data)
    x.grad = None
    (x + x).sum().backward()
    np.testing.assert_array_equal(x.grad.data, np.full(4, 2.0))
    x.grad = None
    # a diamond: y feeds two branches that meet again
    y = x.exp()
    (y * 3.0 + y.tanh()).sum().backward()
    ey = np.exp(x.data)
    np.testing.assert_allclose(x.grad.data, ey * (3 + 1 - np.tanh(ey) ** 2), rtol=1e-12)


@pytest.mark.parametrize("depth", [1000, 3000])
def test_deep_chain_does_not_hit_the_recursion_limit(depth, rng):
    x = leaf(rng, 2)
    y = x
    for _ in range(depth):
        y = y * 1.001 + 0.0
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(min(limit, 1000))  # stay well below the depth
    try:
        y.sum().backward()
    finally:
        sys.setrecursionlimit(limit)
    np.testing.assert_allclose(x.grad.data, np.full(2, 1.001**depth), rtol=1e-10)


def test_deep_graph_can_be_dropped_without_backward(rng):
    """Freeing a long chain of nodes must not overflow the C stack either."""
    x = leaf(rng, 2)
    y = x
    for _ in range(3000):
        y = y + 1.0
    del y
    gc.collect()


def test_backward_twice_on_a_freed_graph_raises(rng):
    x = leaf(rng, 3)
    y = (x.exp() * x).sum()
    y.backward()
    with pytest.raises(RuntimeError, match="second time.*retain_graph=True"):
        y.backward()


def test_retain_graph_allows_a_second_backward(rng):
    x = leaf(rng, 3)
    y = (x.exp() * x).sum()
    y.backward(retain_graph=True)
    first = x.grad.data.copy()
    y.backward()
    np.testing.assert_allclose(x.grad.data, 2 * first, rtol=1e-12)
    np.testing.assert_allclose(first, np.exp(x.data) * (x.data + 1), rtol=1e-12)


def test_no_grad_context_records_nothing(rng):
    x = leaf(rng, 3)
    with hg.no_grad():
        assert not hg.is_grad_enabled()
        y = x * 2 + 1
        with hg.enable_grad():
            z = x * 2
    assert hg.is_grad_enabled()
    assert not y.requires_grad and y.is_leaf
    assert z.requires_grad and not z.is_leaf
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()


def test_no_grad_and_enable_grad_as_decorators(rng):
    x = leaf(rng, 3)

    @hg.no_grad()
    def double(t):
        """doc"""
        return t * 2

    @hg.enable_grad()
    def triple(t):
        return t * 3

    assert not double(x).requires_grad
    assert double.__name__ == "double" and double.__doc__ == "doc"
    assert hg.is_grad_enabled()
    with hg.no_grad():
        out = triple(x)
        assert not hg.is_grad_enabled()
    assert out.requires_grad
    out.sum().backward()
    np.testing.assert_array_equal(x.grad.data, np.full(3, 3.0))


def test_grad_mode_restored_after_an_exception(rng):
    with pytest.raises(ZeroDivisionError), hg.no_grad():
        _ = 1 / 0
    assert hg.is_grad_enabled()


def test_detach_stops_gradients(rng):
    x = leaf(rng, 3)
    d = x.detach()
    assert not d.requires_grad and d.is_leaf
    y = (x * d).sum()  # d/dx = d, not 2x
    y.backward()
    np.testing.assert_allclose(x.grad.data, x.data)


def test_retain_grad_on_a_non_leaf(rng):
    x = leaf(rng, 3)
    h = x * 2
    h.retain_grad()
    other = x * 3  # a non-leaf without retain_grad keeps no grad
    (h * h + other).sum().backward()
    np.testing.assert_allclose(h.grad.data, 2 * h.data)
    assert other.grad is None
    np.testing.assert_allclose(x.grad.data, 8 * x.data + 3)


def test_backward_with_explicit_gradient(rng):
    x = leaf(rng, 2, 3)
    g = rng.standard_normal((2, 3))
    (x * 3).backward(gradient=hg.tensor(g))
    np.testing.assert_allclose(x.grad.data, 3 * g)
    x.grad = None
    (x * 3).backward(g)  # a plain array is accepted too
    np.testing.assert_allclose(x.grad.data, 3 * g)


def test_backward_gradient_with_wrong_shape_raises(rng):
    x = leaf(rng, 2, 3)
    with pytest.raises(RuntimeError, match=r"gradient has shape \(3, 2\).*shape \(2, 3\)"):
        (x * 3).backward(hg.tensor(np.ones((3, 2))))


def test_inputs_without_requires_grad_get_no_grad(rng):
    x, c = leaf(rng, 3), hg.tensor(rng.standard_normal(3))
    (x * c).sum().backward()
    assert c.grad is None
    np.testing.assert_allclose(x.grad.data, c.data)


def test_backward_from_a_leaf(rng):
    x = leaf(rng, 3)
    x.backward(hg.tensor(np.arange(3.0)))
    np.testing.assert_array_equal(x.grad.data, np.arange(3.0))


def test_backward_frees_saved_arrays(rng):
    x = leaf(rng, 50, 50)
    y = x.exp()
    ctx = y._ctx
    y.sum().backward()
    assert not hasattr(ctx, "out")  # the saved exp(x) was released


def test_clone_is_differentiable_and_independent(rng):
    x = leaf(rng, 3)
    c = x.clone()
    (c * 2).sum().backward()
    np.testing.assert_array_equal(x.grad.data, np.full(3, 2.0))
    y = hg.tensor(np.ones(3))
    z = y.clone()
    z.data[0] = 5
    assert y.data[0] == 1


def test_setitem_on_a_tensor_requiring_grad_is_refused_outside_no_grad(rng):
    x = leaf(rng, 3)
    with pytest.raises(RuntimeError, match="in-place"):
        x[0] = 1.0
    with hg.no_grad():
        x[0] = 1.0
    assert x.data[0] == 1.0


# ----------------------------------------------------------------------------------------
# finite differences in float64, independent of torch


def test_gradcheck_helper_detects_a_wrong_gradient(rng):
    class WrongSquare(hg.Function):
        def forward(self, a):
            self.a = a
            return a * a

        def backward(self, g):
            return (g * self.a,)  # should be 2 a g

    with pytest.raises(AssertionError, match="relative error"):
        gradcheck(lambda x: WrongSquare.apply(x).sum(), [rng.standard_normal(3)])


def test_gradcheck_softmax_cross_entropy_from_primitives(rng):
    target = np.array([0, 2, 1])

    def build(x, w):
        logits = x @ w
        m = logits.max(dim=1, keepdim=True)
        logp = logits - m - (logits - m).exp().sum(dim=1, keepdim=True).log()
        return -logp[np.arange(3), target].mean()

    gradcheck(build, [rng.standard_normal((3, 4)), rng.standard_normal((4, 3))])


def test_gradcheck_layer_norm_from_primitives(rng):
    def build(x, w, b):
        mu = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        y = (x - mu) / (var + 1e-5).sqrt() * w + b
        return (y * y.sigmoid()).sum()

    gradcheck(build, [rng.standard_normal((2, 5)), rng.standard_normal(5), rng.standard_normal(5)])


def test_gradcheck_attention_from_primitives(rng):
    mask = np.tril(np.ones((4, 4), dtype=bool))

    def build(q, k, v):
        s = (q @ k.transpose(-1, -2)) / 2.0
        p = s.masked_fill(hg.tensor(~mask), -1e9).softmax(-1)
        return ((p @ v) ** 2).sum()

    gradcheck(build, [rng.standard_normal((2, 4, 3)) for _ in range(3)])


def test_gradcheck_shape_ops_and_powers(rng):
    def build(a, b):
        c = hg.cat([a, b.T], dim=0).reshape(2, 6)
        d = hg.stack(c.split(3, dim=1), dim=0)  # (2, 2, 3)
        e = d.permute(2, 0, 1).flatten(1)[:, ::2]
        return (e.abs() + 1.0) ** 1.5 @ hg.tensor(np.arange(2.0)) @ (2.0 ** b[:, 0])

    gradcheck(build, [rng.standard_normal((2, 3)), rng.standard_normal((3, 2))])


@pytest.mark.parametrize(
    "name", ["cross_entropy", "layer_norm", "sdpa", "gelu_tanh", "gelu", "linear", "embedding"]
)
def test_gradcheck_fused_ops(name, rng):
    g = rng.standard_normal((2, 3, 4))
    if name == "cross_entropy":
        t = hg.tensor(np.array([1, -100, 3, 0, 2, 2]))
        gradcheck(
            lambda x: F.cross_entropy(x.reshape(6, 4), t, label_smoothing=0.2),
            [rng.standard_normal((2, 3, 4))],
        )
    elif name == "layer_norm":
        gradcheck(
            lambda x, w, b: (F.layer_norm(x, 4, w, b) * hg.tensor(g)).sum(),
            [rng.standard_normal((2, 3, 4)), rng.standard_normal(4), rng.standard_normal(4)],
        )
    elif name == "sdpa":
        gradcheck(
            lambda q, k, v: (
                F.scaled_dot_product_attention(q, k, v, is_causal=True) * hg.tensor(g)
            ).sum(),
            [rng.standard_normal((2, 3, 4)) for _ in range(3)],
        )
    elif name in ("gelu", "gelu_tanh"):
        approx = "tanh" if name == "gelu_tanh" else "none"
        gradcheck(
            lambda x: (F.gelu(x, approximate=approx) * hg.tensor(g)).sum(),
            [rng.standard_normal((2, 3, 4)) * 2],
        )
    elif name == "linear":
        gradcheck(
            lambda x, w, b: (F.linear(x, w, b) * hg.tensor(g)).sum(),
            [rng.standard_normal((2, 3, 5)), rng.standard_normal((4, 5)), rng.standard_normal(4)],
        )
    else:
        idx = hg.tensor(np.array([[0, 1, 1], [4, 0, 0]]))
        gradcheck(
            lambda w: (F.embedding(idx, w) * hg.tensor(g)).sum(), [rng.standard_normal((5, 4))]
        )
