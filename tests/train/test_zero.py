"""ZeRO-1 (``parallel/zero.py``) on a local group of forked ranks: every rank ends with the
weights AdamW gives on the summed, clipped gradient, keeps 1/P of its state, and its
gathered state dict is AdamW's."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest

import handgrad as hg
import handgrad.distributed as dist
from handgrad import nn
from handgrad.distributed.local import can_fork
from handgrad.nn.utils import clip_grad_norm_
from handgrad.optim import AdamW
from handgrad.parallel.zero import ZeroAdamW

pytestmark = pytest.mark.skipif(not can_fork(), reason="the local transport needs fork")

SHAPES = [(5, 3), (4, 4), (7,), (3,)]  # 15 + 16 + 7 + 3 = 41 elements, in group order


def make_params(dtype: str) -> list[nn.Parameter]:
    rng = np.random.default_rng(0)
    return [
        nn.Parameter(hg.tensor(rng.standard_normal(s).astype(np.float32)).to(dtype=dtype))
        for s in SHAPES
    ]


def groups(params: list[nn.Parameter]) -> list[dict]:
    # decay on the 2-D weights only, as param_groups_for_weight_decay makes them
    return [
        {"params": [p for p in params if p.ndim == 2], "weight_decay": 0.1},
        {"params": [p for p in params if p.ndim != 2], "weight_decay": 0.0},
    ]


def grads(step: int, rank: int) -> list[np.ndarray]:
    rng = np.random.default_rng([step, rank])
    return [rng.standard_normal(s).astype(np.float32) for s in SHAPES]


def check_zero(dtype: str, max_norm: float) -> None:
    """Run by every rank: 3 ZeRO steps against AdamW on the sum of every rank's gradient."""
    r, P = dist.get_rank(), dist.get_world_size()
    mine, ref = make_params(dtype), make_params(dtype)
    zero = ZeroAdamW(AdamW(groups(mine), lr=0.05), dist.group())
    adamw = AdamW(groups(ref), lr=0.05)
    for step in range(3):
        for k, p in enumerate(mine):
            p.grad = hg.tensor(grads(step, r)[k])
        for k, p in enumerate(ref):
            p.grad = hg.tensor(sum(grads(step, q)[k] for q in range(P)))
        norm = zero.reduce_and_clip(max_norm)
        want = float(clip_grad_norm_(ref, max_norm).item())
        assert norm == pytest.approx(want, rel=1e-5)
        zero.step()
        adamw.step()
        zero.zero_grad()
        assert all(p.grad is None for p in mine)
        for a, b in zip(mine, ref):
            assert a.dtype == b.dtype
            np.testing.assert_allclose(
                a.data.astype(np.float32),
                b.data.astype(np.float32),
                rtol=0,
                atol=1e-5 if dtype == "float32" else 1e-2,
            )
    # this rank's state: m and v of ceil(41 / P) elements, plus fp32 masters for bfloat16
    n = math.ceil(41 / P)
    assert zero.state_bytes() == (2 if dtype == "float32" else 3) * n * 4
    zero.gather_state()
    sd, want = zero.state_dict(), adamw.state_dict()
    assert sorted(sd["state"]) == sorted(want["state"]) == [0, 1, 2, 3]
    for i, st in want["state"].items():
        assert sorted(sd["state"][i]) == sorted(st), i  # "master" only for bfloat16
        for key in ("exp_avg", "exp_avg_sq", "master"):
            if key in st:
                np.testing.assert_allclose(
                    np.asarray(sd["state"][i][key]), np.asarray(st[key]), rtol=1e-4, atol=1e-6
                )
    # loaded back into a fresh ZeroAdamW: the same next step
    again = ZeroAdamW(AdamW(groups(make_params(dtype)), lr=0.05), dist.group())
    for p, q in zip(again.params, zero.params):
        p.data[...] = q.data
    again.load_state_dict(sd)
    for z in (zero, again):
        for k, p in enumerate(z.params):
            p.grad = hg.tensor(grads(9, r)[k])
        z.reduce_and_clip(max_norm)
        z.step()
    for a, b in zip(zero.params, again.params):
        assert a.data.tobytes() == b.data.tobytes()
    dist.barrier()


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize(
    "dtype, max_norm", [("float32", math.inf), ("float32", 1.0), ("bfloat16", 1.0)]
)
def test_zero1_on_local_ranks_matches_adamw_on_the_summed_gradient(
    world_size, dtype, max_norm, on_local_ranks
):
    on_local_ranks(world_size, lambda: check_zero(dtype, max_norm))


def check_gather_to_rank_0(dtype: str) -> None:
    """Run by every rank: the state gathered to rank 0 only is the one gathered everywhere;
    the other ranks keep none, and ``state_dict()`` hands it over once."""
    r, P = dist.get_rank(), dist.get_world_size()
    zero = ZeroAdamW(AdamW(groups(make_params(dtype)), lr=0.05), dist.group())
    for step in range(2):
        for k, p in enumerate(zero.params):
            p.grad = hg.tensor(grads(step, r)[k])
        zero.reduce_and_clip(1.0)
        zero.step()
    zero.gather_state()
    everywhere = zero.state_dict()
    with pytest.raises(RuntimeError, match=r"once per state_dict\(\)"):
        zero.state_dict()  # handed over: this optimizer holds no reference any more
    zero.gather_state(dst=0)
    if r == 0:
        sd = zero.state_dict()
        assert zero._gathered is None
        assert sorted(sd["state"]) == sorted(everywhere["state"]) == [0, 1, 2, 3]
        for i, st in everywhere["state"].items():
            assert sorted(sd["state"][i]) == sorted(st)
            for key, value in st.items():
                assert np.asarray(sd["state"][i][key]).tobytes() == np.asarray(value).tobytes()
    else:
        assert zero._gathered is None
        with pytest.raises(RuntimeError, match="kept it on rank 0 only"):
            zero.state_dict()
    with pytest.raises(ValueError, match=f"rank {P} is outside 0 .. {P - 1}"):
        zero.gather_state(dst=P)
    dist.barrier()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_state_gathered_to_rank_0_only_and_released_once_handed_over(dtype, on_local_ranks):
    on_local_ranks(3, lambda: check_gather_to_rank_0(dtype))


class _OneRank(dist.Transport):
    """A group of one: every collective leaves its arrays as they are (copies across)."""

    name = "one"

    def _reduce(self, array, op, dst, what) -> None:
        pass

    def reduce_scatter(self, output, input) -> None:
        output[...] = input

    def all_gather(self, output, input) -> None:
        output[...] = input


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_norm_leaves_the_gradient_alone_on_a_device_as_on_the_host(bad):
    """The host tests ``coef < 1`` (False for nan); the device multiplies by a coefficient it
    never reads back, which must then be 1, not nan, as ``minimum(nan, 1)`` would give."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import fakecupy

    def clipped(on_device: bool) -> np.ndarray:
        params = make_params("float32")
        g = grads(0, 0)
        g[1][0, 0] = bad
        if on_device:
            params = [nn.Parameter(p.to("cuda")) for p in params]
        for p, gi in zip(params, g):
            p.grad = hg.tensor(gi).to(p.device)
        zero = ZeroAdamW(AdamW(groups(params), lr=0.05), _OneRank())
        norm = zero.reduce_and_clip(1.0)
        assert not math.isfinite(float(norm))
        return fakecupy.asnumpy(zero._grad) if on_device else zero._grad.copy()

    host = clipped(False)
    with fakecupy.installed():
        device = clipped(True)
    finite = np.isfinite(host)
    assert finite.sum() == host.size - 1  # the bad element only: nothing was scaled by nan
    np.testing.assert_array_equal(device[finite], host[finite])
