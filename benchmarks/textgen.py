"""Unseen text at any size, from a seed: a word-level Markov chain over the local corpora plus
random words, cut into documents.

Only about 3.4 MB of distinct real text is on hand offline (the Python docs and tiny Shakespeare),
and repeating it would warm a tokenizer's word cache and flatter every encoder. This generator
walks a first-order chain over the words (with their punctuation) of that text, so word pairs are
real, and replaces about 3% of the words by random strings of letters or digits, so new
pre-tokens keep coming as they do in web text. Documents are 500-8,000 words (OpenWebText's are
about 4.7 kB on average). The same seed gives the same text.

    from textgen import generate_documents
    for doc in generate_documents(34_000_000, seed=0): ...
    python benchmarks/textgen.py --size 100MB --out corpus.jsonl   # {"text": ...} per line
"""

from __future__ import annotations

import argparse
import json
import random
import re
import string
from collections.abc import Iterator
from pathlib import Path

from bench_tokenizer import corpus

RANDOM_WORD_SHARE = 0.03
_TOKEN = re.compile(r"\n\s*\n|\S+")


def _chain(texts: list[str]) -> tuple[list[str], list[list[int]]]:
    """Words (paragraph breaks included as "\\n\\n") and, for each, the ids of its successors."""
    ids: dict[str, int] = {}
    words: list[str] = []
    successors: list[list[int]] = []
    previous = None
    for text in texts:
        for m in _TOKEN.finditer(text):
            w = "\n\n" if m.group()[0] == "\n" else m.group()
            i = ids.get(w)
            if i is None:
                i = ids[w] = len(words)
                words.append(w)
                successors.append([])
            if previous is not None:
                successors[previous].append(i)
            previous = i
    for nxt in successors:
        if not nxt:  # the very last word: go on from the first
            nxt.append(0)
    return words, successors


def _random_word(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.2:
        return str(rng.randrange(10 ** rng.randint(1, 7)))
    word = "".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 12)))
    return word.capitalize() if kind < 0.45 else word


def generate_documents(
    n_bytes: int, seed: int = 0, texts: list[str] | None = None
) -> Iterator[str]:
    """Documents of generated text, about `n_bytes` UTF-8 bytes in all."""
    rng = random.Random(seed)
    words, successors = _chain(texts if texts is not None else corpus())
    done = 0
    current = rng.randrange(len(words))
    while done < n_bytes:
        n_words = rng.randint(500, 8000)
        parts = []
        for _ in range(n_words):
            current = rng.choice(successors[current])
            w = words[current]
            if rng.random() < RANDOM_WORD_SHARE:
                w = _random_word(rng)
            parts.append(w)
        doc = " ".join(parts).replace(" \n\n ", "\n\n").strip()
        done += len(doc.encode("utf-8"))
        yield doc


def parse_size(text: str) -> int:
    """ "34MB" -> 34_000_000 (kB, MB, GB are powers of 1000; a bare number is bytes)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgG]?)[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 10MB, 100MB, 1GB)")
    scale = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def write_jsonl(path: Path, n_bytes: int, seed: int = 0) -> int:
    """Write generated documents as {"text": ...} lines; returns the number of documents."""
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for doc in generate_documents(n_bytes, seed):
            f.write(json.dumps({"text": doc}) + "\n")
            n += 1
    return n


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("10MB"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(f"{write_jsonl(args.out, args.size, args.seed):,} documents written to {args.out}")
