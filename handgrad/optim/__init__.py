"""Optimizers and learning-rate schedules, mirroring ``torch.optim``."""

from handgrad.optim.adamw import AdamW
from handgrad.optim.lr_scheduler import CosineWithWarmup, cosine_with_warmup
from handgrad.optim.optimizer import (
    Optimizer,
    flatten_state_dict,
    param_groups_for_weight_decay,
    unflatten_state_dict,
)
from handgrad.optim.sgd import SGD

__all__ = [
    "SGD",
    "AdamW",
    "CosineWithWarmup",
    "Optimizer",
    "cosine_with_warmup",
    "flatten_state_dict",
    "param_groups_for_weight_decay",
    "unflatten_state_dict",
]
