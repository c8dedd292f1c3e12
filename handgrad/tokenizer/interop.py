"""Exchange BPE vocabularies with Hugging Face `tokenizers` / `transformers` and `tiktoken`.

GPT-2's file format writes every token's bytes as text through `bytes_to_unicode` (a space
becomes "Ġ", a newline "Ċ"): a vocabulary JSON maps that text to the id, and a merges file lists
"left right" per line in rank order after a "#version" header. The same two formats go by two
pairs of names: Hugging Face's vocab.json + merges.txt and OpenAI's original release,
encoder.json + vocab.bpe.

Nothing here imports the tokenizer class: these functions take and return plain maps (or any
object with the tokenizer's attributes), and `BPETokenizer` wraps them. `tiktoken` is an optional
(test/benchmark) dependency, imported only when asked for.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from handgrad.fileio import write_json_atomic, write_text_atomic
from handgrad.tokenizer.bytelevel import GPT2_PATTERN, bytes_to_unicode

if TYPE_CHECKING:
    from handgrad.tokenizer.bpe import BPETokenizer

# (vocabulary, merges) file names, in the order they are looked for.
GPT2_FILE_NAMES = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))


def _require(module: str, purpose: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{purpose} needs the optional package '{module}' (pip install {module}); it is a "
            "test/benchmark dependency of handgrad, not a runtime one"
        ) from None


# ---------------------------------------------------------------------- export


def gpt2_vocab(tok: BPETokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tokenizer as GPT-2 file contents: {token text: id} over every id (special tokens
    included, at their own ids) ordered by id, and the merges as (left text, right text)."""
    b2u = bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(b2u[b] for b in token)

    vocab = {text(b): i for b, i in tok.encoder.items()}
    for special, i in tok.special_tokens.items():
        if special in vocab:
            raise ValueError(
                f"special token {special!r} collides with the byte-level spelling "
                "of an ordinary token; GPT-2 files cannot hold both"
            )
        vocab[special] = i
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    merges = [(text(tok.decoder[a]), text(tok.decoder[b])) for a, b in tok.merges]
    return vocab, merges


def hf_tokenizer_json(
    vocab: dict[str, int],
    merges: list[tuple[str, str]],
    special_tokens: dict[str, int],
    pattern: str,
) -> dict[str, Any]:
    """A Hugging Face `tokenizers` document (tokenizer.json) for a byte-level BPE.

    The special tokens sit in the model's vocabulary at their own ids and are listed again as
    special added tokens with those ids. `tokenizers` registers an added token that the model
    already holds under the model's id, so every id stays ours wherever the special tokens are
    (first, as Hugging Face's BpeTrainer puts them, or last, as GPT-2 does). Merges are written
    as "left right" strings, the form every `tokenizers` release reads (byte-level text has no
    space).
    """
    byte_level = {"add_prefix_space": False, "trim_offsets": True}
    if pattern == GPT2_PATTERN:
        # HF's built-in ByteLevel regex is GPT-2's pattern (written without the (?:...) group).
        pre_tokenizer: dict[str, Any] = {"type": "ByteLevel", **byte_level, "use_regex": True}
    else:
        pre_tokenizer = {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": pattern},
                    "behavior": "Isolated",
                    "invert": False,
                },
                {"type": "ByteLevel", **byte_level, "use_regex": False},
            ],
        }
    added = [
        {
            "id": i,
            "content": s,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for s, i in sorted(special_tokens.items(), key=lambda kv: kv[1])
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": {
            "type": "ByteLevel",
            "add_prefix_space": True,
            "trim_offsets": True,
            "use_regex": True,
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [f"{a} {b}" for a, b in merges],
        },
    }


def export_hf(tok: BPETokenizer, directory: str | os.PathLike[str]) -> None:
    """Write vocab.json, merges.txt and tokenizer.json for `tok` into `directory` (created).

    The ids are ours as they are, special tokens included. Each file is written atomically;
    no optional package is needed.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab, merges = gpt2_vocab(tok)
    write_json_atomic(directory / "vocab.json", vocab, indent=None)
    write_text_atomic(
        directory / "merges.txt", "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    )
    document = hf_tokenizer_json(vocab, merges, tok.special_tokens, tok.pattern)
    write_json_atomic(directory / "tokenizer.json", document, indent=None)


# ---------------------------------------------------------------------- import


def find_gpt2_files(directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The (vocabulary, merges) files in `directory`: vocab.json + merges.txt, else OpenAI's
    encoder.json + vocab.bpe. A missing file raises FileNotFoundError naming what was looked
    for."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory (expected GPT-2 tokenizer files)")
    for vocab_name, merges_name in GPT2_FILE_NAMES:
        vocab_path, merges_path = directory / vocab_name, directory / merges_name
        if vocab_path.is_file() and merges_path.is_file():
            return vocab_path, merges_path
    present = [n for pair in GPT2_FILE_NAMES for n in pair if (directory / n).is_file()]
    looked_for = " or ".join(f"{v} + {m}" for v, m in GPT2_FILE_NAMES)
    found = f"; found only {', '.join(present)}" if present else ""
    raise FileNotFoundError(
        f"{directory}: no GPT-2 tokenizer files (looked for {looked_for}){found}"
    )


def read_gpt2_files(
    directory: str | os.PathLike[str],
) -> tuple[dict[bytes, int], list[tuple[int, int]], dict[str, int]]:
    """Read a GPT-2-style byte-level BPE from `directory` (see `find_gpt2_files`).

    Returns (encoder: token bytes -> id, merges: (id_a, id_b) in rank order, special tokens:
    text -> id), with the ids of the files. Entries that are neither one of the 256 byte
    characters nor the result of a merge (e.g. "<|endoftext|>") become special tokens. A merge
    whose result repeats an earlier merge's token (possible in HF-trained files) is dropped: a
    rank-based vocabulary holds each byte string once, and the earlier, lower-rank merge already
    builds it.
    """
    vocab_path, merges_path = find_gpt2_files(directory)
    try:
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{vocab_path}: not valid JSON ({e})") from None
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()
    ):
        raise ValueError(f"{vocab_path}: expected a JSON object mapping token text to int ids")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{vocab_path}: ids must be exactly 0..{len(vocab) - 1}")

    b2u = bytes_to_unicode()
    u2b = {u: b for b, u in b2u.items()}
    encoder: dict[bytes, int] = {}
    for b in range(256):
        if b2u[b] not in vocab:
            raise ValueError(
                f"{vocab_path}: not a byte-level BPE vocabulary: byte {b} ({b2u[b]!r}) has no token"
            )
        encoder[bytes([b])] = vocab[b2u[b]]

    def to_bytes(token: str, line_no: int) -> bytes:
        if token not in vocab:
            raise ValueError(
                f"{merges_path}:{line_no}: token {token!r} is not in {vocab_path.name}"
            )
        try:
            return bytes(u2b[c] for c in token)
        except KeyError:
            raise ValueError(
                f"{merges_path}:{line_no}: token {token!r} is not byte-level text"
            ) from None

    merges: list[tuple[int, int]] = []
    merged_texts: set[str] = set()
    try:
        lines = merges_path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{merges_path}: not UTF-8 text ({e})") from None
    for line_no, line in enumerate(lines, start=1):
        if not line.strip() or (line_no == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{merges_path}:{line_no}: expected 'left right', got {line!r}")
        a, b = to_bytes(parts[0], line_no), to_bytes(parts[1], line_no)
        result = parts[0] + parts[1]
        if result not in vocab:
            raise ValueError(
                f"{merges_path}:{line_no}: merge result {result!r} is not in {vocab_path.name}"
            )
        merged_texts.add(result)
        if a + b in encoder:
            continue
        encoder[a + b] = vocab[result]
        merges.append((encoder[a], encoder[b]))

    byte_texts = set(b2u.values())
    specials = {t: i for t, i in vocab.items() if t not in byte_texts and t not in merged_texts}
    return encoder, merges, specials


# ---------------------------------------------------------------------- tiktoken


def to_tiktoken(tok: BPETokenizer, name: str = "handgrad-bpe") -> Any:
    """A `tiktoken.Encoding` over our ranks (= ids), pattern and special tokens."""
    tiktoken = _require("tiktoken", "to_tiktoken")
    return tiktoken.Encoding(
        name=name,
        pat_str=tok.pattern,
        mergeable_ranks=dict(tok.encoder),
        special_tokens=tok.special_tokens,
    )
