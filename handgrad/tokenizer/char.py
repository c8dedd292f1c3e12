"""Character-level tokenizer (nanoGPT's shakespeare_char): one token per distinct character.

The vocabulary is the sorted set of characters of the training text, so id i is the i-th
character in code-point order (for tiny Shakespeare: 65 tokens, "\\n" = 0, " " = 1, ...).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

from handgrad.tokenizer.io import (
    FORMAT_NAME,
    FORMAT_VERSION,
    TokenizerFileError,
    read_tokenizer_json,
    write_tokenizer_json,
)


class CharTokenizer:
    """Maps each character of a fixed alphabet to its index in the sorted alphabet."""

    def __init__(self, chars: Sequence[str]):
        chars = list(chars)
        if any(not isinstance(c, str) or len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer vocabulary entries must be single characters")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer vocabulary has duplicate characters")
        self.chars = chars
        self.stoi = {c: i for i, c in enumerate(chars)}

    @classmethod
    def train(cls, text_or_texts: str | Iterable[str]) -> CharTokenizer:
        """Vocabulary = sorted unique characters of the text (one str or an iterable of str)."""
        texts = [text_or_texts] if isinstance(text_or_texts, str) else text_or_texts
        alphabet: set[str] = set()
        for text in texts:
            alphabet.update(text)
        return cls(sorted(alphabet))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def n_vocab(self) -> int:
        return len(self.chars)

    @property
    def eot_token(self) -> None:
        return None

    @property
    def special_tokens(self) -> dict[str, int]:
        return {}

    def __repr__(self) -> str:
        return f"CharTokenizer(vocab_size={self.vocab_size})"

    def encode(self, text: str, *args: Any, **kwargs: Any) -> list[int]:
        """Token ids of `text`; a character outside the vocabulary raises ValueError.

        Extra arguments (allowed_special, ...) are accepted for API compatibility and ignored:
        a character tokenizer has no special tokens.
        """
        try:
            return [self.stoi[c] for c in text]
        except KeyError:
            for position, c in enumerate(text):
                if c not in self.stoi:
                    raise ValueError(
                        f"character {c!r} (U+{ord(c):04X}) at position {position} is not in "
                        f"the vocabulary of this CharTokenizer ({self.vocab_size} characters)"
                    ) from None
            raise

    encode_ordinary = encode

    def encode_batch(
        self, texts: Sequence[str], workers: int = 1, **kwargs: Any
    ) -> list[list[int]]:
        """Encode each text (inline: a dict lookup per character is too cheap to parallelise)."""
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        n = len(self.chars)
        try:
            if all(0 <= i < n for i in ids):
                return "".join([self.chars[i] for i in ids])
        except TypeError:
            pass
        for position, i in enumerate(ids):
            if not (isinstance(i, int) or hasattr(i, "__index__")) or not 0 <= i < n:
                raise ValueError(
                    f"unknown token id {i!r} at position {position} (valid ids are 0..{n - 1})"
                )
        raise AssertionError("unreachable")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.decode(ids).encode("utf-8", "surrogatepass")

    # ------------------------------------------------------------------ save / load

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "type": "char",
            "vocab_size": self.vocab_size,
            "chars": self.chars,
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        write_tokenizer_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CharTokenizer:
        obj = read_tokenizer_json(path, expect_type="char")
        return cls.from_dict(obj, source=str(path))

    @classmethod
    def from_dict(cls, obj: dict[str, Any], source: str = "<dict>") -> CharTokenizer:
        chars = obj.get("chars")
        if not isinstance(chars, list):
            raise TokenizerFileError(
                source, 'missing or malformed key "chars" (a list of single characters)'
            )
        if obj.get("vocab_size") != len(chars):
            raise TokenizerFileError(
                source,
                f"inconsistent vocab_size: the file says "
                f"{obj.get('vocab_size')!r} but lists {len(chars)} chars",
            )
        try:
            return cls(chars)
        except ValueError as e:
            raise TokenizerFileError(source, str(e)) from None
