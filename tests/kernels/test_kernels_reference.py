"""The NumPy kernel references against PyTorch (float64) and against handgrad's own ops:
forward and gradients, float32, relative error <= 1e-4 (as tests/core)."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from _torchref import assert_close

import handgrad as hg
import handgrad.nn.functional as F
from handgrad.kernels import reference as ref
from handgrad.nn.utils import clip_grad_norm_
from handgrad.optim import AdamW

RTOL = 1e-4


def f32(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


def t64(a: np.ndarray, grad: bool = True) -> torch.Tensor:
    return torch.tensor(a.astype(np.float64), requires_grad=grad)


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm(rng: np.random.Generator, bias: bool) -> None:
    N, C = 13, 48
    x, w, b, dy = f32(rng, N, C) * 3 + 1, f32(rng, C), f32(rng, C), f32(rng, N, C)
    y, mean, rstd = ref.layer_norm_forward(x, w, b if bias else None, 1e-5)
    dx, dw, db = ref.layer_norm_backward(dy, x, w, mean, rstd)
    assert y.dtype == dx.dtype == np.float32
    tx, tw, tb = t64(x), t64(w), t64(b)
    ty = torch.nn.functional.layer_norm(tx, (C,), tw, tb if bias else None, 1e-5)
    (ty * torch.from_numpy(dy.astype(np.float64))).sum().backward()
    assert_close(y, ty.detach().numpy(), RTOL, "y")
    assert_close(dx, tx.grad.numpy(), RTOL, "dx")
    assert_close(dw, tw.grad.numpy(), RTOL, "dw")
    if bias:
        assert_close(db, tb.grad.numpy(), RTOL, "db")
    hx, hw, hb = (hg.tensor(a, requires_grad=True) for a in (x, w, b))
    hy = F.layer_norm(hx, C, hw, hb if bias else None, 1e-5)
    (hy * hg.tensor(dy)).sum().backward()
    assert_close(y, hy.data, RTOL, "y vs handgrad")
    assert_close(dx, hx.grad.data, RTOL, "dx vs handgrad")
    assert_close(dw, hw.grad.data, RTOL, "dw vs handgrad")


def test_gelu_tanh(rng: np.random.Generator) -> None:
    x, dy = f32(rng, 7, 33) * 3, f32(rng, 7, 33)
    y, dx = ref.gelu_tanh_forward(x), ref.gelu_tanh_backward(dy, x)
    tx = t64(x)
    ty = torch.nn.functional.gelu(tx, approximate="tanh")
    (ty * torch.from_numpy(dy.astype(np.float64))).sum().backward()
    assert_close(y, ty.detach().numpy(), RTOL, "y")
    assert_close(dx, tx.grad.numpy(), RTOL, "dx")
    hx = hg.tensor(x, requires_grad=True)
    hy = F.gelu(hx, approximate="tanh")
    (hy * hg.tensor(dy)).sum().backward()
    assert_close(y, hy.data, RTOL, "y vs handgrad")
    assert_close(dx, hx.grad.data, RTOL, "dx vs handgrad")


def test_causal_softmax(rng: np.random.Generator) -> None:
    s, dp, scale = f32(rng, 2, 3, 9, 9) * 4, f32(rng, 2, 3, 9, 9), 0.37
    p = ref.causal_softmax_forward(s, scale)
    ds = ref.causal_softmax_backward(dp, p, scale)
    assert np.all(p[..., np.triu_indices(9, 1)[0], np.triu_indices(9, 1)[1]] == 0)
    ts = t64(s)
    mask = torch.ones(9, 9, dtype=torch.bool).triu(1)
    tp = torch.softmax((ts * scale).masked_fill(mask, -math.inf), dim=-1)
    (tp * torch.from_numpy(dp.astype(np.float64))).sum().backward()
    assert_close(p, tp.detach().numpy(), RTOL, "p")
    assert_close(ds, ts.grad.numpy(), RTOL, "dscores")
    hs = hg.tensor(s, requires_grad=True)
    hp = F.softmax((hs * scale).masked_fill(hg.tensor(np.triu(np.ones((9, 9), bool), 1)), -1e30))
    (hp * hg.tensor(dp)).sum().backward()
    assert_close(p, hp.data, RTOL, "p vs handgrad")
    assert_close(ds, hs.grad.data, RTOL, "dscores vs handgrad")


def test_attention(rng: np.random.Generator) -> None:
    q, k, v, do = (f32(rng, 2, 3, 11, 8) for _ in range(4))
    out, p = ref.attention_forward(q, k, v)
    dq, dk, dv = ref.attention_backward(do, q, k, v, p)
    tq, tk, tv = t64(q), t64(k), t64(v)
    to = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    (to * torch.from_numpy(do.astype(np.float64))).sum().backward()
    assert_close(out, to.detach().numpy(), RTOL, "out")
    for name, ours, t in (("dq", dq, tq), ("dk", dk, tk), ("dv", dv, tv)):
        assert_close(ours, t.grad.numpy(), RTOL, name)
    hq, hk, hv = (hg.tensor(a, requires_grad=True) for a in (q, k, v))
    ho = F.scaled_dot_product_attention(hq, hk, hv, is_causal=True)
    (ho * hg.tensor(do)).sum().backward()
    assert_close(out, ho.data, RTOL, "out vs handgrad")
    for name, ours, h in (("dq", dq, hq), ("dk", dk, hk), ("dv", dv, hv)):
        assert_close(ours, h.grad.data, RTOL, name + " vs handgrad")


def test_cross_entropy_padded_vocabulary(rng: np.random.Generator) -> None:
    N, V, Vp = 10, 37, 48
    logits = f32(rng, N, Vp) * 3
    logits[:, V:] = 1e4  # padding columns: must not count anywhere
    targets = rng.integers(0, V, N)
    targets[[2, 7]] = -1
    loss, lse = ref.cross_entropy_forward(logits, targets, V, ignore_index=-1)
    count = int((targets != -1).sum())
    dloss = np.full(N, 1.0 / count, dtype=np.float32)
    d = ref.cross_entropy_backward(logits, lse, targets, dloss, V, ignore_index=-1)
    assert d.shape == (N, Vp) and np.all(d[:, V:] == 0) and np.all(d[[2, 7]] == 0)
    assert loss[2] == 0 and loss[7] == 0
    tx = t64(logits)
    tl = torch.nn.functional.cross_entropy(
        tx[:, :V], torch.from_numpy(targets), ignore_index=-1, reduction="none"
    )
    tl.mean().mul(N / count).backward()
    assert_close(loss, tl.detach().numpy(), RTOL, "loss")
    assert_close(d, tx.grad.numpy(), RTOL, "dlogits")
    hx = hg.tensor(logits[:, :V].copy(), requires_grad=True)
    hl = F.cross_entropy(hx, hg.tensor(targets), ignore_index=-1)
    hl.backward()
    assert_close(np.float32(loss.sum() / count), hl.data, RTOL, "mean loss vs handgrad")
    assert_close(d[:, :V], hx.grad.data, RTOL, "dlogits vs handgrad")
    with pytest.raises(IndexError, match="target 40 out of range"):
        ref.cross_entropy_forward(logits, np.full(N, 40), V)


def test_embedding_backward(rng: np.random.Generator) -> None:
    V, C, N = 9, 6, 40
    idx = rng.integers(0, V, N)  # repeats: the scatter must add, not overwrite
    dout = f32(rng, N, C)
    dw = ref.embedding_backward(idx, dout, V)
    tw = t64(f32(rng, V, C))
    torch.nn.functional.embedding(torch.from_numpy(idx), tw).mul(
        torch.from_numpy(dout.astype(np.float64))
    ).sum().backward()
    assert_close(dw, tw.grad.numpy(), RTOL, "dweight")
    hw = hg.tensor(f32(rng, V, C), requires_grad=True)
    (F.embedding(hg.tensor(idx), hw) * hg.tensor(dout)).sum().backward()
    assert_close(dw, hw.grad.data, RTOL, "dweight vs handgrad")


def _adamw_problem(rng: np.random.Generator):
    decayed = [f32(rng, 6, 4), f32(rng, 3, 5)]  # matrices first in the flat buffer
    plain = [f32(rng, 7), f32(rng, 4)]
    grads = [[f32(rng, *p.shape) * s for p in decayed + plain] for s in (1.0, 5.0, 0.1)]
    return decayed, plain, grads


@pytest.mark.parametrize("max_norm", [1.0, 0.0])
def test_adamw_flat_against_torch_and_handgrad(rng: np.random.Generator, max_norm: float) -> None:
    decayed, plain, grads = _adamw_problem(rng)
    opts = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8)
    params = decayed + plain
    n_decay = sum(p.size for p in decayed)
    w = np.concatenate([p.reshape(-1) for p in params])
    m, v = np.zeros_like(w), np.zeros_like(w)

    tp = [t64(p) for p in params]
    topt = torch.optim.AdamW(
        [{"params": tp[:2], "weight_decay": 0.1}, {"params": tp[2:], "weight_decay": 0.0}], **opts
    )
    hp = [hg.nn.Parameter(hg.tensor(p.copy())) for p in params]
    hopt = AdamW(
        [{"params": hp[:2], "weight_decay": 0.1}, {"params": hp[2:], "weight_decay": 0.0}], **opts
    )
    for step, gs in enumerate(grads, start=1):
        g = np.concatenate([a.reshape(-1) for a in gs])
        ref.adamw_flat(
            w, g, m, v, lr=opts["lr"], beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1,
            step=step, n_decay=n_decay, norm_sq=ref.sum_squares(g), max_norm=max_norm,
        )  # fmt: skip
        for t, h, a in zip(tp, hp, gs):
            t.grad = torch.from_numpy(a.astype(np.float64))
            h.grad = hg.tensor(a.copy())
        if max_norm > 0:
            torch.nn.utils.clip_grad_norm_(tp, max_norm)
            clip_grad_norm_(hp, max_norm)
        topt.step()
        hopt.step()
    ours = np.split(w, np.cumsum([p.size for p in params])[:-1])
    for i, (o, t, h) in enumerate(zip(ours, tp, hp)):
        assert_close(o, t.detach().numpy().reshape(-1), RTOL, f"param {i} vs torch")
        assert_close(o, h.data.reshape(-1), RTOL, f"param {i} vs handgrad")


def test_adamw_flat_writes_bfloat16_rounded_to_nearest_even(rng: np.random.Generator) -> None:
    w = f32(rng, 64)
    g = f32(rng, 64)
    out2 = np.zeros(64, dtype=ml_dtypes.bfloat16)
    w2 = w.copy()
    ref.adamw_flat(
        w2, g, np.zeros(64, np.float32), np.zeros(64, np.float32), lr=1e-3, beta1=0.9,
        beta2=0.999, eps=1e-8, weight_decay=0.0, step=1, n_decay=0, norm_sq=1.0, max_norm=0.0,
        out_bf16=out2,
    )  # fmt: skip
    np.testing.assert_array_equal(out2.astype(np.float32), w2.astype(ml_dtypes.bfloat16))
    assert np.abs(out2.astype(np.float32) - w2).max() <= np.abs(w2).max() * 2**-8


def test_sum_squares_and_clip_coefficient() -> None:
    g = np.array([3.0, 4.0], dtype=np.float32)
    assert ref.sum_squares(g) == 25.0
    assert ref.clip_coefficient(25.0, 1.0) == pytest.approx(1 / (5 + 1e-6))
    assert ref.clip_coefficient(25.0, 10.0) == 1.0 and ref.clip_coefficient(25.0, 0.0) == 1.0


# ---- the fused kernels of a bfloat16-autocast step: float32 PyTorch is the reference


BF16 = np.dtype(ml_dtypes.bfloat16)


def t32(a: np.ndarray, grad: bool = True) -> torch.Tensor:
    return torch.tensor(a.astype(np.float32), requires_grad=grad)


@pytest.mark.parametrize("rt, yt, dyt", [(np.float32,) * 3, (BF16,) * 3, (BF16, np.float32, BF16)])
@pytest.mark.parametrize("with_dh", [True, False])
def test_residual_layer_norm(rng: np.random.Generator, rt, yt, dyt, with_dh: bool) -> None:
    N, C = 7, 48
    x, r = f32(rng, N, C) * 3 + 1, f32(rng, N, C).astype(rt)
    w, b, dy = f32(rng, C), f32(rng, C), f32(rng, N, C).astype(dyt)
    dh = f32(rng, N, C) if with_dh else None
    h, y, mean, rstd = ref.residual_layer_norm_forward(x, r, w, b, 1e-5, yt)
    dx, dw, db = ref.residual_layer_norm_backward(dy, dh, h, w, mean, rstd)
    assert h.dtype == dx.dtype == dw.dtype == db.dtype == np.float32 and y.dtype == yt
    tx, tr, tw, tb = t32(x), t32(r), t32(w), t32(b)
    th = tx + tr
    ty = torch.nn.functional.layer_norm(th, (C,), tw, tb, 1e-5)
    loss = (ty * t32(dy, False)).sum()
    if with_dh:
        loss = loss + (th * t32(dh, False)).sum()
    loss.backward()
    assert_close(h, th.detach().numpy(), RTOL, "h")
    # a bfloat16 y is torch's float32 y rounded once: within half a bfloat16 ulp, 2^-9
    assert_close(y.astype(np.float32), ty.detach().numpy(), RTOL if yt == np.float32 else 4e-3, "y")
    assert_close(mean, th.detach().mean(1).numpy(), RTOL, "mean")
    assert_close(dx, tx.grad.numpy(), RTOL, "dx")
    assert_close(dx, tr.grad.numpy(), RTOL, "dr = dx")
    assert_close(dw, tw.grad.numpy(), RTOL, "dw")
    assert_close(db, tb.grad.numpy(), RTOL, "db")


@pytest.mark.parametrize("xt, bt, dyt", [(np.float32,) * 3, (BF16,) * 3, (BF16, np.float32, BF16)])
def test_bias_gelu(rng: np.random.Generator, xt, bt, dyt) -> None:
    x, b, dy = (
        (f32(rng, 9, 33) * 3).astype(xt),
        f32(rng, 33).astype(bt),
        f32(rng, 9, 33).astype(dyt),
    )
    y = ref.bias_gelu_forward(x, b)
    dx, db = ref.bias_gelu_backward(dy, x, b)
    assert y.dtype == xt and dx.dtype == db.dtype == np.float32 and db.shape == (33,)
    tx, tb = t32(x), t32(b)
    ty = torch.nn.functional.gelu(tx + tb, approximate="tanh")
    (ty * t32(dy, False)).sum().backward()
    assert_close(y.astype(np.float32), ty.detach().numpy(), RTOL if xt == np.float32 else 4e-3, "y")
    assert_close(dx, tx.grad.numpy(), RTOL, "dx")
    assert_close(db, tb.grad.numpy(), RTOL, "db")


def test_causal_softmax_bfloat16(rng: np.random.Generator) -> None:
    s, dp, scale = (f32(rng, 2, 9, 9) * 4).astype(BF16), f32(rng, 2, 9, 9).astype(BF16), 0.37
    p = ref.causal_softmax_forward(s, scale)
    ds = ref.causal_softmax_backward(dp, p, scale)
    assert p.dtype == ds.dtype == BF16
    ts = t32(s)
    mask = torch.ones(9, 9, dtype=torch.bool).triu(1)
    tp = torch.softmax((ts * scale).masked_fill(mask, -math.inf), dim=-1)
    assert_close(p.astype(np.float32), tp.detach().numpy(), 4e-3, "p")
    # the backward of bfloat16 p (as the kernel is given it), in float32
    tp2 = t32(p, False)
    tdp = t32(dp, False)
    want = scale * tp2 * (tdp - (tp2 * tdp).sum(-1, keepdim=True))
    assert_close(ds.astype(np.float32), want.numpy(), 4e-3, "ds")


@pytest.mark.parametrize("dt", [np.float32, BF16])
def test_causal_softmax_lse_and_recompute(rng: np.random.Generator, dt) -> None:
    """lse against torch.logsumexp of the masked scaled scores, p against torch.softmax (a
    bfloat16 p within half a bfloat16 ulp of it), and p recomputed from lse."""
    T, scale = 9, 0.37
    s = (f32(rng, 2, 3, T, T) * 4).astype(dt)
    s[0, 0, 4, :2] = -np.inf  # masked by a caller: weight 0
    p, lse = ref.causal_softmax_lse_forward(s, scale)
    assert p.dtype == dt and lse.dtype == np.float32 and lse.shape == (2, 3, T)
    np.testing.assert_array_equal(p, ref.causal_softmax_forward(s, scale))
    mask = torch.ones(T, T, dtype=torch.bool).triu(1)
    tz = (t64(s, False) * scale).masked_fill(mask, -math.inf)
    assert_close(lse, torch.logsumexp(tz, dim=-1).numpy(), RTOL, "lse")
    tp = torch.softmax(tz, dim=-1).numpy()
    rt = RTOL if dt == np.float32 else 4e-3
    assert_close(p.astype(np.float32), tp, rt, "p")
    q = ref.causal_softmax_recompute(s, lse, scale)
    assert q.dtype == dt
    assert_close(q.astype(np.float32), tp, rt, "recomputed p")
    assert np.all(
        q[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]].astype(np.float32) == 0
    )
    want = torch.exp(t64(s, False) * scale - t64(lse, False)[..., None]).masked_fill(mask, 0)
    assert_close(q.astype(np.float32), want.numpy(), rt, "exp(scale s - lse)")


@pytest.mark.parametrize("dt", [np.float32, BF16])
def test_fused_classifier(rng: np.random.Generator, dt) -> None:
    N, V, Vp = 10, 37, 48
    logits = (f32(rng, N, Vp) * 3).astype(dt)
    logits[:, V:] = 1e4  # padding columns: must not count anywhere
    targets = rng.integers(0, V, N)
    targets[[2, 7]] = -1
    count = int((targets != -1).sum())
    scale = np.array([1.0 / count], np.float32)
    losses, d = ref.fused_classifier(logits, targets, V, -1, scale)
    assert losses.dtype == np.float32 and d.dtype == dt and d.shape == (N, Vp)
    assert np.all(d[:, V:].astype(np.float32) == 0) and np.all(d[[2, 7]].astype(np.float32) == 0)
    tx = t32(logits)
    tl = torch.nn.functional.cross_entropy(
        tx[:, :V], torch.from_numpy(targets), ignore_index=-1, reduction="none"
    )
    tl.sum().mul(float(scale[0])).backward()
    assert_close(losses, tl.detach().numpy(), RTOL, "losses")
    assert_close(
        np.float32(losses.sum() / count), float(tl.detach().sum() / count), RTOL, "mean loss"
    )
    assert_close(
        d.astype(np.float32), tx.grad.numpy(), RTOL if dt == np.float32 else 4e-3, "dlogits"
    )
    # out-of-range targets: NaN loss and NaN dlogits in that row only; scale None is 1
    bad = targets.copy()
    bad[0], bad[1] = V, -5
    l2, d2 = ref.fused_classifier(logits, bad, V)
    assert np.isnan(l2[:2]).all() and np.isfinite(l2[2:]).all()
    assert (
        np.isnan(d2[:2, :V].astype(np.float32)).all() and (d2[:2, V:].astype(np.float32) == 0).all()
    )
    one, _ = ref.fused_classifier(logits, targets, V, -1, None)
    np.testing.assert_array_equal(one, losses)


def test_embedding_backward_skips_ids_out_of_range(rng: np.random.Generator) -> None:
    idx, dout = np.array([1, 5, -1, 1, 9]), f32(rng, 5, 3)
    dw = ref.embedding_backward(idx, dout, 5)
    ok = (idx >= 0) & (idx < 5)
    tw = t32(np.zeros((5, 3), np.float32))
    torch.nn.functional.embedding(torch.from_numpy(idx[ok]), tw).mul(
        torch.from_numpy(dout[ok])
    ).sum().backward()
    assert_close(dw, tw.grad.numpy(), RTOL, "dweight")
