"""Ops, the engine and creation take their array functions from the arrays' own namespace
(``backend.get_array_module``), never from NumPy directly: a stand-in namespace registered
for an array type sees the calls."""

from __future__ import annotations

from collections import Counter

import numpy as np

import handgrad as hg
from handgrad import backend as B


class _Marked(np.ndarray):
    """Arrays of the stand-in namespace (NumPy arrays underneath)."""


class _CountingNumPy:
    """NumPy, counting which functions are looked up through it."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        self.calls[name] += 1
        return getattr(np, name)


def _marked(values: list) -> np.ndarray:
    return np.array(values, dtype=np.float32).view(_Marked)


def test_ops_engine_and_creation_use_the_arrays_namespace():
    ns = _CountingNumPy()
    B.register_array_module(_Marked, ns)
    x = hg.from_numpy(_marked([[0.5, -1.0], [2.0, 0.0]])).requires_grad_()
    y = (x.exp() + x.tanh()).softmax(-1).sum()
    assert ns.calls["exp"] == 2 and ns.calls["tanh"] == 1  # Exp, Tanh and Softmax's forward
    assert abs(y.item() - 2.0) < 1e-6  # each softmax row sums to 1
    y.backward()
    assert ns.calls["ones"] == 1  # backward's seed dL/dy = 1, made in y's namespace

    x.grad = None
    x.sum(0).backward(hg.from_numpy(_marked([1.0, 3.0])))
    assert ns.calls["broadcast_to"] == 1  # Sum's backward
    np.testing.assert_array_equal(np.asarray(x.grad.data), [[1.0, 3.0], [1.0, 3.0]])

    x.grad = None
    x[1].backward(hg.from_numpy(_marked([4.0, 5.0])))
    assert ns.calls["zeros"] == 1  # the engine spreads a slice's gradient into zeros
    np.testing.assert_array_equal(np.asarray(x.grad.data), [[0.0, 0.0], [4.0, 5.0]])

    assert hg.zeros_like(x).shape == (2, 2) and ns.calls["zeros"] == 2
