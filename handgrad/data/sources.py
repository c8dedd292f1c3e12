"""Where documents come from: local files, the embedded `pydocs` corpus, tiny Shakespeare, OpenWebText.

Every source is a `TextSource`: an object whose `documents()` yields one `str` per document, in a
fixed order, and can be called again to start over (the char tokenizer reads the data twice: once to
collect its alphabet, once to encode). While it reads, a source counts everything it skipped or
repaired in `TextSource.stats`; nothing is dropped without being counted, and these counts end up in
`meta.json`.

Accepted `--source` values (see `open_source`):
  pydocs        CPython's own English documentation, built here without any download
  shakespeare   tiny Shakespeare (a local copy, the cache, or a download checked by sha256)
  openwebtext   OpenWebText streamed from the Hugging Face hub with `datasets`
  PATH          a .txt/.jsonl/.parquet file, a directory of them, or a glob
"""

from __future__ import annotations

import codecs
import glob as globlib
import importlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from handgrad.fileio import atomic_path
from handgrad.manifest import hash_file

SUFFIXES = (".txt", ".jsonl", ".parquet")
BUILTIN_SOURCES = ("pydocs", "shakespeare", "openwebtext")

SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_FILE = "tinyshakespeare.txt"

# The hub repo still carries a legacy loading script (`openwebtext.py`), which `datasets` >= 4 refuses
# to run; the same data is published as parquet shards in the repo's data/ folder, so we stream
# those with the generic parquet builder. The revision is pinned so the corpus cannot change
# under a run.
OPENWEBTEXT_ID = "Skylion007/openwebtext"
OPENWEBTEXT_REVISION = "963532436460638ab26b7633e23776e6c7e37d59"
OPENWEBTEXT_DATA_FILES = (
    f"hf://datasets/{OPENWEBTEXT_ID}@{OPENWEBTEXT_REVISION}/data/train-*.parquet"
)

REPO_ROOT = Path(__file__).resolve().parents[2]
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


def open_source(
    source: str | os.PathLike,
    text_field: str = "text",
    skip_bad_lines: bool = False,
    rows: Iterable[dict[str, Any]] | None = None,
) -> TextSource:
    """Resolve a `--source` value to a `TextSource`.

    `rows` replaces the Hugging Face stream for `openwebtext` (any iterable of dicts with a
    `text_field` key), so the loading code can be exercised without the hub.
    """
    spec = os.fspath(source)
    if spec == "pydocs":
        return pydocs_source()
    if spec == "shakespeare":
        return _single_file_source(shakespeare_path(), "shakespeare")
    if spec == "openwebtext":
        return openwebtext_source(rows=rows, text_field=text_field)
    return local_source(spec, text_field=text_field, skip_bad_lines=skip_bad_lines)


# ---------------------------------------------------------------------------------------------
# Local files


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
    sha = sha256_file(path)

    def read(stats: SourceStats, warn: _Warner) -> Iterator[tuple[str, str]]:
        stats.files = 1
        yield str(path), decode_utf8(path.read_bytes(), str(path), stats, warn)

    return TextSource(f"{name}: {path} (sha256 {sha})", read)


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


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes (the manifests' hash, streamed the same way)."""
    return hash_file(path, "sha256")


# ---------------------------------------------------------------------------------------------
# pydocs: CPython's own documentation


def build_pydocs_corpus(timeout: float = 300.0) -> list[dict[str, str]]:
    """Build the pydocs documents ([{"title", "text"}]) in a fresh isolated interpreter.

    Importing ~300 standard-library modules has side effects we do not want in this process; the
    child (`pydocs_corpus.py`, run with `python -I`) writes its result to a temporary JSON file.
    """
    script = Path(__file__).with_name("pydocs_corpus.py")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pydocs.json"
        proc = subprocess.run(
            [sys.executable, "-I", str(script), str(out)],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            cwd=tmp,
        )
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(
                f"building the pydocs corpus failed (exit {proc.returncode}):\n"
                + proc.stderr.decode("utf-8", "replace")[-2000:]
            )
        return json.loads(out.read_text(encoding="utf-8"))["documents"]


def pydocs_source() -> TextSource:
    corpus = build_pydocs_corpus()
    n_bytes = sum(len(d["text"].encode("utf-8")) for d in corpus)
    version = ".".join(map(str, sys.version_info[:3]))

    def read(stats: SourceStats, warn: _Warner) -> Iterator[tuple[str, str]]:
        for doc in corpus:
            yield doc["title"], doc["text"]

    description = (
        f"pydocs: Python {version} documentation, {len(corpus)} documents, {n_bytes} bytes"
    )
    return TextSource(description, read)


# ---------------------------------------------------------------------------------------------
# Tiny Shakespeare


def cache_dir() -> Path:
    return Path(os.environ.get("HANDGRAD_CACHE") or Path.home() / ".cache" / "handgrad")


def local_shakespeare_candidates() -> list[Path]:
    """Shared copies that may already be on this machine (tried before the cache)."""
    rel = Path("..") / "shared" / "data" / SHAKESPEARE_FILE
    return [(Path.cwd() / rel).resolve(), (REPO_ROOT / rel).resolve()]


def shakespeare_path() -> Path:
    """Path to a verified copy of tiny Shakespeare, downloading it into the cache if needed.

    Order: $HANDGRAD_SHAKESPEARE (must match the sha256), ../shared/data relative to the current
    directory or the repo, the cache, then the canonical URL.
    """
    explicit = os.environ.get("HANDGRAD_SHAKESPEARE")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise FileNotFoundError(f"HANDGRAD_SHAKESPEARE={explicit}: no such file")
        _check_shakespeare(path)
        return path
    for path in [*local_shakespeare_candidates(), cache_dir() / SHAKESPEARE_FILE]:
        if path.is_file() and sha256_file(path) == SHAKESPEARE_SHA256:
            return path
    return _download_shakespeare(cache_dir() / SHAKESPEARE_FILE)


def _check_shakespeare(path: Path) -> None:
    sha = sha256_file(path)
    if sha != SHAKESPEARE_SHA256:
        raise ValueError(
            f"{path}: sha256 {sha} does not match tiny Shakespeare's {SHAKESPEARE_SHA256}; "
            "to use other text, pass it with --source path/to/file.txt"
        )


def _download_shakespeare(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(dest) as tmp:  # checked before it takes the real name
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=30) as response:
                tmp.write_bytes(response.read())
            _check_shakespeare(tmp)
    except (urllib.error.URLError, OSError) as e:
        raise ConnectionError(
            f"could not download tiny Shakespeare from {SHAKESPEARE_URL} ({e}). Without network, "
            "pass a local copy: `handgrad data prepare --source path/to/input.txt ...`, or set "
            f"HANDGRAD_SHAKESPEARE=path/to/input.txt (sha256 {SHAKESPEARE_SHA256})"
        ) from e
    return dest


# ---------------------------------------------------------------------------------------------
# OpenWebText


def openwebtext_data_files() -> str:
    """The parquet shards to stream: $HANDGRAD_OPENWEBTEXT_DATA_FILES (another revision, a mirror,
    or a local copy such as /data/owt/*.parquet) or the pinned hub revision."""
    return os.environ.get("HANDGRAD_OPENWEBTEXT_DATA_FILES") or OPENWEBTEXT_DATA_FILES


def openwebtext_rows(data_files: str) -> Iterable[dict[str, Any]]:
    """Stream OpenWebText rows ({"text": ...}) with `datasets`, never holding the corpus in RAM."""
    datasets = import_optional("datasets")
    return datasets.load_dataset(
        "parquet", data_files={"train": data_files}, split="train", streaming=True
    )


def openwebtext_source(
    rows: Iterable[dict[str, Any]] | None = None, text_field: str = "text"
) -> TextSource:
    if rows is None:
        data_files = openwebtext_data_files()
        rows = openwebtext_rows(data_files)
        description = f"openwebtext: {data_files}"
    else:
        description = "openwebtext: injected rows"

    def read(stats: SourceStats, warn: _Warner) -> Iterator[tuple[str, str]]:
        for i, row in enumerate(rows):
            if text_field not in row:
                raise ValueError(
                    f"openwebtext row {i}: no {text_field!r} field (keys: {', '.join(row)})"
                )
            yield f"openwebtext row {i}", row[text_field] or ""

    return TextSource(description, read)
