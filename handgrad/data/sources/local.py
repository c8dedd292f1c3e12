"""Local text: a .txt, .jsonl or .parquet file, a directory of them (searched recursively) or
a glob."""

from __future__ import annotations

import codecs
import glob as globlib
import hashlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path

from handgrad.data.sources.base import (
    BUILTIN_SOURCES,
    Document,
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
    sizes = [p.stat().st_size for p in files]

    def read(stats: SourceStats, warn: _Warner, start: dict | None) -> Iterator[Document]:
        # Position: {"file": index in `files`, "offset": bytes (.jsonl) or rows (.parquet) of it
        # done, "line": last line number read (.jsonl), "bytes": input bytes done in all files}.
        stats.files, stats.files_ignored = len(files), ignored
        first = start["file"] if start else 0
        for k in range(first, len(files)):
            path = files[k]
            done_before = sum(sizes[:k])
            offset, line = (start["offset"], start["line"]) if start and k == first else (0, 0)
            if path.suffix == ".txt":
                raw = path.read_bytes().removeprefix(codecs.BOM_UTF8)
                at = {"file": k + 1, "offset": 0, "line": 0, "bytes": done_before + sizes[k]}
                yield str(path), decode_utf8(raw, str(path), stats, warn), at
            elif path.suffix == ".jsonl":
                for origin, text, end, lineno in _read_jsonl(
                    path, text_field, skip_bad_lines, stats, warn, offset, line
                ):
                    at = {"file": k, "offset": end, "line": lineno, "bytes": done_before + end}
                    yield origin, text, at
            else:
                n_rows = _parquet_rows(path)
                for origin, text, row in _read_parquet(path, text_field, stats, offset):
                    done = done_before + sizes[k] * row // max(n_rows, 1)
                    yield origin, text, {"file": k, "offset": row, "line": 0, "bytes": done}

    description = f"local {spec!r}: {len(files)} file(s) ({', '.join(kinds)})"
    if any(k != ".txt" for k in kinds):
        description += f", text field {text_field!r}"
    return TextSource(description, read, size=sum(sizes), fingerprint=_fingerprint(files))


def _fingerprint(files: list[Path]) -> str:
    """A hash of the files' names, sizes and modification times: changes when any file does."""
    entries = []
    for path in files:
        st = path.stat()
        entries.append([str(path.resolve()), st.st_size, st.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _read_jsonl(
    path: Path,
    field: str,
    skip_bad: bool,
    stats: SourceStats,
    warn: _Warner,
    offset: int = 0,
    lineno: int = 0,
) -> Iterator[tuple[str, str, int, int]]:
    """Yield (origin, text, byte offset after the line, line number) from byte `offset` on
    (`lineno` lines lie before it)."""
    with open(path, "rb") as f:
        f.seek(offset)
        for raw in f:
            lineno += 1
            offset += len(raw)
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
            yield origin, text, offset, lineno


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


def _parquet_rows(path: Path) -> int:
    pq = import_optional("pyarrow.parquet")
    return pq.ParquetFile(path).metadata.num_rows


def _read_parquet(
    path: Path, field: str, stats: SourceStats, start_row: int = 0
) -> Iterator[tuple[str, str, int]]:
    """Yield (origin, text, rows done) from row `start_row` on, reading only the row groups
    that hold it and the rows after it."""
    pq = import_optional("pyarrow.parquet")
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    if field not in names:
        raise ValueError(
            f"{path}: no column {field!r} (columns: {', '.join(names)}); "
            "choose the column with --text-field"
        )
    row, groups = 0, []
    for g in range(parquet.metadata.num_row_groups):
        n = parquet.metadata.row_group(g).num_rows
        if row + n <= start_row and not groups:
            row += n  # wholly done: not read at all
            continue
        groups.append(g)
    if not groups:
        return
    for batch in parquet.iter_batches(batch_size=1024, columns=[field], row_groups=groups):
        for text in batch.column(0).to_pylist():
            row += 1
            if row <= start_row:
                continue
            if text is not None and not isinstance(text, str):
                raise ValueError(
                    f"{path} row {row - 1}: column {field!r} holds {type(text).__name__}, "
                    "expected strings"
                )
            yield f"{path} row {row - 1}", text or "", row


def _single_file_source(path: Path, name: str) -> TextSource:
    sha = hash_file(path, "sha256")

    size = path.stat().st_size

    def read(stats: SourceStats, warn: _Warner, start: dict | None) -> Iterator[Document]:
        stats.files = 1
        if start:
            return  # the one document was done
        text = decode_utf8(path.read_bytes(), str(path), stats, warn)
        yield str(path), text, {"done": True, "bytes": size}

    return TextSource(f"{name}: {path} (sha256 {sha})", read, size=size, fingerprint=sha)
