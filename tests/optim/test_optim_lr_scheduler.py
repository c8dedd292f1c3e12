"""The warmup + cosine schedule: hand-computed values and torch's LambdaLR."""

import math

import pytest
import torch

import handgrad as hg
from handgrad.nn import Parameter
from handgrad.optim import SGD, AdamW, CosineWithWarmup, cosine_with_warmup

CARD = dict(max_lr=6e-4, min_lr=1e-4, warmup_steps=1000, decay_steps=600_000)


def test_schedule_hand_values():
    f = lambda s: cosine_with_warmup(s, **CARD)  # noqa: E731
    assert f(0) == pytest.approx(6e-4 / 1000, rel=1e-12)  # first step is not lr 0
    assert f(499) == pytest.approx(6e-4 * 500 / 1000, rel=1e-12)
    assert f(999) == pytest.approx(6e-4, rel=1e-12)  # warmup ends at max_lr
    assert f(1000) == pytest.approx(6e-4, rel=1e-12)  # cosine starts at max_lr
    # halfway through the decay cos(pi/2) = 0: the midpoint of max and min
    assert f(1000 + 599_000 // 2) == pytest.approx((6e-4 + 1e-4) / 2, rel=1e-9)
    # a quarter of the way: min + (max - min) (1 + cos(pi/4)) / 2
    quarter = 1000 + 599_000 // 4  # 150750: ratio = 149750 / 599000 = 0.25
    assert f(quarter) == pytest.approx(1e-4 + 5e-4 * (1 + math.sqrt(0.5)) / 2, rel=1e-9)
    assert f(600_000) == pytest.approx(1e-4, rel=1e-12)
    assert f(600_001) == 1e-4 and f(10**7) == 1e-4


def test_schedule_no_warmup_and_equal_steps():
    assert cosine_with_warmup(0, max_lr=1.0, min_lr=0.0, warmup_steps=0, decay_steps=10) == 1.0
    assert cosine_with_warmup(5, max_lr=1.0, min_lr=0.0, warmup_steps=5, decay_steps=5) == 0.0


@pytest.mark.parametrize(
    "bad",
    [
        dict(step=-1),
        dict(warmup_steps=-1),
        dict(warmup_steps=20, decay_steps=10),
        dict(min_lr=1.0, max_lr=0.5),
    ],
)
def test_schedule_rejects_bad_arguments(bad):
    kwargs = dict(step=0, max_lr=1.0, min_lr=0.1, warmup_steps=2, decay_steps=10) | bad
    step = kwargs.pop("step")
    with pytest.raises(ValueError):
        cosine_with_warmup(step, **kwargs)


def test_scheduler_matches_torch_lambda_lr():
    cfg = dict(max_lr=1e-2, min_lr=1e-3, warmup_steps=5, decay_steps=30)
    p = Parameter(hg.zeros(2))
    opt = SGD([{"params": [p]}], lr=123.0)
    sched = CosineWithWarmup(opt, **cfg)
    q = torch.zeros(2, requires_grad=True)
    ref_opt = torch.optim.SGD([q], lr=cfg["max_lr"])

    # the same schedule written independently as a multiplier of max_lr
    def lam(s):
        if s < 5:
            return (s + 1) / 5
        if s >= 30:
            return 0.1
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 5) / 25))

    ref = torch.optim.lr_scheduler.LambdaLR(ref_opt, lam)
    for _ in range(40):
        assert sched.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], rel=1e-12)
        assert opt.param_groups[0]["lr"] == sched.get_last_lr()[0]
        opt.step()
        ref_opt.step()
        sched.step()
        ref.step()


def test_scheduler_sets_every_group_and_resumes():
    cfg = dict(max_lr=1.0, min_lr=0.1, warmup_steps=3, decay_steps=9)
    params = [Parameter(hg.zeros(2)), Parameter(hg.zeros(3))]
    opt = AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}])
    sched = CosineWithWarmup(opt, **cfg)
    for _ in range(4):
        sched.step()
    assert sched.get_last_lr() == [cosine_with_warmup(4, **cfg)] * 2
    state = sched.state_dict()
    opt2 = AdamW([{"params": params[:1]}, {"params": params[1:], "weight_decay": 0.0}])
    sched2 = CosineWithWarmup(opt2, **cfg)
    sched2.load_state_dict(state)
    assert sched2.last_step == 4 and sched2.get_last_lr() == sched.get_last_lr()
    with pytest.raises(ValueError, match="expected keys"):
        sched2.load_state_dict({"last_step": 1})
