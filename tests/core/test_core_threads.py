"""handgrad.backend: how many threads one op may use (set_num_threads, num_threads)."""

from __future__ import annotations

import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from handgrad import backend as B


def _blas_threads() -> set[int]:
    return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}


def test_num_threads_block_limits_blas_and_restores_it_exactly():
    before, blas_before = B.get_num_threads(), _blas_threads()
    with B.num_threads(1):
        assert B.get_num_threads() == 1
        assert _blas_threads() == {1}
    assert B.get_num_threads() == before and _blas_threads() == blas_before


def test_set_num_threads_limits_blas_until_changed():
    with threadpool_limits(limits=None):  # puts BLAS back as it was afterwards
        try:
            B.set_num_threads(1)
            assert B.get_num_threads() == 1 and _blas_threads() == {1}
            B.set_num_threads(2)
            assert B.get_num_threads() == 2 and _blas_threads() == {2}
        finally:
            B._num_threads = None
    assert B.get_num_threads() == B.available_cores()


def test_top_level_names_are_torchs():
    import handgrad as hg

    assert hg.set_num_threads is B.set_num_threads and hg.get_num_threads is B.get_num_threads


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_thread_counts_must_be_counts(bad):
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        B.set_num_threads(bad)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        with B.num_threads(bad):
            pass
