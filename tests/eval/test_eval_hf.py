"""Hugging Face interop, checked against transformers' own GPT2LMHeadModel."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_numpy = pytest.importorskip("safetensors.numpy")

from handgrad.eval.hf import export_hf, import_hf  # noqa: E402
from handgrad.models.gpt2 import GPT2  # noqa: E402
from handgrad.tensor import Tensor  # noqa: E402


def ours_logits(model, ids: list[int]) -> np.ndarray:
    return model(Tensor(np.asarray([ids]))).data[0]


def hf_logits(hf_model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].numpy()


def assert_close(a: np.ndarray, b: np.ndarray, rel: float = 1e-4) -> None:
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= rel * np.abs(b).max()


def test_export_loads_in_transformers_with_same_logits(hf_dir, model, tokenizer):
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["architectures"] == ["GPT2LMHeadModel"]
    assert config["vocab_size"] == tokenizer.vocab_size  # padding rows dropped
    assert config["n_positions"] == model.config.block_size
    assert config["bos_token_id"] == config["eos_token_id"] == tokenizer.eot_token
    weights = safetensors_numpy.load_file(str(hf_dir / "model.safetensors"))
    assert "lm_head.weight" not in weights  # tied
    C = model.config.n_embd
    assert weights["transformer.h.0.attn.c_attn.weight"].shape == (C, 3 * C)  # Conv1D (in, out)
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    hf.eval()
    ids = tokenizer.encode("The king said to the queen that the castle was cold.")
    assert_close(ours_logits(model, ids), hf_logits(hf, ids))
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    text = "Tom walked along the river <|endoftext|> and Mary saw a boat."
    assert hf_tok(text)["input_ids"] == tokenizer.encode(text, allowed_special="all")
    assert hf_tok.eos_token_id == tokenizer.eot_token


def test_export_without_biases(tmp_path, tokenizer, write_ckpt):
    from handgrad.models.gpt2 import GPT2Config

    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=16,
                        vocab_size=tokenizer.vocab_size, bias=False)  # fmt: skip
    model = GPT2(config)
    model.eval()
    write_ckpt(tmp_path / "run", model, tokenizer)
    export_hf(tmp_path / "run", tmp_path / "hf")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf")
    ids = tokenizer.encode("the dog sleeps in the sun")
    assert_close(ours_logits(model, ids), hf_logits(hf, ids))


def _save_random_hf(directory, tokenizer, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=24, vocab_size=tokenizer.vocab_size,
        bos_token_id=tokenizer.eot_token, eos_token_id=tokenizer.eot_token,
    )  # fmt: skip
    hf = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # larger than the default init, so logits differ visibly
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    hf.eval()
    hf.save_pretrained(directory)
    tokenizer.export_hf(directory)
    return hf


def test_import_random_transformers_model_gives_same_logits(tmp_path, tokenizer):
    hf = _save_random_hf(tmp_path / "hf", tokenizer)
    out = import_hf(tmp_path / "hf", tmp_path / "run")
    assert (out / "latest").read_text().strip() == "checkpoints/step_0000000"
    model = GPT2.from_checkpoint(out)
    model.eval()
    assert model.config.vocab_size == tokenizer.vocab_size
    assert model.config.padded_vocab_size % 64 == 0
    assert model.config.block_size == 24
    ids = tokenizer.encode("Once upon a time there was a little girl")
    assert_close(ours_logits(model, ids), hf_logits(hf, ids))


def test_import_openai_layout(tmp_path, tokenizer):
    """OpenAI's released files: no "transformer." prefix, the causal-mask buffers attn.bias
    and attn.masked_bias, and an explicit lm_head equal to wte."""
    hf = _save_random_hf(tmp_path / "src", tokenizer, seed=1)
    weights = safetensors_numpy.load_file(str(tmp_path / "src" / "model.safetensors"))
    T = 24
    openai = {k.removeprefix("transformer."): v for k, v in weights.items()}
    for i in range(2):
        openai[f"h.{i}.attn.bias"] = np.tril(np.ones((T, T), np.float32))[None, None]
        openai[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
    openai["lm_head.weight"] = weights["transformer.wte.weight"]
    (tmp_path / "src" / "model.safetensors").unlink()
    safetensors_numpy.save_file(openai, str(tmp_path / "src" / "model.safetensors"))
    out = import_hf(tmp_path / "src", tmp_path / "run")
    model = GPT2.from_checkpoint(out)
    model.eval()
    ids = tokenizer.encode("The quick brown fox jumps over")
    assert_close(ours_logits(model, ids), hf_logits(hf, ids))


def test_import_refuses_pickles_and_untied_heads(tmp_path, tokenizer):
    _save_random_hf(tmp_path / "src", tokenizer)
    weights = safetensors_numpy.load_file(str(tmp_path / "src" / "model.safetensors"))
    weights["lm_head.weight"] = weights["transformer.wte.weight"] + 1.0
    safetensors_numpy.save_file(weights, str(tmp_path / "src" / "model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight differs"):
        import_hf(tmp_path / "src", tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing half-written
    (tmp_path / "src" / "model.safetensors").unlink()
    (tmp_path / "src" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickle"):
        import_hf(tmp_path / "src", tmp_path / "run")


def test_export_refuses_non_empty_output(tmp_path, run_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError):
        export_hf(run_dir, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"


def test_round_trip_export_import(tmp_path, run_dir, model, tokenizer):
    export_hf(run_dir, tmp_path / "hf")
    back = GPT2.from_checkpoint(import_hf(tmp_path / "hf", tmp_path / "run"))
    V = tokenizer.vocab_size
    np.testing.assert_array_equal(
        back.transformer.wte.weight.data[:V], model.transformer.wte.weight.data[:V]
    )
    np.testing.assert_array_equal(
        back.transformer.h[1].attn.c_attn.weight.data,
        model.transformer.h[1].attn.c_attn.weight.data,
    )


ROUND_TRIP_DOCS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "Once upon a time there was a little girl who lived in a village near the forest.",
    "Tom and Mary walked along the river. Mary saw a boat; Tom saw a bird in the tree.",
] * 4


def _hf_trained_source(directory, layout: str, seed: int = 0):
    """A Hugging Face GPT-2 directory whose tokenizer was trained with `tokenizers`:
    "first": BpeTrainer's own layout, special tokens before the bytes (<|endoftext|> = 0);
    "last": GPT-2's layout, <|endoftext|> after the merges. Returns (tokenizer, model)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    eot = "<|endoftext|>"
    hf_tok = Tokenizer(models.BPE())
    hf_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf_tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=330,
        special_tokens=[eot] if layout == "first" else [],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    hf_tok.train_from_iterator(ROUND_TRIP_DOCS, trainer)
    if layout == "last":
        hf_tok.add_special_tokens([AddedToken(eot, special=True, normalized=False)])
    directory.mkdir(parents=True)
    hf_tok.model.save(str(directory))  # vocab.json + merges.txt (the model's vocabulary)
    vocab = json.loads((directory / "vocab.json").read_text(encoding="utf-8"))
    vocab[eot] = hf_tok.token_to_id(eot)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    eot_id = hf_tok.token_to_id(eot)
    assert eot_id == (0 if layout == "first" else hf_tok.get_vocab_size() - 1)
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=24, vocab_size=hf_tok.get_vocab_size(),
        bos_token_id=eot_id, eos_token_id=eot_id,
    )  # fmt: skip
    hf_model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.normal_(0.0, 0.3)
    hf_model.eval()
    hf_model.save_pretrained(directory)
    return hf_tok, hf_model


@pytest.mark.parametrize("layout", ["first", "last"])
def test_import_export_round_trip_tokenizers_trained(tmp_path, layout):
    """import hf -> export hf -> transformers: same ids and logits wherever <|endoftext|> is."""
    hf_tok, hf_model = _hf_trained_source(tmp_path / "src", layout)
    run = import_hf(tmp_path / "src", tmp_path / "run")
    export_hf(run, tmp_path / "out")

    from handgrad.tokenizer import load_tokenizer

    ours = load_tokenizer(run / "checkpoints" / "step_0000000" / "tokenizer.json")
    eot_id = hf_tok.token_to_id("<|endoftext|>")
    assert ours.eot_token == eot_id
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    fast = transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "out")
    assert auto.eos_token_id == fast.eos_token_id == eot_id
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out")
    exported.eval()
    model = GPT2.from_checkpoint(run)
    model.eval()
    texts = [
        "The quick brown fox saw a boat.<|endoftext|>Once upon a time",
        "<|endoftext|>Mary walked along the river",
        "a village near the forest<|endoftext|>",
    ]
    for text in texts:
        ids = hf_tok.encode(text).ids
        assert eot_id in ids
        assert auto(text)["input_ids"] == ids
        assert fast(text)["input_ids"] == ids
        assert ours.encode(text, allowed_special="all") == ids
        reference = hf_logits(hf_model, ids)
        assert_close(hf_logits(exported, ids), reference)
        assert_close(ours_logits(model, ids), reference)


@pytest.mark.parametrize("layout", ["first", "last"])
def test_import_tokenizer_json_only(tmp_path, layout):
    """A source whose tokenizer was saved by GPT2TokenizerFast.save_pretrained: with
    transformers >= 5 only tokenizer.json + tokenizer_config.json, no vocab.json / merges.txt."""
    hf_tok, hf_model = _hf_trained_source(tmp_path / "src", layout)
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / "src" / name).unlink()
    eot = "<|endoftext|>"
    fast = transformers.GPT2TokenizerFast(
        tokenizer_object=hf_tok, eos_token=eot, bos_token=eot, unk_token=eot
    )
    fast.save_pretrained(tmp_path / "src")
    if int(transformers.__version__.split(".")[0]) >= 5:
        assert not (tmp_path / "src" / "vocab.json").exists()
    (tmp_path / "src" / "vocab.json").unlink(missing_ok=True)
    (tmp_path / "src" / "merges.txt").unlink(missing_ok=True)
    assert (tmp_path / "src" / "tokenizer.json").is_file()

    run = import_hf(tmp_path / "src", tmp_path / "run")
    from handgrad.tokenizer import load_tokenizer

    ours = load_tokenizer(run / "checkpoints" / "step_0000000" / "tokenizer.json")
    reloaded = transformers.GPT2TokenizerFast.from_pretrained(tmp_path / "src")
    assert ours.eot_token == hf_tok.token_to_id(eot) == reloaded.eos_token_id
    model = GPT2.from_checkpoint(run)
    model.eval()
    for text in [f"{eot}Mary walked along the river", f"a village near the forest{eot}"]:
        ids = reloaded(text)["input_ids"]
        assert ids == hf_tok.encode(text).ids
        assert ours.encode(text, allowed_special="all") == ids
        assert_close(ours_logits(model, ids), hf_logits(hf_model, ids))
