"""The collectives' checks, the same for every transport: run by each rank of a group (the
local transport's tests call ``check_collectives``; the MPI tests run this file under
``mpirun -n 2``)."""

from __future__ import annotations

import os
import sys

import numpy as np

import handgrad as hg
import handgrad.distributed as dist
from handgrad import nn
from handgrad.distributed.reducer import GradientReducer
from handgrad.parallel.zero import FlatShards


def check_collectives() -> None:
    """Asserts, on every rank, what each collective gives (values from closed forms in the
    rank r and world size P, never from the code under test)."""
    r, P = dist.get_rank(), dist.get_world_size()
    ranks = np.arange(P, dtype=np.float64)

    a = np.arange(5, dtype=np.float32) + r  # sum over r of (i + r) = P i + P(P-1)/2
    dist.all_reduce(a, op="sum")
    np.testing.assert_array_equal(a, P * np.arange(5) + ranks.sum())
    b = np.full((2, 3), 2.0 * r + 1, dtype=np.float64)  # mean of 2r + 1 = P
    dist.all_reduce(b, op="avg")
    np.testing.assert_allclose(b, np.full((2, 3), float(P)))
    c = np.array([r, -r, 7], dtype=np.int64)
    dist.all_reduce(c, op="max")
    np.testing.assert_array_equal(c, [P - 1, 0, 7])

    d = np.full(4, float(r), dtype=np.float32) if r == P - 1 else np.zeros(4, np.float32)
    dist.broadcast(d, src=P - 1)
    np.testing.assert_array_equal(d, np.full(4, P - 1.0))

    n = 3
    full = (np.arange(P * n, dtype=np.float32) + 10 * r).reshape(P, n)
    shard = np.zeros(n, dtype=np.float32)
    dist.reduce_scatter(shard, full)
    # rank r gets sum over ranks q of (r n + i + 10 q)
    np.testing.assert_array_equal(shard, P * (r * n + np.arange(n)) + 10 * ranks.sum())
    gathered = np.zeros(P * n, dtype=np.float32)
    dist.all_gather(gathered, shard)
    expected = P * np.arange(P * n) + 10 * ranks.sum()
    np.testing.assert_array_equal(gathered, expected)  # the round trip: every rank's shard

    # bucketed reducer: parameters of 4 + 6 + 3 floats, buckets of 32 bytes (8 floats)
    hg.manual_seed(0)
    params = [nn.Parameter(hg.zeros(*shape)) for shape in [(4,), (2, 3), (3,)]]
    for k, p in enumerate(params):
        p.grad = hg.full(p.shape, float(k + 1) * (r + 1))
    reducer = GradientReducer(params, dist.group(), bucket_bytes=32)
    assert len(reducer.buckets) == 3  # 4 floats fit, then 6 alone (4 + 6 > 8), then 3
    reducer.reduce("sum")
    total = P * (P + 1) / 2  # sum over ranks of (r + 1)
    for k, p in enumerate(params):
        np.testing.assert_allclose(p.grad.numpy(), np.full(p.shape, (k + 1) * total))
    one_bucket = GradientReducer(params, dist.group())
    assert len(one_bucket.buckets) == 1
    for k, p in enumerate(params):
        p.grad = hg.full(p.shape, float(k + 1) * (r + 1))
    one_bucket.reduce("avg", dst=0)
    for k, p in enumerate(params):
        want = (k + 1) * total / P if r == 0 else (k + 1) * (r + 1)
        np.testing.assert_allclose(p.grad.numpy(), np.full(p.shape, want), rtol=1e-6)

    # ZeRO-1 pieces: the flat gradient reduce-scattered, parameters all-gathered back
    shards = FlatShards(params, dist.group())
    assert shards.shard_size == -(-13 // P)
    for p in params:
        p.grad = hg.full(p.shape, float(r + 1))
    g = shards.reduce_scatter_gradients("sum")
    lo, hi = shards.shard_range()
    np.testing.assert_allclose(g, [total if i < 13 else 0.0 for i in range(lo, hi)])
    shards.all_gather_parameters(np.arange(lo, hi, dtype=np.float32))
    flat = np.concatenate([p.data.reshape(-1) for p in params])
    np.testing.assert_array_equal(flat, np.arange(13))
    dist.barrier()


if __name__ == "__main__":
    dist.init_process_group()
    check_collectives()
    # Open MPI started with handgrad's settings (the launcher's environment sets none)
    from handgrad.distributed.mpi import OPEN_MPI_SETTINGS

    assert all(os.environ.get(k) == v for k, v in OPEN_MPI_SETTINGS.items()), os.environ
    print(f"rank {dist.get_rank()} of {dist.get_world_size()}: ok", flush=True)
    dist.destroy_process_group()
    sys.exit(0)
