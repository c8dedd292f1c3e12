"""ZeRO-1's chunked reduce-scatter and all-gather (``FlatShards``) give the whole-vector
results for every chunk size (1 element, sizes that do not divide the shard, larger than
it), over a local group of 1 to 4 ranks and under ``mpirun -n 2`` and ``-n 3``; no
collective is handed more than P x chunk elements; ZeRO-1 steps on them are bit-identical
for every chunk size."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import handgrad as hg
import handgrad.distributed as dist
from handgrad import nn
from handgrad.distributed.local import can_fork
from handgrad.optim import AdamW
from handgrad.parallel import zero as zero_module
from handgrad.parallel.zero import FlatShards, ZeroAdamW

HERE = Path(__file__).resolve().parent


def _load_check():
    spec = importlib.util.spec_from_file_location("hg_dist_flat_shards", HERE / "flat_shards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.check_flat_shards


@pytest.mark.skipif(not can_fork(), reason="the local transport needs the fork start method")
# capacity 16 bytes per rank: the transport's own pieces are smaller than most chunks too
@pytest.mark.parametrize("world_size, capacity", [(1, None), (2, None), (3, 16), (4, None)])
def test_local_flat_shards(world_size, capacity, on_local_ranks):
    on_local_ranks(world_size, _load_check(), capacity=capacity)


@pytest.mark.parametrize("n", [2, 3])
def test_mpi_flat_shards(mpirun, n):
    run = mpirun(HERE / "flat_shards.py", n=n)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert all(f"rank {r} of {n}: ok" in out for r in range(n)), out


@pytest.mark.parametrize("chunk", [0, -3, 2.5, True, "8"])
def test_bad_chunk_size_is_refused(chunk):
    params = [nn.Parameter(hg.zeros(4))]
    with pytest.raises(ValueError, match=r"chunk_elems must be an integer >= 1, got"):
        FlatShards(params, SimpleNamespace(rank=0, world_size=2), chunk_elems=chunk)


def check_zero_independent_of_chunks() -> None:
    """Run by every rank: 3 clipped ZeRO-1 steps give bit-identical parameters, moments and
    norms whatever the chunk size (each element is summed over the same ranks either way)."""
    r = dist.get_rank()
    results = {}
    for dtype in ("float32", "bfloat16"):
        for chunk in (1, 7, 4 << 20):
            zero_module.DEFAULT_CHUNK_ELEMS = chunk
            rng = np.random.default_rng(0)
            params = [
                nn.Parameter(hg.tensor(rng.standard_normal(s).astype(np.float32)).to(dtype=dtype))
                for s in [(5, 3), (4, 4), (7,), (3,)]
            ]
            zero = ZeroAdamW(AdamW(params, lr=0.05, weight_decay=0.1), dist.group())
            assert zero.shards.chunk_elems == min(chunk, zero.shards.shard_size)
            norms = []
            for step in range(3):
                grads = np.random.default_rng([step, r])
                for p in params:
                    p.grad = hg.tensor(grads.standard_normal(p.shape).astype(np.float32))
                norms.append(zero.reduce_and_clip(1.0))
                zero.step()
            zero.gather_state()
            state = zero.state_dict()["state"]
            results.setdefault(dtype, []).append(
                (
                    [p.data.tobytes() for p in params],
                    [state[i]["exp_avg_sq"].tobytes() for i in sorted(state)],
                    norms,
                )
            )
        first, *rest = results[dtype]
        assert all(other == first for other in rest), dtype
    dist.barrier()


@pytest.mark.skipif(not can_fork(), reason="the local transport needs the fork start method")
@pytest.mark.parametrize("world_size", [2, 3])
def test_zero1_steps_do_not_depend_on_the_chunk_size(world_size, monkeypatch, on_local_ranks):
    monkeypatch.setattr(zero_module, "DEFAULT_CHUNK_ELEMS", zero_module.DEFAULT_CHUNK_ELEMS)
    on_local_ranks(world_size, check_zero_independent_of_chunks)
