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


def test_allocations_frees_and_peak_are_counted(cp) -> None:
    import gc

    gc.collect()
    s = fakecupy.stats
    s.reset()
    live0 = s.live_bytes
    x = cp.zeros((4, 8), dtype=np.float32)  # 128 bytes
    assert (s.allocations, s.allocated_bytes, s.live_bytes - live0) == (1, 128, 128)
    v = x.reshape(8, 4)[1:]  # views allocate nothing
    w = x.T
    assert s.allocations == 1 and s.live_bytes - live0 == 128
    y = x + 1.0  # a new array: 128 bytes more
    assert s.allocations == 2 and s.live_bytes - live0 == 256 and s.peak_bytes - live0 == 256
    del y
    assert s.frees == 1 and s.freed_bytes == 128 and s.live_bytes - live0 == 128
    assert s.peak_bytes - live0 == 256
    s.reset_peak()
    assert s.peak_bytes == s.live_bytes
    h = cp.asarray(np.ones(10, np.float64))  # an upload allocates too
    assert s.allocations == 3 and s.live_bytes - live0 == 208
    del x, v, w  # the last view of x's buffer gone: x's 128 bytes freed
    assert s.frees == 2 and s.live_bytes - live0 == 80
    del h
    assert s.live_bytes == live0 and s.peak_bytes - live0 == 208
    snap = s.snapshot()
    assert snap["allocations"] == 3 and snap["frees"] == 3


def test_launches_are_counted(cp) -> None:
    s = fakecupy.stats
    x = cp.ones((3, 4), dtype=np.float32)  # a fill
    s.reset()
    e = cp.empty((3, 4), np.float32)  # no kernel
    assert s.launches == 0
    y = cp.exp(x)  # 1
    cp.multiply(x, 2, out=e)  # 2: out=
    z = y.sum(axis=0)  # 3: a reduction
    _ = x.reshape(4, 3).T[1:]  # views: none
    _ = x.astype(np.float32, copy=False)  # returns x: none
    t = x.astype(np.float16)  # 4
    x[0] = 5.0  # 5: an assignment
    _ = x[cp.asarray(np.array([0, 2]))]  # 6: a gather (the index upload is no launch)
    _ = cp.ascontiguousarray(x)  # contiguous already: none
    _ = cp.ascontiguousarray(x.T)  # 7: a copy
    _ = x @ y.T  # 8
    assert s.launches == 8, s.launches_by
    assert s.launches_by["exp"] == 1 and s.launches_by["setitem"] == 1
    assert s.syncs == 0 and s.uploads == 1
    del z, t


def test_kernel_launches_and_synchronisations_are_counted(cp, monkeypatch) -> None:
    from handgrad.backend import cuda
    from handgrad.kernels import cuda as K

    calls = fakecupy.reference_kernels(monkeypatch)
    s = fakecupy.stats
    x = cp.asarray(np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32))
    w, b = cp.ones(8, np.float32), cp.zeros(8, np.float32)
    s.reset()
    y, mean, rstd = K.layer_norm_forward(x, w, b)  # one kernel
    K.layer_norm_backward(y, x, w, mean, rstd)  # two kernels and two memsets
    K.gelu_tanh_forward(x)
    assert calls == {"layer_norm_forward": 1, "layer_norm_backward": 1, "gelu_tanh_forward": 1}
    assert s.launches == 6 and s.syncs == 0
    # the outputs are the new device memory (3 + 3 + 1 arrays), the references' temporaries not
    assert s.allocations == 7
    # a launch through handgrad.kernels.cuda._launch is counted (an empty grid is none)
    seen = []
    real = K._launch
    s.reset()
    with monkeypatch.context() as m:
        m.setattr(K, "_kernel", lambda name: lambda grid, block, args: seen.append(name))
        real("gelu_tanh_forward", (2,), (256,), ())
        real("gelu_tanh_forward", (0,), (256,), ())
    assert seen == ["gelu_tanh_forward"] and s.launches_by == {"gelu_tanh_forward": 1}
    cuda.synchronize()
    cp.cuda.Device().synchronize()
    assert s.syncs == 2
