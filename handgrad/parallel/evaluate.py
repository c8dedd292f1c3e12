"""Validation loss of a language model, and the unigram baseline it should beat.

The loss is the mean next-token cross entropy in nats over a fixed set of validation windows
(``iter_batches_sequential``: evenly spaced, the same for every caller and every run), so two
evaluations of the same weights agree exactly. It is also reported as

    perplexity       exp(loss): the size of a uniform choice that would be as uncertain;
    bits per token   loss / ln 2.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from handgrad import backend as B
from handgrad.backend.device import to_device
from handgrad.data import iter_batches_sequential
from handgrad.distributed import Transport
from handgrad.grad_mode import no_grad
from handgrad.parallel.step import autocast_region
from handgrad.tensor import Tensor


@dataclass
class EvalResult:
    loss: float  # mean cross entropy, nats per token
    tokens: int  # tokens scored

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    @property
    def bits_per_token(self) -> float:
        return self.loss / math.log(2)

    def as_dict(self, prefix: str = "val_") -> dict[str, float]:
        return {
            f"{prefix}loss": self.loss,
            f"{prefix}ppl": self.perplexity,
            f"{prefix}bpt": self.bits_per_token,
        }


def evaluate(
    model: Any,
    tokens: np.ndarray,
    batches: int,
    micro_batch_size: int,
    block_size: int,
    group: Transport | None = None,
    mask: np.ndarray | None = None,
    precision: str | None = None,
) -> EvalResult:
    """Mean loss of ``model`` over ``batches`` fixed batches of ``micro_batch_size`` windows of
    ``block_size`` (+1) tokens of ``tokens`` (a 1-D array of ids, e.g. the val split).

    The model runs in eval mode (no dropout) without a graph; its mode is restored after.
    Every batch has the same size, so the mean of the batch means is the mean over tokens.
    With a loss ``mask`` (chat data) only the targets it marks are scored, each batch's loss
    being the mean over its marked targets. ``precision`` "bf16": the forward passes run
    under autocast, as in training. Batches go to the model's device (``model.device`` when it has one) and the batch losses
    are read back in one copy.

    With a process ``group`` the batches are dealt out over its ranks: batch b is scored by
    rank b mod P into slot b of a (batches,) float64 vector that the ranks sum (the others
    add 0, exactly). The mean is then added up in batch order, so every rank gets the bits
    one process gets.
    """
    if batches < 1:
        raise ValueError(f"evaluate: batches must be >= 1, got {batches}")
    rank, world = (0, 1) if group is None else (group.rank, group.world_size)
    where = getattr(model, "device", None)
    losses = np.zeros(batches)
    mine: dict[int, Any] = {}  # batch -> its 0-d loss, left on the model's device
    was_training = model.training
    model.eval()
    try:
        with no_grad():
            windows = iter_batches_sequential(tokens, micro_batch_size, block_size, batches, mask)
            for b, (x, y) in enumerate(windows):
                if b % world == rank:
                    x, y = to_device(x, where), to_device(y, where)
                    with autocast_region(model, precision):
                        _, loss = model(Tensor._make(x), Tensor._make(y))
                    mine[b] = loss.data
    finally:
        model.train(was_training)
    if mine:  # one read of the device for all of this rank's batches
        xp = B.get_array_module(*mine.values())
        losses[list(mine)] = B.to_numpy(xp.stack(list(mine.values())))
    if group is not None:
        group.all_reduce(losses)
    total = 0.0
    for value in losses:
        total += float(value)
    return EvalResult(total / batches, batches * micro_batch_size * block_size)


def unigram_loss(
    train_tokens: np.ndarray, val_tokens: np.ndarray, vocab_size: int, max_train: int = 100_000_000
) -> float:
    """Cross entropy (nats/token) of ``val_tokens`` under a unigram model of the training
    token frequencies (add-one smoothed, so a token train never saw costs log of a finite
    probability): -mean_i log p(v_i), p(t) = (count(t) + 1) / (N + V). A model that learnt
    nothing beyond token frequencies scores this; a language model must go well below it.
    Only the first ``max_train`` training tokens are counted (enough for frequencies)."""
    counts = np.bincount(np.asarray(train_tokens[:max_train]), minlength=vocab_size)
    counts = counts.astype(np.float64) + 1.0
    log_p = np.log(counts) - np.log(counts.sum())
    return float(-log_p[np.asarray(val_tokens)].mean())
