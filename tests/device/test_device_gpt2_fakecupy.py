"""GPT-2 on the CuPy stand-in: a training step, generation and a checkpoint round trip run
with every array on the (fake) device, give the CPU's numbers, and never convert device data
to NumPy implicitly (the stand-in raises where real CuPy would). Host synchronisations are
counted: one loss value per step is all a training step may fetch."""

from __future__ import annotations

import fakecupy
import numpy as np

import handgrad as hg
from handgrad.models.gpt2 import GPT2, GPT2Config
from handgrad.nn.utils import clip_grad_norm_
from handgrad.optim import AdamW

CONFIG = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, dropout=0.0)


def _batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(step)
    return rng.integers(0, 50, (3, 16)), rng.integers(0, 50, (3, 16))


def _run(device: str, steps: int) -> tuple[list[float], GPT2, list[int]]:
    hg.manual_seed(0)
    model = GPT2(GPT2Config(**CONFIG)).to(hg.device(device))
    opt = AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    losses, syncs = [], []
    for step in range(steps):
        x, y = _batch(step)
        fakecupy.stats.reset()
        _, loss = model(hg.tensor(x).to(device), hg.tensor(y).to(device))
        opt.zero_grad()
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        syncs.append(fakecupy.stats.syncs)
    return losses, model, syncs


def test_training_steps_match_the_cpu_and_do_not_sync() -> None:
    cpu_losses, _, _ = _run("cpu", 3)
    with fakecupy.installed() as cp:
        losses, model, syncs = _run("cuda", 3)
        for name, p in model.named_parameters():
            assert isinstance(p.data, cp.ndarray), f"{name} is not on the device"
            assert p.device == hg.device("cuda:0")
    np.testing.assert_allclose(losses, cpu_losses, rtol=1e-6)
    assert max(syncs) <= 1, f"host synchronisations per step: {syncs}"


def test_generation_and_checkpoint_round_trip(tmp_path) -> None:
    from handgrad.serialization import load_file, save_file

    with fakecupy.installed() as cp:
        _, model, _ = _run("cuda", 1)
        prompt = hg.tensor(np.array([[1, 2, 3]])).to("cuda")
        out = model.generate(prompt, 5, temperature=1.0, top_k=10, seed=3)
        state = {k: v.to("cpu").numpy() for k, v in model.state_dict().items()}
        save_file(state, tmp_path / "model.safetensors")
        cpu_model = GPT2(GPT2Config(**CONFIG))
        cpu_model.load_state_dict(
            {k: hg.tensor(v) for k, v in load_file(tmp_path / "model.safetensors").items()}
        )
        back = GPT2(GPT2Config(**CONFIG)).to("cuda")
        back.load_state_dict(cpu_model.state_dict())
        assert all(isinstance(p.data, cp.ndarray) for p in back.parameters())
        again = back.generate(prompt, 5, temperature=1.0, top_k=10, seed=3)
        first = out.to("cpu").numpy() if hasattr(out, "to") else out
        second = again.to("cpu").numpy() if hasattr(again, "to") else again
    want = cpu_model.generate(
        hg.tensor(np.array([[1, 2, 3]])), 5, temperature=1.0, top_k=10, seed=3
    )
    want = want.numpy() if hasattr(want, "numpy") else want
    np.testing.assert_array_equal(first, want)
    np.testing.assert_array_equal(second, want)
