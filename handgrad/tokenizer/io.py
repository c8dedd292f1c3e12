"""Tokenizer files: one JSON document per tokenizer, written atomically, validated on load.

Every file starts with the same header so that a foreign JSON (a Hugging Face tokenizer.json, a
config file, ...) is recognised and refused with a clear message instead of a KeyError later::

    {"format": "handgrad-tokenizer", "version": 1, "type": "bpe" | "char", ...}

The rest of the document is owned by the tokenizer class named by "type".
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from handgrad.fileio import write_text_atomic

FORMAT_NAME = "handgrad-tokenizer"
FORMAT_VERSION = 1
TOKENIZER_TYPES = ("bpe", "char")


class TokenizerFileError(ValueError):
    """A tokenizer file is unreadable, foreign, or inconsistent. The message names the file."""

    def __init__(self, path: str | os.PathLike[str], problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def write_tokenizer_json(path: str | os.PathLike[str], obj: dict[str, Any]) -> None:
    """Write a tokenizer document atomically (a crash leaves the previous file intact).

    ASCII-only JSON: a character tokenizer may hold lone surrogates, which have no UTF-8 form
    but survive as \\uXXXX escapes.
    """
    write_text_atomic(path, json.dumps(obj, ensure_ascii=True, separators=(",", ":")) + "\n")


def read_tokenizer_json(
    path: str | os.PathLike[str], expect_type: str | None = None
) -> dict[str, Any]:
    """Read and check the header of a handgrad tokenizer file (and its "type", when
    ``expect_type`` is given); return the whole document."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenizerFileError(path, "no such file") from None
    except IsADirectoryError:
        raise TokenizerFileError(
            path,
            "is a directory (handgrad.tokenizer.load_tokenizer reads a directory of GPT-2 "
            "files: vocab.json + merges.txt, encoder.json + vocab.bpe or tokenizer.json)",
        ) from None
    except UnicodeDecodeError as e:
        raise TokenizerFileError(path, f"not UTF-8 text ({e})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise TokenizerFileError(
            path, f"not valid JSON (truncated or corrupt file?): {e.msg} at line {e.lineno}"
        ) from None
    if not isinstance(obj, dict):
        raise TokenizerFileError(path, f"expected a JSON object, got {type(obj).__name__}")
    if obj.get("format") != FORMAT_NAME:
        hint = ""
        if "model" in obj and "added_tokens" in obj:
            hint = (
                " (it looks like a Hugging Face tokenizer.json: pass its directory, or use "
                "BPETokenizer.from_hf(directory))"
            )
        raise TokenizerFileError(
            path, f'not a handgrad tokenizer file: no "format": "{FORMAT_NAME}" key{hint}'
        )
    version = obj.get("version")
    if version != FORMAT_VERSION:
        raise TokenizerFileError(
            path,
            f"unsupported format version {version!r} (this code reads version {FORMAT_VERSION})",
        )
    if obj.get("type") not in TOKENIZER_TYPES:
        raise TokenizerFileError(
            path,
            f'unknown tokenizer "type" {obj.get("type")!r} (expected one of '
            f"{', '.join(TOKENIZER_TYPES)})",
        )
    if expect_type is not None and obj["type"] != expect_type:
        raise TokenizerFileError(
            path,
            f'"type" is {obj["type"]!r}, not "{expect_type}" (use handgrad.tokenizer.load_tokenizer)',
        )
    return obj
