"""Fine-tuning (``[train] init_from``): a GPT-2 built by transformers from a random config,
imported, then trained further on tiny Shakespeare; what is taken from the checkpoint and
what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from handgrad.cli import main
from handgrad.data import TokenShards
from handgrad.models.gpt2 import GPT2
from handgrad.parallel import evaluate
from handgrad.tokenizer import BPETokenizer
from handgrad.train import train
from handgrad.train.config import ConfigError, from_dict

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared/data/tinyshakespeare.txt"


@pytest.fixture(scope="module")
def text_and_tokenizer(tmp_path_factory):
    """120 kB of tiny Shakespeare, and a 320-token BPE learnt on half of it."""
    if not SHAKESPEARE.is_file():
        pytest.skip("../shared/data/tinyshakespeare.txt is not present")
    source = SHAKESPEARE
    root = tmp_path_factory.mktemp("finetune")
    text = root / "shakespeare.txt"
    text.write_text(source.read_text(encoding="utf-8")[:120_000], encoding="utf-8")
    tok = BPETokenizer.train(source.read_text(encoding="utf-8")[:60_000], vocab_size=256 + 64)
    return root, text, tok


@pytest.fixture(scope="module")
def hf_gpt2(text_and_tokenizer):
    """A GPT-2 of transformers (random weights) with the BPE tokenizer, saved as Hugging Face
    saves it."""
    root, _, tok = text_and_tokenizer
    directory = root / "hf-gpt2"
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, n_positions=64, vocab_size=tok.vocab_size,
        bos_token_id=tok.eot_token, eos_token_id=tok.eot_token,
    )  # fmt: skip
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    tok.export_hf(directory)
    return directory


def config(text, init_from, **sections) -> dict:
    cfg = {
        "model": {},
        "data": {"source": str(text), "val_fraction": 0.1, "workers": 1},
        "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2},
        "train": {
            "init_from": str(init_from), "max_steps": 30, "micro_batch_size": 8,
            "block_size": 32, "seed": 3, "log_interval": 10, "sample_tokens": 0,
        },
        "eval": {"interval": 0, "batches": 4},
    }  # fmt: skip
    for name, values in sections.items():
        cfg[name].update(values)
    return cfg


def quiet_train(cfg: dict, out, **kw):
    return train(from_dict(cfg), out, progress=False, log=lambda m: None, **kw)


def test_import_then_fine_tune_lowers_the_loss(
    text_and_tokenizer, hf_gpt2, tmp_path, monkeypatch, capsys
):
    root, text, tok = text_and_tokenizer
    monkeypatch.setenv("HANDGRAD_CACHE", str(tmp_path / "cache"))
    assert main(["import", "hf", "--from", str(hf_gpt2), "--out", str(tmp_path / "imported")]) == 0
    # an import is weights only: resuming it is refused with the way to train it further
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "imported"), "--no-progress"]) == 1
    assert "--set train.init_from=" in capsys.readouterr().err
    result = quiet_train(config(text, tmp_path / "imported"), tmp_path / "run")
    # the imported model's loss on the very batches the run's evaluation scores
    data = TokenShards(_data_dir(result.checkpoint))
    before = evaluate(GPT2.from_checkpoint(tmp_path / "imported"), data.val, 4, 8, 32).loss
    assert result.final_eval.loss < before - 0.5, (before, result.final_eval.loss)
    # the data was tokenized with the checkpoint's tokenizer, which the run keeps
    saved = BPETokenizer.load(result.checkpoint / "tokenizer.json")
    assert saved.to_dict() == tok.to_dict()
    # an HF directory given directly is imported once (cached) and starts the same run
    direct = quiet_train(config(text, hf_gpt2), tmp_path / "direct")
    assert direct.train_losses == result.train_losses
    assert len(list((tmp_path / "cache" / "imported").iterdir())) == 1


def _data_dir(checkpoint) -> str:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    return state["data"]["dir"]


def test_weights_come_from_the_checkpoint_and_the_optimizer_is_new(
    text_and_tokenizer, hf_gpt2, tmp_path, monkeypatch
):
    _, text, _ = text_and_tokenizer
    monkeypatch.setenv("HANDGRAD_CACHE", str(tmp_path / "cache"))
    cfg = config(
        text, hf_gpt2, train={"max_steps": 1}, optim={"lr": 1e-12, "min_lr": 0.0, "warmup_steps": 0}
    )
    result = quiet_train(cfg, tmp_path / "run")
    state = json.loads((result.checkpoint / "trainer_state.json").read_text())
    assert state["step"] == 1  # a new step count
    hf = transformers.GPT2LMHeadModel.from_pretrained(hf_gpt2)
    ours = GPT2.from_checkpoint(result.checkpoint)
    # a learning rate of 1e-12 moves no weight visibly: they are the transformers model's
    np.testing.assert_allclose(
        ours.transformer.wte.weight.detach().numpy()[: hf.config.vocab_size],
        hf.transformer.wte.weight.detach().numpy(), atol=1e-6,
    )  # fmt: skip


def test_resume_of_a_fine_tune_is_exact(text_and_tokenizer, hf_gpt2, tmp_path, monkeypatch):
    _, text, _ = text_and_tokenizer
    monkeypatch.setenv("HANDGRAD_CACHE", str(tmp_path / "cache"))
    cfg = config(text, hf_gpt2, train={"max_steps": 6, "log_interval": 1},
                 optim={"decay_steps": 6}, model={"dropout": 0.1})  # fmt: skip
    whole = quiet_train(cfg, tmp_path / "whole")
    cfg3 = config(text, hf_gpt2, train={"max_steps": 3, "log_interval": 1},
                  optim={"decay_steps": 6}, model={"dropout": 0.1})  # fmt: skip
    quiet_train(cfg3, tmp_path / "part")
    resumed = quiet_train(cfg, tmp_path / "part", resume=tmp_path / "part")
    assert [resumed.train_losses[s] for s in (4, 5, 6)] == [
        whole.train_losses[s] for s in (4, 5, 6)
    ]


@pytest.mark.parametrize(
    "sections, words",
    [
        ({"model": {"n_layer": 3}}, "[model] n_layer = 3, but the model in"),
        ({"model": {"preset": "shakespeare-char"}}, "keeps its shape"),
        ({"data": {"tokenizer": "char"}}, "reads the ids of its own tokenizer"),
        ({"data": {"tokenizer": "train:300"}}, "remove [data] tokenizer to use it"),
        ({"train": {"block_size": 128}}, "above the model's block_size = 64"),
    ],
)
def test_refusals(text_and_tokenizer, hf_gpt2, tmp_path, monkeypatch, sections, words):
    _, text, _ = text_and_tokenizer
    monkeypatch.setenv("HANDGRAD_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConfigError) as err:
        quiet_train(config(text, hf_gpt2, **sections), tmp_path / "run")
    assert words in str(err.value)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_the_same_tokenizer_in_any_form_trains_and_another_is_refused(
    text_and_tokenizer, hf_gpt2, tmp_path, monkeypatch
):
    _, text, tok = text_and_tokenizer
    monkeypatch.setenv("HANDGRAD_CACHE", str(tmp_path / "cache"))
    tok.save(tmp_path / "same.json")
    for named in (tmp_path / "same.json", hf_gpt2):  # its JSON file, a Hugging Face directory
        cfg = config(text, hf_gpt2, data={"tokenizer": str(named)}, train={"max_steps": 2})
        assert quiet_train(cfg, tmp_path / f"run-{named.name}").step == 2
    other = BPETokenizer.train(text.read_text(encoding="utf-8")[:20_000], vocab_size=256 + 8)
    other.save(tmp_path / "other.json")
    with pytest.raises(ConfigError, match="another tokenizer than the one the model"):
        quiet_train(config(text, hf_gpt2, data={"tokenizer": str(tmp_path / "other.json")}),
                    tmp_path / "refused")  # fmt: skip
