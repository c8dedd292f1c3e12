"""``Tensor.register_post_accumulate_grad_hook``: when the engine calls it, against what
torch does and against ``.grad`` seen from inside the hook."""

from __future__ import annotations

import numpy as np
import pytest

import handgrad as hg
import handgrad.nn as nn
import handgrad.nn.functional as F


def _recorder(calls: list) -> callable:
    def hook(t: hg.Tensor) -> None:
        calls.append((id(t), t.grad.numpy().copy()))  # .grad as the hook sees it

    return hook


def test_fires_once_per_backward_after_the_grad_is_final():
    w = hg.tensor([1.0, 2.0, 3.0], requires_grad=True)
    calls: list = []
    w.register_post_accumulate_grad_hook(_recorder(calls))
    # w used three times: the hook must see the sum of all three uses, once
    loss = (w * w).sum() + (w * 3.0).sum() + w.sum()
    loss.backward()
    assert len(calls) == 1
    np.testing.assert_allclose(calls[0][1], 2 * np.array([1.0, 2.0, 3.0]) + 3 + 1)
    # a second backward accumulates, and the hook sees the running total
    (w * 2.0).sum().backward()
    assert len(calls) == 2
    np.testing.assert_allclose(calls[1][1], 2 * np.array([1.0, 2.0, 3.0]) + 4 + 2)


def test_tied_weight_used_twice_fires_once_with_both_gradients():
    # GPT-2's wte: the embedding table and the output projection are one Parameter
    hg.manual_seed(0)
    wte = nn.Parameter(hg.randn(7, 4))
    idx = hg.tensor(np.array([[0, 3, 6]]))
    calls: list = []
    wte.register_post_accumulate_grad_hook(_recorder(calls))
    h = F.embedding(idx, wte)
    logits = F.linear(h, wte)
    F.cross_entropy(logits.reshape(3, 7), hg.tensor(np.array([1, 2, 3]))).backward()
    assert len(calls) == 1
    np.testing.assert_array_equal(calls[0][1], wte.grad.numpy())

    torch = pytest.importorskip("torch")
    tw = torch.tensor(wte.detach().numpy(), requires_grad=True)
    seen: list = []
    tw.register_post_accumulate_grad_hook(lambda t: seen.append(t.grad.clone()))
    tl = torch.nn.functional.linear(
        torch.nn.functional.embedding(torch.tensor([[0, 3, 6]]), tw), tw
    )
    torch.nn.functional.cross_entropy(tl.reshape(3, 7), torch.tensor([1, 2, 3])).backward()
    assert len(seen) == 1  # torch also fires once for the tied weight
    np.testing.assert_allclose(calls[0][1], seen[0].numpy(), rtol=1e-5, atol=1e-7)


def test_not_fired_for_a_leaf_the_backward_does_not_reach():
    a = hg.tensor([1.0, 2.0], requires_grad=True)
    unused = hg.tensor([5.0], requires_grad=True)
    fired: list = []
    a.register_post_accumulate_grad_hook(lambda t: fired.append("a"))
    unused.register_post_accumulate_grad_hook(lambda t: fired.append("unused"))
    (a * 2.0).sum().backward()
    assert fired == ["a"]
    assert unused.grad is None


def test_hooks_run_in_backward_order_and_before_earlier_layers_are_computed():
    # two layers: the second layer's weight is final before the first layer's is computed
    hg.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    events: list = []
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda t, name=name: events.append((name, model[0].weight.grad is None))
        )
    model(hg.randn(5, 3)).sum().backward()
    names = [n for n, _ in events]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())  # each once
    # the last layer's hooks ran while the first layer's gradient did not exist yet
    assert all(first_missing for n, first_missing in events if n.startswith("1."))
    assert names.index("1.weight") < names.index("0.weight")


def test_a_leaf_root_fires_and_remove_unregisters():
    x = hg.tensor([2.0], requires_grad=True)
    fired: list = []
    handle = x.register_post_accumulate_grad_hook(lambda t: fired.append(t.grad.item()))
    x.backward()
    assert fired == [1.0]
    handle.remove()
    handle.remove()  # a second remove does nothing
    (x * 3.0).sum().backward()
    assert fired == [1.0]


def test_only_leaves_that_require_grad_take_a_hook():
    x = hg.tensor([1.0], requires_grad=True)
    with pytest.raises(RuntimeError, match="non-leaf tensor of shape"):
        (x * 2.0).register_post_accumulate_grad_hook(lambda t: None)
    with pytest.raises(RuntimeError, match="does not require grad"):
        hg.tensor([1.0]).register_post_accumulate_grad_hook(lambda t: None)
    with pytest.raises(TypeError, match="not callable"):
        x.register_post_accumulate_grad_hook(3)
