"""Stochastic gradient descent with momentum, dampening, Nesterov and L2 weight decay."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from handgrad import backend as B
from handgrad.optim.optimizer import Optimizer


class SGD(Optimizer):
    """torch.optim.SGD. Per parameter, with g the gradient and b the momentum buffer:

        g <- g + weight_decay * p                      (L2 penalty, coupled to the gradient)
        b <- g                        on the first step
        b <- momentum * b + (1 - dampening) * g        afterwards
        g <- g + momentum * b  (nesterov)   or   g <- b
        p <- p - lr * g

    (with momentum = 0 the buffer is skipped: p <- p - lr * g).
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
        )
        super().__init__(params, defaults)

    def _check_options(self, options: dict[str, Any], group_index: int) -> None:
        super()._check_options(options, group_index)
        if not (isinstance(options["momentum"], int | float) and options["momentum"] >= 0):
            raise ValueError(f"SGD: invalid momentum {options['momentum']!r} (group {group_index})")
        if options["nesterov"] and (options["momentum"] <= 0 or options["dampening"] != 0):
            raise ValueError("SGD: Nesterov momentum requires a momentum > 0 and zero dampening")

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = self._closure_loss(closure)
        for group in self.param_groups:
            lr, momentum, dampening = group["lr"], group["momentum"], group["dampening"]
            weight_decay, nesterov = group["weight_decay"], group["nesterov"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state.setdefault(p, {})
                w = self._weights(p, state)
                g = self._grad(p, w.dtype)
                if weight_decay != 0:
                    g = g + weight_decay * w  # a new array: p.grad stays as backward left it
                if momentum != 0:
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = B.copy_as(g, g.dtype)
                    else:
                        buf *= momentum
                        buf += (1 - dampening) * g
                    g = g + momentum * buf if nesterov else buf
                w -= lr * g
                if w is not p.data:  # 16-bit parameter: write back the rounded master
                    p.data[...] = w
        return loss
