"""The Llama-style model: its config and interface (GPT-2's), and sampling with the
key/value cache. Its logits against transformers' LlamaForCausalLM are checked in
tests/eval/test_eval_hf_llama.py, its ops against PyTorch in tests/core/test_core_llama_ops.py."""

from __future__ import annotations

import numpy as np
import pytest

from handgrad.models import GPT2, Llama, LlamaConfig, build_model, config_from_dict, num_parameters


def test_generate_with_the_cache_equals_rerunning_the_window():
    """Greedy tokens from the key/value cache (past block_size too, where the window is
    re-run) are the argmax of a full forward pass over the same context."""
    config = LlamaConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=12,
                         vocab_size=50, tie_embeddings=True)  # fmt: skip
    model = Llama(config)
    rng = np.random.default_rng(0)
    for p in model.parameters():
        p.data[...] = 0.5 * rng.standard_normal(p.shape)
    model.eval()
    prompt = rng.integers(0, 50, size=(2, 5))
    out = model.generate(prompt, 15, temperature=0)
    assert out.shape == (2, 20)
    for t in range(5, 20):
        context = out[:, max(0, t - config.block_size) : t]
        expected = model(context).data[:, -1].argmax(-1)
        np.testing.assert_array_equal(out[:, t], expected)


def test_model_interface_matches_gpt2():
    config = LlamaConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=30)
    model = Llama(config)
    assert LlamaConfig.from_dict(config.to_dict()) == config
    assert model.num_parameters() == num_parameters(config)
    assert model.num_parameters(non_embedding=True) == num_parameters(config, True)
    idx = np.zeros((2, 8), dtype=np.int64)
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 8, 30) and loss.shape == ()
    for name in ("generate", "from_checkpoint", "device", "to"):
        assert hasattr(GPT2, name) and hasattr(Llama, name)
    with pytest.raises(ValueError, match="block_size"):
        model(np.zeros((1, 9), dtype=np.int64))


def test_config_dispatch_and_checks():
    config = LlamaConfig(n_layer=1, n_head=4, n_kv_head=2, n_embd=32, block_size=8, vocab_size=30)
    assert config.intermediate_size == 128 and config.padded_vocab_size == 64
    assert config_from_dict(config.to_dict()) == config
    assert isinstance(build_model(config.to_dict()), Llama)
    gpt2 = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8, "vocab_size": 30}
    assert isinstance(build_model(gpt2), GPT2)  # no "arch": GPT-2, as old checkpoints
    with pytest.raises(ValueError, match="unknown arch"):
        config_from_dict({**gpt2, "arch": "rnn"})
    with pytest.raises(ValueError, match="must be even"):
        LlamaConfig(n_layer=1, n_head=4, n_embd=12, block_size=8, vocab_size=30)
    with pytest.raises(ValueError, match="unknown key"):
        LlamaConfig.from_dict({**gpt2, "bias": True})
