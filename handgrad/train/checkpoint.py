"""Saving and loading training checkpoints: one directory per saved step, published
atomically, safetensors + JSON only. The layout and finding a checkpoint are
``handgrad.checkpoint``'s; this module writes, prunes and reads what resuming needs.

A checkpoint directory ``<run>/checkpoints/step_0002000/`` holds::

    model.safetensors                 weights in their stored dtype (bf16 stays bf16)
    optimizer.safetensors             AdamW moments and fp32 master weights; the rest of the
                                      optimizer state (step counts, groups) is JSON in the
                                      file's metadata under "optimizer"
    config.json                       the full resolved config; "model" = GPT2Config.to_dict()
    trainer_state.json                step, tokens seen, RNG states, best val loss, version
    tokenizer.json                    a copy of the tokenizer the data was made with

Publishing: every file is written into ``checkpoints/.tmp-step_...`` which is then renamed to
its final name (one atomic rename of a complete directory), and only then ``latest`` is
replaced (atomically, ``handgrad.fileio``). A crash or a full disk at any point leaves
``latest`` naming the previous complete checkpoint. Older checkpoints beyond the newest
``keep`` are deleted afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from handgrad.checkpoint import (
    CHECKPOINTS,
    LATEST,
    CheckpointError,
    list_checkpoints,
    read_config,
    read_json,
    read_latest,
    resolve_checkpoint,
    run_dir_of,
    step_dir_name,
    write_latest,
)
from handgrad.fileio import fsync_dir, write_json_atomic
from handgrad.optim import flatten_state_dict, unflatten_state_dict
from handgrad.serialization import SafetensorsError, load_file, load_metadata, save_file

FORMAT_VERSION = 1
FILES = (
    "model.safetensors",
    "optimizer.safetensors",
    "config.json",
    "trainer_state.json",
    "tokenizer.json",
)

__all__ = [
    "CHECKPOINTS",
    "FILES",
    "FORMAT_VERSION",
    "LATEST",
    "Checkpoint",
    "CheckpointError",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "read_latest",
    "resolve_checkpoint",
    "run_dir_of",
    "save_checkpoint",
    "step_dir_name",
    "write_latest",
]


# ----------------------------------------------------------------------------------------
# writing


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model: Any,
    optimizer: Any,
    config: dict[str, Any],
    trainer_state: dict[str, Any],
    tokenizer_path: str | os.PathLike,
    keep: int,
) -> Path:
    """Write the checkpoint of ``step`` under ``run_dir``, publish it as latest, keep the
    newest ``keep``. Returns the checkpoint directory."""
    run_dir = Path(run_dir)
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = step_dir_name(step)
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        # model.state_dict() shares the parameters' arrays: no copy, no dtype conversion.
        weights = {k: t.data for k, t in model.state_dict().items()}
        save_file(weights, tmp / "model.safetensors", metadata={"step": str(step)})
        arrays, rest = flatten_state_dict(optimizer.state_dict())
        save_file(arrays, tmp / "optimizer.safetensors", metadata={"optimizer": json.dumps(rest)})
        write_json_atomic(tmp / "config.json", config)
        write_json_atomic(
            tmp / "trainer_state.json", {"format_version": FORMAT_VERSION, **trainer_state}
        )
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. a rerun): replace it whole
            old = root / f".old-{name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_latest(run_dir, f"{CHECKPOINTS}/{name}")
    prune_checkpoints(run_dir, keep)
    return final


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints (never the one ``latest`` names), and
    leftovers of interrupted saves."""
    run_dir = Path(run_dir)
    latest = read_latest(run_dir)
    ckpts = list_checkpoints(run_dir)
    for _, path in ckpts[: max(len(ckpts) - keep, 0)]:
        if latest is None or path.resolve() != latest.resolve():
            shutil.rmtree(path, ignore_errors=True)
    for p in (run_dir / CHECKPOINTS).glob(".tmp-step_*"):
        if not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


# ----------------------------------------------------------------------------------------
# reading


@dataclass
class Checkpoint:
    """A checkpoint read and checked for completeness (not yet against a model)."""

    path: Path
    config: dict[str, Any]
    trainer_state: dict[str, Any]
    model: dict[str, np.ndarray]
    optimizer: dict[str, Any]

    @property
    def tokenizer_path(self) -> Path:
        return self.path / "tokenizer.json"


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read every file of a checkpoint; refuse a missing file, invalid JSON or safetensors,
    another format version or an incomplete trainer state."""
    ckpt = resolve_checkpoint(path)
    missing = [f for f in FILES if not (ckpt / f).is_file()]
    if missing:
        raise CheckpointError(f"{ckpt}: incomplete checkpoint, missing {', '.join(missing)}")
    config = read_config(ckpt)
    state = read_json(ckpt / "trainer_state.json")
    if not isinstance(state, dict):
        raise CheckpointError(f"{ckpt / 'trainer_state.json'}: not a JSON object")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{ckpt / 'trainer_state.json'}: format_version {state.get('format_version')!r}, "
            f"this handgrad reads {FORMAT_VERSION}"
        )
    needed = ("step", "tokens_seen", "rng_state", "data_rng_state")
    absent = [k for k in needed if k not in state]
    if absent:
        raise CheckpointError(f"{ckpt / 'trainer_state.json'}: missing {', '.join(absent)}")
    try:
        weights = load_file(ckpt / "model.safetensors")
        opt_arrays = load_file(ckpt / "optimizer.safetensors")
        opt_meta = load_metadata(ckpt / "optimizer.safetensors")
    except SafetensorsError as e:
        raise CheckpointError(str(e)) from None
    try:
        optimizer = unflatten_state_dict(opt_arrays, json.loads(opt_meta["optimizer"]))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(
            f"{ckpt / 'optimizer.safetensors'}: bad optimizer metadata ({e})"
        ) from None
    return Checkpoint(ckpt, config, state, weights, optimizer)
