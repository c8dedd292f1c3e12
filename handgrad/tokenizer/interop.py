"""Exchange BPE vocabularies with Hugging Face `tokenizers` / `transformers` and `tiktoken`.

GPT-2's file format (vocab.json + merges.txt) writes every token's bytes as text through
`bytes_to_unicode` (a space becomes "Ġ", a newline "Ċ"); vocab.json maps that text to the id and
merges.txt lists "left right" per line in rank order after a "#version" header.

`tiktoken` and `tokenizers` are optional (test/benchmark) dependencies, imported only here.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from handgrad.tokenizer.bpe import GPT2_PATTERN, bytes_to_unicode

if TYPE_CHECKING:
    from handgrad.tokenizer.bpe import BPETokenizer


def _require(module: str, purpose: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{purpose} needs the optional package '{module}' (pip install {module}); it is a "
            "test/benchmark dependency of handgrad, not a runtime one"
        ) from None


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def export_hf(tok: BPETokenizer, directory: str | os.PathLike[str]) -> None:
    """Write vocab.json, merges.txt and tokenizer.json for `tok` into `directory` (created).

    The ids are ours as they are. tokenizer.json (needs `tokenizers`) is a byte-level BPE with
    our pre-tokenization pattern and our special tokens registered as special added tokens.
    """
    tokenizers = _require("tokenizers", "export_hf")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
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

    _write_text_atomic(directory / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    _write_text_atomic(
        directory / "merges.txt",
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges),
    )

    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

    model = models.BPE(
        vocab={k: v for k, v in vocab.items() if k not in tok.special_tokens}, merges=merges
    )
    hf = tokenizers.Tokenizer(model)
    if tok.pattern == GPT2_PATTERN:
        # HF's built-in ByteLevel regex is GPT-2's pattern (written without the (?:...) group).
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(tok.pattern), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tok.special_tokens.items(), key=lambda kv: kv[1])
    hf.add_special_tokens([AddedToken(s, special=True, normalized=False) for s, _ in specials])
    for s, i in specials:
        if hf.token_to_id(s) != i:
            raise RuntimeError(
                f"tokenizers assigned special token {s!r} the id {hf.token_to_id(s)}, expected {i}"
            )
    tmp = directory / f".tokenizer.json.tmp-{os.getpid()}"
    hf.save(str(tmp))
    os.replace(tmp, directory / "tokenizer.json")


def from_hf(cls: type[BPETokenizer], directory: str | os.PathLike[str]) -> BPETokenizer:
    """Load a GPT-2-style byte-level BPE from `directory`/vocab.json + merges.txt.

    Ids are kept as in vocab.json. Entries that are neither one of the 256 byte characters nor
    the result of a merge (e.g. "<|endoftext|>") become special tokens. A merge whose result
    repeats an earlier merge's token (possible in HF-trained files) is dropped: a rank-based
    vocabulary holds each byte string once, and the earlier, lower-rank merge already builds it.
    """
    directory = Path(directory)
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    for p in (vocab_path, merges_path):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing (from_hf needs vocab.json and merges.txt)")
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

    u2b = {u: b for b, u in bytes_to_unicode().items()}
    encoder: dict[bytes, int] = {}
    for b in range(256):
        char = chr(ord(bytes_to_unicode()[b]))
        if char not in vocab:
            raise ValueError(
                f"{vocab_path}: not a byte-level BPE vocabulary: byte {b} ({char!r}) has no token"
            )
        encoder[bytes([b])] = vocab[char]

    def to_bytes(token: str, line_no: int) -> bytes:
        if token not in vocab:
            raise ValueError(f"{merges_path}:{line_no}: token {token!r} is not in vocab.json")
        try:
            return bytes(u2b[c] for c in token)
        except KeyError:
            raise ValueError(
                f"{merges_path}:{line_no}: token {token!r} is not byte-level text"
            ) from None

    merges: list[tuple[int, int]] = []
    merged_texts: set[str] = set()
    lines = merges_path.read_text(encoding="utf-8").split("\n")
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
                f"{merges_path}:{line_no}: merge result {result!r} is not in vocab.json"
            )
        merged_texts.add(result)
        if a + b in encoder:
            continue
        encoder[a + b] = vocab[result]
        merges.append((encoder[a], encoder[b]))

    byte_texts = {bytes_to_unicode()[b] for b in range(256)}
    specials = {t: i for t, i in vocab.items() if t not in byte_texts and t not in merged_texts}
    try:
        return cls(encoder, merges, specials, GPT2_PATTERN)
    except ValueError as e:
        raise ValueError(f"{directory}: {e}") from None


def to_tiktoken(tok: BPETokenizer, name: str = "handgrad-bpe"):
    """A `tiktoken.Encoding` over our ranks (= ids), pattern and special tokens."""
    tiktoken = _require("tiktoken", "to_tiktoken")
    return tiktoken.Encoding(
        name=name,
        pat_str=tok.pattern,
        mergeable_ranks=dict(tok.encoder),
        special_tokens=tok.special_tokens,
    )
