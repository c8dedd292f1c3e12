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

Each source is its own module (`local`, `pydocs`, `shakespeare`, `openwebtext`); `base` holds
what they share. Every public name is also importable from here; a test that patches one patches
it in the module that looks it up (`sources.shakespeare.SHAKESPEARE_URL`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from handgrad.data.sources.base import (
    BUILTIN_SOURCES,
    MAX_WARNINGS,
    SourceStats,
    TextSource,
    cache_dir,
    decode_utf8,
    import_optional,
)
from handgrad.data.sources.local import (
    SUFFIXES,
    _single_file_source,
    local_source,
    resolve_local,
)
from handgrad.data.sources.openwebtext import (
    OPENWEBTEXT_DATA_FILES,
    OPENWEBTEXT_ID,
    OPENWEBTEXT_REVISION,
    openwebtext_data_files,
    openwebtext_rows,
    openwebtext_source,
)
from handgrad.data.sources.pydocs import build_pydocs_corpus, pydocs_source
from handgrad.data.sources.shakespeare import (
    REPO_ROOT,
    SHAKESPEARE_FILE,
    SHAKESPEARE_SHA256,
    SHAKESPEARE_URL,
    local_shakespeare_candidates,
    shakespeare_path,
)

__all__ = [
    "BUILTIN_SOURCES",
    "MAX_WARNINGS",
    "OPENWEBTEXT_DATA_FILES",
    "OPENWEBTEXT_ID",
    "OPENWEBTEXT_REVISION",
    "REPO_ROOT",
    "SHAKESPEARE_FILE",
    "SHAKESPEARE_SHA256",
    "SHAKESPEARE_URL",
    "SUFFIXES",
    "SourceStats",
    "TextSource",
    "build_pydocs_corpus",
    "cache_dir",
    "decode_utf8",
    "import_optional",
    "local_shakespeare_candidates",
    "local_source",
    "open_source",
    "openwebtext_data_files",
    "openwebtext_rows",
    "openwebtext_source",
    "pydocs_source",
    "resolve_local",
    "shakespeare_path",
]


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
