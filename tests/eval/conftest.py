"""Shared fixtures for tests/eval: a tiny BPE tokenizer, a tiny random GPT-2 saved as a
handgrad checkpoint, the same weights exported to Hugging Face format, and local fixture data
in every zero-shot task's format. Session-scoped: building them (and importing lm-eval and
transformers) is the slow part."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

# Everything these tests read is local; never wait on the Hugging Face hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps in the sun.",
    "Once upon a time there was a little girl who lived in a village near the forest.",
    "She went to the market with her mother, and they bought apples, bread and milk.",
    "The king said to the queen that the castle was cold, so they lit a great fire.",
    "Tom and Mary walked along the river. Mary saw a boat; Tom saw a bird in the tree.",
    "It was a dark and stormy night; the rain fell in torrents, except at occasional "
    "intervals, when it was checked by a violent gust of wind.",
    " = Valkyria Chronicles = \n Senjo no Valkyria 3 : Unrecorded Chronicles is a game .",
]


def write_checkpoint(run_dir: Path, model, tokenizer, step: int = 1, extra: dict | None = None):
    """A run directory as the trainer lays it out: latest -> checkpoints/step_N."""
    from handgrad.serialization import save_file

    name = f"checkpoints/step_{step:07d}"
    ckpt = run_dir / name
    ckpt.mkdir(parents=True, exist_ok=True)
    save_file({k: v.data for k, v in model.state_dict().items()}, ckpt / "model.safetensors")
    config = {"model": model.config.to_dict(), **(extra or {})}
    (ckpt / "config.json").write_text(json.dumps(config))
    tokenizer.save(ckpt / "tokenizer.json")
    (run_dir / "latest").write_text(name + "\n")
    return ckpt


def random_gpt2(vocab_size: int, seed: int = 0, block_size: int = 32, scale: float = 0.4):
    """A tiny GPT-2 with large random weights, so its next-token distributions are far from
    uniform (near-ties would make argmax-based checks depend on rounding)."""
    from handgrad.models.gpt2 import GPT2, GPT2Config

    config = GPT2Config(
        n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab_size
    )
    model = GPT2(config)
    rng = np.random.default_rng(seed)
    for name, p in model.named_parameters():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            p.data[...] = 1.0 + 0.1 * rng.standard_normal(p.shape)
        else:
            p.data[...] = scale * rng.standard_normal(p.shape)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tokenizer():
    from handgrad.tokenizer import BPETokenizer

    return BPETokenizer.train(CORPUS, vocab_size=256 + 60 + 1)


def fit(model, tokenizer, texts: list[str], steps: int = 200, seed: int = 0):
    """A few AdamW steps on ``texts`` so the model knows them: the fixture tasks then have
    accuracies between 0 and 1 instead of a random model's 0."""
    from handgrad.optim import AdamW
    from handgrad.tensor import Tensor

    eot = tokenizer.eot_token
    stream = []
    for t in texts:
        stream += [eot] + tokenizer.encode(t)
    stream = np.asarray(stream, dtype=np.int64)
    T = model.config.block_size
    rng = np.random.default_rng(seed)
    opt = AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        starts = rng.integers(0, len(stream) - T - 1, size=8)
        x = np.stack([stream[s : s + T] for s in starts])
        y = np.stack([stream[s + 1 : s + T + 1] for s in starts])
        _, loss = model(Tensor._make(x), Tensor._make(y))
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    return model


def training_texts() -> list[str]:
    cbt = [
        " ".join(d["sentences"]) + " " + d["question"].replace("XXXXX", d["answer"]) for d in CBT
    ]
    return CORPUS + LAMBADA[:2] + PTB + cbt[:2]


@pytest.fixture(scope="session")
def model(tokenizer):
    from handgrad.random import manual_seed

    manual_seed(0)
    m = random_gpt2(tokenizer.vocab_size, scale=0.1)
    return fit(m, tokenizer, training_texts())


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, model, tokenizer) -> Path:
    run = tmp_path_factory.mktemp("run")
    write_checkpoint(run, model, tokenizer)
    return run


@pytest.fixture(scope="session")
def hf_dir(tmp_path_factory, run_dir) -> Path:
    from handgrad.eval.hf import export_hf

    out = tmp_path_factory.mktemp("export") / "hf"
    export_hf(run_dir, out)
    return out


# ---- local data in each task's format (the hub datasets' fields)

WIKI_PAGES = [
    " = Valkyria Chronicles III = \n \n Senjo no Valkyria 3 : Unrecorded Chronicles is a "
    "tactical role @-@ playing video game . The game began development in 2010 , carrying "
    "over a large portion of the work done on Valkyria Chronicles II . \n",
    " = Tower Building = \n \n The Tower Building of the Little Rock Arsenal , also known as "
    "U.S. Arsenal Building , is a building located in MacArthur Park in downtown Little Rock "
    ", Arkansas . It was built in 1840 . \n",
]
LAMBADA = [
    "the girl walked to the market with her mother and they bought bread and milk",
    "tom and mary walked along the river and mary saw a boat near the tree",
    "the king said to the queen that the castle was cold so they lit a fire",
]
PTB = [
    "the dog said it was n't cold in the village",
    "mary 's mother bought N apples for $ N",
    "the king lit a great fire",
]
LM1B = [
    "The king said to the queen that the castle was cold .",
    "Tom walked along the river , and Mary saw a boat .",
]
CBT_OPTIONS = ["boat", "bird", "tree", "river", "king", "queen", "castle", "fire", "dog", "sun"]
CBT = [
    {
        "sentences": [
            "Tom and Mary walked along the river .",
            "Mary saw a boat on the water .",
            "Tom saw a bird in the tree .",
        ],
        "question": "Then Mary said that the XXXXX was red .",
        "answer": "boat",
        "options": CBT_OPTIONS,
    },
    {
        "sentences": [
            "The king said to the queen that the castle was cold .",
            "So they lit a fire .",
        ],
        "question": "XXXXX was warm at last .",
        "answer": "castle",
        "options": CBT_OPTIONS,
    },
    {
        "sentences": ["The dog sleeps in the sun .", "The bird sings ."],
        "question": "The XXXXX is happy .",
        "answer": "dog",
        "options": CBT_OPTIONS,
    },
]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("taskdata")
    pages = [{"page": p} for p in WIKI_PAGES]
    _write_jsonl(root / "hg_wikitext103" / "test.jsonl", pages)
    _write_jsonl(root / "hg_wikitext2" / "test.jsonl", pages[:1])
    _write_jsonl(root / "lambada_openai" / "test.jsonl", [{"text": t} for t in LAMBADA])
    _write_jsonl(root / "hg_ptb" / "test.jsonl", [{"sentence": s} for s in PTB])
    _write_jsonl(root / "hg_lm1b" / "test.jsonl", [{"text": s} for s in LM1B])
    _write_jsonl(
        root / "hg_enwik8" / "test.jsonl", [{"text": line} for line in WIKI_PAGES[0].split("\n")]
    )
    _write_jsonl(
        root / "hg_text8" / "test.jsonl", [{"text": " the king lit a great fire and the dog slept"}]
    )
    _write_jsonl(root / "hg_cbt_cn" / "test.jsonl", CBT)
    _write_jsonl(root / "hg_cbt_ne" / "test.jsonl", CBT[::-1])
    return root


@pytest.fixture(scope="session")
def write_ckpt():
    """``write_checkpoint`` for tests (conftest modules are not importable under importlib)."""
    return write_checkpoint


@pytest.fixture(scope="session")
def docs():
    """The fixture documents written into ``task_data``, for hand computations."""
    import types

    return types.SimpleNamespace(
        WIKI_PAGES=WIKI_PAGES, LAMBADA=LAMBADA, PTB=PTB, LM1B=LM1B, CBT=CBT
    )
