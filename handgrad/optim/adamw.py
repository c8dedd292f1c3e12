"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, 2019), as torch.optim.AdamW."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

from handgrad import backend as B
from handgrad.backend import get_array_module
from handgrad.backend.device import device_of
from handgrad.kernels.dispatch import cuda_kernels, f32
from handgrad.optim.optimizer import Optimizer, _is_probability

# Updates run over slices of this many elements so that the ~10 elementwise passes of one
# step stay in cache: memory traffic is then one read of p, g, m, v and one write of p, m, v.
_CHUNK = 1 << 15


class AdamW(Optimizer):
    """torch.optim.AdamW. Per parameter, at step t = 1, 2, ... with gradient g:

        p <- p * (1 - lr * weight_decay)              (decoupled decay, before the update)
        m <- beta1 * m + (1 - beta1) * g              (first moment)
        v <- beta2 * v + (1 - beta2) * g^2            (second moment)
        p <- p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

    m and v start at 0; ``1 - beta^t`` corrects their bias towards 0. For 16-bit parameters
    p above is the float32 master copy in ``state['master']``; the parameter receives its
    rounding after each step. Give per-group ``weight_decay`` (see
    ``handgrad.optim.param_groups_for_weight_decay``) to decay only matrices, as GPT-2.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self._scratch: dict[tuple[Any, Any], Any] = {}  # (namespace, dtype) -> flat buffer

    def _check_options(self, options: dict[str, Any], group_index: int) -> None:
        super()._check_options(options, group_index)
        betas = options["betas"]
        if not (isinstance(betas, tuple | list) and len(betas) == 2):
            raise ValueError(f"AdamW: betas must be a pair, got {betas!r} (group {group_index})")
        for i, b in enumerate(betas):
            if not _is_probability(b):
                raise ValueError(
                    f"AdamW: invalid beta parameter at index {i}: {b!r} (must be in [0, 1))"
                )
        options["betas"] = tuple(betas)
        eps = options["eps"]
        if not (isinstance(eps, int | float) and eps >= 0):
            raise ValueError(f"AdamW: invalid eps {eps!r} (group {group_index})")

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.setdefault(p, {})
                w = self._weights(p, state)
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = B.zeros_like(w)
                    state["exp_avg_sq"] = B.zeros_like(w)
                state["step"] += 1
                low_precision = w is not p.data
                out = p.data.reshape(-1) if low_precision else None
                kernels = cuda_kernels(w)
                hyper = dict(
                    lr=group["lr"],
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    step=state["step"],
                )
                if kernels is not None and (out is None or out.dtype == B.bfloat16):
                    # one fused kernel per parameter; no clipping here:
                    # clip_grad_norm_ has already scaled the gradient
                    kernels.adamw_flat(
                        w.reshape(-1),
                        f32(p.grad.data).reshape(-1),
                        state["exp_avg"].reshape(-1),
                        state["exp_avg_sq"].reshape(-1),
                        **hyper,
                        n_decay=w.size,
                        norm_sq=self._no_norm(w),
                        max_norm=0.0,
                        out_bf16=out,
                    )
                    continue
                _adamw_update(
                    w.reshape(-1),
                    self._grad(p, w.dtype).reshape(-1),
                    state["exp_avg"].reshape(-1),
                    state["exp_avg_sq"].reshape(-1),
                    self._scratch_for(w),
                    out,
                    **hyper,
                )
        return loss

    def _no_norm(self, w: Any) -> Any:
        """The 1-element float64 device array the AdamW kernel reads as the squared global
        norm; with max_norm = 0 it only needs to exist (one per device)."""
        key = ("norm", device_of(w))
        if key not in self._scratch:
            self._scratch[key] = get_array_module(w).zeros(1, dtype=B.float64)
        return self._scratch[key]

    def _scratch_for(self, w: Any) -> Any:
        """A flat scratch buffer of _CHUNK elements in w's namespace and dtype."""
        xp = get_array_module(w)
        key = (xp, w.dtype, device_of(w))  # one buffer per GPU: kernels read one device
        if key not in self._scratch:
            self._scratch[key] = xp.empty(_CHUNK, dtype=w.dtype)
        return self._scratch[key]


def _adamw_update(
    w: Any,
    g: Any,
    m: Any,
    v: Any,
    tmp: Any,
    out: Any | None,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step: int,
) -> None:
    """One AdamW step on flat arrays, in place (w, m, v; ``out`` gets w cast to its dtype).
    The operations and their order are torch's, so float64 results agree to the last bits."""
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    decay = 1 - lr * weight_decay
    xp = get_array_module(w)
    for start in range(0, w.size, _CHUNK):
        s = slice(start, start + _CHUNK)
        ws, gs, ms, vs = w[s], g[s], m[s], v[s]
        t = tmp[: ws.size]
        if decay != 1:
            ws *= decay
        # m <- m + (1 - beta1) (g - m)   (torch's lerp)
        xp.subtract(gs, ms, out=t)
        t *= 1 - beta1
        ms += t
        # v <- beta2 v + (1 - beta2) g g
        vs *= beta2
        xp.multiply(gs, 1 - beta2, out=t)
        t *= gs
        vs += t
        # w <- w - step_size * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
        xp.sqrt(vs, out=t)
        t /= bias_correction2_sqrt
        t += eps
        xp.divide(ms, t, out=t)
        t *= step_size
        ws -= t
        if out is not None:
            out[s] = ws
