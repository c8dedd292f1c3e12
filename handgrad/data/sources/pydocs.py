"""The `pydocs` source: CPython's own English documentation, built here without any download
(the documents come from `pydocs_corpus.py`, run in a fresh isolated interpreter)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from handgrad.data.sources.base import Document, SourceStats, TextSource, _Warner


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

    def read(stats: SourceStats, warn: _Warner, start: dict | None) -> Iterator[Document]:
        done = start["bytes"] if start else 0
        for i in range(start["index"] if start else 0, len(corpus)):
            doc = corpus[i]
            done += len(doc["text"].encode("utf-8"))
            yield doc["title"], doc["text"], {"index": i + 1, "bytes": done}

    description = (
        f"pydocs: Python {version} documentation, {len(corpus)} documents, {n_bytes} bytes"
    )
    return TextSource(description, read, size=n_bytes, fingerprint=description)
