"""What every text source shares: `TextSource`, `SourceStats`, the capped warnings, UTF-8
decoding that counts what it replaces, optional imports and the cache directory."""

from __future__ import annotations

import importlib
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BUILTIN_SOURCES = ("pydocs", "shakespeare", "openwebtext")
MAX_WARNINGS = 10  # per kind of problem; the rest are only counted


@dataclass
class SourceStats:
    """What a pass over a source skipped or repaired (all zero for clean data)."""

    files: int = 0
    files_ignored: int = 0  # files in a directory/glob whose suffix is not .txt/.jsonl/.parquet
    empty_documents_skipped: int = 0
    bad_lines_skipped: int = 0
    documents_with_replacement: int = 0  # documents that had undecodable bytes
    replacement_chars: int = 0  # U+FFFD characters put in place of undecodable bytes

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class TextSource:
    """A re-iterable stream of documents.

    `read(stats, warn)` is a generator function yielding `(origin, text)`; `origin` names where a
    document came from (`file.jsonl:12`) for messages. Empty documents are skipped and counted here,
    so every source treats them alike.
    """

    def __init__(
        self,
        description: str,
        read: Callable[[SourceStats, _Warner], Iterator[tuple[str, str]]],
    ):
        self.description = description
        self._read = read
        self.stats = SourceStats()

    def documents(self, quiet: bool = False) -> Iterator[str]:
        """Yield the documents from the start; `quiet` silences the warnings (a second pass
        over the same data would repeat them)."""
        self.stats = SourceStats()
        warn = _Warner(quiet)
        for origin, text in self._read(self.stats, warn):
            if not text.strip():
                self.stats.empty_documents_skipped += 1
                warn("empty", f"skipping empty document {origin}")
                continue
            yield text
        warn.summary()


class _Warner:
    """Warn about the first MAX_WARNINGS problems of each kind, then only say how many more."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.counts: dict[str, int] = {}

    def __call__(self, kind: str, message: str) -> None:
        n = self.counts[kind] = self.counts.get(kind, 0) + 1
        if n <= MAX_WARNINGS and not self.quiet:
            warnings.warn(message, stacklevel=3)

    def summary(self) -> None:
        for kind, n in self.counts.items():
            if n > MAX_WARNINGS and not self.quiet:
                warnings.warn(
                    f"... and {n - MAX_WARNINGS} more ({kind}); see meta.json", stacklevel=3
                )


def decode_utf8(raw: bytes, origin: str, stats: SourceStats, warn: _Warner) -> str:
    """UTF-8 decode; undecodable bytes become U+FFFD and are counted, never dropped silently."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
    # Each invalid byte sequence yields one U+FFFD; genuine U+FFFD already in the input are EF BF BD.
    replaced = text.count("\ufffd") - raw.count(b"\xef\xbf\xbd")
    stats.documents_with_replacement += 1
    stats.replacement_chars += replaced
    warn("non-utf8", f"{origin}: {replaced} invalid UTF-8 byte sequence(s) replaced by U+FFFD")
    return text


def import_optional(module: str) -> Any:
    """Import pyarrow / datasets on demand, with an error that says how to get them."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        package = module.split(".")[0]
        raise ImportError(
            f"{package} is needed for this source but is not installed; "
            f"install it with `pip install 'handgrad[data]'` (or `pip install {package}`)"
        ) from e


def cache_dir() -> Path:
    return Path(os.environ.get("HANDGRAD_CACHE") or Path.home() / ".cache" / "handgrad")
