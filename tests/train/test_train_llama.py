"""``[model] arch = "llama"``: the config section, training, exact resume and sampling with
the key/value cache, as for GPT-2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from handgrad.cli import main
from handgrad.models import Llama, LlamaConfig, model_from_checkpoint, num_parameters
from handgrad.serialization import load_file
from handgrad.train import CheckpointError, train
from handgrad.train.config import ConfigError, from_dict, load_config, resolve_model_config

LLAMA = {"arch": "llama", "n_kv_head": 1, "intermediate_size": 48, "rope_theta": 1000.0}


def run(cfg_dict, out, resume=None):
    return train(from_dict(cfg_dict), out, resume=resume, progress=False, log=lambda m: None)


def bits(losses):
    return {k: np.float64(v).view(np.int64) for k, v in losses.items()}


def test_arch_selects_the_config_class(tiny):
    cfg = from_dict(tiny(model=LLAMA))
    model = resolve_model_config(cfg.model, 40)
    assert isinstance(model, LlamaConfig)
    assert (model.n_kv_head, model.intermediate_size, model.vocab_size) == (1, 48, 40)
    assert model.to_dict()["arch"] == "llama"
    assert type(resolve_model_config(from_dict(tiny()).model, 40)).__name__ == "GPT2Config"


@pytest.mark.parametrize(
    "model,message",
    [
        ({"n_kv_head": 1}, "n_kv_head: not a setting of arch = 'gpt2'"),
        ({"arch": "llama", "bias": False}, "bias: not a setting of arch = 'llama'"),
        ({"arch": "mamba"}, "arch = 'mamba': unknown"),
        ({"arch": "llama", "n_kv_head": 3}, "n_head \\(2\\) must be divisible by n_kv_head"),
        ({"arch": "llama", "preset": "gpt2-124m"}, "unknown for arch = 'llama'"),
        ({"arch": "llama", "rope_theta": -1.0}, "rope_theta must be a positive number"),
    ],
)
def test_model_section_is_checked_by_the_chosen_class(tiny, model, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(tiny(model=model))


def test_llama_124m_preset():
    cfg = load_config("llama-124m")
    m = resolve_model_config(cfg.model, 50257)
    assert isinstance(m, LlamaConfig)
    assert (m.n_layer, m.n_head, m.n_kv_head, m.n_embd, m.block_size) == (12, 12, 4, 768, 1024)
    assert (m.padded_vocab_size, m.tie_embeddings, m.dtype) == (50304, True, "bfloat16")
    assert 120e6 < num_parameters(m) < 130e6
    assert num_parameters(m) == sum(p.numel() for p in Llama(m).parameters())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_llama_trains_and_resumes_exactly(tiny, tmp_path, dtype):
    model = {**LLAMA, "dropout": 0.1, "dtype": dtype}
    full = run(tiny(model=model), tmp_path / "full")
    losses = list(full.train_losses.values())
    assert losses[-1] < losses[0]
    first = run(tiny(model=model, train={"max_steps": 3}), tmp_path / "split")
    second = run(tiny(model=model), tmp_path / "split", resume=tmp_path / "split")
    assert bits({**first.train_losses, **second.train_losses}) == bits(full.train_losses)
    assert second.final_eval.loss == full.final_eval.loss
    a = load_file(tmp_path / "full" / "checkpoints" / "step_0000006" / "model.safetensors")
    b = load_file(tmp_path / "split" / "checkpoints" / "step_0000006" / "model.safetensors")
    assert "model.layers.0.self_attn.qkv_proj.weight" in a and "lm_head.weight" in a
    assert all(a[k].tobytes() == b[k].tobytes() for k in a)
    saved = json.loads((full.checkpoint / "config.json").read_text())["model"]
    assert saved["arch"] == "llama" and saved["n_kv_head"] == 1
    assert isinstance(model_from_checkpoint(tmp_path / "full"), Llama)
    # a GPT-2 config cannot resume it: the architecture is named as the difference
    with pytest.raises(CheckpointError, match="arch: 'llama' in the checkpoint, 'gpt2'"):
        run(tiny(train={"max_steps": 8}), tmp_path / "split", resume=tmp_path / "split")


def test_llama_train_resume_and_sample_cli(tiny, tmp_path, capsys):
    cfg = tiny(model={**LLAMA, "tie_embeddings": True}, train={"max_steps": 4})
    out = tmp_path / "run"
    run(cfg, out)
    assert main(["train", "--resume", str(out), "--set", "train.max_steps=6", "--no-progress"]) == 0
    assert "done: 6 steps" in capsys.readouterr().out
    args = ["sample", "--checkpoint", str(out), "--max-new-tokens", "40", "--seed", "3"]
    assert main([*args, "--prompt", "The ", "--num-samples", "2"]) == 0
    samples = capsys.readouterr().out.split("-" * 40 + "\n")
    assert len(samples) == 2 and all(s.startswith("The ") for s in samples)
    card = tmp_path / "MODEL_CARD.md"
    assert main(["report", "--checkpoint", str(out), "--out", str(card)]) == 0
    text = card.read_text()
    assert "A Llama-style GPT language model" in text and "Key/value heads (n_kv_head)" in text


def test_fine_tune_starts_from_a_llama_run(tiny, tmp_path):
    trained = run(tiny(model=LLAMA, train={"max_steps": 12}), tmp_path / "base")
    fresh = run(tiny(model=LLAMA, train={"max_steps": 2, "seed": 9}), tmp_path / "fresh")
    tuned = run(
        tiny(model={**LLAMA, "dropout": 0.1}, train={"max_steps": 2, "seed": 9,
                                                     "init_from": str(tmp_path / "base")}),
        tmp_path / "tuned",
    )  # fmt: skip
    assert tuned.train_losses[1] < fresh.train_losses[1]  # the trained weights, not new ones
    assert abs(tuned.train_losses[1] - trained.train_losses[12]) < 0.5
    saved = json.loads((tuned.checkpoint / "config.json").read_text())["model"]
    assert saved["arch"] == "llama" and saved["dropout"] == 0.1
