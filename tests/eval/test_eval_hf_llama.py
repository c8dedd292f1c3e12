"""Hugging Face Llama interop (``arch = "llama"``), checked against transformers' own
LlamaForCausalLM built from a small random config and saved locally."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from handgrad.cli import main  # noqa: E402
from handgrad.eval.hf import export_hf, import_hf  # noqa: E402
from handgrad.models import Llama, model_from_checkpoint  # noqa: E402
from handgrad.tensor import Tensor  # noqa: E402

ATOL = 1e-5  # float32 logits, ours against transformers'


def _save_random_llama(directory, tokenizer, seed=0, **overrides):
    """A 2-layer LlamaForCausalLM (hidden 32, 4 query heads sharing 2 key/value heads) with
    weights larger than its default init, so that the logits differ visibly."""
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=80,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=96, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        bos_token_id=tokenizer.eot_token, eos_token_id=tokenizer.eot_token,
    )  # fmt: skip
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**settings, **overrides}))
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    hf.eval()
    hf.save_pretrained(directory)
    tokenizer.export_hf(directory)
    return hf


def _logits(model, ids):
    return model(Tensor(np.asarray([ids]))).data[0]


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def _ids(tokenizer):
    return tokenizer.encode(
        "Once upon a time there was a little girl who lived in a village near the forest. "
        "She went to the market with her mother."
    )


@pytest.mark.parametrize("tied", [False, True])
def test_import_gives_transformers_logits_and_exports_back(tmp_path, tokenizer, tied):
    hf = _save_random_llama(tmp_path / "hf", tokenizer, tie_word_embeddings=tied)
    assert (
        main(["import", "hf", "--from", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 0
    )
    model = model_from_checkpoint(tmp_path / "run")
    assert isinstance(model, Llama)
    cfg = model.config
    assert (cfg.n_kv_head, cfg.intermediate_size, cfg.block_size) == (2, 80, 96)
    assert (cfg.rope_theta, cfg.norm_eps, cfg.tie_embeddings) == (500.0, 1e-5, tied)
    model.eval()
    ids = _ids(tokenizer)
    assert 50 < len(ids) <= 96
    ref = _hf_logits(hf, ids)
    assert np.abs(_logits(model, ids) - ref).max() <= ATOL

    # and back: the same tensors under HF's names, and the same logits in transformers
    out = tmp_path / "exported"
    assert main(["export", "hf", "--checkpoint", str(tmp_path / "run"), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["tie_word_embeddings"] is tied
    weights = safetensors_numpy.load_file(str(out / "model.safetensors"))
    original = {k: v.numpy() for k, v in hf.state_dict().items()}
    if tied:
        original.pop("lm_head.weight")
    assert sorted(weights) == sorted(original)
    for name, array in original.items():
        np.testing.assert_array_equal(weights[name], array, err_msg=name)
    back = transformers.LlamaForCausalLM.from_pretrained(out)
    back.eval()
    assert np.abs(_hf_logits(back, ids) - ref).max() <= ATOL


def test_trained_llama_exports_and_loads_in_transformers(tmp_path, tokenizer, write_ckpt):
    """A model of ours (as the trainer builds it, bf16 storage included) exports with
    --dtype stored and loads in transformers with the same logits."""
    from handgrad.models import LlamaConfig

    config = LlamaConfig(n_layer=2, n_head=4, n_kv_head=1, n_embd=32, block_size=128,
                         vocab_size=tokenizer.vocab_size, rope_theta=10000.0)  # fmt: skip
    model = Llama(config)
    rng = np.random.default_rng(0)
    for p in model.parameters():
        p.data[...] = 0.3 * rng.standard_normal(p.shape)
    model.eval()
    write_ckpt(tmp_path / "run", model, tokenizer)
    export_hf(tmp_path / "run", tmp_path / "hf")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    hf.eval()
    ids = _ids(tokenizer)
    assert np.abs(_logits(model, ids) - _hf_logits(hf, ids)).max() <= ATOL
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok("the dog sleeps")["input_ids"] == tokenizer.encode("the dog sleeps")


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 16}, "head_dim"),
    ],
)
def test_import_refuses_variants_it_does_not_compute(tmp_path, tokenizer, overrides, message):
    _save_random_llama(tmp_path / "hf", tokenizer, **overrides)
    with pytest.raises(ValueError, match=message):
        import_hf(tmp_path / "hf", tmp_path / "run")
    assert not (tmp_path / "run").exists()
