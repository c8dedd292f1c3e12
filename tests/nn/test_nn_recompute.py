"""Activation recompute (``hg.nn.utils.checkpoint``, GPT2Config.recompute): the same gradients
as without it, bit for bit, dropout replayed; and torch.utils.checkpoint's gradients on a
deterministic block."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import handgrad as hg
from handgrad import nn
from handgrad.models.gpt2 import GPT2, GPT2Config
from handgrad.nn import functional as F
from handgrad.nn.utils import checkpoint
from handgrad.random import get_rng_state


def _step(recompute: bool, dtype: str = "float32", micro_batches: int = 2):
    """Two micro batches of a tiny GPT-2 with dropout: losses, gradients, RNG state after."""
    hg.manual_seed(0)
    cfg = GPT2Config(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=50,
                     dropout=0.2, dtype=dtype, recompute=recompute)  # fmt: skip
    model = GPT2(cfg)
    model.train()
    built = get_rng_state()
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(micro_batches):
        x, y = rng.integers(0, 50, (3, 16)), rng.integers(0, 50, (3, 16))
        _, loss = model(x, y)
        (loss * 0.5).backward()
        losses.append(loss.item())
    grads = {n: p.grad.numpy().copy() for n, p in model.named_parameters()}
    return losses, grads, get_rng_state(), built


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpt2_gradients_are_bit_identical_and_dropout_replayed(dtype):
    plain, again = _step(False, dtype), _step(True, dtype)
    assert plain[0] == again[0]  # losses
    assert plain[2] == again[2]  # the generator ends where it would have: masks were replayed
    for name, g in plain[1].items():
        np.testing.assert_array_equal(again[1][name], g, err_msg=name)
    assert plain[2] != plain[3]  # and dropout did draw masks in the steps


def test_recompute_keeps_only_block_inputs():
    # the graph recorded by a recomputed block holds one node: nothing of its insides
    hg.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
    x = hg.randn(4, 8, requires_grad=True)
    y = checkpoint(block, x)
    assert type(y._ctx).__name__ == "_Recompute" and y._ctx.parents == (x,)
    with hg.no_grad():  # outside autograd it is a plain call
        assert checkpoint(block, x)._ctx is None


def test_parameters_get_gradients_when_the_input_wants_none():
    hg.manual_seed(0)
    lin = nn.Linear(4, 3)
    x = hg.randn(2, 4)  # requires no grad (a frozen embedding's output, say)
    checkpoint(lin, x).sum().backward()
    np.testing.assert_allclose(lin.weight.grad.numpy(), np.tile(x.numpy().sum(0), (3, 1)), 1e-6)


def test_matches_torch_utils_checkpoint():
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((16, 8)), rng.standard_normal((8, 16))
    x0 = rng.standard_normal((5, 8))

    def ours_fn(x):
        return F.linear(F.gelu(F.linear(x, a)), b)

    a, b = (nn.Parameter(hg.tensor(w, dtype="float64")) for w in (w1, w2))
    x = hg.tensor(x0, dtype="float64", requires_grad=True)
    (checkpoint(ours_fn, x) ** 2).sum().backward()

    ta, tb = (torch.tensor(w, requires_grad=True) for w in (w1, w2))
    tx = torch.tensor(x0, requires_grad=True)

    def torch_fn(t):
        return torch.nn.functional.linear(torch.nn.functional.gelu(t @ ta.T), tb)

    (torch.utils.checkpoint.checkpoint(torch_fn, tx, use_reentrant=False) ** 2).sum().backward()
    for ours, theirs in ((a, ta), (b, tb), (x, tx)):
        np.testing.assert_allclose(ours.grad.numpy(), theirs.grad.numpy(), rtol=1e-12)
