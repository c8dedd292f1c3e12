"""Ops with several outputs (a tuple from ``forward``): each output's gradient reaches the
op's backward in its slot, None where nothing used it; ``F.residual_layer_norm`` against
PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import handgrad as hg
import handgrad.nn.functional as F
from handgrad.function import Function


class _Two(Function):
    # (a, b) = (2 x, x^3)  =>  dx = 2 ga + 3 x^2 gb
    def forward(self, x):
        self.x = x
        return 2 * x, x**3

    def backward(self, g):
        ga, gb = g
        self.seen = (ga is not None, gb is not None)
        dx = np.zeros_like(self.x)
        if ga is not None:
            dx += 2 * ga
        if gb is not None:
            dx += 3 * self.x**2 * gb
        return (dx,)


@pytest.mark.parametrize("use", ["both", "first", "second"])
def test_each_outputs_gradient_reaches_its_slot(use):
    x = hg.tensor(np.array([1.0, -2.0, 0.5], dtype=np.float32), requires_grad=True)
    a, b = _Two.apply(x)
    loss = {"both": (a * 3).sum() + b.sum() + b.sum(), "first": a.sum(), "second": b.sum()}[use]
    loss.backward()
    xv = x.detach().numpy()
    want = {"both": 6 + 6 * xv**2, "first": np.full(3, 2.0), "second": 3 * xv**2}[use]
    np.testing.assert_allclose(x.grad.numpy(), want, rtol=1e-6)


def test_no_graph_without_grad():
    x = hg.randn(3)
    a, b = _Two.apply(x)
    assert not a.requires_grad and not b.requires_grad


@pytest.mark.parametrize("affine", ["both", "weight", "none"])
def test_residual_layer_norm_matches_torch(affine):
    rng = np.random.default_rng(0)
    x, r = (rng.standard_normal((2, 5, 16)).astype(np.float32) for _ in range(2))
    w, b = rng.standard_normal(16).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    gh, gy = (rng.standard_normal((2, 5, 16)).astype(np.float32) for _ in range(2))
    w_, b_ = (w if affine != "none" else None), (b if affine == "both" else None)

    ts = {k: torch.tensor(v, requires_grad=True) for k, v in dict(x=x, r=r, w=w, b=b).items()}
    th = ts["x"] + ts["r"]
    ty = torch.nn.functional.layer_norm(
        th, (16,), ts["w"] if w_ is not None else None, ts["b"] if b_ is not None else None
    )
    (th * torch.tensor(gh)).sum().add((ty * torch.tensor(gy)).sum()).backward()

    hs = {k: hg.tensor(v, requires_grad=True) for k, v in dict(x=x, r=r, w=w, b=b).items()}
    h, y = F.residual_layer_norm(
        hs["x"], hs["r"], hs["w"] if w_ is not None else None, hs["b"] if b_ is not None else None
    )
    ((h * hg.tensor(gh)).sum() + (y * hg.tensor(gy)).sum()).backward()
    np.testing.assert_allclose(h.detach().numpy(), th.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(y.detach().numpy(), ty.detach().numpy(), rtol=1e-5, atol=1e-6)
    for k in ("x", "r") + (("w",) if w_ is not None else ()) + (("b",) if b_ is not None else ()):
        np.testing.assert_allclose(
            hs[k].grad.numpy(), ts[k].grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=k
        )


def test_residual_layer_norm_errors_name_the_shape():
    x = hg.randn(2, 4)
    with pytest.raises(ValueError, match=r"residual of shape \(2, 3\)"):
        F.residual_layer_norm(x, hg.randn(2, 3))
    with pytest.raises(ValueError, match=r"weight has shape \(3,\), expected \(4,\)"):
        F.residual_layer_norm(x, hg.randn(2, 4), hg.randn(3))
