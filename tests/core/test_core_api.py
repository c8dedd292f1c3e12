"""The top-level API: ``import handgrad as hg`` reaches nn, optim and the creation functions,
and ``from_numpy`` shares memory with its array as ``torch.from_numpy`` does."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import handgrad as hg


def test_import_handgrad_reaches_the_subpackages():
    # a fresh interpreter: in this one the test suite has imported the subpackages already
    code = (
        "import handgrad as hg\n"
        "assert hg.nn.Linear(2, 3).weight.shape == (3, 2)\n"
        "assert callable(hg.nn.functional.cross_entropy)\n"
        "assert hg.optim.AdamW.__name__ == 'AdamW'\n"
        "assert hasattr(hg.optim.lr_scheduler, 'cosine_with_warmup')\n"
        "assert callable(hg.from_numpy) and callable(hg.tensor)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_from_numpy_shares_memory_both_ways():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    t = hg.from_numpy(a)
    assert t.shape == (2, 3) and t.dtype == np.float32
    a[0, 0] = 10.0
    assert t[0, 0].item() == 10.0
    with hg.no_grad():
        t[1, 2] = -1.0
    assert a[1, 2] == -1.0


def test_from_numpy_keeps_the_dtype():
    # unlike hg.tensor([1.0]), which defaults to float32, as torch.from_numpy
    assert hg.from_numpy(np.zeros(2, dtype=np.float64)).dtype == np.float64
    assert hg.from_numpy(np.zeros(2, dtype=np.int32)).dtype == np.int32
    assert hg.tensor(np.zeros(2, dtype=np.float64).tolist()).dtype == np.float32


def test_from_numpy_gradients_flow():
    t = hg.from_numpy(np.array([1.0, 2.0, 3.0], dtype=np.float32)).requires_grad_()
    (t * t).sum().backward()
    np.testing.assert_array_equal(t.grad.numpy(), [2.0, 4.0, 6.0])


@pytest.mark.parametrize(
    ("value", "message"),
    [([1.0, 2.0], "expected an array, got list"), (np.zeros(2, dtype=np.complex64), "complex")],
)
def test_from_numpy_refuses_what_is_not_a_supported_array(value, message):
    with pytest.raises(TypeError, match=message):
        hg.from_numpy(value)
