"""The CuPy stand-in itself: it computes as NumPy, refuses implicit host conversion and
counts every host synchronisation."""

from __future__ import annotations

import fakecupy
import numpy as np
import pytest

from handgrad.backend import get_array_module


@pytest.fixture
def cp():
    with fakecupy.installed() as ns:
        yield ns


def test_refuses_implicit_conversion(cp) -> None:
    x = cp.asarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(x)
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.array(x)
    with pytest.raises(TypeError, match="Unsupported type"):
        _ = x + np.ones(3, dtype=np.float32)
    with pytest.raises(TypeError, match="Unsupported type"):
        np.concatenate([x, np.zeros((1, 3), np.float32)])
    with pytest.raises(TypeError, match="Unsupported type"):
        x[0] = np.ones(3)
    with pytest.raises(TypeError, match="cannot be pickled"):
        import pickle

        pickle.dumps(x)


def test_computes_as_numpy(cp) -> None:
    a = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    x = cp.asarray(a)
    y = cp.exp(x - x.max(axis=1, keepdims=True))
    y /= y.sum(axis=1, keepdims=True)
    ref = np.exp(a - a.max(axis=1, keepdims=True))
    ref /= ref.sum(axis=1, keepdims=True)
    assert isinstance(y, cp.ndarray) and y.dtype == np.float32
    np.testing.assert_array_equal(y.get(), ref)
    np.testing.assert_array_equal((x @ x.T).get(), a @ a.T)
    np.testing.assert_array_equal(cp.where(x > 0, x, 0).get(), np.where(a > 0, a, 0))
    np.testing.assert_array_equal(x[cp.asarray([3, 1]), 2:].get(), a[[3, 1], 2:])


def test_out_and_in_place_write_into_the_device_array(cp) -> None:
    x = cp.asarray(np.arange(4.0))
    e = cp.empty_like(x)
    assert cp.exp(x, out=e) is e
    v = x.reshape(2, 2)
    v *= 2  # a view: writes through to x, as on a GPU
    np.testing.assert_array_equal(x.get(), np.arange(4.0) * 2)


def test_reductions_are_device_arrays_and_syncs_are_counted(cp) -> None:
    x = cp.asarray(np.arange(5.0))
    fakecupy.stats.reset()
    s = x.sum()
    assert isinstance(s, cp.ndarray) and s.shape == ()
    assert fakecupy.stats.syncs == 0
    assert float(s) == 10.0 and s.item() == 10.0 and bool(s) and int(s) == 10
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert cp.asnumpy(x)[4] == 4.0 and f"{s:.1f}" == "10.0"
    assert fakecupy.stats.syncs == 7


def test_namespace_is_registered(cp) -> None:
    x = cp.zeros((2, 2), dtype=np.float32)
    assert get_array_module(x) is cp
    assert get_array_module(np.zeros(2), 1.0, x) is cp
    assert get_array_module(np.zeros(2)) is np
    fakecupy.stats.reset()
    cp.asarray(np.ones(3))
    assert fakecupy.stats.uploads == 1
