"""Run the same computation in handgrad and in PyTorch and compare outputs and gradients.

``compare(hg_fn, torch_fn, *arrays, dtype=..., rng=...)``:
  * floating arrays become leaf tensors that require grad in both libraries (cast to
    ``dtype`` first, so both sides see exactly the same values); integer and boolean arrays
    are passed as plain tensors (indices, masks);
  * the torch side always computes in float64, so it is the reference for both dtypes;
  * a random upstream gradient (not ``.sum()``) is backpropagated through every output;
  * outputs and every input gradient must agree to a relative error of 1e-6 (float64) or
    1e-4 (float32), where relative error = max|ours - ref| / max|ref| (the scale of the
    reference, floored at 0.01 so that exact zeros such as a one-class softmax gradient
    are not compared by their rounding noise).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

import handgrad as hg

RTOL = {"float64": 1e-6, "float32": 1e-4}
DTYPES = ["float64", "float32"]


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"shape {ours.shape} != reference shape {ref.shape}"
    if ref.size == 0:
        return 0.0
    same_nonfinite = (~np.isfinite(ref)) & ((ours == ref) | (np.isnan(ours) & np.isnan(ref)))
    assert (
        np.array_equal(~np.isfinite(ours), ~np.isfinite(ref))
        and same_nonfinite.sum() == (~np.isfinite(ref)).sum()
    ), f"non-finite values differ:\nours {ours}\nref {ref}"
    fin = np.isfinite(ref)
    if not fin.any():
        return 0.0
    scale = max(np.abs(ref[fin]).max(), 1e-2)
    return float(np.abs(ours[fin] - ref[fin]).max() / scale)


def assert_close(ours: Any, ref: Any, rtol: float, what: str) -> None:
    err = rel_err(ours, ref)
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"


def _as_tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, tuple | list) else (x,)


def compare(
    hg_fn: Callable[..., Any],
    torch_fn: Callable[..., Any],
    *arrays: np.ndarray,
    dtype: str,
    rng: np.random.Generator,
    rtol: float | None = None,
    check_grad: bool = True,
) -> tuple[Any, ...]:
    """Compare ``hg_fn(*hg_tensors)`` with ``torch_fn(*torch_tensors)``; returns our outputs."""
    rtol = RTOL[dtype] if rtol is None else rtol
    hg_in, t_in = [], []
    for a in arrays:
        a = np.asarray(a)
        if a.dtype.kind == "f":
            a = a.astype(dtype)
            hg_in.append(hg.tensor(a, requires_grad=check_grad))
            t_in.append(torch.tensor(a.astype(np.float64), requires_grad=check_grad))
        else:
            hg_in.append(hg.tensor(a))
            t_in.append(torch.from_numpy(a.copy()))
    outs = _as_tuple(hg_fn(*hg_in))
    refs = _as_tuple(torch_fn(*t_in))
    assert len(outs) == len(refs), f"{len(outs)} outputs, torch gives {len(refs)}"
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert o.shape == tuple(r.shape), f"output {i}: shape {o.shape} != torch {tuple(r.shape)}"
        if r.dtype.is_floating_point:
            assert o.dtype == np.dtype(dtype), f"output {i}: dtype {o.dtype}, expected {dtype}"
        assert_close(o.data, r.detach().numpy(), rtol, f"output {i}")
    if not check_grad:
        return outs
    ups = [rng.standard_normal(r.shape) for r in refs]
    # one scalar that weights every output by its own random upstream gradient
    loss = None
    for o, u in zip(outs, ups):
        term = (o * hg.tensor(u.astype(dtype))).sum()
        loss = term if loss is None else loss + term
    loss.backward()
    t_loss = sum(
        (r * torch.from_numpy(u.astype(dtype).astype(np.float64))).sum() for r, u in zip(refs, ups)
    )
    t_loss.backward()
    for i, (h, t) in enumerate(zip(hg_in, t_in)):
        if not t.requires_grad:
            continue
        if t.grad is None:
            assert h.grad is None or not np.any(h.grad.data), f"input {i}: torch has no grad"
            continue
        assert h.grad is not None, f"input {i}: no gradient"
        assert h.grad.dtype == np.dtype(dtype), f"input {i}: grad dtype {h.grad.dtype}"
        assert_close(h.grad.data, t.grad.numpy(), rtol, f"grad of input {i} {tuple(t.shape)}")
    return outs


def numerical_grad(
    f: Callable[[np.ndarray], float], x: np.ndarray, eps: float = 1e-6
) -> np.ndarray:
    """Central differences: df/dx_i ~ (f(x + eps e_i) - f(x - eps e_i)) / (2 eps), in float64."""
    x = np.array(x, dtype=np.float64)
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        fp = f(x)
        x[i] = old - eps
        fm = f(x)
        x[i] = old
        grad[i] = (fp - fm) / (2 * eps)
    return grad


def gradcheck(
    build: Callable[..., hg.Tensor], arrays: Sequence[np.ndarray], rtol: float = 1e-6
) -> None:
    """Check handgrad's gradient of the scalar ``build(*tensors)`` against finite differences."""
    arrays = [np.asarray(a, dtype=np.float64) for a in arrays]
    leaves = [hg.tensor(a, requires_grad=True) for a in arrays]
    build(*leaves).backward()
    for k, leaf in enumerate(leaves):

        def f(xk: np.ndarray, k: int = k) -> float:
            args = [hg.tensor(xk if j == k else a) for j, a in enumerate(arrays)]
            with hg.no_grad():
                return build(*args).item()

        num = numerical_grad(f, arrays[k])
        assert_close(leaf.grad.data, num, rtol, f"grad of input {k}")
