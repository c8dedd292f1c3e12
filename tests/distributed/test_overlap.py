"""The gradient reduction overlapped with backward (``GradientReducer.arm/flush/wait``):
when buckets start, in which order, and that the sums are the ones reduce() gives after
backward; in one process over a recording transport, then over 2 MPI ranks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import handgrad as hg
import handgrad.nn as nn
from handgrad.distributed.reducer import GradientReducer
from handgrad.distributed.transport import Transport, Work

HERE = Path(__file__).resolve().parent


class _Pending(Work):
    """Completes at wait(): until then the array holds what was packed."""

    def __init__(self, log: list, array: np.ndarray) -> None:
        self.log, self.array, self.done = log, array, False

    def test(self) -> bool:
        self.log.append("test")
        return self.done

    def wait(self) -> None:
        if not self.done:
            self.array *= 2  # as if a second rank held the same gradient
            self.done = True


class Recording(Transport):
    """Two ranks holding the same gradients: a sum doubles. Records each collective and
    the state of the model's first layer when it starts."""

    name, world_size = "recording", 2

    def __init__(self, watch: nn.Parameter) -> None:
        self.log: list = []
        self.watch = watch

    def _reduce(self, array, op, dst, what) -> None:  # noqa: ANN001
        self.log.append(("blocking", array.size))
        array *= 2

    def all_reduce_async(self, array, op="sum") -> Work:  # noqa: ANN001
        self.log.append(("start", array.size, self.watch.grad is None))
        return _Pending(self.log, array)


def _mlp() -> nn.Module:
    hg.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 5), nn.Linear(5, 2))


def _backward(model: nn.Module, seed: int) -> None:
    hg.manual_seed(seed)
    (model(hg.randn(6, 3)) ** 2).sum().backward()


def test_buckets_start_during_backward_in_reverse_parameter_order():
    model = _mlp()
    params = list(model.parameters())
    group = Recording(watch=model[0].weight)
    # 32 bytes = 8 floats: [2.bias 2, 2.weight 10 alone, 1.bias 5, 1.weight 20, 0.bias 4 ...]
    reducer = GradientReducer(params, group, bucket_bytes=32)
    order = [params[i].shape for b in reducer.buckets for i, _, _ in b.members]
    assert order == [p.shape for p in reversed(params)]
    reducer.attach()
    _backward(model, 0)  # not armed: a backward outside a step reduces nothing
    reducer.arm(backwards=2)
    _backward(model, 1)  # the first of 2 micro batches only accumulates
    assert group.log == []
    _backward(model, 2)
    starts = [e for e in group.log if e[0] == "start"]
    # every bucket whose parameters all got gradients started inside backward, in order
    assert [s[1] for s in starts] == [b.flat.size for b in reducer.buckets]
    assert "test" in group.log  # the outstanding ones were polled from later hooks
    local = [p.grad.numpy().copy() for p in params]
    reducer.flush()
    reducer.wait()
    for p, g in zip(params, local):
        np.testing.assert_array_equal(p.grad.numpy(), 2 * g)


def test_the_first_layer_is_still_being_computed_when_the_last_bucket_starts():
    model = _mlp()
    params = list(model.parameters())
    group = Recording(watch=model[0].weight)
    reducer = GradientReducer(params, group, bucket_bytes=32)
    reducer.attach()
    reducer.arm()
    _backward(model, 0)  # first backward: 0.weight.grad is None until its own turn
    starts = [e for e in group.log if e[0] == "start"]
    assert starts[0][2] is True  # bucket 0 (the last layer's bias) went out before it
    assert starts[-1][2] is False  # the first layer's own bucket went after it


def test_same_sums_as_reduce_after_backward_with_accumulation():
    ref, ovl = _mlp(), _mlp()
    plain = GradientReducer(list(ref.parameters()), Recording(ref[0].weight), bucket_bytes=48)
    reducer = GradientReducer(list(ovl.parameters()), Recording(ovl[0].weight), bucket_bytes=48)
    reducer.attach()
    reducer.arm(backwards=2)
    for model in (ref, ovl):
        _backward(model, 1)
        _backward(model, 2)
    plain.reduce("sum")
    reducer.flush()
    reducer.wait()
    for p, q in zip(ref.parameters(), ovl.parameters()):
        np.testing.assert_array_equal(p.grad.numpy(), q.grad.numpy())


def test_a_parameter_without_gradient_completes_at_flush_and_keeps_none():
    model = _mlp()
    unused = nn.Parameter(hg.ones(3))
    params = [unused, *model.parameters()]  # first in order: its bucket is the last one
    group = Recording(watch=model[0].weight)
    reducer = GradientReducer(params, group, bucket_bytes=32)
    reducer.attach()
    reducer.arm()
    _backward(model, 0)
    started = sum(e[0] == "start" for e in group.log)
    assert started == len(reducer.buckets) - 1  # all but the bucket waiting for `unused`
    reducer.flush()
    assert sum(e[0] == "start" for e in group.log) == len(reducer.buckets)
    reducer.wait(has_grad=[False] + [True] * (len(params) - 1))
    assert unused.grad is None
    reducer.arm()
    _backward(model, 0)
    reducer.flush()
    reducer.wait()  # no has_grad: zeros, as reduce() gives
    np.testing.assert_array_equal(unused.grad.numpy(), np.zeros(3))


def test_a_second_gradient_while_armed_and_wait_before_flush_are_errors():
    model = _mlp()
    reducer = GradientReducer(list(model.parameters()), Recording(model[0].weight))
    reducer.attach()
    reducer.arm()
    with pytest.raises(RuntimeError, match="call flush"):
        reducer.wait()
    _backward(model, 0)
    with pytest.raises(RuntimeError, match="more than the 1 backward passes of arm"):
        _backward(model, 1)
    reducer.arm()
    reducer.flush()  # too early: the backward has not run
    with pytest.raises(RuntimeError, match=r"after flush\(\) had started its bucket"):
        _backward(model, 1)
    reducer.detach()
    reducer.arm()
    _backward(model, 1)  # detached: the hooks are gone
    with pytest.raises(ValueError, match="'sum' or 'avg'"):
        reducer.arm("max")
    with pytest.raises(ValueError, match="backwards must be >= 1, got 0"):
        reducer.arm(backwards=0)


def test_overlap_over_mpi_gives_the_sums_of_reduce_after_backward(mpirun):
    run = mpirun(HERE / "overlap_ranks.py")
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "rank 0: overlap ok" in out and "rank 1: overlap ok" in out, out
