"""Config validation: every bad value is refused up front, with a message that names it."""

from __future__ import annotations

from pathlib import Path

import pytest

from handgrad.train.config import (
    SHIPPED_DIR,
    ConfigError,
    from_dict,
    load_config,
    parse_override,
    resolve_model_config,
)

REPO = Path(__file__).resolve().parents[2]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "c.toml"
    path.write_text(text, encoding="utf-8")
    return path


BASE = """
[model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 16
[data]
source = "pydocs"
tokenizer = "char"
[train]
max_steps = 10
micro_batch_size = 4
"""


def test_valid_config_and_defaults(tmp_path):
    cfg = load_config(_write(tmp_path, BASE))
    assert cfg.model.n_embd == 32
    assert cfg.optim.betas == [0.9, 0.95]
    assert cfg.global_batch_size == 4
    assert cfg.name == "c"


def test_unknown_key_named_with_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, BASE + "learning_rate = 0.1\n"))
    msg = str(e.value)
    assert "unknown key 'learning_rate' in [train]" in msg
    assert "micro_batch_size" in msg and "grad_accum_steps" in msg  # the valid keys are listed


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \[trainer\]"):
        load_config(_write(tmp_path, BASE + "[trainer]\nx = 1\n"))


def test_wrong_type(tmp_path):
    with pytest.raises(
        ConfigError, match=r"\[train\] max_steps = '10': expected an integer, got str"
    ):
        load_config(_write(tmp_path, BASE.replace("max_steps = 10", 'max_steps = "10"')))
    with pytest.raises(ConfigError, match=r"\[model\] bias = 1: expected true/false"):
        load_config(_write(tmp_path, BASE), ["model.bias=1"])
    with pytest.raises(ConfigError, match=r"\[optim\] betas = 0.9: expected a list of a number"):
        load_config(_write(tmp_path, BASE), ["optim.betas=0.9"])


def test_integers_accepted_where_numbers_are_expected(tmp_path):
    cfg = load_config(_write(tmp_path, BASE), ["optim.lr=1", "optim.min_lr=0"])
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float)


@pytest.mark.parametrize(
    "override, expected",
    [
        (
            ["train.global_batch_size=30"],
            "global_batch_size = 30 is not divisible by micro_batch_size",
        ),
        (["train.global_batch_size=16"], "set grad_accum_steps = 4"),
        (["train.block_size=32"], "[train] block_size = 32 is above the model's block_size = 16"),
        (
            ["optim.warmup_steps=20", "optim.decay_steps=10"],
            "warmup_steps = 20 is greater than decay_steps = 10",
        ),
        (["optim.lr=0"], "[optim] lr = 0.0: must be > 0"),
        (["optim.lr=-1e-3"], "[optim] lr = -0.001: must be > 0"),
        (["optim.min_lr=1.0"], "min_lr = 1.0: must be in [0, lr"),
        (["optim.betas=[0.9, 1.5]"], "betas = [0.9, 1.5]"),
        (["train.processes=0"], "[train] processes = 0: must be >= 1"),
        (["model.n_head=3"], "[model]: n_embd (32) must be divisible by n_head (3)"),
        (["model.dtype='float16'"], "[model]: dtype must be one of"),
        (["data.tokenizer='bpe'"], "[data] tokenizer = 'bpe'"),
        (["data.val_fraction=0.0"], "needs a validation split"),
        (["train.micro_batch_size=0"], "micro_batch_size = 0: must be >= 1"),
        (["model.preset='gpt5'"], "preset = 'gpt5': unknown"),
    ],
)
def test_impossible_values(tmp_path, override, expected):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, BASE), override)
    assert expected in str(e.value)
    assert str(tmp_path / "c.toml") in str(e.value)  # the file is named


def test_block_size_checked_against_a_preset():
    raw = {
        "model": {"preset": "shakespeare-char"},  # block_size 64
        "data": {"source": "x", "tokenizer": "char"},
        "train": {"block_size": 128},
    }
    with pytest.raises(ConfigError, match="block_size = 128 is above the model's block_size = 64"):
        from_dict(raw)


def test_set_values_are_toml_literals():
    assert parse_override("optim.lr=1e-3") == ("optim", "lr", 1e-3)
    assert parse_override("optim.betas=[0.9, 0.99]") == ("optim", "betas", [0.9, 0.99])
    assert parse_override("model.bias=false") == ("model", "bias", False)
    assert parse_override('data.source="a b.txt"') == ("data", "source", "a b.txt")
    assert parse_override("data.tokenizer=train:512") == ("data", "tokenizer", "train:512")
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("lr=3")
    with pytest.raises(ConfigError, match="expected section.key=value"):
        parse_override("optim.lr")


def test_set_unknown_section_or_key():
    with pytest.raises(ConfigError, match=r"unknown section \[optimizer\]"):
        load_config("quickstart", ["optimizer.lr=1"])
    with pytest.raises(ConfigError, match="unknown key 'learning_rate' in \\[optim\\]"):
        load_config("quickstart", ["optim.learning_rate=1"])


def test_unknown_config_name_lists_shipped_ones():
    with pytest.raises(ConfigError, match="quickstart"):
        load_config("no-such-config")


def test_shipped_configs_load_and_repo_paths_resolve_to_them(monkeypatch):
    names = sorted(p.stem for p in SHIPPED_DIR.glob("*.toml"))
    assert names == [
        "finetune-shakespeare",
        "gpt2-124m-owt",
        "llama-124m",
        "quickstart",
        "shakespeare-char",
    ]
    # configs/ at the repository root is a link to the shipped directory, not a copy.
    assert (REPO / "configs").is_symlink()
    assert (REPO / "configs").resolve() == SHIPPED_DIR
    monkeypatch.chdir(REPO)
    for name in names:
        shipped = load_config(name)
        by_path = load_config(f"configs/{name}.toml")
        assert Path(f"configs/{name}.toml").resolve() == SHIPPED_DIR / f"{name}.toml"
        assert by_path.name == shipped.name == name
        assert by_path.to_dict() == shipped.to_dict()


def test_shipped_schedules_follow_max_steps():
    # --set train.max_steps=N moves the end of the cosine with it
    for name in ("quickstart", "shakespeare-char", "gpt2-124m-owt"):
        cfg = load_config(name, ["train.max_steps=1234"])
        assert cfg.optim.decay_steps is None and cfg.decay_steps == 1234, name


def test_finetune_shakespeare_is_nanogpts_recipe():
    cfg = load_config("finetune-shakespeare")
    t, o = cfg.train, cfg.optim
    assert t.init_from == "runs/gpt2" and cfg.data.tokenizer is None  # the checkpoint's
    assert (t.micro_batch_size, t.grad_accum_steps, t.block_size, t.max_steps) == (1, 32, 1024, 20)
    assert o.lr == o.min_lr == 3e-5 and o.warmup_steps == 0  # constant, as decay_lr = False
    assert all(getattr(cfg.model, k) is None for k in ("n_layer", "n_embd", "preset"))


def test_gpt2_124m_owt_is_the_model_card():
    cfg = load_config("gpt2-124m-owt")
    m = resolve_model_config(cfg.model, 50257)
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (12, 12, 768, 1024)
    assert (m.vocab_size, m.padded_vocab_size, m.dtype, m.dropout) == (
        50257,
        50304,
        "bfloat16",
        0.0,
    )
    o, t = cfg.optim, cfg.train
    assert (o.lr, o.min_lr, o.betas, o.weight_decay, o.grad_clip) == (
        6e-4,
        1e-4,
        [0.9, 0.95],
        0.1,
        1.0,
    )
    assert (o.warmup_steps, cfg.decay_steps) == (1000, 600_000)
    assert (t.micro_batch_size, t.grad_accum_steps, t.block_size) == (60, 8, 1024)
    assert cfg.global_batch_size * t.block_size == 491_520
    assert cfg.eval.batches == 100
    assert cfg.data.tokenizer == "train:50257"


def test_vocab_size_from_data_unless_set():
    cfg = load_config("shakespeare-char")
    assert resolve_model_config(cfg.model, 65).vocab_size == 65
    assert resolve_model_config(cfg.model, 65).padded_vocab_size == 128
    cfg = load_config("shakespeare-char", ["model.vocab_size=100"])
    assert resolve_model_config(cfg.model, 65).vocab_size == 100


def test_shakespeare_char_is_nanogpts_cpu_recipe():
    cfg = load_config("shakespeare-char")
    m = resolve_model_config(cfg.model, 65)
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout, m.bias) == (
        4, 4, 128, 64, 0.0, False,
    )  # fmt: skip
    o, t = cfg.optim, cfg.train
    assert (o.lr, o.min_lr, o.betas, o.weight_decay, o.grad_clip) == (
        1e-3, 1e-4, [0.9, 0.99], 0.1, 1.0,
    )  # fmt: skip
    assert (o.warmup_steps, cfg.decay_steps, t.max_steps) == (100, 2000, 2000)
    # nanoGPT's batch of 12, here split over 2 processes
    assert cfg.global_batch_size == 12 and t.grad_accum_steps == 1
    assert (cfg.eval.interval, cfg.eval.batches, cfg.data.val_fraction) == (250, 20, 0.1)


def test_a_set_mistake_names_the_set(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config("shakespeare-char", ["optim.lr=-1"])
    assert "shakespeare-char.toml with --set optim.lr=-1" in str(err.value)
    assert "[optim] lr = -1" in str(err.value)
