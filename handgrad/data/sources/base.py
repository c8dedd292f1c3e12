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
    """A re-iterable, resumable stream of documents.

    `read(stats, warn, start)` is a generator function yielding `(origin, text, at)`: `origin`
    names where a document came from (`file.jsonl:12`) for messages, and `at` is a small JSON-able
    position just after the document; `read(..., start=at)` goes on from there without reading
    what came before (a byte offset in a .jsonl, a row in a .parquet, a file index). `at["bytes"]`
    counts the input bytes consumed so far, and `size` is the total where it is known (local
    files), for progress and ETA. `fingerprint` identifies the input's content cheaply (file
    names, sizes and modification times), so a resumed preparation can tell the input changed.
    Empty documents are skipped and counted here, so every source treats them alike.
    """

    def __init__(
        self,
        description: str,
        read: Callable[[SourceStats, _Warner, dict[str, Any] | None], Iterator[Document]],
        size: int | None = None,
        fingerprint: str | None = None,
    ):
        self.description = description
        self._read = read
        self.size = size
        self.fingerprint = fingerprint
        self.stats = SourceStats()

    def documents(self, quiet: bool = False) -> Iterator[str]:
        """Yield the documents from the start; `quiet` silences the warnings (a second pass
        over the same data would repeat them)."""
        for text, _ in self.stream(quiet=quiet):
            yield text

    def stream(
        self, start: dict[str, Any] | None = None, quiet: bool = False
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Yield `(text, position)`, from the beginning or from a `position` yielded earlier.

        A position holds the reader's place (`"at"`) and the counts of `stats` up to this
        document (`"stats"`), so a pass resumed from it ends with the same stats as one that was
        never interrupted.
        """
        self.stats = SourceStats(**start["stats"]) if start else SourceStats()
        stats = self.stats
        warn = _Warner(quiet)
        for origin, text, at in self._read(stats, warn, start["at"] if start else None):
            if not text.strip():
                stats.empty_documents_skipped += 1
                warn("empty", f"skipping empty document {origin}")
                continue
            yield text, {"at": at, "stats": dict(stats.__dict__)}
        warn.summary()


# What a reader yields: (origin, text, position after the document).
Document = tuple[str, str, dict[str, Any]]


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
