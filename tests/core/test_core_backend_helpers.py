"""The backend helpers nn/ and optim/ use instead of NumPy, and the CPU thread pool's seam:
the pool is entered for NumPy arrays only."""

import math
import threading

import numpy as np
import pytest
import torch

from handgrad import backend as B
from handgrad.nn import _threads


def test_erf_matches_torch(rng):
    x = rng.standard_normal((4, 5)) * 2
    np.testing.assert_allclose(B.erf(x), torch.erf(torch.from_numpy(x)).numpy(), rtol=1e-14)
    assert B.erf(x).shape == (4, 5)


def test_dropout_scale_is_seeded_and_scaled():
    a = B.dropout_scale(B.host_generator(3), (300, 200), 0.25, like=np.zeros(1, np.float32))
    b = B.dropout_scale(B.host_generator(3), (300, 200), 0.25, like=np.zeros(1, np.float32))
    assert a.dtype == np.float32 and a.shape == (300, 200)
    np.testing.assert_array_equal(a, b)
    assert set(np.unique(a).tolist()) == {0.0, np.float32(1 / 0.75)}
    assert abs((a == 0).mean() - 0.25) < 0.01


def test_read_only_copies_and_host_arrays():
    a = B.make_read_only(np.ones(3))
    with pytest.raises(ValueError):
        a[0] = 2.0
    t = np.arange(6.0).reshape(2, 3).T  # not C-contiguous
    c = B.copy_as(t, B.float32)
    assert c.dtype == np.float32 and c.flags.c_contiguous and np.array_equal(c, t)
    assert not np.shares_memory(c, t)
    assert B.contiguous(t).flags.c_contiguous and B.to_host_contiguous(t).flags.c_contiguous
    assert B.is_array(t) and not B.is_array(np.float32(1)) and not B.is_array(1.0)
    assert B.is_scalar(np.float32(1)) and not B.is_scalar(1.0)
    z = B.zeros_like(t)
    assert z.shape == t.shape and not z.any()


class _StandModule:
    """Allocates NumPy arrays but is not NumPy, as CuPy would be."""

    @staticmethod
    def empty(n, dtype):
        return np.empty(n, dtype=dtype)


def test_thread_pool_is_entered_for_numpy_only(monkeypatch):
    monkeypatch.setattr(B, "_num_threads", 3)
    monkeypatch.setattr(_threads, "PARALLEL_MIN_WORK", 0)
    entered, seen = [], []

    real = _threads._parallel_map

    def spy(*args, **kwargs):
        entered.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(_threads, "_parallel_map", spy)

    def item(i, buffer):
        seen.append((i, threading.get_ident(), buffer.size))

    _threads.map_items(_StandModule, item, list(range(6)), 4, 1, np.float32, work=10**9)
    assert entered == [] and sorted(i for i, _, _ in seen) == list(range(6))
    assert {t for _, t, _ in seen} == {threading.get_ident()}  # all on the calling thread
    assert {n for _, _, n in seen} == {4}

    seen.clear()
    _threads.map_items(np, item, list(range(6)), 4, 1, np.float32, work=10**9)
    assert entered == [np] and sorted(i for i, _, _ in seen) == list(range(6))


def test_chunks_cover_the_range_evenly(monkeypatch):
    monkeypatch.setattr(_threads, "ELEMENTWISE_CHUNK", 20)
    pieces = _threads.chunks(105)
    assert pieces[0].start == 0 and pieces[-1].stop == 105
    assert all(a.stop == b.start for a, b in zip(pieces, pieces[1:]))
    sizes = [p.stop - p.start for p in pieces]
    assert max(sizes) <= 20 and max(sizes) - min(sizes) <= 1 and len(pieces) == math.ceil(105 / 20)
