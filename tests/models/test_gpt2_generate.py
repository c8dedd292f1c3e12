"""GPT2.generate: the key/value cache, the sliding window, and the samplers."""

import numpy as np
import pytest

import handgrad as hg
from handgrad.models.gpt2 import GPT2, GPT2Config, sample_next

CONFIG = GPT2Config(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=61)


def make_model(seed=0, config=CONFIG):
    """A random model with weights large enough that next-token logits are well separated
    (GPT-2's N(0, 0.02) init gives near-uniform, nearly tied predictions)."""
    hg.manual_seed(seed)
    model = GPT2(config)
    rng = np.random.default_rng(seed)
    for _, p in model.named_parameters():
        if p.ndim == 2:
            p.data[...] = rng.normal(0, 0.3, p.shape).astype(p.dtype)
    return model


def greedy_without_cache(model, idx, n):
    """The definition: re-run the last block_size tokens for every new token, take argmax."""
    idx = np.array(idx)
    for _ in range(n):
        logits = model(idx[:, -model.config.block_size :]).data[:, -1]
        idx = np.concatenate([idx, logits.argmax(-1)[:, None]], axis=1)
    return idx


def test_greedy_with_cache_equals_rerunning_the_prefix_also_past_block_size():
    model = make_model()
    prompt = np.random.default_rng(0).integers(0, 61, (3, 5))
    # 5 + 30 tokens: the window slides past block_size = 16 for the last 19.
    out = model.generate(prompt, 30, temperature=0)
    assert out.shape == (3, 35) and out.dtype == np.int64
    assert np.array_equal(out[:, :5], prompt)
    assert np.array_equal(out, greedy_without_cache(model, prompt, 30))
    assert len(np.unique(out[:, 5:])) > 5  # a non-degenerate continuation


def test_prompt_longer_than_block_size_is_cropped():
    model = make_model(1)
    prompt = np.random.default_rng(1).integers(0, 61, (1, 40))
    out = model.generate(prompt, 4, temperature=0)
    assert out.shape == (1, 44)
    assert np.array_equal(out, greedy_without_cache(model, prompt, 4))


def test_tensor_in_tensor_out_and_mode_restored():
    model = make_model()
    model.train()
    out = model.generate(hg.tensor([[1, 2, 3]]), 2, temperature=0)
    assert isinstance(out, hg.Tensor) and out.shape == (1, 5) and out.dtype == hg.int64
    assert model.training
    assert model.generate([[1, 2, 3]], 0).tolist() == [[1, 2, 3]]


def test_never_emits_padding_ids():
    model = make_model()
    wte = model.transformer.wte.weight.data
    # Make the padding rows (61..63) the best match for every hidden state: if logits
    # covered them, greedy would always pick one.
    wte[61:] = 100 * np.sign(model.transformer.ln_f.weight.data)
    prompt = np.zeros((4, 3), np.int64)
    for kwargs in (dict(temperature=0), dict(temperature=5.0, seed=0), dict(top_p=0.99, seed=1)):
        out = model.generate(prompt, 20, **kwargs)
        assert out.max() < 61, kwargs


def test_top_k_1_is_greedy_and_seeds_are_deterministic():
    model = make_model(2)
    prompt = np.array([[4, 5], [6, 7]])
    greedy = model.generate(prompt, 12, temperature=0)
    assert np.array_equal(model.generate(prompt, 12, temperature=1.0, top_k=1, seed=9), greedy)
    # temperature 0 ignores the seed
    assert np.array_equal(model.generate(prompt, 12, temperature=0, seed=123), greedy)
    hot = dict(temperature=3.0)  # a flat distribution: two seeds agree by chance ~never
    a = model.generate(prompt, 12, seed=1, **hot)
    assert np.array_equal(a, model.generate(prompt, 12, seed=1, **hot))
    assert not np.array_equal(a, model.generate(prompt, 12, seed=2, **hot))
    # without a seed, the global generator (handgrad.manual_seed) decides
    hg.manual_seed(5)
    b = model.generate(prompt, 12, **hot)
    hg.manual_seed(5)
    assert np.array_equal(b, model.generate(prompt, 12, **hot))


def test_stop_at_eos_pads_finished_rows():
    model = make_model(3)
    prompt = np.random.default_rng(3).integers(0, 61, (3, 4))
    full = model.generate(prompt, 10, temperature=0)
    eos = int(full[0, 4 + 2])  # row 0 emits it as its third new token
    out = model.generate(prompt, 10, temperature=0, stop_at_eos=True, eos_token_id=eos)
    for row, ref in zip(out, full):
        new, ref_new = row[4:], ref[4 : 4 + len(row) - 4]
        hits = np.flatnonzero(ref_new == eos)
        stop = hits[0] + 1 if len(hits) else len(new)
        assert np.array_equal(new[:stop], ref_new[:stop])
        assert np.all(new[stop:] == eos)
    if out.shape[1] < full.shape[1]:  # ended early: every row has emitted eos
        assert all((row[4:] == eos).any() for row in out)
    one = model.generate(prompt[:1], 10, temperature=0, stop_at_eos=True, eos_token_id=eos)
    first = np.flatnonzero(full[0, 4:] == eos)[0]  # <= 2
    assert one.shape == (1, 4 + first + 1) and one[0, -1] == eos  # a lone row stops at once


def test_generate_argument_errors():
    model = make_model()
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate([[1]], 3, stop_at_eos=True)
    with pytest.raises(ValueError, match="top_p must be in"):
        model.generate([[1]], 3, top_p=0.0)
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        model.generate([[1]], 3, top_k=0)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        model.generate([[1]], 3, temperature=-1)
    with pytest.raises(ValueError, match="token id 70"):
        model.generate([[70]], 3)
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(np.zeros((2, 0), np.int64), 3)


# ---- the sampler on hand-built distributions

PROBS = np.array([0.5, 0.3, 0.15, 0.05])


def draw(n=20_000, **kwargs):
    logits = np.tile(np.log(PROBS), (n, 1)).astype(np.float32)
    counts = np.bincount(sample_next(logits, rng=np.random.default_rng(0), **kwargs), minlength=4)
    return counts / n


def test_plain_sampling_follows_the_distribution():
    assert np.abs(draw() - PROBS).max() < 0.015
    # temperature 2 flattens: p ~ sqrt(PROBS)
    flat = np.sqrt(PROBS) / np.sqrt(PROBS).sum()
    assert np.abs(draw(temperature=2.0) - flat).max() < 0.015


def test_top_p_keeps_the_smallest_nucleus():
    # mass before each token in order: 0, 0.5, 0.8, 0.95
    assert np.array_equal(draw(top_p=0.45), [1, 0, 0, 0])
    f = draw(top_p=0.7)  # tokens 0, 1 renormalised: 0.625 / 0.375
    assert f[2:].sum() == 0 and abs(f[0] - 0.625) < 0.015
    f = draw(top_p=0.9)  # tokens 0, 1, 2: 0.5 / 0.95 ...
    assert f[3] == 0 and np.abs(f[:3] - PROBS[:3] / 0.95).max() < 0.015
    assert np.abs(draw(top_p=1.0) - PROBS).max() < 0.015


def test_top_k_and_greedy():
    f = draw(top_k=2)
    assert f[2:].sum() == 0 and abs(f[0] - 0.625) < 0.015
    assert np.array_equal(draw(top_k=1), [1, 0, 0, 0])
    assert np.abs(draw(top_k=10) - PROBS).max() < 0.015  # k >= V keeps everything
    logits = np.array([[0.0, 3.0, 1.0], [5.0, -1.0, 4.9]], np.float32)
    assert sample_next(logits, temperature=0).tolist() == [1, 0]


def test_bf16_model_samples_like_its_f32_copy_and_keeps_bf16_weights():
    config = GPT2Config.from_dict({**CONFIG.to_dict(), "dtype": "bfloat16"})
    model = make_model(4, config)
    arrays = [p.data for p in model.parameters()]
    f32 = GPT2.from_state_dict(
        CONFIG, {k: v.data.astype(np.float32) for k, v in model.state_dict().items()}
    )
    prompt = np.array([[1, 2, 3]])
    out = model.generate(prompt, 20, temperature=0)
    assert np.array_equal(out, f32.generate(prompt, 20, temperature=0))
    assert all(p.data is a and p.dtype == hg.bfloat16 for p, a in zip(model.parameters(), arrays))
