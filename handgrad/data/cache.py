"""The prepared-data cache: a raw source is prepared once per (source, tokenizer, split) into
``<cache>/prepared/<key>`` and reused by every later run that asks for the same data.

The key is a readable prefix plus a hash of what determines the shards: the source (a built-in
name, with the Python version for ``pydocs`` whose corpus is this Python's documentation; or a
path, with size and modification time for a file so that an edited file gets a new entry), the
tokenizer (a tokenizer file by its sha256) and ``val_fraction``.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any, Protocol

from handgrad.data.prepare import prepare
from handgrad.data.sources.base import BUILTIN_SOURCES, cache_dir
from handgrad.manifest import hash_file


class DataSpec(Protocol):
    """What the cache needs to know of a ``[data]`` section (``train.config.DataSection``)."""

    source: str
    tokenizer: str | None
    val_fraction: float
    cache_dir: str | None
    workers: int | None


class DataSpecError(ValueError):
    """A ``[data]`` section that cannot be prepared as given; the message names the key."""


def _source_identity(source: str) -> dict[str, Any]:
    if source in BUILTIN_SOURCES:
        ident: dict[str, Any] = {"builtin": source}
        if source == "pydocs":
            ident["python"] = list(sys.version_info[:2])
        return ident
    path = Path(source).expanduser()
    ident = {"path": str(path.resolve())}
    if path.is_file():
        st = path.stat()
        ident.update(size=st.st_size, mtime_ns=st.st_mtime_ns)
    return ident


def data_cache_key(data: DataSpec) -> str:
    """The cache entry name of a raw source: readable prefix + hash of what determines it."""
    tok = data.tokenizer or ""
    tok_ident = hash_file(tok, "sha256") if tok.endswith(".json") and Path(tok).is_file() else tok
    ident = {
        "source": _source_identity(data.source),
        "tokenizer": tok_ident,
        "val_fraction": data.val_fraction,
    }
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    stem = re.sub(r"[^A-Za-z0-9]+", "-", Path(data.source).stem or data.source).strip("-")
    tok_slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(tok).stem if tok.endswith(".json") else tok)
    return f"{stem[:40]}-{tok_slug.strip('-')[:24]}-{digest}"


def _prepared_with(directory: Path, tokenizer: str) -> bool:
    """Whether the prepared ``directory`` was made with ``tokenizer``: the same spec
    (``char``, ``train:N``) or a tokenizer file of the same sha256."""
    try:
        recorded = json.loads((directory / "meta.json").read_text(encoding="utf-8"))["tokenizer"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if tokenizer == recorded.get("spec"):
        return True
    path = Path(tokenizer).expanduser()
    return path.is_file() and hash_file(path, "sha256") == recorded.get("sha256")


def prepared_data_dir(data: DataSpec, progress: bool | None = None) -> Path:
    """The prepared directory for ``[data]``: ``source`` itself when it already holds
    meta.json, else a cache entry, prepared on first use (``data prepare`` writes meta.json
    last, so an interrupted preparation is simply redone). Raises DataSpecError for a
    tokenizer given with a prepared source, or missing for a raw one."""
    source = Path(data.source).expanduser()
    if (source / "meta.json").is_file():
        if data.tokenizer is not None and not _prepared_with(source, data.tokenizer):
            raise DataSpecError(
                f"[data] tokenizer = {data.tokenizer!r}, but source {data.source} is already "
                "prepared with another tokenizer (its tokenizer.json); remove [data] tokenizer "
                "from the config, or give the one the data was prepared with"
            )
        return source
    if data.tokenizer is None:
        raise DataSpecError(
            f"[data] tokenizer is required to prepare source {data.source!r} "
            "('char', 'train:N' or a tokenizer .json file)"
        )
    root = Path(data.cache_dir).expanduser() if data.cache_dir else cache_dir() / "prepared"
    out = root / data_cache_key(data)
    if not (out / "meta.json").is_file():
        print(
            f"preparing {data.source} with tokenizer {data.tokenizer} into {out}", file=sys.stderr
        )
        prepare(
            data.source,
            data.tokenizer,
            out,
            val_fraction=data.val_fraction,
            workers=data.workers,
            progress=progress is not False,
        )
    return out
