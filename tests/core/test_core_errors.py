"""Bad input gets a clear error that names the shapes or values involved."""

import numpy as np
import pytest

import handgrad as hg
import handgrad.nn.functional as F


def t(*shape, dtype="float32", grad=False):
    return hg.tensor(np.ones(shape, dtype=dtype), requires_grad=grad)


@pytest.mark.parametrize(
    "a,b,pattern",
    [
        ((3, 4), (5, 2), r"\(3, 4\) and \(5, 2\).*4 .*!= 5"),
        ((4,), (3,), r"\(4,\) and \(3,\)"),
        ((2, 3, 4), (3, 4, 2), r"batch dimensions of \(2, 3, 4\) and \(3, 4, 2\)"),
    ],
)
def test_matmul_shape_mismatch(a, b, pattern):
    with pytest.raises(ValueError, match=pattern):
        t(*a) @ t(*b)


def test_matmul_of_a_scalar():
    with pytest.raises(ValueError, match="at least one dimension"):
        hg.matmul(hg.tensor(2.0), t(3))


@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "pow"])
def test_broadcasting_mismatch_names_the_op_and_shapes(op):
    fn = {
        "add": lambda a, b: a + b,
        "sub": lambda a, b: a - b,
        "mul": lambda a, b: a * b,
        "div": lambda a, b: a / b,
        "pow": lambda a, b: a**b,
    }[op]
    with pytest.raises(ValueError, match=rf"{op}: shapes \(3, 4\) and \(3,\) cannot be broadcast"):
        fn(t(3, 4), t(3))


def test_backward_on_non_scalar_without_gradient():
    y = t(2, 3, grad=True) * 2
    with pytest.raises(RuntimeError, match=r"only for scalar outputs.*shape \(2, 3\)"):
        y.backward()


def test_backward_on_a_tensor_without_graph():
    with pytest.raises(RuntimeError, match="does not require grad"):
        t(1).backward()


@pytest.mark.parametrize("dtype", ["int64", "int32", "bool"])
def test_integer_tensors_cannot_require_grad(dtype):
    with pytest.raises(TypeError, match=rf"floating point.*{dtype}.*\(2,\)"):
        hg.tensor(np.zeros(2, dtype=dtype), requires_grad=True)
    with pytest.raises(TypeError, match="floating point"):
        hg.tensor(np.zeros(2, dtype=dtype)).requires_grad_()


def test_unknown_dtype_lists_the_known_ones():
    with pytest.raises(TypeError, match=r"unknown dtype 'float8'.*'bfloat16'"):
        hg.zeros(2, dtype="float8")


def test_string_data_is_refused():
    with pytest.raises(TypeError, match="dtype <U"):
        hg.tensor(["a", "b"])


def test_cross_entropy_target_out_of_range():
    with pytest.raises(IndexError, match="target 7 is out of bounds for 5 classes"):
        F.cross_entropy(t(2, 5), hg.tensor([0, 7]))
    with pytest.raises(IndexError, match="target -3 is out of bounds for 5 classes"):
        F.cross_entropy(t(2, 5), hg.tensor([-3, 1]))


def test_cross_entropy_target_wrong_shape_or_dtype():
    with pytest.raises(
        ValueError, match=r"target shape \(3,\) does not match input shape \(2, 5\)"
    ):
        F.cross_entropy(t(2, 5), hg.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"target shape \(2, 3\).*\(2, 5, 4\).*\(2, 4\)"):
        F.cross_entropy(t(2, 5, 4), hg.tensor(np.zeros((2, 3), dtype=np.int64)))
    with pytest.raises(TypeError, match="integer class indices, got float32"):
        F.cross_entropy(t(2, 5), t(2))
    with pytest.raises(ValueError, match="reduction must be.*'avg'"):
        F.cross_entropy(t(2, 5), hg.tensor([0, 1]), reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be in .* got 1.5"):
        F.cross_entropy(t(2, 5), hg.tensor([0, 1]), label_smoothing=1.5)


def test_embedding_index_out_of_range_or_not_integer():
    w = t(5, 3)
    with pytest.raises(IndexError, match="index 10 out of range for 5 embeddings"):
        F.embedding(hg.tensor([1, 10]), w)
    with pytest.raises(IndexError, match="index -1 out of range for 5 embeddings"):
        F.embedding(hg.tensor([-1, 2]), w)
    with pytest.raises(TypeError, match="indices must be integers, got float32"):
        F.embedding(t(2), w)


def test_layer_norm_shape_mismatch():
    with pytest.raises(
        ValueError, match=r"input shape \(2, 3\) does not end with normalized_shape \(4,\)"
    ):
        F.layer_norm(t(2, 3), 4)
    with pytest.raises(ValueError, match=r"weight has shape \(3,\), expected \(4,\)"):
        F.layer_norm(t(2, 4), 4, weight=t(3))
    with pytest.raises(ValueError, match=r"bias has shape \(5,\), expected \(4,\)"):
        F.layer_norm(t(2, 4), (4,), weight=t(4), bias=t(5))


def test_linear_feature_mismatch():
    with pytest.raises(
        ValueError, match=r"input has 4 features \(shape \(2, 4\)\) but weight expects 3"
    ):
        F.linear(t(2, 4), t(5, 3))


def test_reshape_to_an_impossible_shape():
    with pytest.raises(ValueError, match=r"cannot view shape \(2, 3\) \(6 elements\) as \(4, 2\)"):
        t(2, 3).reshape(4, 2)
    with pytest.raises(ValueError, match=r"\(2, 3\).*as \(4, -1\)"):
        t(2, 3).view(4, -1)


def test_shape_op_errors():
    with pytest.raises(
        ValueError, match=r"cat: shapes \[\(2, 3\), \(2, 4\)\] differ outside dim 0"
    ):
        hg.cat([t(2, 3), t(2, 4)])
    with pytest.raises(ValueError, match=r"stack: .* \[\(2, 3\), \(3, 2\)\]"):
        hg.stack([t(2, 3), t(3, 2)])
    with pytest.raises(ValueError, match=r"sections \[2, 2\] sum to 4, but dim 0 has size 5"):
        t(5).split([2, 2])
    with pytest.raises(ValueError, match=r"\(0, 0\) is not a permutation of 2 dims"):
        t(2, 3).permute(0, 0)
    with pytest.raises(IndexError, match="dimension 2 out of range for a tensor with 2 dimensions"):
        t(2, 3).sum(dim=2)
    with pytest.raises(ValueError, match="empty"):
        t(0).max()


def test_functional_argument_errors():
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh', got 'fast'"):
        F.gelu(t(2), approximate="fast")
    with pytest.raises(ValueError, match=r"dropout: probability must be in \[0, 1\], got 1.5"):
        F.dropout(t(2), 1.5)
    with pytest.raises(ValueError, match=r"q \(2, 3, 4\), k \(2, 3, 5\)"):
        F.scaled_dot_product_attention(t(2, 3, 4), t(2, 3, 5), t(2, 3, 5))
    with pytest.raises(ValueError, match="attn_mask or is_causal, not both"):
        F.scaled_dot_product_attention(t(3, 4), t(3, 4), t(3, 4), attn_mask=t(3, 3), is_causal=True)
    with pytest.raises(ValueError, match=r"attn_mask of shape \(2, 2\).*\(3, 3\)"):
        F.scaled_dot_product_attention(t(3, 4), t(3, 4), t(3, 4), attn_mask=t(2, 2))
    with pytest.raises(ValueError, match="reduction must be 'mean', 'sum' or 'none', got 'avg'"):
        F.mse_loss(t(2), t(2), reduction="avg")
    with pytest.raises(ValueError, match="class values must be in \\[0, 3\\), got 3"):
        F.one_hot(hg.tensor([0, 3]), num_classes=3)


def test_item_and_where_errors():
    with pytest.raises(ValueError, match=r"only one-element tensors.*\(2,\)"):
        t(2).item()
    with pytest.raises(TypeError, match="condition must be a bool tensor, got float32"):
        hg.where(t(2), t(2), t(2))
    with pytest.raises(RuntimeError, match="detach"):
        t(2, grad=True).numpy()
