"""The checkpoint layout every command shares: finding a checkpoint, following ``latest``, the
run a checkpoint belongs to, and whether a checkpoint's model fits the one wanted.

A run directory::

    <run>/latest                          text: "checkpoints/step_0002000" (the newest complete one)
    <run>/metrics.jsonl, <run>/loss.png   the training log
    <run>/checkpoints/step_0002000/       a checkpoint directory:
        model.safetensors                 weights in their stored dtype
        config.json                       the full resolved config; "model" = GPT2Config.to_dict()
        tokenizer.json                    the tokenizer the data was made with
        trainer_state.json, optimizer.safetensors   (from the trainer; what resuming needs)

Every ``--checkpoint`` (and ``train --resume``) accepts a run directory, a checkpoint directory
or the run's ``latest`` file, and goes through ``resolve_checkpoint``. Writing checkpoints is
the trainer's (``handgrad.train.checkpointing``); this module only knows the layout.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from handgrad.fileio import fsync_dir, write_text_atomic

CHECKPOINTS = "checkpoints"
LATEST = "latest"
METRICS = "metrics.jsonl"
_STEP_DIR = re.compile(r"^step_(\d+)$")

# Model config fields (GPT2Config's, LlamaConfig's) that fix the shapes (and storage) of the
# weights: a checkpoint can only be loaded into a model that agrees on all of them. dropout may
# change between runs. A section without "arch" is GPT-2's.
SHAPE_FIELDS = ("arch", "n_layer", "n_head", "n_embd", "block_size", "vocab_size",
                "padded_vocab_size", "bias", "dtype", "n_kv_head", "intermediate_size",
                "tie_embeddings")  # fmt: skip
_FIELD_DEFAULTS = {"arch": "gpt2"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No checkpoint where one was named: a missing directory or a ``latest`` naming nothing."""


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / "model.safetensors").is_file() or (path / "trainer_state.json").is_file()


# ----------------------------------------------------------------------------------------
# latest


def read_latest(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint directory ``<run_dir>/latest`` names, or None without a latest file."""
    run_dir = Path(run_dir)
    path = run_dir / LATEST
    if not path.is_file():
        return None
    target = path.read_text(encoding="utf-8").strip()
    checkpoint = run_dir / target
    if not target or not checkpoint.is_dir():
        raise CheckpointNotFoundError(
            f"{path} names {target!r}, which is not a directory in {run_dir}"
        )
    return checkpoint


def write_latest(run_dir: str | os.PathLike, target: str | os.PathLike) -> None:
    """Point ``<run_dir>/latest`` at ``target`` (a path relative to ``run_dir``), atomically."""
    run_dir = Path(run_dir)
    write_text_atomic(run_dir / LATEST, Path(target).as_posix() + "\n")
    fsync_dir(run_dir)


def latest_text(run_dir: str | os.PathLike) -> str:
    """What ``latest`` names, for messages: the path, or "none saved yet"."""
    run_dir = Path(run_dir)
    try:
        target = (run_dir / LATEST).read_text(encoding="utf-8").strip()
    except OSError:
        return "none saved yet"
    return str(run_dir / target)


# ----------------------------------------------------------------------------------------
# finding a checkpoint and its run


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint directory that ``path`` means: a run directory (its ``latest``), the
    run's ``latest`` file itself, or a checkpoint directory.

    Raises CheckpointNotFoundError (a CheckpointError and a FileNotFoundError) for a missing
    path, a ``latest`` naming nothing or a directory that is neither; CheckpointError for a
    file other than ``latest``."""
    path = Path(path)
    if path.is_file():
        if path.name == LATEST:
            return read_latest(path.parent)  # type: ignore[return-value]  # the file exists
        raise CheckpointError(
            f"{path} is a file; expected a checkpoint directory, a run directory or a run's "
            f"'{LATEST}' file"
        )
    if not path.is_dir():
        raise CheckpointNotFoundError(
            f"{path}: no such directory ({path.name!r} is not a directory nor a run's "
            f"'{LATEST}' file)"
        )
    latest = read_latest(path)
    if latest is not None:
        return latest
    if is_checkpoint_dir(path):
        return path
    raise CheckpointNotFoundError(
        f"{path}: not a checkpoint ({path / 'model.safetensors'} does not exist) nor a run "
        f"directory (no '{LATEST}' file)"
    )


def run_dir_of(path: str | os.PathLike) -> Path:
    """The run directory of ``path`` (a run directory, its ``latest`` file or a checkpoint
    directory): the one with ``latest``/``metrics.jsonl`` above ``checkpoints/step_N``, or
    ``path`` itself for a checkpoint that belongs to no run."""
    path = Path(path).resolve()
    if path.name == LATEST and path.is_file():
        return path.parent
    if path.parent.name == CHECKPOINTS and _STEP_DIR.match(path.name):
        return path.parent.parent
    for candidate in (path, *path.parents[:3]):
        if (candidate / LATEST).is_file() or (candidate / METRICS).is_file():
            return candidate
    return path


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Checkpoint directories of a run, oldest first, as (step, path)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


# ----------------------------------------------------------------------------------------
# reading a checkpoint's files


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not UTF-8 text") from None


def read_config(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """config.json of a checkpoint directory, checked to have a "model" section."""
    path = Path(checkpoint_dir) / "config.json"
    config = read_json(path)
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f'{path}: has no "model" section')
    return config


def check_same_model(
    saved: Mapping[str, Any], wanted: Mapping[str, Any], where: str | os.PathLike
) -> None:
    """Refuse a checkpoint whose model (the config's ``to_dict()`` of ``saved``) differs from
    ``wanted`` in a field that fixes the weights' shapes or dtype (``SHAPE_FIELDS``)."""
    saved, wanted = {**_FIELD_DEFAULTS, **saved}, {**_FIELD_DEFAULTS, **wanted}
    diffs = [
        f"{k}: {saved.get(k)!r} in the checkpoint, {wanted.get(k)!r} in the config"
        for k in SHAPE_FIELDS
        if saved.get(k) != wanted.get(k)
    ]
    if diffs:
        raise CheckpointError(
            f"{where}: the checkpoint's model does not match the config's:\n  " + "\n  ".join(diffs)
        )
