"""A preparation's record in its output directory: what it is (its identity) and how far it got.

While `data prepare` runs, the output directory holds:

    progress.json        identity + the last checkpoint (written atomically, see fileio)
    tokenizer.json       saved before any tokenizing, so a learnt `train:N` or `char` tokenizer is
                         reused on resume instead of learnt again
    train.bin.partial    the shards so far; bytes past the checkpoint's sizes (written after it,
    val.bin.partial      before a kill) are cut off on resume

A checkpoint is taken only where everything before a point of the source has been written and
nothing after it (see `split_stream` in prepare.py), so resuming from it and appending gives the
bytes of a run that was never interrupted. When the shards are complete they are renamed to
train.bin / val.bin, meta.json is written (with the identity under "preparation") and
progress.json is removed.

The identity is what determines the output: the source (its description and a fingerprint of its
files), the tokenizer (its spec, and the sha256 of a tokenizer file), val_fraction, seed and the
format version. Workers, chunk size and --skip-bad-lines do not change the bytes of documents
that are read, so they may differ between runs (a run that stopped at a bad line can go on with
--skip-bad-lines). Anything else already in the directory is refused, never overwritten.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from handgrad.fileio import write_json_atomic

FORMAT_VERSION = 1  # of meta.json and the shards
META_FILE = "meta.json"
PROGRESS_FILE = "progress.json"
PROGRESS_FORMAT = "handgrad-prepare-progress"
PROGRESS_VERSION = 1
PARTIAL_SUFFIX = ".partial"


class PreparationRefused(ValueError):
    """The output directory holds something other than this preparation."""


def identity(
    source: Any, tokenizer_spec: str, tokenizer_sha256: str | None, val_fraction: float, seed: int
) -> dict[str, Any]:
    """What determines a preparation's output (see the module doc); JSON-able."""
    return {
        "format_version": FORMAT_VERSION,
        "source": source.description,
        "source_fingerprint": source.fingerprint,
        "tokenizer": tokenizer_spec,
        "tokenizer_sha256": tokenizer_sha256,
        "val_fraction": val_fraction,
        "seed": seed,
    }


def _differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    names = {
        "source_fingerprint": "source files (names, sizes or modification times)",
        "tokenizer_sha256": "tokenizer file contents",
    }
    lines = []
    for key, value in ours.items():
        if theirs.get(key) != value:
            what = names.get(key, key)
            if key in names:
                lines.append(f"  {what} differ")
            else:
                lines.append(f"  {what}: this command {value!r}, the directory {theirs.get(key)!r}")
    return lines


def _refuse(out: Path, what: str, details: list[str]) -> PreparationRefused:
    return PreparationRefused(
        f"{out} holds {what}; refusing to touch it:\n"
        + "\n".join(details)
        + f"\nchoose another --out, or delete {out} to prepare it again"
    )


def check_out_dir(out: Path, ident: dict[str, Any]) -> str:
    """What `out` holds, for a preparation of identity `ident`:

    "new"      absent, or an empty directory
    "finished" meta.json of this very preparation: nothing to do
    "resume"   progress.json of this preparation: go on from its checkpoint

    Anything else raises PreparationRefused naming what differs.
    """
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise PreparationRefused(f"--out {out} exists and is not a directory")
    meta_path, progress_path = out / META_FILE, out / PROGRESS_FILE
    if meta_path.is_file():
        meta = _read_json(meta_path)
        theirs = meta.get("preparation")
        if theirs is None:  # written before preparations recorded their identity
            theirs = {
                "format_version": meta.get("format_version"),
                "source": meta.get("source"),
                "tokenizer": meta.get("tokenizer", {}).get("spec"),
                "val_fraction": meta.get("val_fraction"),
                "seed": meta.get("seed"),
            }
            ours = {k: ident[k] for k in theirs}
        else:
            ours = ident
        differences = _differences(ours, theirs)
        if differences:
            raise _refuse(out, "another finished preparation", differences)
        return "finished"
    if progress_path.is_file():
        progress = read_progress(out)
        differences = _differences(ident, progress["identity"])
        if differences:
            raise _refuse(out, "another preparation, unfinished", differences)
        return "resume"
    others = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise _refuse(out, f"files that are not a preparation ({shown})", [])
    return "new"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PreparationRefused(
            f"{path}: not valid JSON ({e}); delete {path.parent} to prepare it again"
        ) from None
    if not isinstance(obj, dict):
        raise PreparationRefused(f"{path}: expected a JSON object")
    return obj


def read_progress(out: Path) -> dict[str, Any]:
    path = out / PROGRESS_FILE
    progress = _read_json(path)
    if progress.get("format") != PROGRESS_FORMAT or progress.get("version") != PROGRESS_VERSION:
        raise PreparationRefused(
            f"{path}: not a progress file this handgrad reads (format "
            f"{progress.get('format')!r}, version {progress.get('version')!r}); delete "
            f"{out} to prepare it again"
        )
    for key in ("identity", "checkpoint"):
        if key not in progress:
            raise PreparationRefused(f"{path}: missing key {key!r}; delete {out} to start over")
    return progress


def write_progress(out: Path, ident: dict[str, Any], checkpoint: dict[str, Any] | None) -> None:
    """Record `checkpoint` (None: tokenizer saved, nothing tokenized yet) atomically."""
    write_json_atomic(
        out / PROGRESS_FILE,
        {
            "format": PROGRESS_FORMAT,
            "version": PROGRESS_VERSION,
            "identity": ident,
            "checkpoint": checkpoint,
        },
    )


def remove_stale_temporaries(out: Path) -> None:
    """Temporary files a killed process left behind (`.NAME.tmpPID`): never part of the output."""
    for p in out.iterdir():
        if p.name.startswith(".") and ".tmp" in p.name and p.is_file():
            p.unlink(missing_ok=True)


def partial_path(out: Path, shard: str) -> Path:
    return out / f"{shard}{PARTIAL_SUFFIX}"


def open_partials(
    out: Path, shards: tuple[str, ...], sizes: dict[str, int] | None
) -> dict[str, Any]:
    """Open the partial shards for appending, cut back to `sizes` (None: empty). A partial file
    shorter than its checkpoint means it was damaged or replaced: refused."""
    files = {}
    for shard in shards:
        path = partial_path(out, shard)
        want = sizes[shard] if sizes else 0
        have = path.stat().st_size if path.exists() else 0
        if have < want:
            for f in files.values():
                f.close()
            raise PreparationRefused(
                f"{path} is {have} bytes but {out / PROGRESS_FILE} records {want} written; "
                f"the file was damaged or replaced: delete {out} to prepare it again"
            )
        f = open(path, "r+b" if path.exists() else "wb")
        f.truncate(want)
        f.seek(want)
        files[shard] = f
    return files


def sync(files: dict[str, Any]) -> None:
    for f in files.values():
        f.flush()
        os.fsync(f.fileno())
