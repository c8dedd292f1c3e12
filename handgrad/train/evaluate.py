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
from handgrad.grad_mode import no_grad
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
    model: Any, tokens: np.ndarray, batches: int, micro_batch_size: int, block_size: int
) -> EvalResult:
    """Mean loss of ``model`` over ``batches`` fixed batches of ``micro_batch_size`` windows of
    ``block_size`` (+1) tokens of ``tokens`` (a 1-D array of ids, e.g. the val split).

    The model runs in eval mode (no dropout) without a graph; its mode is restored after.
    Every batch has the same size, so the mean of the batch means is the mean over tokens.
    Batches go to the model's device (``model.device`` when it has one); the batch losses
    are summed there and read back once.
    """
    if batches < 1:
        raise ValueError(f"evaluate: batches must be >= 1, got {batches}")
    was_training = model.training
    model.eval()
    where = getattr(model, "device", None)
    total: Any = None
    try:
        with no_grad():
            for x, y in iter_batches_sequential(tokens, micro_batch_size, block_size, batches):
                _, loss = model(
                    Tensor._make(to_device(x, where)), Tensor._make(to_device(y, where))
                )
                # summed in float64 on the device: the same sum, in the same order, as the
                # float64 host sum of float(loss) it replaces
                value = loss.data.astype(B.float64)
                total = value if total is None else total + value
    finally:
        model.train(was_training)
    return EvalResult(float(B.to_numpy(total)) / batches, batches * micro_batch_size * block_size)


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
