"""Exchange BPE vocabularies with Hugging Face `tokenizers` / `transformers` and `tiktoken`.

GPT-2's file format writes every token's bytes as text through `bytes_to_unicode` (a space
becomes "Ġ", a newline "Ċ"): a vocabulary JSON maps that text to the id, and a merges file lists
"left right" per line in rank order after a "#version" header. The same two formats go by two
pairs of names: Hugging Face's vocab.json + merges.txt and OpenAI's original release,
encoder.json + vocab.bpe. A Hugging Face tokenizer.json holds the same two maps (model.vocab,
model.merges) next to the pipeline around them (normalizer, pre-tokenizer, added tokens); it is
read when neither pair is present, and only when that pipeline is GPT-2's.

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
# Read when neither pair is present (transformers >= 5 saves only this for a GPT-2 tokenizer).
HF_TOKENIZER_FILE = "tokenizer.json"


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


def _gpt2_pair(directory: Path) -> tuple[Path, Path] | None:
    for vocab_name, merges_name in GPT2_FILE_NAMES:
        vocab_path, merges_path = directory / vocab_name, directory / merges_name
        if vocab_path.is_file() and merges_path.is_file():
            return vocab_path, merges_path
    return None


def find_gpt2_files(directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """The (vocabulary, merges) files in `directory`: vocab.json + merges.txt, else OpenAI's
    encoder.json + vocab.bpe. A missing file raises FileNotFoundError naming what was looked
    for."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: not a directory (expected GPT-2 tokenizer files)")
    pair = _gpt2_pair(directory)
    if pair is not None:
        return pair
    names = [n for pair in GPT2_FILE_NAMES for n in pair] + [HF_TOKENIZER_FILE]
    present = [n for n in names if (directory / n).is_file()]
    looked_for = " or ".join([*(f"{v} + {m}" for v, m in GPT2_FILE_NAMES), HF_TOKENIZER_FILE])
    found = f"; found only {', '.join(present)}" if present else ""
    raise FileNotFoundError(
        f"{directory}: no GPT-2 tokenizer files (looked for {looked_for}){found}"
    )


def read_gpt2_files(
    directory: str | os.PathLike[str],
) -> tuple[dict[bytes, int], list[tuple[int, int]], dict[str, int]]:
    """Read a GPT-2-style byte-level BPE from `directory`: vocab.json + merges.txt, else
    encoder.json + vocab.bpe (see `find_gpt2_files`), else a Hugging Face tokenizer.json (see
    `read_hf_tokenizer_json`; what `transformers` >= 5 saves for a fast GPT-2 tokenizer).

    Returns (encoder: token bytes -> id, merges: (id_a, id_b) in rank order, special tokens:
    text -> id), with the ids of the files. Entries that are neither one of the 256 byte
    characters nor the result of a merge (e.g. "<|endoftext|>") become special tokens. A merge
    whose result repeats an earlier merge's token (possible in HF-trained files) is dropped: a
    rank-based vocabulary holds each byte string once, and the earlier, lower-rank merge already
    builds it.
    """
    directory = Path(directory)
    hf_file = directory / HF_TOKENIZER_FILE
    if directory.is_dir() and _gpt2_pair(directory) is None and hf_file.is_file():
        return read_hf_tokenizer_json(hf_file)
    vocab_path, merges_path = find_gpt2_files(directory)
    vocab = _read_json(vocab_path)
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()
    ):
        raise ValueError(f"{vocab_path}: expected a JSON object mapping token text to int ids")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise ValueError(f"{vocab_path}: ids must be exactly 0..{len(vocab) - 1}")
    try:
        lines = merges_path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{merges_path}: not UTF-8 text ({e})") from None
    merges: list[tuple[str, str, str]] = []
    for line_no, line in enumerate(lines, start=1):
        if not line.strip() or (line_no == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise ValueError(f"{merges_path}:{line_no}: expected 'left right', got {line!r}")
        merges.append((f"{merges_path}:{line_no}", parts[0], parts[1]))
    encoder, merge_ids, specials = _byte_level_bpe(vocab, merges, str(vocab_path), vocab_path.name)
    return encoder, merge_ids, specials


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _byte_level_bpe(
    vocab: dict[str, int],
    merges: list[tuple[str, str, str]],
    vocab_where: str,
    vocab_name: str,
) -> tuple[dict[bytes, int], list[tuple[int, int]], dict[str, int]]:
    """(encoder, merge ids, special tokens) from byte-level token text -> id and the merges as
    (where, left text, right text) in rank order; `where` prefixes each merge's errors,
    `vocab_where` the vocabulary's, and `vocab_name` names the vocabulary inside them."""
    b2u = bytes_to_unicode()
    u2b = {u: b for b, u in b2u.items()}
    encoder: dict[bytes, int] = {}
    for b in range(256):
        if b2u[b] not in vocab:
            raise ValueError(
                f"{vocab_where}: not a byte-level BPE vocabulary: byte {b} ({b2u[b]!r}) has no "
                "token"
            )
        encoder[bytes([b])] = vocab[b2u[b]]

    def to_bytes(token: str, where: str) -> bytes:
        if token not in vocab:
            raise ValueError(f"{where}: token {token!r} is not in {vocab_name}")
        try:
            return bytes(u2b[c] for c in token)
        except KeyError:
            raise ValueError(f"{where}: token {token!r} is not byte-level text") from None

    merge_ids: list[tuple[int, int]] = []
    merged_texts: set[str] = set()
    for where, left, right in merges:
        a, b = to_bytes(left, where), to_bytes(right, where)
        result = left + right
        if result not in vocab:
            raise ValueError(f"{where}: merge result {result!r} is not in {vocab_name}")
        merged_texts.add(result)
        if a + b in encoder:
            continue
        encoder[a + b] = vocab[result]
        merge_ids.append((encoder[a], encoder[b]))

    byte_texts = set(b2u.values())
    specials = {t: i for t, i in vocab.items() if t not in byte_texts and t not in merged_texts}
    return encoder, merge_ids, specials


def _kind(obj: Any) -> str:
    return repr(obj.get("type")) if isinstance(obj, dict) else repr(obj)


def _byte_level_problems(pre: Any) -> list[str]:
    """What keeps a `pre_tokenizer` entry from being GPT-2's: ByteLevel with its built-in regex
    (GPT-2's pattern) and no space put before the text. A Sequence holding only that is the
    same thing."""
    if isinstance(pre, dict) and pre.get("type") == "Sequence":
        inner = pre.get("pretokenizers")
        if isinstance(inner, list) and len(inner) == 1:
            return _byte_level_problems(inner[0])
        kinds = ", ".join(_kind(p) for p in inner) if isinstance(inner, list) else repr(inner)
        return [f"pre_tokenizer is a Sequence of [{kinds}], not GPT-2's single ByteLevel"]
    if not isinstance(pre, dict) or pre.get("type") != "ByteLevel":
        return [f"pre_tokenizer is {_kind(pre)}, not 'ByteLevel'"]
    problems = []
    if pre.get("use_regex", True) is not True:
        problems.append("pre_tokenizer ByteLevel has use_regex false (no GPT-2 pattern split)")
    if pre.get("add_prefix_space", False) is not False:
        problems.append(
            "pre_tokenizer ByteLevel has add_prefix_space true (a space is put before the text)"
        )
    return problems


def _gpt2_kind_problems(doc: dict[str, Any]) -> list[str]:
    """Every way the tokenizer.json document `doc` encodes text differently from GPT-2's
    byte-level BPE. The post-processor (tokens put around a whole sequence on request) and the
    decoder (ids -> text) do not change the ids of a text, so they are not checked."""
    problems: list[str] = []
    model = doc.get("model")
    if not isinstance(model, dict):
        return ['no "model" object']
    model_type = model.get("type", "BPE" if "merges" in model else None)
    if model_type != "BPE":
        problems.append(f"model.type is {model_type!r}, not 'BPE'")
    if model.get("dropout") not in (None, 0, 0.0):
        problems.append(f"model.dropout is {model['dropout']!r} (merges skipped at random)")
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            problems.append(f"model.{key} is {model[key]!r} (GPT-2 has none)")
    if model.get("byte_fallback"):
        problems.append("model.byte_fallback is true")
    if model.get("ignore_merges"):
        problems.append("model.ignore_merges is true (whole words skip the merges)")
    normalizer = doc.get("normalizer")
    empty = isinstance(normalizer, dict) and normalizer.get("type") == "Sequence"
    if normalizer is not None and not (empty and not normalizer.get("normalizers")):
        problems.append(f"normalizer is {_kind(normalizer)} (GPT-2 has none)")
    problems += _byte_level_problems(doc.get("pre_tokenizer"))
    return problems


def read_hf_tokenizer_json(
    path: str | os.PathLike[str],
) -> tuple[dict[bytes, int], list[tuple[int, int]], dict[str, int]]:
    """Read a byte-level BPE from a Hugging Face `tokenizers` document (tokenizer.json).

    Returns what `read_gpt2_files` returns. The vocabulary is ``model.vocab``; the merges are
    ``model.merges`` in rank order, each "left right" or ["left", "right"] (the two forms
    `tokenizers` writes); the special tokens are the ``added_tokens`` at their ids (an added
    token the model vocabulary already holds keeps the model's id, as in `tokenizers`), plus any
    vocabulary entry that is neither a byte nor a merge result. A document that would encode
    text differently from GPT-2 (another model type, another pre-tokenizer, a normalizer, added
    tokens that strip spaces or match only whole words) is refused, naming what differs.
    """
    path = Path(path)
    doc = _read_json(path)
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object (a Hugging Face tokenizer.json)")
    problems = _gpt2_kind_problems(doc)
    added = doc.get("added_tokens") or []
    if not isinstance(added, list) or not all(
        isinstance(t, dict) and isinstance(t.get("id"), int) and isinstance(t.get("content"), str)
        for t in added
    ):
        raise ValueError(f'{path}: "added_tokens" must be a list of {{"id": int, "content": str}}')
    for t in added:
        flags = [f for f in ("lstrip", "rstrip", "single_word") if t.get(f)]
        if flags:
            problems.append(f"added token {t['content']!r} has {', '.join(flags)} set")
    if problems:
        raise ValueError(
            f"{path}: not a byte-level BPE tokenizer of GPT-2's kind: {'; '.join(problems)}"
        )

    model = doc["model"]
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not all(
        isinstance(k, str) and isinstance(v, int) for k, v in vocab.items()
    ):
        raise ValueError(f"{path}: model.vocab must be a JSON object mapping token text to ids")
    raw_merges = model.get("merges")
    if not isinstance(raw_merges, list):
        raise ValueError(f"{path}: model.merges must be a list")
    merges: list[tuple[str, str, str]] = []
    for rank, m in enumerate(raw_merges):
        where = f"{path}: model.merges[{rank}]"
        pair = m.split(" ") if isinstance(m, str) else m
        if not (
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)
        ):
            raise ValueError(f'{where}: expected "left right" or ["left", "right"], got {m!r}')
        merges.append((where, pair[0], pair[1]))

    # The model's ids and the added tokens' ids together must be exactly 0..n-1.
    full = dict(vocab)
    by_id = {i: t for t, i in vocab.items()}
    if len(by_id) != len(vocab):
        raise ValueError(f"{path}: model.vocab gives two tokens the same id")
    for t in added:
        content, i = t["content"], t["id"]
        if content in full:
            continue
        if i in by_id:
            raise ValueError(
                f"{path}: added token {content!r} has id {i}, which is {by_id[i]!r}'s already"
            )
        full[content] = by_id[i] = i
    if sorted(full.values()) != list(range(len(full))):
        raise ValueError(
            f"{path}: the ids of model.vocab and added_tokens must be exactly 0..{len(full) - 1}"
        )
    encoder, merge_ids, specials = _byte_level_bpe(
        full, merges, f"{path}: model.vocab", "model.vocab"
    )
    for t in added:
        if t["content"] not in specials:
            raise ValueError(
                f"{path}: added token {t['content']!r} is also an ordinary byte-level token of "
                "model.vocab; a GPT-2 tokenizer cannot hold both"
            )
    return encoder, merge_ids, specials


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
