"""ZeRO-1's chunked collectives (``FlatShards``), checked on every rank: the local
transport's tests call ``check_flat_shards``; the MPI tests run this file under ``mpirun``.

Parameters of 3 + 2x5 + 1 + 4 = 18 elements, so shards and chunks straddle parameters and,
at 4 ranks, the last shard ends in padding. Expected values come from closed forms in the
flat index f and the rank r, never from the code under test."""

from __future__ import annotations

import sys
from typing import Any

import numpy as np

import handgrad as hg
import handgrad.distributed as dist
from handgrad import nn
from handgrad.parallel.zero import FlatShards

SHAPES = [(3,), (2, 5), (1,), (4,)]
NUMEL = 18
CHUNKS = [1, 2, 4, 5, 1000, None]  # 1000: larger than any shard; None: the default


class Recording:
    """The group, recording how many elements each collective is handed."""

    def __init__(self, group: Any) -> None:
        self.group, self.sizes = group, []
        self.rank, self.world_size = group.rank, group.world_size

    def reduce_scatter(self, output: Any, input: Any) -> None:
        self.sizes.append(input.size)
        self.group.reduce_scatter(output, input)

    def all_gather(self, output: Any, input: Any) -> None:
        self.sizes.append(output.size)
        self.group.all_gather(output, input)


def make_params(dtype: str = "float32") -> list[nn.Parameter]:
    params = [nn.Parameter(hg.zeros(*shape, dtype=dtype)) for shape in SHAPES]
    # a strided (Fortran-order) parameter: written through, not through a copy
    params[1].data = np.asfortranarray(params[1].data)
    assert not params[1].data.flags.c_contiguous
    return params


def flat_positions() -> list[np.ndarray]:
    """Each parameter's flat indices f, in its shape (C order)."""
    out, start = [], 0
    for shape in SHAPES:
        size = int(np.prod(shape))
        out.append(np.arange(start, start + size).reshape(shape))
        start += size
    return out


def check_flat_shards() -> None:
    r, P = dist.get_rank(), dist.get_world_size()
    n = -(-NUMEL // P)
    lo, hi = r * n, (r + 1) * n
    f = np.arange(lo, hi)
    for chunk in CHUNKS:
        params = make_params()
        group = Recording(dist.group())
        shards = FlatShards(params, group, chunk_elems=chunk)
        assert shards.shard_size == n and shards.shard_range() == (lo, hi)
        # rank q's gradient at flat index f: (q + 1) (f + 1); parameter 2 has none on rank
        # 0, parameter 3 none anywhere, so they sum to (f + 1) (P (P + 1) / 2 - 1) and 0
        for k, (p, pos) in enumerate(zip(params, flat_positions())):
            no_grad = k == 3 or (k == 2 and r == 0)
            p.grad = None if no_grad else hg.tensor(((r + 1) * (pos + 1)).astype(np.float32))
        total = P * (P + 1) / 2
        want = np.select([f < 13, f == 13], [(f + 1) * total, (f + 1) * (total - 1)], 0.0)
        g = shards.reduce_scatter_gradients("sum")
        np.testing.assert_array_equal(g, want)
        g = shards.reduce_scatter_gradients("avg")
        np.testing.assert_allclose(g, want / P, rtol=1e-6)
        k = max(1, min(chunk or n, n))
        assert max(group.sizes) <= P * k, (chunk, group.sizes)  # never the whole vector

        # all-gather: rank q sends 0.5 f + 3 for its flat indices f (padding included)
        group.sizes.clear()
        shards.all_gather_parameters((0.5 * f + 3).astype(np.float32))
        for p, pos in zip(params, flat_positions()):
            np.testing.assert_array_equal(p.data, 0.5 * pos + 3)
        assert max(group.sizes) <= P * k
        np.testing.assert_array_equal(shards.parameter_shard(), np.where(f < NUMEL, 0.5 * f + 3, 0))

    # bfloat16 parameters: float32 shards, each parameter cast back to its own dtype
    params = make_params("bfloat16")
    shards = FlatShards(params, dist.group(), chunk_elems=4)
    assert shards.dtype == np.float32
    shards.all_gather_parameters((f + 0.25).astype(np.float32))  # exact in bfloat16
    for p, pos in zip(params, flat_positions()):
        assert p.data.dtype.name == "bfloat16"
        np.testing.assert_array_equal(p.data.astype(np.float32), pos + 0.25)
    shard = shards.parameter_shard()
    assert shard.dtype == np.float32
    np.testing.assert_array_equal(shard, np.where(f < NUMEL, f + 0.25, 0))
    dist.barrier()


if __name__ == "__main__":
    dist.init_process_group()
    check_flat_shards()
    print(f"rank {dist.get_rank()} of {dist.get_world_size()}: ok", flush=True)
    dist.destroy_process_group()
    sys.exit(0)
