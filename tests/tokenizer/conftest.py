"""Shared fixtures for tokenizer tests: small corpora and tokenizers trained once per session."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from handgrad.tokenizer import BPETokenizer

SHAKESPEARE = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "tinyshakespeare.txt"

# Varied text for encode parity: whitespace runs, digits, contractions, punctuation, unicode.
VARIED_TEXTS = [
    "Hello, world! It's a test: we'll see, they've done it, I'm sure you'd agree. DON'T",
    "   leading spaces\tand\ttabs\n\n\nthree newlines   \n  trailing   ",
    "numbers 1234567890 3.14159 -42 1e10 0x1F 2024-01-01 10,000,000",
    "unicode: café naïve résumé Ωμέγα Привет мир 你好世界 こんにちは 안녕하세요",
    "emoji 😀👍🏽 👨‍👩‍👧‍👦 flags 🇫🇷 and combining e\u0301 a\u0308 \u0915\u094d\u0937",
    "code: def f(x):\n    return x**2  # comment\n\tif a != b: print(f'{a!r}')",
    "NUL \x00 and controls \x01\x02\x7f\x1b[0m bell\x07",
    "'s 't 're 've 'm 'll 'd 'S 'LL ''' `'` \"quoted\"",
    "",
    " ",
    "\n",
    "a" * 300 + " " + "ab" * 100,
    "mixed\r\nline\rendings\n\r\n",
]


def make_corpus(seed: int = 0, n_docs: int = 300) -> list[str]:
    """Documents from a Zipf-like random vocabulary (varied, deterministic)."""
    rng = random.Random(seed)
    syllables = ["ka", "to", "ri", "ne", "sha", "mu", "lo", "pe", "qui", "zan", "é", "ñ", "th"]
    vocab = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(400)]
    vocab += ["1", "42", "2024", "'s", ",", ".", "!", "—", "日本", "😀"]
    weights = [1.0 / (rank + 1) for rank in range(len(vocab))]
    docs = []
    for _ in range(n_docs):
        words = rng.choices(vocab, weights, k=rng.randint(5, 60))
        seps = rng.choices([" ", " ", " ", "  ", "\n", "\n\n", "\t"], k=len(words))
        docs.append("".join(w + s for w, s in zip(words, seps)))
    return docs


@pytest.fixture(scope="session", name="varied_texts")
def varied_texts_fixture() -> list[str]:
    return list(VARIED_TEXTS)


@pytest.fixture(scope="session", name="make_corpus")
def make_corpus_fixture():
    return make_corpus


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return make_corpus()


@pytest.fixture(scope="session")
def small_tok(corpus) -> BPETokenizer:
    """A 600-token BPE trained on the random corpus plus the varied texts."""
    return BPETokenizer.train(corpus + VARIED_TEXTS, 600, show_progress=False)


@pytest.fixture(scope="session")
def shakespeare_docs() -> list[str]:
    """The first ~300 kB of tiny Shakespeare as paragraphs (skips if ../shared/data is absent)."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")
    text = SHAKESPEARE.read_text(encoding="utf-8")[:300_000]
    return text.split("\n\n")


@pytest.fixture(scope="session")
def shakespeare_tok(shakespeare_docs) -> BPETokenizer:
    return BPETokenizer.train(shakespeare_docs, 1200, show_progress=False)
