"""CPU threads for the fused ops: big ops cut their work into cache-sized pieces and share the
pieces out over a few threads, each with its own scratch buffers.

NumPy runs each ufunc on one core but releases the GIL inside ufuncs and BLAS, so threads of
NumPy calls do run in parallel. That is a host concern: arrays of any other namespace (CuPy
on a GPU) bring their own parallelism, and their pieces run one after the other on the
calling thread (``map_items`` never enters the pool for them).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from typing import Any

from handgrad import backend as B

PARALLEL_MIN_WORK = 1 << 21  # elements; smaller ops run on one thread (see map_items)

ELEMENTWISE_CHUNK = 1 << 18  # elements per piece of a big elementwise op; big enough that
# threads seldom wait for the GIL between NumPy calls, small enough to stay in cache

_pool: ThreadPoolExecutor | None = None
_pool_workers = 0


def chunks(n: int) -> list[slice]:
    """Cut range(n) into pieces of at most ELEMENTWISE_CHUNK, all of (nearly) one size, so
    that no thread is left with a long piece after the others finish."""
    count = -(-n // ELEMENTWISE_CHUNK)
    return [slice(n * i // count, n * (i + 1) // count) for i in range(count)]


def tile(buffer: Any, *shape: int) -> Any:
    """A contiguous view of the front of a flat scratch buffer, in the given shape."""
    return buffer[: math.prod(shape)].reshape(shape)


def map_items(
    xp: Any,
    fn: Callable[..., None],
    items: Sequence,
    buffer_size: int,
    n_buffers: int,
    dtype: Any,
    uses_blas: bool = False,
    *,
    work: int,
) -> None:
    """Call ``fn(item, *buffers)`` for every item, each call given ``n_buffers`` flat scratch
    arrays of ``buffer_size`` elements of ``xp`` (reused from item to item). On NumPy the items
    are shared out over threads (see ``_parallel_map``); on any other namespace they run in
    order on the calling thread."""
    if B.is_numpy(xp):
        _parallel_map(xp, fn, items, buffer_size, n_buffers, dtype, uses_blas, work=work)
        return
    buffers = [xp.empty(buffer_size, dtype=dtype) for _ in range(n_buffers)]
    for item in items:
        fn(item, *buffers)


def _parallel_map(
    xp: Any,
    fn: Callable[..., None],
    items: Sequence,
    buffer_size: int,
    n_buffers: int,
    dtype: Any,
    uses_blas: bool = False,
    *,
    work: int,
) -> None:
    """``map_items`` for NumPy arrays: the items shared out over threads.

    ``work`` is the op's size in elements: below ``PARALLEL_MIN_WORK`` everything runs on
    the calling thread, since handing small pieces to threads (which then compete with BLAS's
    own threads for the same cores) cost more than it saved: on the shakespeare-char model
    (768 tokens x 128 wide) one thread made the whole training step ~25% faster.

    Each thread owns ``n_buffers`` flat scratch arrays of ``buffer_size`` elements, reused for
    every item it runs. With ``uses_blas``, BLAS is held to one thread meanwhile: the products
    inside one item (e.g. (128, 64) x (64, 1024) in attention) are too small to split across
    cores, and BLAS threads competing with ours or with other processes made them ~3x slower
    than one thread per core. Without threadpoolctl to set that limit, such work stays on one
    thread of ours.
    """
    global _pool, _pool_workers
    workers = max(1, min(len(items), B.get_num_threads()))
    if work < PARALLEL_MIN_WORK or (uses_blas and not B.can_limit_blas()):
        workers = 1

    def run(w: int) -> None:
        buffers = [xp.empty(buffer_size, dtype=dtype) for _ in range(n_buffers)]
        for item in items[w::workers]:
            fn(item, *buffers)

    if workers == 1:
        run(0)
        return
    if _pool_workers != workers:
        if _pool is not None:
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(workers, thread_name_prefix="handgrad")
        _pool_workers = workers
    with B.num_threads(1) if uses_blas else nullcontext():
        list(_pool.map(run, range(workers)))  # list() re-raises a worker's exception
