"""GPT2Config: presets, parameter counts, validation, dict round trip, initialisation."""

import math
from pathlib import Path

import numpy as np
import pytest

import handgrad as hg
from handgrad.models.gpt2 import GPT2, PRESETS, GPT2Config, flops_per_token, num_parameters

# Parameter counts of OpenAI's GPT-2 checkpoints as published on the Hugging Face hub
# (vocabulary 50,257, tied LM head), plus the 47 padding rows of wte times n_embd.
HF_COUNTS = {
    "gpt2-124m": (124_439_808, 768),
    "gpt2-medium": (354_823_168, 1024),
    "gpt2-large": (774_030_080, 1280),
    "gpt2-xl": (1_557_611_200, 1600),
}


@pytest.mark.parametrize("name", sorted(HF_COUNTS))
def test_gpt2_sizes_match_published_counts_plus_padding(name):
    published, width = HF_COUNTS[name]
    config = GPT2Config.from_preset(name)
    assert config.padded_vocab_size == 50_304
    assert num_parameters(config) == published + (50_304 - 50_257) * width


def test_124m_preset_is_exactly_124_475_904():
    config = GPT2Config.from_preset("gpt2-124m")
    assert (config.n_layer, config.n_head, config.n_embd) == (12, 12, 768)
    assert (config.block_size, config.vocab_size, config.padded_vocab_size) == (1024, 50257, 50304)
    assert (config.dropout, config.bias, config.dtype) == (0.0, True, "bfloat16")
    assert num_parameters(config) == 124_475_904


def test_small_presets_by_hand():
    # 4 blocks of 12 C^2 + 13 C with C = 128, ln_f 2C, wpe block_size * C, wte padded * C.
    blocks = 4 * (12 * 128 * 128 + 13 * 128)
    sc = GPT2Config.from_preset("shakespeare-char")
    assert (sc.n_layer, sc.n_head, sc.n_embd, sc.block_size, sc.dropout) == (4, 4, 128, 64, 0.0)
    assert sc.padded_vocab_size == 128
    assert num_parameters(sc) == 128 * 128 + 64 * 128 + blocks + 256 == 817_920
    tiny = GPT2Config.from_preset("tiny")
    assert num_parameters(tiny) == 50_304 * 128 + 128 * 128 + blocks + 256


def test_every_preset_formula_matches_a_built_model_when_small():
    for name in ("shakespeare-char", "tiny"):
        config = GPT2Config.from_preset(name)
        assert GPT2(config).num_parameters() == num_parameters(config)
    no_bias = GPT2Config(n_layer=2, n_head=2, n_embd=8, block_size=4, vocab_size=10, bias=False)
    assert (
        GPT2(no_bias).num_parameters()
        == num_parameters(no_bias)
        == 64 * 8 + 32 + 2 * (12 * 64 + 2 * 8) + 8
    )


def test_building_124m_counts_exactly_and_uses_bf16():
    model = GPT2(GPT2Config.from_preset("gpt2-124m"))
    params = dict(model.named_parameters())
    assert sum(p.numel() for p in params.values()) == 124_475_904
    assert all(p.dtype == hg.bfloat16 for p in params.values())
    assert params["transformer.wte.weight"].shape == (50304, 768)
    assert params["transformer.h.11.mlp.c_proj.weight"].shape == (768, 3072)
    assert "lm_head.weight" not in params


def test_parameter_names_follow_nanogpt_and_hf():
    model = GPT2(GPT2Config(n_layer=2, n_head=2, n_embd=8, block_size=4, vocab_size=10))
    per_block = [
        "ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
        "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
        "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
    ]  # fmt: skip
    expected = ["transformer.wte.weight", "transformer.wpe.weight"]
    expected += [f"transformer.h.{i}.{n}" for i in range(2) for n in per_block]
    expected += ["transformer.ln_f.weight", "transformer.ln_f.bias"]
    assert [n for n, _ in model.named_parameters()] == expected
    assert list(model.state_dict()) == expected
    assert model.transformer.h[1].attn.c_attn.weight.shape == (24, 8)


def test_flops_per_token():
    c = GPT2Config.from_preset("gpt2-124m")
    n = 124_475_904 - 1024 * 768
    assert flops_per_token(c) == 6 * n + 12 * 12 * 768 * 1024
    assert flops_per_token(c, 256) == 6 * n + 12 * 12 * 768 * 256


def test_gpt2_init_statistics():
    hg.manual_seed(0)
    L = 4
    model = GPT2(GPT2Config(n_layer=L, n_head=4, n_embd=256, block_size=64, vocab_size=500))
    p = dict(model.named_parameters())
    for name, t in p.items():
        a = t.data.astype(np.float64)
        if name.endswith("c_proj.weight"):
            assert abs(a.std() / (0.02 / math.sqrt(2 * L)) - 1) < 0.02, name
        elif name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or "ln_f.w" in name:
            assert np.all(a == 1), name
        elif name.endswith("bias"):
            assert np.all(a == 0), name
        else:
            assert abs(a.std() / 0.02 - 1) < 0.02 and abs(a.mean()) < 1e-3, name


def test_init_is_reproducible_with_manual_seed():
    config = GPT2Config(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=10)
    hg.manual_seed(3)
    a = GPT2(config).state_dict()
    hg.manual_seed(3)
    b = GPT2(config).state_dict()
    assert all(np.array_equal(a[k].data, b[k].data) for k in a)


# ---- config validation and serialisation


def test_padded_vocab_defaults_to_next_multiple_of_64():
    assert GPT2Config(1, 1, 8, 4, vocab_size=64).padded_vocab_size == 64
    assert GPT2Config(1, 1, 8, 4, vocab_size=65).padded_vocab_size == 128
    assert GPT2Config(1, 1, 8, 4, vocab_size=65, padded_vocab_size=65).padded_vocab_size == 65


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_embd=10, n_head=3), r"n_embd \(10\) must be divisible by n_head \(3\)"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(block_size=-4), "block_size must be a positive integer"),
        (dict(vocab_size=2.5), "vocab_size must be a positive integer"),
        (dict(n_head=True), "n_head must be a positive integer"),
        (dict(vocab_size=100, padded_vocab_size=64), r"padded_vocab_size \(64\) must be >= "),
        (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
        (dict(dtype="float16"), "dtype must be one of"),
        (dict(bias="yes"), "bias must be true or false"),
    ],
)
def test_config_validation(kwargs, message):
    base = dict(n_layer=1, n_head=2, n_embd=8, block_size=4, vocab_size=10)
    with pytest.raises(ValueError, match=message):
        GPT2Config(**{**base, **kwargs})


def test_dict_round_trip_and_unknown_keys():
    config = GPT2Config.from_preset("shakespeare-char", vocab_size=70, dropout=0.2)
    d = config.to_dict()
    assert d["padded_vocab_size"] == 128 and d["dropout"] == 0.2
    assert GPT2Config.from_dict(d) == config
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_embed', 'zzz'\]"):
        GPT2Config.from_dict({**d, "n_embed": 3, "zzz": 1})
    d.pop("n_head")
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['n_head'\]"):
        GPT2Config.from_dict(d)


def test_presets_by_name_and_overrides():
    assert set(PRESETS) >= {"gpt2-124m", "gpt2-medium", "gpt2-large", "gpt2-xl",
                            "shakespeare-char", "tiny"}  # fmt: skip
    medium = GPT2Config.from_preset("gpt2-medium")
    assert (medium.n_layer, medium.n_head, medium.n_embd) == (24, 16, 1024)
    large = GPT2Config.from_preset("gpt2-large")
    assert (large.n_layer, large.n_head, large.n_embd) == (36, 20, 1280)
    xl = GPT2Config.from_preset("gpt2-xl")
    assert (xl.n_layer, xl.n_head, xl.n_embd) == (48, 25, 1600)
    small = GPT2Config.from_preset("gpt2-124m", dtype="float32", block_size=256)
    assert (small.dtype, small.block_size, small.n_layer) == ("float32", 256, 12)
    with pytest.raises(ValueError, match="unknown GPT-2 preset 'gpt3'"):
        GPT2Config.from_preset("gpt3")
    with pytest.raises(ValueError, match="unknown key"):
        GPT2Config.from_preset("tiny", n_layers=2)


def test_shakespeare_char_vocab_matches_the_data():
    path = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare.txt"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    assert len(set(path.read_text(encoding="utf-8"))) == PRESETS["shakespeare-char"]["vocab_size"]
