"""``handgrad verify PATH``: check files against the sizes and hashes recorded when they were
written, and say which (if any) is damaged.

PATH may be

- a run directory (``latest`` + ``checkpoints/``): every checkpoint in it, and where
  ``latest`` points;
- a checkpoint directory, or an exported Hugging Face directory: the files its
  ``manifest.json`` lists;
- a prepared data directory (``meta.json``): the tokenizer's and each shard's size and sha256.

Each file is printed with its size and OK / FAILED (and why); the exit status is 1 when any
file failed. A checkpoint written before manifests existed is checked for structure only
(safetensors headers against file sizes, JSON that parses) and reported as UNVERIFIED.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from handgrad.checkpoint import CHECKPOINTS, LATEST, list_checkpoints
from handgrad.data.prepare import META_FILE
from handgrad.data.shards import load_meta
from handgrad.manifest import MANIFEST_FILE, ManifestError, check_files, hash_file, read_manifest
from handgrad.serialization import SafetensorsError, load_metadata

OK, FAILED, UNVERIFIED = "OK", "FAILED", "UNVERIFIED"


@dataclass
class Line:
    """One checked file: ``status`` is OK, FAILED or UNVERIFIED; ``detail`` says why."""

    name: str
    size: int | None
    status: str
    detail: str = ""


@dataclass
class Section:
    """The files of one directory, under a title such as "checkpoint <path>"."""

    title: str
    lines: list[Line]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "verify",
        help="check a run, checkpoint, prepared data or export for damaged files",
        description="Check every file of PATH (a run directory, a checkpoint directory, a "
        "prepared data directory or an exported Hugging Face directory) against the sizes and "
        "sha256 hashes recorded when it was written. Exit status 1 when a file fails.",
    )
    p.add_argument("path", metavar="PATH")
    p.add_argument("--sizes-only", action="store_true", help="compare sizes, skip the hashes")
    p.set_defaults(func=_verify)


def verify_path(path: str | Path, hashes: bool = True) -> list[Section]:
    """Check ``path`` (see the module docstring); raises ValueError when it is none of the
    directories this command knows."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such directory")
    if (path / LATEST).is_file() or (path / CHECKPOINTS).is_dir():
        return _run(path, hashes)
    if (path / META_FILE).is_file():
        return [_data(path, hashes)]
    if (path / MANIFEST_FILE).is_file():
        kind = "checkpoint" if (path / "trainer_state.json").is_file() else "exported model"
        return [_with_manifest(path, hashes, kind)]
    if (path / "trainer_state.json").is_file() or (path / "model.safetensors").is_file():
        return [_checkpoint(path, hashes)]
    raise ValueError(
        f"{path}: not a run directory (no {LATEST}), a checkpoint or exported directory (no "
        f"{MANIFEST_FILE} nor model.safetensors) or prepared data (no {META_FILE})"
    )


def _run(run: Path, hashes: bool) -> list[Section]:
    sections = [_checkpoint(ckpt, hashes) for _, ckpt in list_checkpoints(run)]
    latest = run / LATEST
    if not latest.is_file():
        sections.append(Section(f"run {run}", [Line(LATEST, None, FAILED, "missing")]))
        return sections
    target = latest.read_text(encoding="utf-8", errors="replace").strip()
    ckpt = run / target
    if target and ckpt.is_dir():
        line = Line(LATEST, latest.stat().st_size, OK, f"-> {target}")
        if not any(c == ckpt for _, c in list_checkpoints(run)):
            sections.append(_checkpoint(ckpt, hashes))  # a checkpoint outside checkpoints/
    else:
        line = Line(LATEST, latest.stat().st_size, FAILED, f"names {target!r}: no such directory")
    sections.append(Section(f"run {run}", [line]))
    return sections


def _checkpoint(ckpt: Path, hashes: bool) -> Section:
    if (ckpt / MANIFEST_FILE).is_file():
        return _with_manifest(ckpt, hashes, "checkpoint")
    # Written before manifests: what can be checked without one is the structure.
    lines = [Line(MANIFEST_FILE, None, UNVERIFIED, "missing (older checkpoint): structure only")]
    for p in sorted(x for x in ckpt.iterdir() if x.is_file() and not x.name.startswith(".")):
        size = p.stat().st_size
        try:
            if p.suffix == ".safetensors":
                load_metadata(p)  # opens the header: size and layout checked
            elif p.suffix == ".json":
                json.loads(p.read_text(encoding="utf-8"))
        except SafetensorsError as e:
            lines.append(Line(p.name, size, FAILED, str(e).removeprefix(f"{p}: ")))
            continue
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            lines.append(Line(p.name, size, FAILED, f"not valid JSON ({e})"))
            continue
        lines.append(Line(p.name, size, UNVERIFIED, "structure OK, no hash recorded"))
    return Section(f"checkpoint {ckpt}", lines)


def _with_manifest(directory: Path, hashes: bool, kind: str) -> Section:
    title = f"{kind} {directory}"
    try:
        manifest = read_manifest(directory)
    except ManifestError as e:
        return Section(title, [Line(MANIFEST_FILE, None, FAILED, str(e))])
    assert manifest is not None
    lines = [
        Line(
            c.name,
            c.size,
            FAILED if c.problem else OK,
            (c.problem or "").removeprefix(f"{c.size:,} bytes but "),
        )
        for c in check_files(directory, hashes=hashes, manifest=manifest)
    ]
    if not hashes:
        lines = [Line(x.name, x.size, x.status, x.detail or "size only") for x in lines]
    return Section(title, lines)


def _data(directory: Path, hashes: bool) -> Section:
    title = f"prepared data {directory}"
    meta_path = directory / META_FILE
    try:
        meta = load_meta(directory)
        files = [(meta["tokenizer"]["file"], None, meta["tokenizer"]["sha256"])]
        itemsize = _itemsize(meta["dtype"])
        for info in meta["splits"].values():
            files.append((info["file"], info["tokens"] * itemsize, info.get("sha256")))
    except (ValueError, KeyError, TypeError) as e:
        detail = str(e) if isinstance(e, ValueError) else f"missing or bad entry {e}"
        return Section(title, [Line(META_FILE, _size(meta_path), FAILED, detail)])
    lines = [Line(META_FILE, _size(meta_path), OK, "format and entries")]
    for name, expected_size, digest in files:
        path = directory / name
        size = _size(path)
        if size is None:
            lines.append(Line(name, None, FAILED, f"missing (named in {META_FILE})"))
        elif expected_size is not None and size != expected_size:
            lines.append(Line(name, size, FAILED, f"{META_FILE} records {expected_size:,} bytes"))
        elif digest is None:
            lines.append(Line(name, size, OK, f"size only (no sha256 in {META_FILE})"))
        elif not hashes:
            lines.append(Line(name, size, OK, "size only"))
        elif (actual := hash_file(path, "sha256")) != digest:
            lines.append(
                Line(
                    name,
                    size,
                    FAILED,
                    f"sha256 {actual[:16]}... differs from the {digest[:16]}... that "
                    f"{META_FILE} records: the file is damaged or was changed",
                )
            )
        else:
            lines.append(Line(name, size, OK))
    return Section(title, lines)


def _itemsize(dtype: str) -> int:
    import numpy as np

    return np.dtype(dtype).itemsize


def _size(path: Path) -> int | None:
    return path.stat().st_size if path.is_file() else None


def format_sections(sections: list[Section]) -> str:
    out = []
    width = max((len(x.name) for s in sections for x in s.lines), default=0)
    for section in sections:
        out.append(section.title)
        for x in section.lines:
            size = "-" if x.size is None else f"{x.size:,} bytes"
            detail = f"  {x.detail}" if x.detail else ""
            out.append(f"  {x.status:<10} {x.name:<{width}}  {size:>20}{detail}")
    lines = [x for s in sections for x in s.lines]
    failed = sum(x.status == FAILED for x in lines)
    verdict = f"{failed} FAILED" if failed else "all OK"
    unverified = sum(x.status == UNVERIFIED for x in lines)
    if unverified:
        verdict += f", {unverified} without a recorded hash"
    n_dirs = f"{len(sections)} director{'y' if len(sections) == 1 else 'ies'}"
    out.append(f"checked {len(lines)} files in {n_dirs}: {verdict}")
    return "\n".join(out)


def _verify(args: argparse.Namespace) -> int:
    sections = verify_path(args.path, hashes=not args.sizes_only)
    print(format_sections(sections))
    failed = any(x.status == FAILED for s in sections for x in s.lines)
    if failed:
        print(f"handgrad verify: {args.path} has damaged or missing files", file=sys.stderr)
    return 1 if failed else 0
