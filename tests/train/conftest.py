"""Fixtures of the training tests: a small prepared character-level corpus and tiny configs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from handgrad.data import prepare

TEXT = (
    "The quick brown fox jumps over the lazy dog. A stitch in time saves nine.\n"
    "To be, or not to be, that is the question: whether 'tis nobler in the mind.\n"
    "All that glitters is not gold; all who wander are not lost.\n"
) * 40


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A prepared directory (char tokenizer, 90/10 split) shared by the whole module."""
    root = tmp_path_factory.mktemp("train_data")
    text = root / "corpus.txt"
    text.write_text(TEXT, encoding="utf-8")
    out = root / "prepared"
    prepare(str(text), "char", out, val_fraction=0.1, workers=1, progress=False)
    return out


TINY = {
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 16, "dropout": 0.0},
    "data": {},
    "optim": {"lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "decay_steps": 8},
    "train": {
        "max_steps": 6,
        "micro_batch_size": 4,
        "grad_accum_steps": 1,
        "seed": 7,
        "log_interval": 1,
        "checkpoint_interval": 0,
        "keep_checkpoints": 3,
        "sample_tokens": 8,
        # float32 on every device, so that a GPU run can equal the CPU's to the last bits
        "autocast": "none",
    },
    "eval": {"interval": 3, "batches": 2},
}


@pytest.fixture
def tiny(data_dir):
    """A function returning a tiny config dict (sections) with overrides {section: {k: v}}."""

    def make(**sections):
        cfg = copy.deepcopy(TINY)
        cfg["data"]["source"] = str(data_dir)
        for name, values in sections.items():
            cfg[name].update(values)
        return cfg

    return make
