"""Local text: a .txt, .jsonl or .parquet file, a directory of them (searched recursively) or
a glob."""

from __future__ import annotations

import codecs
import glob as globlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

from handgrad.data.sources.base import (
    BUILTIN_SOURCES,
    SourceStats,
    TextSource,
    _Warner,
    decode_utf8,
    import_optional,
)
from handgrad.manifest import hash_file

SUFFIXES = (".txt", ".jsonl", ".parquet")


def resolve_local(spec: str) -> tuple[list[Path], int]:
    """Files named by a path, directory (searched recursively) or glob, sorted; and how many were
    ignored for their suffix."""
    if globlib.has_magic(spec):
        matches = [Path(p) for p in sorted(globlib.glob(spec, recursive=True)) if Path(p).is_file()]
        if not matches:
            raise FileNotFoundError(f"source glob {spec!r} matches no files")
        what = f"glob {spec!r}"
    else:
        path = Path(spec)
        if path.is_file():
            if path.suffix not in SUFFIXES:
                raise ValueError(
                    f"{path}: unsupported file type {path.suffix!r}; expected one of "
                    f"{', '.join(SUFFIXES)}"
                )
            return [path], 0
        if not path.is_dir():
            raise FileNotFoundError(
                f"source {spec!r} does not exist; expected a file, directory or glob of "
                f"{'/'.join(SUFFIXES)} files, or one of: {', '.join(BUILTIN_SOURCES)}"
            )
        matches = sorted(p for p in path.rglob("*") if p.is_file())
        what = f"directory {spec!r}"
    files = [p for p in matches if p.suffix in SUFFIXES]
    if not files:
        raise FileNotFoundError(f"{what} contains no {', '.join(SUFFIXES)} files")
    ignored = len(matches) - len(files)
    if ignored:
        warnings.warn(
            f"{what}: ignoring {ignored} file(s) without a {'/'.join(SUFFIXES)} suffix",
            stacklevel=2,
        )
    return files, ignored


def local_source(spec: str, text_field: str = "text", skip_bad_lines: bool = False) -> TextSource:
    files, ignored = resolve_local(spec)
    kinds = sorted({p.suffix for p in files})

    def read(stats: SourceStats, warn: _Warner) -> Iterator[tuple[str, str]]:
        stats.files, stats.files_ignored = len(files), ignored
        for path in files:
            if path.suffix == ".txt":
                raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
                yield str(path), decode_utf8(raw, str(path), stats, warn)
            elif path.suffix == ".jsonl":
                yield from _read_jsonl(path, text_field, skip_bad_lines, stats, warn)
            else:
                yield from _read_parquet(path, text_field, stats)

    description = f"local {spec!r}: {len(files)} file(s) ({', '.join(kinds)})"
    if any(k != ".txt" for k in kinds):
        description += f", text field {text_field!r}"
    return TextSource(description, read)


def _read_jsonl(
    path: Path, field: str, skip_bad: bool, stats: SourceStats, warn: _Warner
) -> Iterator[tuple[str, str]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue  # a blank line holds no document
            origin = f"{path}:{lineno}"
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)  # editors on Windows like to add one
            try:
                text = _jsonl_text(decode_utf8(raw, origin, stats, warn), origin, field)
            except ValueError as e:
                if not skip_bad:
                    raise ValueError(
                        f"{e} (pass --skip-bad-lines to skip and count such lines)"
                    ) from None
                stats.bad_lines_skipped += 1
                warn("bad-line", f"skipping bad line: {e}")
                continue
            # JSON escapes can spell lone surrogates ("\ud800"), which UTF-8 cannot encode.
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                fixed = text.encode("utf-8", errors="replace").decode("utf-8")
                stats.documents_with_replacement += 1
                stats.replacement_chars += fixed.count("?") - text.count("?")
                warn("surrogates", f"{origin}: lone surrogate escapes replaced")
                text = fixed
            yield origin, text


def _jsonl_text(line: str, origin: str, field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{origin}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{origin}: expected a JSON object, got {type(record).__name__}")
    if field not in record:
        keys = ", ".join(repr(k) for k in list(record)[:10]) or "none"
        raise ValueError(
            f"{origin}: no {field!r} field (keys: {keys}); choose the field with --text-field"
        )
    text = record[field]
    if text is None:
        return ""
    if not isinstance(text, str):
        raise ValueError(f"{origin}: field {field!r} is {type(text).__name__}, expected a string")
    return text


def _read_parquet(path: Path, field: str, stats: SourceStats) -> Iterator[tuple[str, str]]:
    pq = import_optional("pyarrow.parquet")
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    if field not in names:
        raise ValueError(
            f"{path}: no column {field!r} (columns: {', '.join(names)}); "
            "choose the column with --text-field"
        )
    row = 0
    for batch in parquet.iter_batches(batch_size=1024, columns=[field]):
        for text in batch.column(0).to_pylist():
            if text is not None and not isinstance(text, str):
                raise ValueError(
                    f"{path} row {row}: column {field!r} holds {type(text).__name__}, "
                    "expected strings"
                )
            yield f"{path} row {row}", text or ""
            row += 1


def _single_file_source(path: Path, name: str) -> TextSource:
    sha = hash_file(path, "sha256")

    def read(stats: SourceStats, warn: _Warner) -> Iterator[tuple[str, str]]:
        stats.files = 1
        yield str(path), decode_utf8(path.read_bytes(), str(path), stats, warn)

    return TextSource(f"{name}: {path} (sha256 {sha})", read)
