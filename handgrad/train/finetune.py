"""Starting a run from a trained model: ``[train] init_from = "PATH"`` (fine-tuning).

PATH is anything that holds a trained GPT-2: a run directory, a checkpoint directory, the
output of ``handgrad import hf``, or a Hugging Face GPT-2 directory (``config.json`` with
``model_type`` and ``model.safetensors``), which is imported once into
``$HANDGRAD_CACHE/imported/`` and reused. What a fine-tune takes from it and what is new:

    from PATH     the weights, the model's shape, the tokenizer
    new           the optimizer (fresh AdamW), the schedule, the step count, the data

The data must be tokenized as the model was trained: a ``[data]`` section that names no
tokenizer takes PATH's, and one that names the same tokenizer in any form (its JSON file, a
Hugging Face directory, a checkpoint or prepared directory) trains too; another is refused.
A ``[model]`` section may be left out; a field it sets must agree with PATH's model, except
``dropout``, which a fine-tune may change (nanoGPT's recipe raises it for small data).

``--resume`` of a fine-tuned run continues it exactly, as any run: the weights then come from
the run's own checkpoint, and PATH is not read again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from handgrad.checkpoint import CheckpointError, read_config, resolve_checkpoint
from handgrad.data.sources.base import cache_dir
from handgrad.models import config_from_dict, model_from_checkpoint
from handgrad.models.gpt2 import GPT2, GPT2Config
from handgrad.tokenizer import load_tokenizer
from handgrad.train.config import ConfigError, TrainConfig, resolve_model_config

__all__ = ["Start", "init_checkpoint", "load_init_weights", "start_from"]

_CHANGEABLE = ("dropout",)
# weights with one row per token: GPT-2's and Llama's embeddings, an untied output layer
_VOCAB_ROWS = (
    "wte.weight",
    "embed_tokens.weight",
    "lm_head.weight",
)  # GPT2Config fields a fine-tune may set differently


@dataclasses.dataclass
class Start:
    """What a run started from a trained model takes from it."""

    checkpoint: Path  # the checkpoint directory its weights come from
    model: GPT2Config  # its shape, with the config's dropout
    data: Any  # the [data] section, naming the checkpoint's tokenizer file


def _is_hf_dir(path: Path) -> bool:
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        d = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(d, dict) and "model_type" in d and "model" not in d


def init_checkpoint(spec: str) -> Path:
    """The checkpoint directory ``[train] init_from`` names; a Hugging Face directory is
    imported first (once: the import is cached by the source's path, sizes and times)."""
    path = Path(spec).expanduser()
    if not path.exists():
        raise ConfigError(f"[train] init_from = {spec!r}: no such file or directory")
    if not _is_hf_dir(path):
        try:
            return resolve_checkpoint(path)
        except CheckpointError as err:
            raise ConfigError(f"[train] init_from = {spec!r}: {err}") from None
    from handgrad.eval.hf import import_hf  # the same conversion as ``handgrad import hf``

    ident = [str(path.resolve())] + [
        [f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(path.iterdir())
    ]
    digest = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:12]
    out = cache_dir() / "imported" / f"{path.name[:40]}-{digest}"
    if not (out / "latest").is_file():
        try:
            import_hf(path, out)
        except (ValueError, FileNotFoundError) as err:
            raise ConfigError(f"[train] init_from = {spec!r}: {err}") from None
    return resolve_checkpoint(out)


def _check_model(section: Any, saved: GPT2Config, where: Path) -> GPT2Config:
    """``saved`` with the section's dropout; a section field that differs is refused."""
    given = {
        f.name: getattr(section, f.name)
        for f in dataclasses.fields(section)
        if f.name != "preset" and getattr(section, f.name) is not None
    }
    if section.preset is not None:  # the preset's shape, for the checkpoint's vocabulary
        preset = resolve_model_config(section, saved.vocab_size).to_dict()
        given = {**{k: v for k, v in preset.items() if k not in _CHANGEABLE}, **given}
    mine = {"arch": saved.arch, **saved.to_dict()}
    diffs = [
        f"[model] {k} = {v!r}, but the model in {where} has {k} = {mine[k]!r}"
        for k, v in given.items()
        if k not in _CHANGEABLE and v != mine.get(k)
    ]
    if diffs:
        raise ConfigError(
            "a model started from a checkpoint keeps its shape (only "
            f"{', '.join(_CHANGEABLE)} may change; remove the other [model] keys):\n  "
            + "\n  ".join(diffs)
        )
    return dataclasses.replace(saved, **{k: given[k] for k in _CHANGEABLE if k in given})


def _check_tokenizer(data: Any, tokenizer_file: Path, where: Path) -> tuple[Any, int]:
    """The ``[data]`` section with the checkpoint's tokenizer and the data's vocabulary size,
    or ConfigError when it names another tokenizer. One that only adds special tokens after
    the checkpoint's last id (as chat data does) is the same tokenizer, grown."""
    named = data.tokenizer
    source_prepared = (Path(data.source).expanduser() / "meta.json").is_file()
    if named is None and source_prepared:
        named, prepared = str(Path(data.source).expanduser()), True
    else:
        prepared = False
    ours = load_tokenizer(tokenizer_file)
    if named is None:
        return dataclasses.replace(data, tokenizer=str(tokenizer_file)), ours.vocab_size
    what = "the prepared data" if prepared else f"[data] tokenizer = {named!r}"
    if named == "char" or named.startswith("train:"):
        raise ConfigError(
            f"{what}: a model started from {where} reads the ids of its own tokenizer "
            f"({tokenizer_file}), not those of a new one; remove [data] tokenizer to use it"
        )
    try:
        theirs = load_tokenizer(Path(named).expanduser())
    except (ValueError, OSError) as err:
        raise ConfigError(f"{what}: {err}") from None
    if not _extends(theirs.to_dict(), ours.to_dict()):
        sizes = f"{theirs.vocab_size} tokens there, {ours.vocab_size} in the model's"
        raise ConfigError(
            f"{what} is another tokenizer than the one the model in {where} was trained with "
            f"({tokenizer_file}; {sizes}): its ids would mean other text to the model; remove "
            "[data] tokenizer to tokenize the data with the model's own"
        )
    if prepared:
        return data, theirs.vocab_size
    return dataclasses.replace(data, tokenizer=str(tokenizer_file)), ours.vocab_size


def _extends(theirs: dict[str, Any], ours: dict[str, Any]) -> bool:
    """Whether tokenizer document ``theirs`` is ``ours`` with special tokens added after
    ``ours``' last id (or the very same)."""
    if theirs == ours:
        return True
    if "special_tokens" not in theirs or "special_tokens" not in ours:  # character tokenizers
        return False
    specials, mine = theirs["special_tokens"], ours["special_tokens"]
    added = {k: v for k, v in specials.items() if k not in mine}
    same_rest = all(
        theirs[k] == ours[k] for k in theirs if k not in ("special_tokens", "vocab_size")
    )
    return (
        same_rest
        and all(specials.get(k) == v for k, v in mine.items())
        and sorted(added.values()) == list(range(ours["vocab_size"], theirs["vocab_size"]))
    )


def start_from(cfg: TrainConfig, resume_dir: Path | None = None) -> Start:
    """What a run with ``[train] init_from`` starts from. When resuming, the tokenizer is
    the resumed checkpoint's (a copy of the same file) and the model's shape its own, so the
    original PATH need not exist any more."""
    where = resume_dir if resume_dir is not None else init_checkpoint(cfg.train.init_from)
    try:
        saved = config_from_dict(read_config(where)["model"])
    except (TypeError, ValueError, KeyError) as err:
        raise CheckpointError(f"{where / 'config.json'}: bad model section: {err}") from None
    tokenizer_file = where / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CheckpointError(f"{tokenizer_file}: missing (the checkpoint has no tokenizer)")
    data, vocab_size = _check_tokenizer(cfg.data, tokenizer_file, where)
    model = _check_model(cfg.model, saved, where)
    if vocab_size > model.vocab_size:  # special tokens added: the embedding grows
        padded = max(model.padded_vocab_size, -(-vocab_size // 64) * 64)
        model = dataclasses.replace(model, vocab_size=vocab_size, padded_vocab_size=padded)
    if cfg.train.block_size is not None and cfg.train.block_size > model.block_size:
        raise ConfigError(
            f"[train] block_size = {cfg.train.block_size} is above the model's block_size = "
            f"{model.block_size} (of {where})"
        )
    return Start(where, model, data)


def load_init_weights(model: GPT2, checkpoint: Path) -> None:
    """The weights of ``checkpoint`` (verified against its manifest) into ``model``. When
    the model's vocabulary is larger (special tokens added), the new rows of the token
    embedding (and of an untied output layer) start as the mean of the trained rows: a new
    token's first logits are then the average token's, and its gradient moves it from there."""
    state = model_from_checkpoint(checkpoint).state_dict()
    old_vocab = int(read_config(checkpoint)["model"]["vocab_size"])
    new_vocab = model.config.vocab_size
    if new_vocab > old_vocab:
        mine = model.state_dict()
        for key, tensor in state.items():
            if not key.endswith(_VOCAB_ROWS):
                continue
            target = mine[key]
            trained = tensor.numpy()[:old_vocab]  # rows of the vocabulary (padding after)
            grown = target.numpy().copy()
            grown[:old_vocab] = trained
            grown[old_vocab:new_vocab] = trained.mean(axis=0, dtype=np.float64)
            state[key] = grown
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"{checkpoint / 'model.safetensors'}: {err}") from None
