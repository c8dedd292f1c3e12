"""Learning-rate schedule: linear warmup, then cosine decay to a floor (GPT-2 / nanoGPT)."""

from __future__ import annotations

import math
from typing import Any

from handgrad.optim.optimizer import Optimizer


def cosine_with_warmup(
    step: int, *, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int
) -> float:
    """The learning rate for optimizer step ``step`` (0-based):

        step < warmup_steps:                 lr = max_lr * (step + 1) / warmup_steps
        warmup_steps <= step < decay_steps:  r = (step - warmup_steps) / (decay_steps - warmup_steps)
                                             lr = min_lr + (max_lr - min_lr) * (1 + cos(pi r)) / 2
        step >= decay_steps:                 lr = min_lr

    The warmup counts step 0 as the first (so it never uses lr = 0) and reaches max_lr at step
    warmup_steps - 1; the cosine starts at max_lr (r = 0) and reaches min_lr at step
    decay_steps (r = 1), after which the rate stays flat. The model card's schedule:
    max_lr=6e-4, min_lr=1e-4, warmup_steps=1_000, decay_steps=600_000.
    """
    if step < 0:
        raise ValueError(f"cosine_with_warmup: step must be >= 0, got {step}")
    if warmup_steps < 0 or decay_steps < warmup_steps:
        raise ValueError(
            "cosine_with_warmup: need 0 <= warmup_steps <= decay_steps, got "
            f"warmup_steps={warmup_steps}, decay_steps={decay_steps}"
        )
    if min_lr < 0 or max_lr < min_lr:
        raise ValueError(f"cosine_with_warmup: need 0 <= min_lr <= max_lr, got {min_lr}, {max_lr}")
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    ratio = (step - warmup_steps) / (decay_steps - warmup_steps)
    return min_lr + (max_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * ratio))


class CosineWithWarmup:
    """Sets every group's ``lr`` to ``cosine_with_warmup(last_step, ...)``, like torch's
    ``LambdaLR``: constructing it applies step 0's rate; call ``step()`` after each
    ``optimizer.step()`` to move to the next one."""

    def __init__(
        self,
        optimizer: Optimizer,
        *,
        max_lr: float,
        min_lr: float,
        warmup_steps: int,
        decay_steps: int,
        last_step: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(
                f"CosineWithWarmup: expected an Optimizer, got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self.max_lr, self.min_lr = float(max_lr), float(min_lr)
        self.warmup_steps, self.decay_steps = int(warmup_steps), int(decay_steps)
        self.last_step = last_step
        self.step()

    def lr_at(self, step: int) -> float:
        return cosine_with_warmup(
            step,
            max_lr=self.max_lr,
            min_lr=self.min_lr,
            warmup_steps=self.warmup_steps,
            decay_steps=self.decay_steps,
        )

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def _apply(self) -> None:
        lr = self.lr_at(self.last_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def get_last_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "last_step": self.last_step,
            "max_lr": self.max_lr,
            "min_lr": self.min_lr,
            "warmup_steps": self.warmup_steps,
            "decay_steps": self.decay_steps,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        expected = set(self.state_dict())
        if set(state_dict) != expected:
            raise ValueError(
                f"CosineWithWarmup.load_state_dict: expected keys {sorted(expected)}, "
                f"got {sorted(state_dict)}"
            )
        self.max_lr, self.min_lr = float(state_dict["max_lr"]), float(state_dict["min_lr"])
        self.warmup_steps = int(state_dict["warmup_steps"])
        self.decay_steps = int(state_dict["decay_steps"])
        self.last_step = int(state_dict["last_step"])
        self._apply()
