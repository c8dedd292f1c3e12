"""Saving and loading training checkpoints: one directory per saved step, published
atomically, safetensors + JSON only. The layout and finding a checkpoint are
``handgrad.checkpoint``'s; this module writes, prunes and reads what resuming needs.

A checkpoint directory ``<run>/checkpoints/step_0002000/`` holds::

    <run>/latest                          text: "checkpoints/step_0002000" (the newest complete one)
    <run>/checkpoints/step_0002000/
        model.safetensors                 weights in their stored dtype (bf16 stays bf16)
        optimizer.safetensors             AdamW moments and fp32 master weights; the rest of the
                                          optimizer state (step counts, groups) is JSON in the
                                          file's metadata under "optimizer"
        config.json                       the full resolved config; "model" = GPT2Config.to_dict()
        trainer_state.json                step, tokens seen, RNG states, best val loss, version
        tokenizer.json                    a copy of the tokenizer the data was made with
        manifest.json                     size and sha256 of each file above, written last;
                                          loading refuses a file that does not match

Publishing: every file is written into ``checkpoints/.tmp-step_...`` which is then renamed to
its final name (one atomic rename of a complete directory), and only then ``latest`` is
replaced (atomically, ``handgrad.fileio``). A crash or a full disk at any point leaves
``latest`` naming the previous complete checkpoint. Older checkpoints beyond the newest
``keep`` are deleted afterwards. A checkpoint that does not fit on the disk raises
DiskFullError (checked before writing, and on ENOSPC while writing) and leaves no trace.
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
    step_dir_name,
    write_latest,
)
from handgrad.diskspace import check_free_space, raise_if_disk_full
from handgrad.fileio import atomic_dir, write_json_atomic
from handgrad.manifest import MANIFEST_FILE, ManifestError, verify_manifest, write_manifest
from handgrad.optim import flatten_state_dict, unflatten_state_dict
from handgrad.serialization import SafetensorsError, load_file, load_metadata, save_file

FORMAT_VERSION = 1
# The files manifest.json lists; with it, every file of a checkpoint.
HASHED_FILES = (
    "model.safetensors",
    "optimizer.safetensors",
    "config.json",
    "trainer_state.json",
    "tokenizer.json",
)
FILES = (*HASHED_FILES, MANIFEST_FILE)

__all__ = [
    "FILES",
    "FORMAT_VERSION",
    "HASHED_FILES",
    "Checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
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
    # model.state_dict() shares the parameters' arrays: no copy, no dtype conversion.
    weights = {k: t.data for k, t in model.state_dict().items()}
    arrays, rest = flatten_state_dict(optimizer.state_dict())
    needed = _checkpoint_bytes(weights, arrays, tokenizer_path)
    what = f"checkpoint {CHECKPOINTS}/{name}"
    check_free_space(root, needed, what, _still_latest(run_dir))
    try:
        # the same step saved again (e.g. a rerun) replaces the old directory whole
        with atomic_dir(final, replace=True) as tmp:
            save_file(weights, tmp / "model.safetensors", metadata={"step": str(step)})
            save_file(
                arrays, tmp / "optimizer.safetensors", metadata={"optimizer": json.dumps(rest)}
            )
            write_json_atomic(tmp / "config.json", config)
            write_json_atomic(
                tmp / "trainer_state.json", {"format_version": FORMAT_VERSION, **trainer_state}
            )
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.json")
            write_manifest(tmp, HASHED_FILES)  # last: a directory with a manifest is complete
    except BaseException as err:
        raise_if_disk_full(err, what, root, needed, lambda: _still_latest(run_dir))
        raise
    try:
        write_latest(run_dir, f"{CHECKPOINTS}/{name}")
    except OSError as err:
        # Unpublished, the new directory would only be a stray copy taking the space.
        if _latest_target(run_dir) != f"{CHECKPOINTS}/{name}":
            shutil.rmtree(final, ignore_errors=True)
        raise_if_disk_full(err, what, root, needed, lambda: _still_latest(run_dir))
        raise
    prune_checkpoints(run_dir, keep)
    return final


def _checkpoint_bytes(weights: dict, arrays: dict, tokenizer_path: str | os.PathLike) -> int:
    """Bytes a checkpoint takes on disk: its arrays, the tokenizer copy, and 1 MiB for the
    safetensors headers and the JSON files."""
    n = sum(a.nbytes for a in weights.values()) + sum(a.nbytes for a in arrays.values())
    return n + os.path.getsize(tokenizer_path) + (1 << 20)


def _latest_target(run_dir: Path) -> str | None:
    """What ``latest`` holds (e.g. "checkpoints/step_0000100"), as written; None when it
    cannot be read. Unlike ``read_latest`` it does not ask the target to exist."""
    try:
        return (run_dir / LATEST).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _still_latest(run_dir: Path) -> str:
    """The end of a disk-full message: which checkpoint a resume would use."""
    try:
        latest = read_latest(run_dir)
    except CheckpointError:
        latest = None
    if latest is None:
        return "nothing was written, and the run has no complete checkpoint yet"
    return (
        f"nothing was written; {run_dir / LATEST} still names "
        f"{latest.relative_to(run_dir).as_posix()}, which is unchanged"
    )


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
    # manifest.json may be absent: checkpoints written before it existed still load
    missing = [f for f in HASHED_FILES if not (ckpt / f).is_file()]
    if (
        missing == ["optimizer.safetensors", "trainer_state.json"]
        and (ckpt / "model.safetensors").is_file()
    ):
        raise CheckpointError(
            f"{ckpt}: holds a model's weights only (as `handgrad import hf` writes), not a run "
            "to continue: there is no optimizer state or step to resume; to train it further "
            f"on new data, start a run from it with --set train.init_from={ckpt}"
        )
    if missing:
        raise CheckpointError(f"{ckpt}: incomplete checkpoint, missing {', '.join(missing)}")
    try:  # before parsing anything: a damaged file is named as such, not as bad JSON
        verify_manifest(ckpt, missing_ok=True)
    except ManifestError as e:
        raise CheckpointError(str(e)) from None
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
