"""The Llama-style model on the CuPy stand-in: training steps and generation with every array
on the (fake) device give the CPU's numbers, without implicit conversions to NumPy and with
no host synchronisation in a step but the loss."""

from __future__ import annotations

import fakecupy
import numpy as np

import handgrad as hg
from handgrad.models import Llama, LlamaConfig
from handgrad.optim import AdamW

CONFIG = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=16, vocab_size=50)


def _run(device: str, steps: int, autocast: bool = False) -> tuple[list[float], Llama, list[int]]:
    hg.manual_seed(0)
    model = Llama(LlamaConfig(**CONFIG)).to(hg.device(device))
    opt = AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    losses, syncs = [], []
    for step in range(steps):
        rng = np.random.default_rng(step)
        x, y = rng.integers(0, 50, (3, 16)), rng.integers(0, 50, (3, 16))
        fakecupy.stats.reset()
        with hg.autocast(hg.device(device).type, enabled=autocast):
            _, loss = model(hg.tensor(x).to(device), hg.tensor(y).to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        syncs.append(fakecupy.stats.syncs)
    return losses, model, syncs


def test_llama_on_the_device_matches_the_cpu() -> None:
    cpu_losses, cpu_model, _ = _run("cpu", 3)
    expected = cpu_model.generate(np.array([[1, 2, 3]]), 20, temperature=0)
    with fakecupy.installed() as cp:
        losses, model, syncs = _run("cuda", 3)
        for name, p in model.named_parameters():
            assert isinstance(p.data, cp.ndarray), f"{name} is not on the device"
        out = model.generate(hg.tensor(np.array([[1, 2, 3]])).to("cuda"), 20, temperature=0)
        np.testing.assert_array_equal(out.to("cpu").numpy(), expected)
    np.testing.assert_allclose(losses, cpu_losses, rtol=1e-6)
    assert max(syncs) <= 1, f"host synchronisations per step: {syncs}"


def test_llama_under_autocast_on_the_device_and_the_cpu(monkeypatch) -> None:
    """bf16 autocast (grouped-query attention, RoPE, RMSNorm, SwiGLU): the device's kernel
    path with bf16 products and the CPU's reference agree to bf16's reach; every product on
    the device is bf16."""
    from handgrad.backend import cuda

    cpu_losses, _, _ = _run("cpu", 2, autocast=True)
    fakecupy.reference_kernels(monkeypatch)
    with fakecupy.installed(kernels=True, bf16_matmul=True):
        assert cuda.bf16_matmul_enabled()  # its probe reads the device once, before the steps
        cuda.GEMM_FLOPS.clear()
        losses, _, syncs = _run("cuda", 2, autocast=True)
        assert set(cuda.gemm_flops()) == {"bfloat16"}, cuda.gemm_flops()
    np.testing.assert_allclose(losses, cpu_losses, rtol=5e-3)
    assert max(syncs) <= 1, f"host synchronisations per step: {syncs}"
