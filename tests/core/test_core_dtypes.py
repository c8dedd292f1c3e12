"""dtypes: float32/float64 are preserved by every op (values and gradients), scalars do not
promote, bfloat16 computes in float32 and casts back, creation defaults, unknown dtypes."""

import ml_dtypes
import numpy as np
import pytest
import torch

import handgrad as hg
import handgrad.nn.functional as F


class Probe(hg.Function):
    """Identity whose backward records the dtype of the gradient arriving from the op above,
    so an op that silently promotes its input gradient to float64 is caught even though
    leaf gradients are cast back on accumulation."""

    seen: list = []

    def forward(self, a):
        return a

    def backward(self, g):
        Probe.seen.append(g.dtype)
        return (g,)


# name -> (fn of float tensors, input shapes); inputs are drawn positive where needed
OPS = {
    "mul_py_scalar": (lambda x: x * 2.0, [(3, 4)]),
    "rmul_py_scalar": (lambda x: 2.0 * x, [(3, 4)]),
    "div_np_float64": (lambda x: x / np.float64(3), [(3, 4)]),
    "rmul_np_float64": (lambda x: np.float64(3) * x, [(3, 4)]),
    "add_np_float32": (lambda x: x + np.float32(1), [(3, 4)]),
    "sub_int": (lambda x: 1 - x - 2, [(3, 4)]),
    "rdiv": (lambda x: 1.5 / x, [(3, 4)]),
    "pow_int": (lambda x: x**2, [(3, 4)]),
    "pow_float": (lambda x: x**0.5, [(3, 4)]),
    "rpow": (lambda x: 2.0**x, [(3, 4)]),
    "pow_tensor": (lambda x, y: x**y, [(3, 4), (4,)]),
    "div_tensor": (lambda x, y: x / y, [(3, 4), (3, 1)]),
    "neg": (lambda x: -x, [(3, 4)]),
    "matmul": (lambda x, y: x @ y, [(2, 3, 4), (4, 5)]),
    "sum": (lambda x: x.sum(dim=1), [(3, 4)]),
    "mean": (lambda x: x.mean(), [(3, 4)]),
    "var": (lambda x: x.var(dim=0), [(3, 4)]),
    "max": (lambda x: x.max(dim=1), [(3, 4)]),
    "max_all": (lambda x: x.max(), [(3, 4)]),
    "exp": (lambda x: x.exp(), [(3, 4)]),
    "log": (lambda x: x.log(), [(3, 4)]),
    "sqrt": (lambda x: x.sqrt(), [(3, 4)]),
    "tanh": (lambda x: x.tanh(), [(3, 4)]),
    "sigmoid": (lambda x: x.sigmoid(), [(3, 4)]),
    "relu": (lambda x: x.relu(), [(3, 4)]),
    "abs": (lambda x: x.abs(), [(3, 4)]),
    "reshape_T": (lambda x: x.reshape(4, 3).T, [(3, 4)]),
    "expand": (lambda x: x.expand(2, 3, 4), [(3, 4)]),
    "getitem": (lambda x: x[hg.tensor([0, 0, 2])], [(3, 4)]),
    "getitem_mask": (lambda x: x[x > 1.0], [(3, 4)]),
    "cat_split": (lambda x, y: hg.cat(x.split(2, dim=1) + (y,), dim=1), [(3, 4), (3, 1)]),
    "stack": (lambda x, y: hg.stack([x, y]), [(3, 4), (3, 4)]),
    "where_scalar": (lambda x: hg.where(x > 1.0, x, 0.0), [(3, 4)]),
    "masked_fill": (
        lambda x: x.masked_fill(hg.tensor(np.triu(np.ones((3, 4), bool), 1)), -np.inf).softmax(-1),
        [(3, 4)],
    ),
    "softmax": (lambda x: F.softmax(x, dim=0), [(3, 4)]),
    "log_softmax": (lambda x: F.log_softmax(x, dim=-1), [(3, 4)]),
    "gelu_tanh": (lambda x: F.gelu(x, approximate="tanh"), [(3, 4)]),
    "gelu": (lambda x: F.gelu(x), [(3, 4)]),
    "linear": (F.linear, [(2, 3, 4), (5, 4), (5,)]),
    "embedding": (lambda w: F.embedding(hg.tensor([[0, 2], [2, 1]]), w), [(3, 4)]),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, 4, w, b), [(3, 4), (4,), (4,)]),
    "cross_entropy": (lambda x: F.cross_entropy(x, hg.tensor([0, 3, -100])), [(3, 4)]),
    "cross_entropy_smooth_none": (
        lambda x: F.cross_entropy(x, hg.tensor([0, 3, 1]), label_smoothing=0.1, reduction="none"),
        [(3, 4)],
    ),
    "sdpa_causal": (
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
        [(2, 3, 4), (2, 3, 4), (2, 3, 4)],
    ),
    "sdpa_float64_mask": (
        lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=hg.tensor(np.zeros((3, 3)))
        ),
        [(2, 3, 4), (2, 3, 4), (2, 3, 4)],
    ),
    "dropout": (lambda x: F.dropout(x, 0.5), [(3, 4)]),
    "mse_loss": (lambda x, y: F.mse_loss(x, y), [(3, 4), (3, 4)]),
}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(OPS))
def test_op_preserves_float_dtype_in_values_and_gradients(name, dtype, rng):
    fn, shapes = OPS[name]
    leaves = [hg.tensor(rng.uniform(0.5, 2.0, s).astype(dtype), requires_grad=True) for s in shapes]
    Probe.seen = []
    out = fn(*(Probe.apply(t) for t in leaves))
    assert out.dtype == np.dtype(dtype), f"{name}: output is {out.dtype}"
    out.backward(hg.tensor(rng.standard_normal(out.shape).astype(dtype)))
    assert Probe.seen == [np.dtype(dtype)] * len(leaves), f"{name}: gradients {Probe.seen}"
    assert all(t.grad.dtype == np.dtype(dtype) for t in leaves)


BF16_OPS = [
    "mul_py_scalar",
    "rpow",
    "matmul",
    "sum",
    "var",
    "max",
    "exp",
    "softmax",
    "gelu_tanh",
    "linear",
    "embedding",
    "layer_norm",
    "cross_entropy",
    "sdpa_causal",
    "reshape_T",
    "getitem",
    "cat_split",
    "where_scalar",
    "mse_loss",
]


@pytest.mark.parametrize("name", BF16_OPS)
def test_bfloat16_computes_in_float32_and_casts_back(name, rng):
    fn, shapes = OPS[name]
    arrays = [rng.uniform(0.5, 2.0, s).astype(ml_dtypes.bfloat16) for s in shapes]
    leaves = [hg.tensor(a, requires_grad=True) for a in arrays]
    out = fn(*leaves)
    assert out.dtype == hg.bfloat16
    g = rng.standard_normal(out.shape).astype(np.float32)
    out.backward(hg.tensor(g))
    assert all(t.grad.dtype == np.float32 for t in leaves)
    # the same computation on the same (bf16-representable) values in float32
    ref_leaves = [hg.tensor(a.astype(np.float32), requires_grad=True) for a in arrays]
    ref = fn(*ref_leaves)
    ref.backward(hg.tensor(g))
    out32 = out.data.astype(np.float32)
    assert np.abs(out32 - ref.data).max() <= 2**-7 * max(np.abs(ref.data).max(), 1e-3)
    for t, r in zip(leaves, ref_leaves):
        assert np.abs(t.grad.data - r.grad.data).max() <= 2e-2 * max(
            np.abs(r.grad.data).max(), 1e-2
        )


def test_bfloat16_matmul_is_close_to_float32(rng):
    a, b = rng.standard_normal((16, 64)), rng.standard_normal((64, 8))
    ours = hg.tensor(a).bfloat16() @ hg.tensor(b).bfloat16()
    assert ours.dtype == hg.bfloat16
    ref = torch.from_numpy(a).float() @ torch.from_numpy(b).float()
    err = np.abs(ours.data.astype(np.float64) - ref.numpy()).max() / np.abs(ref.numpy()).max()
    assert err < 2e-2  # bf16 has an 8-bit significand: inputs and output are rounded


def test_cast_between_dtypes_is_differentiable(rng):
    x = hg.tensor(rng.standard_normal(4), requires_grad=True)
    y = x.bfloat16()
    assert y.dtype == hg.bfloat16
    z = y.float() * 3.0
    assert z.dtype == np.float32
    z.sum().backward()
    np.testing.assert_array_equal(x.grad.data, np.full(4, 3.0, dtype=np.float32))
    assert x.double().dtype == np.float64 and x.long().dtype == np.int64


def test_mixed_float32_float64_tensors_promote_like_torch(rng):
    a = hg.tensor(rng.standard_normal(3).astype(np.float32))
    b = hg.tensor(rng.standard_normal(3))
    assert (a + b).dtype == np.float64
    assert (torch.ones(3) + torch.ones(3, dtype=torch.float64)).dtype == torch.float64


def test_creation_dtypes():
    assert hg.tensor([1, 2]).dtype == np.int64
    assert hg.tensor([1.0]).dtype == np.float32
    assert hg.tensor(1.5).dtype == np.float32
    assert hg.tensor([True, False]).dtype == np.bool_
    assert hg.tensor(np.zeros(2)).dtype == np.float64  # numpy arrays keep their dtype
    assert hg.tensor(np.zeros(2, dtype=np.float32)).dtype == np.float32
    assert hg.tensor([1, 2], dtype="float64").dtype == np.float64
    assert hg.tensor([1.0], dtype="bf16").dtype == hg.bfloat16
    assert hg.zeros(2).dtype == np.float32 and hg.ones(2, 3).shape == (2, 3)
    assert hg.randn(2, dtype="bfloat16").dtype == hg.bfloat16
    assert hg.rand(2, dtype=hg.float64).dtype == np.float64
    assert hg.arange(3).dtype == np.int64 and hg.arange(0, 1, 0.5).dtype == np.float32
    assert hg.full((2,), 3).dtype == np.int64 and hg.full((2,), 3.0).dtype == np.float32
    assert hg.zeros_like(hg.tensor(np.zeros(2))).dtype == np.float64


def test_integer_division_gives_float32_like_torch():
    assert (hg.tensor([1, 2]) / 2).dtype == np.float32
    assert (hg.tensor([1, 2]) / hg.tensor([2, 4])).dtype == np.float32
    assert (hg.tensor([1, 2]) * 2).dtype == np.int64


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: hg.tensor([1.0], dtype="float8"), "float8"),
        (lambda: hg.zeros(2, dtype="torch.float8_e4m3fn"), "float8_e4m3fn"),
        (lambda: hg.zeros(2, dtype=np.complex64), "complex64"),
        (lambda: hg.tensor(np.array([1 + 2j])), "complex128"),
        (lambda: hg.tensor([1.0]).to("int3"), "int3"),
    ],
)
def test_unknown_dtype_raises_type_error_naming_it(make, name):
    with pytest.raises(TypeError, match=name):
        make()


def test_integer_with_float_promotes_to_the_float_dtype_like_torch():
    import torch

    i = hg.tensor([1, 2, 3])
    ti = torch.tensor([1, 2, 3])
    cases = [
        (lambda a: a * 2.5, lambda a: a * 2.5),
        (lambda a: 2.5 * a, lambda a: 2.5 * a),
        (lambda a: a / 2, lambda a: a / 2),
        (lambda a: a + 1, lambda a: a + 1),
    ]
    for ours, theirs in cases:
        assert str(ours(i).dtype) == str(theirs(ti).dtype).removeprefix("torch.")
    f64 = hg.tensor([1.0, 2.0, 3.0], dtype="float64")
    assert (f64 * i).dtype == hg.float64
    assert (i + hg.tensor([0.5, 0.5, 0.5])).dtype == hg.float32
