"""`load_tokenizer`: one entry point for every tokenizer file this package reads.

It sits above the tokenizer classes (it dispatches to them), so they never import it.
"""

from __future__ import annotations

import os
from pathlib import Path

from handgrad.tokenizer.bpe import BPETokenizer
from handgrad.tokenizer.char import CharTokenizer
from handgrad.tokenizer.interop import GPT2_FILE_NAMES
from handgrad.tokenizer.io import read_tokenizer_json

_GPT2_NAMES = {name for pair in GPT2_FILE_NAMES for name in pair}


def load_tokenizer(path: str | os.PathLike[str]) -> BPETokenizer | CharTokenizer:
    """Load a tokenizer from ``path``:

    - a file saved with ``.save(path)`` (dispatching on its "type": bpe or char);
    - a directory of handgrad's holding such a file as ``tokenizer.json`` (a checkpoint, a
      prepared data directory, a run directory through its ``latest`` checkpoint);
    - a directory holding GPT-2 tokenizer files (vocab.json + merges.txt, or OpenAI's
      encoder.json + vocab.bpe, or only a Hugging Face tokenizer.json), or one of the GPT-2
      files: read with `BPETokenizer.from_hf`.
    """
    path = Path(path)
    if path.is_dir():
        latest = path / "latest"  # a run directory: the checkpoint it names
        if latest.is_file():
            path = path / latest.read_text(encoding="utf-8").strip()
        own = path / "tokenizer.json"
        if own.is_file() and _is_handgrad_file(own):
            return load_tokenizer(own)
        return BPETokenizer.from_hf(path)
    if path.name in _GPT2_NAMES and path.is_file():
        return BPETokenizer.from_hf(path.parent)
    obj = read_tokenizer_json(path)
    cls = BPETokenizer if obj["type"] == "bpe" else CharTokenizer
    return cls.from_dict(obj, source=str(path))


def _is_handgrad_file(path: Path) -> bool:
    """Whether ``path`` is a handgrad tokenizer file (not Hugging Face's tokenizer.json)."""
    try:
        with open(path, encoding="utf-8") as f:
            head = f.read(200)
    except (OSError, UnicodeDecodeError):
        return False
    return '"format":"handgrad-tokenizer"' in head.replace(" ", "")
