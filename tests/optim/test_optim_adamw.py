"""AdamW against torch.optim.AdamW: trajectories, groups, bias correction, bf16 master
weights and state-dict round trips."""

import json

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import handgrad as hg
from handgrad.nn import Parameter
from handgrad.optim import AdamW, flatten_state_dict, unflatten_state_dict

SHAPES = [(5, 4), (4,), (3, 2, 2), (7,)]


def make_params(seed, dtype=np.float64):
    rng = np.random.default_rng(seed)
    arrays = [rng.standard_normal(s) for s in SHAPES]
    ours = [Parameter(hg.tensor(a, dtype=dtype)) for a in arrays]
    theirs = [torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in arrays]
    return ours, theirs


def feed_grads(rng, ours, theirs, skip=()):
    for i, (p, q) in enumerate(zip(ours, theirs)):
        if i in skip:
            p.grad, q.grad = None, None
            continue
        g = rng.standard_normal(p.shape)
        p.grad = hg.tensor(g, dtype=hg.float32 if p.dtype == hg.bfloat16 else p.dtype)
        q.grad = torch.tensor(g, dtype=q.dtype)


def assert_close(ours, theirs, rtol):
    for p, q in zip(ours, theirs):
        a, b = p.data.astype(np.float64), q.detach().numpy().astype(np.float64)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(lr=1e-2),
        dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
        dict(lr=1e-3, weight_decay=0.0),
    ],
)
def test_adamw_trajectory_matches_torch(kwargs):
    ours, theirs = make_params(0)
    opt, ref = AdamW(ours, **kwargs), torch.optim.AdamW(theirs, **kwargs)
    rng = np.random.default_rng(1)
    for _ in range(20):
        feed_grads(rng, ours, theirs)
        opt.step()
        ref.step()
        assert_close(ours, theirs, 1e-6)
    for p, q in zip(ours, theirs):
        st, rst = opt.state[p], ref.state[q]
        assert st["step"] == int(rst["step"]) == 20
        np.testing.assert_allclose(st["exp_avg"], rst["exp_avg"].numpy(), rtol=1e-6)
        np.testing.assert_allclose(st["exp_avg_sq"], rst["exp_avg_sq"].numpy(), rtol=1e-6)


def test_adamw_weight_decay_groups_and_missing_grads():
    ours, theirs = make_params(2)
    groups = lambda ps: [  # noqa: E731
        {"params": [ps[0], ps[2]], "weight_decay": 0.5},
        {"params": [ps[1], ps[3]], "weight_decay": 0.0, "lr": 5e-3},
    ]
    opt = AdamW(groups(ours), lr=2e-2, betas=(0.9, 0.95))
    ref = torch.optim.AdamW(groups(theirs), lr=2e-2, betas=(0.9, 0.95))
    rng = np.random.default_rng(3)
    for step in range(20):
        # parameter 3 has no gradient on even steps: it must not move nor count a step
        feed_grads(rng, ours, theirs, skip=(3,) if step % 2 == 0 else ())
        opt.step()
        ref.step()
        assert_close(ours, theirs, 1e-6)
    assert opt.state[ours[3]]["step"] == 10


def test_adamw_first_step_is_bias_corrected_sign_step():
    # With zero decay, step 1 gives m_hat = g and v_hat = g^2, so the update is
    # lr * g / (|g| + eps): every coordinate moves by about lr, whatever |g| is.
    g = np.array([1e-4, -3.0, 250.0, -0.02])
    p = Parameter(hg.zeros(4, dtype=hg.float64))
    p.grad = hg.tensor(g, dtype=hg.float64)
    AdamW([p], lr=0.1, eps=1e-8, weight_decay=0.0).step()
    np.testing.assert_allclose(p.data, -0.1 * g / (np.abs(g) + 1e-8), rtol=1e-12)


def test_adamw_decoupled_decay_with_zero_grad():
    # g = 0 keeps m = v = 0, so only the decay acts: p <- p (1 - lr wd) each step.
    p = Parameter(hg.ones(3, dtype=hg.float64))
    opt = AdamW([p], lr=0.1, weight_decay=0.5)
    for _ in range(3):
        p.grad = hg.zeros(3, dtype=hg.float64)
        opt.step()
    np.testing.assert_allclose(p.data, np.full(3, 0.95**3), rtol=1e-14)


def test_adamw_large_param_spans_several_chunks():
    # more elements than one internal chunk (and not a multiple of it)
    rng = np.random.default_rng(4)
    a = rng.standard_normal(100_003)
    p, q = Parameter(hg.tensor(a, dtype=hg.float64)), torch.tensor(a, requires_grad=True)
    opt, ref = (
        AdamW([p], lr=1e-2, weight_decay=0.1),
        torch.optim.AdamW([q], lr=1e-2, weight_decay=0.1),
    )
    for _ in range(3):
        g = rng.standard_normal(a.shape)
        p.grad, q.grad = hg.tensor(g, dtype=hg.float64), torch.tensor(g)
        opt.step()
        ref.step()
    np.testing.assert_allclose(p.data, q.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_adamw_float32_matches_torch_float32():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((64, 33)).astype(np.float32)
    p, q = Parameter(hg.tensor(a)), torch.tensor(a, requires_grad=True)
    opt, ref = AdamW([p], lr=1e-3), torch.optim.AdamW([q], lr=1e-3)
    for _ in range(20):
        g = rng.standard_normal(a.shape).astype(np.float32)
        p.grad, q.grad = hg.tensor(g), torch.tensor(g)
        opt.step()
        ref.step()
    assert p.dtype == np.float32 and opt.state[p]["exp_avg"].dtype == np.float32
    np.testing.assert_allclose(p.data, q.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_adamw_bfloat16_keeps_float32_master():
    rng = np.random.default_rng(6)
    a = rng.standard_normal((16, 8)).astype(np.float32)
    a16 = a.astype(ml_dtypes.bfloat16)
    p = Parameter(hg.tensor(a16, dtype=hg.bfloat16))
    # torch reference: float32 weights starting from the same (bf16-representable) values
    q = torch.tensor(a16.astype(np.float32), requires_grad=True)
    opt, ref = (
        AdamW([p], lr=1e-3, weight_decay=0.1),
        torch.optim.AdamW([q], lr=1e-3, weight_decay=0.1),
    )
    for _ in range(20):
        g = rng.standard_normal(a.shape).astype(np.float32)
        p.grad, q.grad = hg.tensor(g), torch.tensor(g)
        opt.step()
        ref.step()
        master = opt.state[p]["master"]
        assert master.dtype == np.float32 and p.dtype == hg.bfloat16
        # the parameter is exactly the bf16 rounding of the master
        np.testing.assert_array_equal(p.data, master.astype(ml_dtypes.bfloat16))
    expected = q.detach().numpy()
    np.testing.assert_allclose(opt.state[p]["master"], expected, rtol=1e-5, atol=1e-6)
    # within bf16 rounding of torch's float32 result (8 significant bits: rel. error <= 2^-8)
    np.testing.assert_allclose(p.data.astype(np.float32), expected, rtol=2**-8, atol=1e-6)
    # and the 20 steps of ~1e-3 moved the master by far more than the bf16 rounding would
    # allow if updates were applied to the bf16 values directly and rounded away
    assert np.abs(opt.state[p]["master"] - a16.astype(np.float32)).max() > 5e-3


def _run(opt, params, rng, steps):
    for _ in range(steps):
        for p in params:
            p.grad = hg.tensor(rng.standard_normal(p.shape).astype(np.float32))
        opt.step()


@pytest.mark.parametrize("dtype", [hg.float32, hg.bfloat16])
def test_adamw_state_dict_round_trip_is_bitwise(tmp_path, dtype):
    def fresh():
        rng = np.random.default_rng(7)
        ps = [Parameter(hg.tensor(rng.standard_normal(s), dtype=dtype)) for s in SHAPES]
        return [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]

    straight = fresh()
    params_a = [p for g in straight for p in g["params"]]
    _run(AdamW(straight, lr=1e-2), params_a, np.random.default_rng(8), 20)

    resumed = fresh()
    params_b = [p for g in resumed for p in g["params"]]
    rng = np.random.default_rng(8)
    first = AdamW(resumed, lr=1e-2)
    _run(first, params_b, rng, 10)
    # save as safetensors + JSON, the way the trainer does
    arrays, meta = flatten_state_dict(first.state_dict())
    save_file(arrays, str(tmp_path / "optim.safetensors"))
    (tmp_path / "optim.json").write_text(json.dumps(meta))
    saved_params = [p.data.copy() for p in params_b]

    # a new optimizer (and fresh Parameter objects holding the saved weights)
    params_c = [Parameter(hg.tensor(a, dtype=dtype)) for a in saved_params]
    second = AdamW(
        [{"params": params_c[:2], "weight_decay": 0.1}, {"params": params_c[2:]}], lr=0.5
    )
    loaded = unflatten_state_dict(
        load_file(str(tmp_path / "optim.safetensors")),
        json.loads((tmp_path / "optim.json").read_text()),
    )
    second.load_state_dict(loaded)
    assert second.param_groups[0]["lr"] == 1e-2  # options come from the state dict
    assert second.param_groups[1]["weight_decay"] == 0.0
    assert second.param_groups[0]["betas"] == (0.9, 0.999)
    _run(second, params_c, rng, 10)
    for a, c in zip(params_a, params_c):
        np.testing.assert_array_equal(a.data, c.data)
        assert a.data.dtype == c.data.dtype


def test_adamw_state_dict_is_a_snapshot():
    p = Parameter(hg.ones(3))
    opt = AdamW([p], lr=0.1)
    p.grad = hg.ones(3)
    opt.step()
    sd = opt.state_dict()
    before = sd["state"][0]["exp_avg"].copy()
    opt.step()
    np.testing.assert_array_equal(sd["state"][0]["exp_avg"], before)
    assert sd["state"][0]["step"] == 1
    json.dumps(flatten_state_dict(sd)[1])  # the non-array part is JSON-able
