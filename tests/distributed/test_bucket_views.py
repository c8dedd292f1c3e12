"""Gradients as views of the reducer's buckets: backward accumulates into them, the
reduction works on them in place, parameters no rank reached keep ``.grad = None``, and
clipping and AdamW on the views give the weights plain gradients give."""

from __future__ import annotations

import multiprocessing

import numpy as np
import pytest

import handgrad as hg
import handgrad.nn as nn
from handgrad.distributed.reducer import GradientReducer
from handgrad.distributed.transport import Transport
from handgrad.models.gpt2 import GPT2, GPT2Config
from handgrad.nn.utils import clip_grad_norm_
from handgrad.optim import AdamW
from handgrad.parallel.ddp import DistributedDataParallel
from handgrad.tensor import Tensor


class Twin(Transport):
    """Two ranks holding the same gradients: every sum doubles. Records the arrays it
    reduces."""

    name, world_size = "twin", 2

    def __init__(self) -> None:
        self.reduced: list[np.ndarray] = []

    def _reduce(self, array, op, dst, what) -> None:  # noqa: ANN001
        self.reduced.append(array)
        array *= 2


def _mlp() -> nn.Sequential:
    hg.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 2))


def _backward(model: nn.Module, seed: int) -> None:
    hg.manual_seed(seed)
    (model(hg.randn(6, 3)) ** 2).sum().backward()


def _bucket_index(reducer: GradientReducer, i: int) -> int:
    return next(k for k, b in enumerate(reducer.buckets) if i in [m[0] for m in b.members])


def _assert_views(reducer: GradientReducer) -> None:
    for i, p in enumerate(reducer.params):
        assert p.grad is not None, i
        assert p.grad.data is reducer.grad_view(i), i
        flat = reducer.buckets[_bucket_index(reducer, i)].flat
        assert np.shares_memory(p.grad.data, flat), i
        assert p.grad.shape == p.shape and p.grad.dtype == np.float32


def test_backward_accumulates_micro_batches_into_the_buckets():
    model, ref = _mlp(), _mlp()
    params = list(model.parameters())
    group = Twin()
    reducer = GradientReducer(params, group, bucket_bytes=48)
    reducer.attach()
    for step in range(2):  # the second step starts from set_to_none, as the trainer's
        reducer.arm(backwards=2)
        _backward(model, 2 * step)
        _assert_views(reducer)  # the hooks moved each first gradient into its bucket
        _backward(model, 2 * step + 1)  # added in place into the views
        _assert_views(reducer)
        reducer.flush()
        reducer.wait()
        _assert_views(reducer)
        # the collectives ran on the buckets themselves
        assert [a is b.flat for a, b in zip(group.reduced, reducer.buckets)] == [True] * len(
            reducer.buckets
        )
        group.reduced.clear()
        for q in ref.parameters():
            q.grad = None
        _backward(ref, 2 * step)
        _backward(ref, 2 * step + 1)
        for p, q in zip(params, ref.parameters()):
            np.testing.assert_array_equal(p.grad.numpy(), 2 * q.grad.numpy())
        AdamW(params).zero_grad()
        assert all(p.grad is None for p in params)


def test_a_parameter_no_rank_reached_keeps_none_and_stale_values_are_not_summed():
    model = _mlp()
    unused = nn.Parameter(hg.ones(3))
    params = [unused, *model.parameters()]
    reducer = GradientReducer(params, Twin(), bucket_bytes=32)
    reducer.attach()
    unused.grad = hg.full((3,), 7.0)  # a gradient set by hand: reduce() moves it in
    reducer.reduce()
    assert unused.grad.data is reducer.grad_view(0)
    np.testing.assert_array_equal(unused.grad.numpy(), np.full(3, 14.0))
    unused.grad = None
    reducer.arm()
    _backward(model, 0)
    reducer.flush()
    reducer.wait(has_grad=[False] + [True] * (len(params) - 1))
    assert unused.grad is None
    reducer.arm()
    _backward(model, 1)
    reducer.flush()
    reducer.wait()  # no has_grad: zeros (its slice was cleared, not the 14s left in it)
    np.testing.assert_array_equal(unused.grad.numpy(), np.zeros(3))


def test_reduce_without_hooks_copies_once_and_then_works_on_the_views():
    params = [nn.Parameter(hg.zeros(2, 3)), nn.Parameter(hg.zeros(4))]
    reducer = GradientReducer(params, Twin())
    params[0].grad = hg.tensor(np.arange(6, dtype=np.float64).reshape(2, 3))  # cast in
    params[1].grad = hg.full((4,), 0.5)
    reducer.reduce("sum", has_grad=[True, True])
    _assert_views(reducer)
    np.testing.assert_array_equal(params[0].grad.numpy(), 2 * np.arange(6).reshape(2, 3))
    np.testing.assert_array_equal(params[1].grad.numpy(), np.full(4, 1.0))
    reducer.reduce("sum")  # in place: the views double again
    np.testing.assert_array_equal(params[1].grad.numpy(), np.full(4, 2.0))
    params[1].grad = hg.zeros(2, 2)
    with pytest.raises(ValueError, match=r"parameter 1 of shape \(4,\) has a .grad of shape"):
        reducer.reduce()


def test_clip_and_adamw_on_the_views_give_the_weights_of_plain_gradients():
    model, ref = _mlp(), _mlp()
    params, ref_params = list(model.parameters()), list(ref.parameters())
    reducer = GradientReducer(params, Twin(), bucket_bytes=40)
    reducer.attach()
    opt, ref_opt = AdamW(params, lr=0.1), AdamW(ref_params, lr=0.1)
    for step in range(3):
        reducer.arm()
        _backward(model, step)
        reducer.flush()
        reducer.wait()
        _backward(ref, step)
        for q in ref_params:
            q.grad = Tensor._make(q.grad.data * 2)
        norm = clip_grad_norm_(params, 0.5)
        assert norm.item() == clip_grad_norm_(ref_params, 0.5).item()
        assert norm.item() > 0.5  # the clip scaled the views in place
        _assert_views(reducer)
        for i, q in enumerate(ref_params):
            np.testing.assert_array_equal(reducer.grad_view(i), q.grad.numpy())
        opt.step()
        ref_opt.step()
        opt.zero_grad()
        ref_opt.zero_grad()
    for p, q in zip(params, ref_params):
        assert p.data.tobytes() == q.data.tobytes()
    init = [q.data for q in _mlp().parameters()]
    assert any(not np.array_equal(p.data, a) for p, a in zip(params, init))  # they trained


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="needs the fork start method"
)
def test_forked_ranks_leave_the_summed_gradients_as_views_on_rank_0():
    def gpt() -> GPT2:
        hg.manual_seed(0)
        m = GPT2(GPT2Config(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=20))
        m.unused = nn.Parameter(hg.ones(3))  # no rank gives it a gradient
        return m

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 20, size=(4, 4)), rng.integers(0, 20, size=(4, 4))
    model = gpt()
    # rows 0, 2 go to rank 0 and rows 1, 3 to rank 1 (2 micro batches of 1 row per rank)
    with DistributedDataParallel(model, 2, rows=4, block_size=4, seed=0) as dp:
        for step in range(2):
            for p in model.parameters():
                p.grad = None
            dp.forward_backward(step, x, y, micro_batch_size=1, scale=0.25)
    names = [n for n, _ in model.named_parameters()]
    assert model.unused.grad is None
    ranks = []
    for rows in ([0, 2], [1, 3]):
        m = gpt()
        for r in rows:
            _, loss = m(Tensor._make(x[r : r + 1]), Tensor._make(y[r : r + 1]))
            (loss * 0.25).backward()
        ranks.append(dict(m.named_parameters()))
    for i, (name, p) in enumerate(model.named_parameters()):
        if name == "unused":
            continue
        assert p.grad.data is dp.reducer.grad_view(i), name
        want = ranks[0][name].grad.numpy() + ranks[1][name].grad.numpy()
        np.testing.assert_array_equal(p.grad.numpy(), want, err_msg=name)
    assert "unused" in names
