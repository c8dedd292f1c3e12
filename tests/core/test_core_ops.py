"""Primitive Tensor ops: forward values and gradients against PyTorch, float64 and float32."""

import numpy as np
import pytest
import torch
from _torchref import DTYPES, compare

import handgrad as hg

BROADCAST_PAIRS = [
    ((3, 4), (3, 4)),
    ((3, 4), (4,)),
    ((3, 1), (1, 4)),
    ((2, 1, 4), (3, 1)),
    ((1,), (2, 3)),
    ((), (2, 3)),
    ((2, 3), ()),
    ((1, 1), (1,)),
    ((5,), (1,)),
]
BINARY = {
    "add": lambda a, b: a + b,
    "sub": lambda a, b: a - b,
    "mul": lambda a, b: a * b,
    "div": lambda a, b: a / b,
}


def positive(rng, shape):
    return rng.uniform(0.5, 2.0, size=shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", BROADCAST_PAIRS, ids=str)
@pytest.mark.parametrize("op", list(BINARY))
def test_binary_broadcasting(op, shapes, dtype, rng):
    a = rng.standard_normal(shapes[0])
    b = rng.standard_normal(shapes[1])
    if op == "div":
        b = np.sign(b) * (np.abs(b) + 0.5)  # keep away from 0
    compare(BINARY[op], BINARY[op], a, b, dtype=dtype, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scalar", [2.5, -1.5, 3])
def test_binary_with_python_scalar_both_sides(scalar, dtype, rng):
    a = rng.standard_normal((3, 4)) + 4.0  # away from 0 for the reflected division

    def f(x):
        return (
            x + scalar,
            scalar + x,
            x - scalar,
            scalar - x,
            x * scalar,
            scalar * x,
            x / scalar,
            scalar / x,
        )

    compare(f, f, a, dtype=dtype, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("exponent", [2, 3, 0.5, -1.5, 1.7])
def test_pow_tensor_scalar(exponent, dtype, rng):
    compare(
        lambda x: x**exponent, lambda x: x**exponent, positive(rng, (3, 4)), dtype=dtype, rng=rng
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_pow_integer_exponent_on_negative_base(dtype, rng):
    compare(lambda x: x**3, lambda x: x**3, rng.standard_normal((4, 5)), dtype=dtype, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("base", [2.0, 0.7, np.e])
def test_pow_scalar_tensor(base, dtype, rng):
    compare(lambda x: base**x, lambda x: base**x, rng.standard_normal((3, 4)), dtype=dtype, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", [((3, 4), (3, 4)), ((3, 1), (4,)), ((2, 3), ())], ids=str)
def test_pow_tensor_tensor_positive_base(shapes, dtype, rng):
    a, b = positive(rng, shapes[0]), rng.standard_normal(shapes[1])
    compare(lambda x, y: x**y, lambda x, y: x**y, a, b, dtype=dtype, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
def test_neg(dtype, rng):
    compare(lambda x: -x, lambda x: -x, rng.standard_normal((2, 3)), dtype=dtype, rng=rng)


MATMUL_SHAPES = [
    ((4,), (4,)),
    ((4,), (4, 3)),
    ((3, 4), (4,)),
    ((3, 4), (4, 5)),
    ((1, 4), (4, 1)),
    ((2, 3, 4), (2, 4, 5)),
    ((2, 3, 3, 4), (2, 3, 4, 2)),
    ((2, 1, 3, 4), (5, 4, 2)),
    ((2, 5, 6), (6, 3)),  # (B, T, C) @ (C, N): the weight case
    ((4,), (2, 4, 3)),
    ((2, 3, 4), (4,)),
    ((1, 3, 4), (2, 4, 5)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=str)
def test_matmul(shapes, dtype, rng):
    a, b = rng.standard_normal(shapes[0]), rng.standard_normal(shapes[1])
    compare(lambda x, y: x @ y, torch.matmul, a, b, dtype=dtype, rng=rng)
    compare(hg.matmul, torch.matmul, a, b, dtype=dtype, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
def test_matmul_grad_only_one_side(dtype, rng):
    """The shared-weight GEMM path when only the weight (or only the input) needs grad."""
    a = hg.tensor(rng.standard_normal((2, 5, 6)).astype(dtype))
    w = hg.tensor(rng.standard_normal((6, 3)).astype(dtype), requires_grad=True)
    g = rng.standard_normal((2, 5, 3))
    (a @ w).backward(hg.tensor(g.astype(dtype)))
    ref = np.einsum("btc,btn->cn", a.data.astype(np.float64), g)
    assert np.abs(w.grad.data - ref).max() <= 1e-4 * np.abs(ref).max()


REDUCE_CASES = [
    ((3, 4, 5), None, False),
    ((3, 4, 5), None, True),
    ((3, 4, 5), 1, False),
    ((3, 4, 5), -1, True),
    ((3, 4, 5), (0, 2), False),
    ((3, 4, 5), (0, -1), True),
    ((3, 1, 5), 1, False),
    ((6,), 0, False),
    ((6,), -1, True),
    ((), None, False),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim,keepdim", REDUCE_CASES, ids=str)
@pytest.mark.parametrize("op", ["sum", "mean", "max"])
def test_reductions(op, shape, dim, keepdim, dtype, rng):
    x = rng.standard_normal(shape)

    def ours(t):
        return getattr(t, op)(dim=dim, keepdim=keepdim)

    def theirs(t):
        if dim is None:
            out = getattr(t, op)()  # torch's full reduction takes no keepdim for max
            return out.reshape((1,) * t.ndim) if keepdim else out
        if op == "max":
            return t.amax(dim=dim, keepdim=keepdim)
        return getattr(t, op)(dim=dim, keepdim=keepdim)

    compare(ours, theirs, x, dtype=dtype, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
def test_max_ties_share_the_gradient(dtype):
    """With exact ties, the gradient is split evenly, as torch does for amax."""
    x = np.array([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]])
    compare(
        lambda t: t.max(dim=1),
        lambda t: t.amax(dim=1),
        x,
        dtype=dtype,
        rng=np.random.default_rng(0),
    )


@pytest.mark.filterwarnings(r"ignore:var\(\)")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim,keepdim", REDUCE_CASES[:-1], ids=str)
@pytest.mark.parametrize(
    "kw",
    [{}, {"unbiased": False}, {"unbiased": True}, {"correction": 0}, {"correction": 2}],
    ids=str,
)
def test_var(shape, dim, keepdim, kw, dtype, rng):
    x = rng.standard_normal(shape)
    n = x.size if dim is None else np.prod([shape[d] for d in np.atleast_1d(dim)])
    if kw.get("correction", 0) > n:
        pytest.skip("negative degrees of freedom: torch's gradient there is an artefact")
    tkw = dict(kw)
    if "unbiased" in tkw:
        tkw = {"correction": int(tkw.pop("unbiased"))}
    compare(
        lambda t: t.var(dim=dim, keepdim=keepdim, **kw),
        lambda t: torch.var(t, dim=dim, keepdim=keepdim, **tkw),
        x,
        dtype=dtype,
        rng=rng,
    )


SHAPE_OPS = {
    "reshape": (lambda t: t.reshape(4, 6), (2, 3, 4)),
    "reshape_tuple_-1": (lambda t: t.reshape((-1, 3)), (2, 3, 4)),
    "view": (lambda t: t.view(2, 12), (2, 3, 4)),
    "view_after_transpose": (lambda t: t.transpose(0, 1).reshape(3, 8), (2, 3, 4)),
    "transpose": (lambda t: t.transpose(0, 2), (2, 3, 4)),
    "transpose_neg": (lambda t: t.transpose(-1, -2), (2, 3, 4)),
    "T": (lambda t: t.T, (3, 5)),
    "permute": (lambda t: t.permute(2, 0, 1), (2, 3, 4)),
    "permute_tuple": (lambda t: t.permute((1, 2, 0)), (2, 3, 4)),
    "flatten": (lambda t: t.flatten(), (2, 3, 4)),
    "flatten_1": (lambda t: t.flatten(1), (2, 3, 4)),
    "flatten_0_1": (lambda t: t.flatten(0, 1), (2, 3, 4)),
    "unsqueeze_0": (lambda t: t.unsqueeze(0), (2, 3)),
    "unsqueeze_-1": (lambda t: t.unsqueeze(-1), (2, 3)),
    "unsqueeze_1": (lambda t: t.unsqueeze(1), (2, 3)),
    "squeeze": (lambda t: t.squeeze(), (1, 3, 1, 2)),
    "squeeze_dim": (lambda t: t.squeeze(2), (1, 3, 1, 2)),
    "squeeze_noop": (lambda t: t.squeeze(1), (1, 3, 1, 2)),
    "expand": (lambda t: t.expand(2, 3, 4), (3, 1)),
    "expand_-1": (lambda t: t.expand(5, -1, 4), (1, 3, 1)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(SHAPE_OPS))
def test_shape_ops(name, dtype, rng):
    fn, shape = SHAPE_OPS[name]
    compare(fn, fn, rng.standard_normal(shape), dtype=dtype, rng=rng)


INDEXES = {
    "int": lambda t: t[1],
    "neg_int": lambda t: t[-1, 2],
    "slice": lambda t: t[1:3],
    "step": lambda t: t[::2, 1::2],
    "neg_slice": lambda t: t[-3:-1, :, -1],
    "none": lambda t: t[None, 1:, None],
    "ellipsis": lambda t: t[..., 0],
    "ellipsis_mid": lambda t: t[0, ..., 1:],
    "empty_slice": lambda t: t[2:2],
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(INDEXES))
def test_getitem_basic(name, dtype, rng):
    fn = INDEXES[name]
    compare(fn, fn, rng.standard_normal((4, 5, 3)), dtype=dtype, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
def test_getitem_negative_step(dtype, rng):
    """torch has no negative slice steps; the reference gathers the same positions."""
    rows, cols = np.arange(4)[::-1].copy(), np.arange(5)[-2::-2].copy()
    compare(
        lambda t: t[::-1, -2::-2],
        lambda t: t[rows][:, cols],
        rng.standard_normal((4, 5, 3)),
        dtype=dtype,
        rng=rng,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_getitem_gather_with_repeated_indices(dtype, rng):
    x = rng.standard_normal((5, 3))
    idx = np.array([0, 3, 3, 1, 0, 3])
    compare(lambda t, i: t[i], lambda t, i: t[i], x, idx, dtype=dtype, rng=rng)
    compare(lambda t: t[[4, 4, 2]], lambda t: t[[4, 4, 2]], x, dtype=dtype, rng=rng)
    idx2 = np.array([[0, 2], [2, 2]])
    compare(lambda t, i: t[:, i], lambda t, i: t[:, i], x, idx2, dtype=dtype, rng=rng)
    rows, cols = np.array([1, 1, 4]), np.array([2, 2, 0])
    compare(lambda t, r, c: t[r, c], lambda t, r, c: t[r, c], x, rows, cols, dtype=dtype, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
def test_getitem_boolean_mask(dtype, rng):
    x = rng.standard_normal((4, 5))
    mask = rng.random((4, 5)) > 0.5
    compare(lambda t, m: t[m], lambda t, m: t[m], x, mask, dtype=dtype, rng=rng)
    rowmask = np.array([True, False, True, True])
    compare(lambda t, m: t[m], lambda t, m: t[m], x, rowmask, dtype=dtype, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [0, 1, -1])
def test_cat_and_stack(dim, dtype, rng):
    a, b, c = (rng.standard_normal((2, 3)) for _ in range(3))
    compare(
        lambda *t: hg.cat(t, dim=dim),
        lambda *t: torch.cat(t, dim=dim),
        a,
        b,
        c,
        dtype=dtype,
        rng=rng,
    )
    compare(
        lambda *t: hg.stack(t, dim=dim),
        lambda *t: torch.stack(t, dim=dim),
        a,
        b,
        c,
        dtype=dtype,
        rng=rng,
    )
    u = rng.standard_normal((2, 1) if dim != 0 else (1, 3))
    compare(
        lambda *t: hg.cat(t, dim=dim), lambda *t: torch.cat(t, dim=dim), a, u, dtype=dtype, rng=rng
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("how", [2, 3, 7, [1, 4, 2], [7]], ids=str)
@pytest.mark.parametrize("dim", [1, -1])
def test_split(how, dim, dtype, rng):
    x = rng.standard_normal((2, 7))
    compare(lambda t: t.split(how, dim), lambda t: t.split(how, dim), x, dtype=dtype, rng=rng)
    compare(
        lambda t: hg.split(t, how, dim), lambda t: torch.split(t, how, dim), x, dtype=dtype, rng=rng
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunks", [1, 2, 3, 4])
def test_chunk(chunks, dtype, rng):
    x = rng.standard_normal((6, 2))
    compare(lambda t: t.chunk(chunks), lambda t: t.chunk(chunks), x, dtype=dtype, rng=rng)
    y = rng.standard_normal((2, 5))
    compare(
        lambda t: t.chunk(chunks, dim=1), lambda t: t.chunk(chunks, dim=1), y, dtype=dtype, rng=rng
    )


UNARY = {
    "exp": (lambda t: t.exp(), lambda t: t.exp(), "normal"),
    "hg.exp": (hg.exp, torch.exp, "normal"),
    "log": (lambda t: t.log(), lambda t: t.log(), "positive"),
    "hg.log": (hg.log, torch.log, "positive"),
    "sqrt": (lambda t: t.sqrt(), lambda t: t.sqrt(), "positive"),
    "hg.sqrt": (hg.sqrt, torch.sqrt, "positive"),
    "tanh": (lambda t: t.tanh(), lambda t: t.tanh(), "normal"),
    "hg.tanh": (hg.tanh, torch.tanh, "normal"),
    "sigmoid": (lambda t: t.sigmoid(), lambda t: t.sigmoid(), "normal"),
    "relu": (lambda t: t.relu(), lambda t: t.relu(), "normal"),
    "hg.relu": (hg.relu, torch.relu, "normal"),
    "abs": (lambda t: t.abs(), lambda t: t.abs(), "normal"),
    "softmax_method": (lambda t: t.softmax(-1), lambda t: t.softmax(-1), "normal"),
    "log_softmax_method": (lambda t: t.log_softmax(0), lambda t: t.log_softmax(0), "normal"),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 4), (1,), (), (2, 1, 3)], ids=str)
@pytest.mark.parametrize("name", list(UNARY))
def test_unary(name, shape, dtype, rng):
    ours, theirs, domain = UNARY[name]
    if name.endswith("softmax_method") and shape == ():
        pytest.skip("softmax of a 0-d tensor has no dim")
    x = rng.standard_normal(shape) * 2
    if domain == "positive":
        x = np.abs(x) + 0.1
    compare(ours, theirs, x, dtype=dtype, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sigmoid_saturates_without_overflow(dtype, rng):
    x = (
        np.array([-800.0, -50.0, 0.0, 50.0, 800.0])
        if dtype == "float64"
        else np.array([-100.0, -20.0, 0.0, 20.0, 100.0])
    )
    with np.errstate(all="raise"):
        compare(lambda t: t.sigmoid(), torch.sigmoid, x, dtype=dtype, rng=rng)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shapes", [((3, 4), (3, 4), (3, 4)), ((3, 1), (1, 4), (4,)), ((2, 3), (2, 3), ())], ids=str
)
def test_where(shapes, dtype, rng):
    cond = rng.random(shapes[0]) > 0.5
    a, b = rng.standard_normal(shapes[1]), rng.standard_normal(shapes[2])
    compare(hg.where, torch.where, cond, a, b, dtype=dtype, rng=rng)
    compare(
        lambda c, x: hg.where(c, x, 0.5),
        lambda c, x: torch.where(c, x, 0.5),
        cond,
        a,
        dtype=dtype,
        rng=rng,
    )
    compare(
        lambda c, x: hg.where(c, -2.0, x),
        lambda c, x: torch.where(c, -2.0, x),
        cond,
        a,
        dtype=dtype,
        rng=rng,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mask_shape", [(3, 4), (1, 4), (3, 1)], ids=str)
def test_masked_fill(mask_shape, dtype, rng):
    x = rng.standard_normal((3, 4))
    mask = rng.random(mask_shape) > 0.4
    compare(
        lambda t, m: t.masked_fill(m, -1e9),
        lambda t, m: t.masked_fill(m, -1e9),
        x,
        mask,
        dtype=dtype,
        rng=rng,
    )
    compare(
        lambda t, m: hg.masked_fill(t, m, 3.0),
        lambda t, m: t.masked_fill(m, 3.0),
        x,
        mask,
        dtype=dtype,
        rng=rng,
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_composite_expression(dtype, rng):
    """A small MLP-like expression mixing many ops, so their interplay is checked too."""
    x, w, b = rng.standard_normal((4, 5)), rng.standard_normal((5, 3)), rng.standard_normal(3)

    def f(x, w, b, amax):
        h = (x @ w + b).tanh()
        z = (h * h).sum(dim=1, keepdim=True) / (h.abs() + 1).mean()
        return (z - amax(h)).exp().log() + h.var(dim=0) ** 2

    ours = lambda *t: f(*t, amax=lambda h: h.max(dim=0))
    theirs = lambda *t: f(*t, amax=lambda h: h.amax(dim=0))
    compare(ours, theirs, x, w, b, dtype=dtype, rng=rng)


def test_comparisons_match_numpy(rng):
    a, b = rng.standard_normal((3, 4)), rng.standard_normal(4)
    ta, tb = hg.tensor(a), hg.tensor(b)
    for ours, ref in [
        (ta == tb, a == b),
        (ta != tb, a != b),
        (ta < tb, a < b),
        (ta <= 0.1, a <= 0.1),
        (ta > tb, a > b),
        (ta >= tb, a >= b),
    ]:
        assert ours.dtype == np.bool_
        np.testing.assert_array_equal(ours.data, ref)
    assert ta.argmax().item() == a.argmax()
    np.testing.assert_array_equal(ta.argmax(dim=1).data, a.argmax(axis=1))
