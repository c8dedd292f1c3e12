"""Finding and reading a checkpoint: the directory layout every evaluation command shares.

A training run directory holds ``latest`` (a text file naming ``checkpoints/step_XXXXXXX``)
and the checkpoints; a checkpoint directory holds ``model.safetensors``, ``config.json``
(sections model/data/optim/train/eval; "model" is a ``GPT2Config.to_dict()``),
``tokenizer.json`` and, from the trainer, ``trainer_state.json`` and ``optimizer.safetensors``.
Every command accepts either directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# the trainer owns the checkpoint layout; evaluation re-exports its resolver
from handgrad.train.checkpoint import resolve_checkpoint as resolve_checkpoint


def run_directory(path: str | os.PathLike) -> Path:
    """The run directory of ``path``: the directory with ``latest``/``metrics.jsonl`` that a
    checkpoint ``<run>/checkpoints/step_N`` belongs to (``path`` itself if it is one)."""
    path = Path(path).resolve()
    for candidate in (path, *path.parents[:3]):
        if (candidate / "latest").is_file() or (candidate / "metrics.jsonl").is_file():
            return candidate
    return path


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None


def read_config(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """config.json of a checkpoint, checked to have a "model" section."""
    path = Path(checkpoint_dir) / "config.json"
    config = read_json(path)
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise ValueError(f'{path}: has no "model" section')
    return config


def load_model(checkpoint_dir: str | os.PathLike):  # -> GPT2
    """The GPT-2 of a checkpoint directory, in eval mode."""
    from handgrad.models.gpt2 import GPT2

    model = GPT2.from_checkpoint(checkpoint_dir)
    model.eval()
    return model


def load_checkpoint_tokenizer(checkpoint_dir: str | os.PathLike):
    """The tokenizer saved with a checkpoint (``tokenizer.json``, a handgrad tokenizer file)."""
    from handgrad.tokenizer import load_tokenizer

    path = Path(checkpoint_dir) / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (a checkpoint carries its tokenizer)")
    return load_tokenizer(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary sibling, then rename it over ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
