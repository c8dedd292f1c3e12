"""End to end: the same MLP trained by handgrad and by torch on a toy spiral gives the same
loss curve (model -> loss -> grads -> clipping -> optimizer -> schedule)."""

import math

import numpy as np
import pytest
import torch

import handgrad as hg
import handgrad.nn.functional as F
from handgrad import nn, optim


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Tiny tensors: torch's thread pool only adds contention on a busy 2-core machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def spiral(n_per_class=100, seed=0):
    """Two interleaved one-turn spirals of radius 3, labels 0/1."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0.25, 2 * math.pi, n_per_class)
    xs, ys = [], []
    for label in (0, 1):
        angle = t + label * math.pi
        pts = np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1) * (3 / (2 * math.pi))
        xs.append(pts + 0.06 * rng.standard_normal(pts.shape))
        ys.append(np.full(n_per_class, label))
    return np.concatenate(xs), np.concatenate(ys)


def mlp(lib, act):
    return lib.nn.Sequential(
        lib.nn.Linear(2, 32), act(), lib.nn.Linear(32, 32), act(), lib.nn.Linear(32, 2)
    )


def train_both(optimizer, dtype, steps=100, batch=64):
    x, y = spiral()
    ours = mlp(hg, nn.Tanh if optimizer == "sgd" else nn.ReLU)
    theirs = mlp(torch, torch.nn.Tanh if optimizer == "sgd" else torch.nn.ReLU)
    ours.to(dtype)
    theirs.to(torch.float64 if dtype == "float64" else torch.float32)
    theirs.load_state_dict({k: torch.tensor(v.numpy()) for k, v in ours.state_dict().items()})
    if optimizer == "sgd":
        opt = optim.SGD(ours.parameters(), lr=0.2, momentum=0.9)
        ref = torch.optim.SGD(theirs.parameters(), lr=0.2, momentum=0.9)
        sched = ref_sched = None
    else:
        opt = optim.AdamW(optim.param_groups_for_weight_decay(ours, 0.1), lr=1e-2)
        decay = [p for p in theirs.parameters() if p.dim() >= 2]
        no_decay = [p for p in theirs.parameters() if p.dim() < 2]
        ref = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-2,
        )
        cfg = dict(max_lr=1e-2, min_lr=1e-3, warmup_steps=10, decay_steps=80)
        sched = optim.CosineWithWarmup(opt, **cfg)
        ref_sched = torch.optim.lr_scheduler.LambdaLR(
            ref, lambda s: optim.cosine_with_warmup(s, **cfg) / cfg["max_lr"]
        )
    rng = np.random.default_rng(1)
    losses, ref_losses = [], []
    for _ in range(steps):
        idx = rng.choice(len(x), batch, replace=False)
        xb, yb = x[idx], y[idx]
        loss = F.cross_entropy(ours(hg.tensor(xb, dtype=dtype)), hg.tensor(yb))
        ref_loss = torch.nn.functional.cross_entropy(
            theirs(torch.tensor(xb, dtype=ref.param_groups[0]["params"][0].dtype)),
            torch.tensor(yb),
        )
        opt.zero_grad()
        ref.zero_grad()
        loss.backward()
        ref_loss.backward()
        if sched is not None:
            nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
            torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0)
        opt.step()
        ref.step()
        if sched is not None:
            sched.step()
            ref_sched.step()
        losses.append(loss.item())
        ref_losses.append(ref_loss.item())
    return np.array(losses), np.array(ref_losses)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("dtype,rtol", [("float64", 1e-9), ("float32", 1e-4)])
def test_mlp_loss_curve_matches_torch(optimizer, dtype, rtol):
    losses, ref_losses = train_both(optimizer, dtype)
    np.testing.assert_allclose(losses, ref_losses, rtol=rtol)
    # and it actually learns the spiral
    assert losses[-10:].mean() < 0.25 * losses[:10].mean()
