"""SGD against torch.optim.SGD over 20 steps with identical random gradients."""

import numpy as np
import pytest
import torch

import handgrad as hg
from handgrad.nn import Parameter
from handgrad.optim import SGD

SHAPES = [(6, 3), (3,), (2, 2, 5)]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=0.1),
        dict(lr=0.05, momentum=0.9),
        dict(lr=0.05, momentum=0.9, nesterov=True),
        dict(lr=0.05, momentum=0.8, dampening=0.3),
        dict(lr=0.02, momentum=0.9, weight_decay=0.1),
        dict(lr=0.02, momentum=0.9, nesterov=True, weight_decay=0.05),
        dict(lr=0.1, weight_decay=0.2),
    ],
)
def test_sgd_trajectory_matches_torch(kwargs):
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s) for s in SHAPES]
    ours = [Parameter(hg.tensor(a, dtype=hg.float64)) for a in arrays]
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    opt, ref = SGD(ours, **kwargs), torch.optim.SGD(theirs, **kwargs)
    for _ in range(20):
        for p, q in zip(ours, theirs):
            g = rng.standard_normal(p.shape)
            p.grad, q.grad = hg.tensor(g, dtype=hg.float64), torch.tensor(g)
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            np.testing.assert_allclose(p.data, q.detach().numpy(), rtol=1e-6, atol=1e-12)


def test_sgd_groups_with_own_options_and_no_grad_params():
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(s) for s in SHAPES]
    ours = [Parameter(hg.tensor(a, dtype=hg.float64)) for a in arrays]
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]

    def groups(ps):
        return [{"params": ps[:1], "momentum": 0.5}, {"params": ps[1:], "lr": 0.3}]

    opt, ref = (
        SGD(groups(ours), lr=0.1, momentum=0.9),
        torch.optim.SGD(groups(theirs), lr=0.1, momentum=0.9),
    )
    for step in range(20):
        for i, (p, q) in enumerate(zip(ours, theirs)):
            if i == 2 and step % 3 == 0:
                p.grad = q.grad = None
                continue
            g = rng.standard_normal(p.shape)
            p.grad, q.grad = hg.tensor(g, dtype=hg.float64), torch.tensor(g)
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        np.testing.assert_allclose(p.data, q.detach().numpy(), rtol=1e-6, atol=1e-12)


def test_sgd_plain_step_by_hand():
    p = Parameter(hg.tensor([1.0, -2.0], dtype=hg.float64))
    p.grad = hg.tensor([0.5, 0.25], dtype=hg.float64)
    SGD([p], lr=0.1, weight_decay=0.2).step()
    # p - lr (g + wd p) = [1 - 0.1 (0.5 + 0.2), -2 - 0.1 (0.25 - 0.4)]
    np.testing.assert_allclose(p.data, [0.93, -1.985], rtol=1e-14)
    assert p.grad.data.tolist() == [0.5, 0.25]  # the grad itself is not modified


def test_sgd_state_dict_round_trip_is_bitwise():
    def fresh():
        rng = np.random.default_rng(2)
        return [Parameter(hg.tensor(rng.standard_normal(s))) for s in SHAPES]

    def run(opt, params, rng, n):
        for _ in range(n):
            for p in params:
                p.grad = hg.tensor(rng.standard_normal(p.shape).astype(np.float32))
            opt.step()

    a = fresh()
    run(SGD(a, lr=0.05, momentum=0.9, nesterov=True), a, np.random.default_rng(3), 20)
    b, rng = fresh(), np.random.default_rng(3)
    first = SGD(b, lr=0.05, momentum=0.9, nesterov=True)
    run(first, b, rng, 10)
    sd = first.state_dict()
    assert sorted(sd["state"]) == [0, 1, 2] and "momentum_buffer" in sd["state"][0]
    second = SGD(b, lr=1.0, momentum=0.9, nesterov=True)
    second.load_state_dict(sd)
    run(second, b, rng, 10)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.data, y.data)


def test_sgd_bfloat16_updates_float32_master():
    # 1e-4 steps are below bf16 resolution at 1.0 (2^-7): a plain bf16 update would be
    # rounded away every time; the master accumulates them.
    p = Parameter(hg.ones(4, dtype=hg.bfloat16))
    opt = SGD([p], lr=1e-4)
    for _ in range(100):
        p.grad = hg.ones(4)
        opt.step()
    np.testing.assert_allclose(opt.state[p]["master"], np.full(4, 1 - 100 * 1e-4), rtol=1e-5)
    assert p.data.astype(np.float32).tolist() == [0.98828125] * 4  # bf16 rounding of 0.99
