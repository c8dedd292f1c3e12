"""`handgrad train` / `handgrad sample` from the command line, data caching, evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest

import handgrad
from handgrad.cli import main
from handgrad.data.cache import data_cache_key, prepared_data_dir
from handgrad.nn import functional as F
from handgrad.train import evaluate, unigram_loss
from handgrad.train.config import DataSection

TOML = """
[model]
n_layer = 1
n_head = 2
n_embd = 32
block_size = 16
[data]
source = "{source}"
tokenizer = "char"
val_fraction = 0.1
cache_dir = "{cache}"
workers = 1
[optim]
lr = 3e-3
warmup_steps = 1
[train]
max_steps = 4
micro_batch_size = 4
log_interval = 2
sample_tokens = 0
[eval]
interval = 0
batches = 2
"""


@pytest.fixture
def toml(tmp_path, data_dir):
    text = tmp_path / "corpus.txt"
    text.write_text((data_dir.parent / "corpus.txt").read_text())
    path = tmp_path / "tiny.toml"
    path.write_text(TOML.format(source=text, cache=tmp_path / "cache"))
    return path


def test_train_then_sample_cli(toml, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(toml), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "done: 4 steps" in printed and "val loss" in printed and "unigram baseline" in printed
    assert (out / "latest").is_file()
    # the raw text was prepared once into the cache...
    (entry,) = (tmp_path / "cache").iterdir()
    meta_time = (entry / "meta.json").stat().st_mtime_ns
    # ...and is reused by the next run; --set on the command line; resume without a config
    assert main(["train", "--resume", str(out), "--set", "train.max_steps=6", "--no-progress"]) == 0
    assert "done: 6 steps" in capsys.readouterr().out
    assert (entry / "meta.json").stat().st_mtime_ns == meta_time

    args = ["sample", "--checkpoint", str(out), "--max-new-tokens", "30", "--seed", "3"]
    assert main([*args, "--prompt", "The ", "--num-samples", "2"]) == 0
    text = capsys.readouterr().out
    samples = text.split("-" * 40 + "\n")
    assert len(samples) == 2 and all(s.startswith("The ") for s in samples)
    alphabet = set((tmp_path / "corpus.txt").read_text())
    assert set(text) - {"-"} <= alphabet | {"\n"}
    assert len(samples[0].rstrip("\n")) == 4 + 30  # char level: one char per token
    # same seed, same text
    assert main([*args, "--prompt", "The ", "--num-samples", "2"]) == 0
    assert capsys.readouterr().out == text
    # a prompt longer than the block is cropped, and said so
    assert main([*args, "--prompt", "The quick brown fox jumps over"]) == 0
    assert "the model sees only its last 16 tokens" in capsys.readouterr().err
    # a character model has no end-of-text token to stop at
    assert main([*args, "--stop-at-eos"]) == 1
    assert "no end-of-text token" in capsys.readouterr().err
    # resuming a finished run trains nothing, and says so
    assert main(["train", "--resume", str(out), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "nothing to train" in said and "already at step 6" in said and "done" not in said


def test_print_config_prints_the_resolved_config_and_trains_nothing(toml, tmp_path, capsys):
    import tomllib

    out = tmp_path / "run"
    args = ["train", str(toml), "--out", str(out), "--set", "optim.lr=1e-2", "--print-config"]
    assert main(args) == 0
    printed = tomllib.loads(capsys.readouterr().out)
    assert printed["optim"]["lr"] == 1e-2 and printed["model"]["n_embd"] == 32
    assert printed["train"]["max_steps"] == 4 and printed["data"]["tokenizer"] == "char"
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_bad_config_fails_before_any_work(toml, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["train", str(toml), "--out", str(out), "--set", "train.global_batch_size=6"])
    assert code == 1
    err = capsys.readouterr().err
    assert "global_batch_size = 6 is not divisible by micro_batch_size" in err
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_sample_from_a_missing_checkpoint(tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(tmp_path / "nope")]) == 1
    assert "no such directory" in capsys.readouterr().err


def test_cache_key_depends_on_source_tokenizer_and_split(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("hello")
    base = DataSection(source=str(text), tokenizer="char", val_fraction=0.1)
    key = data_cache_key(base)
    assert key.startswith("a-char-")
    assert data_cache_key(DataSection(str(text), "train:300", 0.1)) != key
    assert data_cache_key(DataSection(str(text), "char", 0.2)) != key
    assert data_cache_key(DataSection(str(text), "char", 0.1)) == key
    text.write_text("hello, changed")
    assert data_cache_key(base) != key  # another file content (size/mtime) -> another entry


def test_prepared_dir_used_as_is_and_tokenizer_conflict(data_dir, tmp_path):
    assert prepared_data_dir(DataSection(source=str(data_dir))) == data_dir
    # a shipped config's tokenizer that is the one the data was prepared with: accepted
    assert prepared_data_dir(DataSection(source=str(data_dir), tokenizer="char")) == data_dir
    same = str(data_dir / "tokenizer.json")
    assert prepared_data_dir(DataSection(source=str(data_dir), tokenizer=same)) == data_dir
    with pytest.raises(ValueError, match="already prepared with another tokenizer"):
        prepared_data_dir(DataSection(source=str(data_dir), tokenizer="train:300"))


def test_unigram_loss_by_hand():
    # train counts [2, 1, 0] + 1 = [3, 2, 1] over 6: p = [1/2, 1/3, 1/6]
    got = unigram_loss(np.array([0, 0, 1]), np.array([0, 1, 2]), vocab_size=3)
    assert got == pytest.approx(-(math.log(1 / 2) + math.log(1 / 3) + math.log(1 / 6)) / 3)


class _Uniform:
    """A stand-in language model that predicts the uniform distribution over V tokens: its loss
    is ln V exactly, whatever the data."""

    training = True

    def __init__(self, vocab):
        self.vocab = vocab
        self.calls = []

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def __call__(self, x, y):
        self.calls.append((x.numpy().copy(), self.training))
        logits = F.log_softmax(handgrad.zeros(*x.shape, self.vocab), dim=-1)
        loss = F.cross_entropy(logits.reshape(-1, self.vocab), y.reshape(-1))
        return logits, loss


def test_evaluate_uniform_model_and_fixed_batches():
    model = _Uniform(vocab=10)
    tokens = np.arange(100) % 10
    res = evaluate(model, tokens, batches=3, micro_batch_size=2, block_size=5)
    assert res.loss == pytest.approx(math.log(10), rel=1e-6)
    assert res.perplexity == pytest.approx(10.0, rel=1e-5)
    assert res.bits_per_token == pytest.approx(math.log2(10), rel=1e-6)
    assert res.tokens == 3 * 2 * 5
    assert model.training  # mode restored
    assert all(not training for _, training in model.calls)  # evaluated in eval mode
    starts = [int(x[r, 0]) for x, _ in model.calls for r in range(2)]
    assert starts[0] == 0 and starts[-1] == (100 - 5 - 1) % 10  # first and last window


def test_a_new_run_never_overwrites_an_existing_one(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    rc = main(["train", "quickstart", "--out", str(out)])
    assert rc == 1
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'
