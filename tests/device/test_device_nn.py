"""Modules, optimizers and fused functional ops on a device, through the CuPy stand-in: the
same numbers as on the CPU, state where the parameters live, and no host synchronisation
inside forward, backward, clipping or an optimizer step."""

from __future__ import annotations

import fakecupy
import numpy as np
import pytest

import handgrad as hg
import handgrad.nn as nn
import handgrad.nn.functional as F
from handgrad.models.gpt2 import GPT2, GPT2Config, KVCache
from handgrad.nn import _threads
from handgrad.nn.utils import clip_grad_norm_
from handgrad.optim import SGD, AdamW


@pytest.fixture
def cp():
    with fakecupy.installed() as ns:
        yield ns


class _WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("scale", hg.ones(3))

    def forward(self, x):
        return self.lin(x) * self.scale


def test_module_to_moves_parameters_buffers_and_grads(cp) -> None:
    hg.manual_seed(0)
    m = _WithBuffer()
    weight = m.lin.weight
    host_w = weight.detach().numpy().copy()
    m(hg.randn(2, 4)).sum().backward()
    assert m.to("cuda") is m and m.lin.weight is weight  # in place: same Parameter objects
    for t in [*m.parameters(), *m.buffers()]:
        assert isinstance(t.data, cp.ndarray) and t.device == hg.device("cuda:0")
    assert isinstance(weight.grad.data, cp.ndarray)
    np.testing.assert_array_equal(weight.detach().numpy(), host_w)
    m.to("cuda", "bf16")
    assert weight.dtype == hg.bfloat16 and weight.is_cuda and weight.grad.dtype == hg.float32
    m.cpu().float()
    assert type(weight.data) is np.ndarray and type(m.scale.data) is np.ndarray
    assert type(weight.grad.data) is np.ndarray
    np.testing.assert_allclose(weight.detach().numpy(), host_w, rtol=1e-2)
    with pytest.raises(TypeError, match="only floating dtypes"):
        m.to("cuda", "int64")
    assert m.cuda().lin.bias.is_cuda


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adamw_state_lives_on_the_device_and_matches_the_cpu(cp, dtype) -> None:
    def run(device: str) -> tuple[nn.Module, AdamW, list[int]]:
        hg.manual_seed(1)
        # tanh GELU: the exact one needs cupyx.scipy.special.erf, which the stand-in lacks
        model = nn.Sequential(nn.Linear(8, 16), nn.GELU("tanh"), nn.Linear(16, 4))
        model.to(device, dtype)
        opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        x = hg.randn(5, 8, device=device)
        syncs = []
        for _ in range(3):
            fakecupy.stats.reset()
            loss = (model(x).float() ** 2).mean()
            opt.zero_grad()
            loss.backward()
            clip_grad_norm_(model.parameters(), 0.05)  # small: the grads are clipped
            opt.step()
            syncs.append(fakecupy.stats.syncs)
        return model, opt, syncs

    cpu_model, _, _ = run("cpu")
    model, opt, syncs = run("cuda")
    assert syncs == [0, 0, 0]
    for state in opt.state.values():
        arrays = [v for v in state.values() if hasattr(v, "shape")]
        assert arrays and all(isinstance(v, cp.ndarray) for v in arrays)
        if dtype == "bfloat16":
            assert state["master"].dtype == np.float32
    for p, q in zip(model.parameters(), cpu_model.parameters()):
        np.testing.assert_array_equal(p.detach().numpy(), q.detach().numpy())


def test_optimizer_state_dict_round_trip_onto_the_device(cp) -> None:
    hg.manual_seed(2)
    host = nn.Linear(3, 2)
    opt = AdamW(host.parameters(), lr=1e-2)
    host(hg.randn(4, 3)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    dev = nn.Linear(3, 2).to("cuda")
    dev.load_state_dict(host.state_dict())
    assert dev.weight.is_cuda
    opt2 = AdamW(dev.parameters(), lr=1e-2)
    opt2.load_state_dict(saved)
    for state in opt2.state.values():
        assert isinstance(state["exp_avg"], cp.ndarray)
    sgd = SGD(dev.parameters(), lr=0.1, momentum=0.9)
    dev(hg.randn(4, 3, device="cuda")).sum().backward()
    sgd.step()
    assert all(isinstance(s["momentum_buffer"], cp.ndarray) for s in sgd.state.values())


def test_clip_grad_norm_without_a_host_read(cp) -> None:
    for scale, clipped in ((100.0, True), (1e-3, False)):
        g = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32) * scale
        p = hg.zeros(4, 5, requires_grad=True, device="cuda")
        p.grad = hg.tensor(g, device="cuda")
        fakecupy.stats.reset()
        total = clip_grad_norm_([p], 1.0)
        assert fakecupy.stats.syncs == 0 and total.is_cuda
        norm = float(np.linalg.norm(g))
        assert total.item() == pytest.approx(norm, rel=1e-5)
        want = g * (1.0 / (norm + 1e-6)) if clipped else g
        np.testing.assert_allclose(p.grad.numpy(), want, rtol=1e-5)


def test_fused_ops_match_the_cpu_without_syncs(cp) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 5, 8)).astype(np.float32)
    w, b = rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32)
    ids = rng.integers(0, 7, (2, 5))
    tgt = rng.integers(0, 8, (10,))
    tgt[3] = -1  # ignored

    def run(device: str) -> tuple[list[np.ndarray], int]:
        xt = hg.tensor(x, requires_grad=True, device=device)
        wt = hg.tensor(w, requires_grad=True, device=device)
        bt = hg.tensor(b, requires_grad=True, device=device)
        emb = hg.tensor(rng_table, requires_grad=True, device=device)
        fakecupy.stats.reset()
        h = F.layer_norm(xt, (8,), wt, bt) + F.embedding(hg.tensor(ids, device=device), emb)
        h = F.gelu(h, approximate="tanh") + F.softmax(h, dim=-1)
        q = h.reshape(2, 5, 2, 4).transpose(1, 2)
        a = F.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2)
        logits = a.reshape(10, 8)
        loss = F.cross_entropy(logits, hg.tensor(tgt, device=device), ignore_index=-1)
        loss.backward()
        syncs = fakecupy.stats.syncs
        return [t.numpy() for t in (loss.detach(), xt.grad, wt.grad, bt.grad, emb.grad)], syncs

    rng_table = rng.standard_normal((7, 8)).astype(np.float32)
    want, _ = run("cpu")
    got, syncs = run("cuda")
    assert syncs == 0
    for g, h in zip(got, want):
        np.testing.assert_allclose(g, h, rtol=2e-5, atol=1e-6)


def test_the_cpu_thread_pool_is_never_entered_for_device_arrays(cp, monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the CPU thread pool was entered for device arrays")

    monkeypatch.setattr(_threads, "_parallel_map", refuse)
    monkeypatch.setattr(_threads, "PARALLEL_MIN_WORK", 1)  # every op would be parallel on NumPy
    x = hg.randn(64, 256, requires_grad=True, device="cuda")
    y = F.layer_norm(x, (256,)) + F.gelu(x, approximate="tanh") + F.softmax(x, -1)
    q = x.reshape(1, 4, 16, 256)
    y = y.sum() + F.scaled_dot_product_attention(q, q, q, is_causal=True).sum()
    y.backward()
    assert x.grad.is_cuda


def test_dropout_masks_are_the_same_on_every_device(cp) -> None:
    x = np.ones((4, 6), dtype=np.float32)
    hg.manual_seed(4)
    host = F.dropout(hg.tensor(x), p=0.5).numpy()
    hg.manual_seed(4)
    dev = F.dropout(hg.tensor(x, device="cuda"), p=0.5)
    assert dev.is_cuda
    np.testing.assert_array_equal(dev.numpy(), host)
    q = np.random.default_rng(5).standard_normal((1, 2, 4, 8)).astype(np.float32)
    hg.manual_seed(6)
    a = F.scaled_dot_product_attention(*(hg.tensor(q),) * 3, dropout_p=0.3).numpy()
    hg.manual_seed(6)
    qd = hg.tensor(q, device="cuda")
    b = F.scaled_dot_product_attention(qd, qd, qd, dropout_p=0.3)
    np.testing.assert_allclose(b.numpy(), a, rtol=1e-5, atol=1e-6)


def test_kv_cache_and_generation_stay_on_the_device(cp) -> None:
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=20, dropout=0.0)
    cache = KVCache(cfg, 2, hg.device("cuda"))
    assert all(isinstance(a, cp.ndarray) for a in cache.k + cache.v)
    hg.manual_seed(0)
    model = GPT2(cfg)
    want = model.generate(np.array([[1, 2]]), 12, temperature=0.9, top_k=5, seed=1)
    model.to("cuda")
    assert model.device == hg.device("cuda:0")
    fakecupy.stats.reset()
    got = model.generate(np.array([[1, 2]]), 12, temperature=0.9, top_k=5, seed=1)
    # 12 tokens, past block_size 8 the window is re-run: one logits copy per token
    assert fakecupy.stats.syncs <= 12
    assert type(got) is np.ndarray
    np.testing.assert_array_equal(got, want)
    as_tensor = model.generate(hg.tensor([[1, 2]], device="cuda"), 3, temperature=0.0)
    assert as_tensor.is_cuda and as_tensor.shape == (1, 5)
    logits = model(np.array([[1, 2, 3]]))  # arrays go to the model's device
    assert logits.is_cuda
    with pytest.raises(ValueError, match="token id 25 in idx is outside the vocabulary"):
        model.generate(np.array([[25]]), 2)
