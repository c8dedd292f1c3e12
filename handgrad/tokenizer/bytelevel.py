"""Byte-level text: GPT-2's pre-tokenization pattern and the byte <-> printable-text map.

These are shared by training, encoding and the GPT-2 file formats, and depend on nothing else
in the package.

Lone surrogates: a Python str may hold surrogate code points (U+D800..U+DFFF) that have no UTF-8
encoding. Like tiktoken, the tokenizer then round-trips the text through UTF-16 with
'surrogatepass': a high+low surrogate pair becomes the character it encodes, and each lone
surrogate becomes U+FFFD (`fix_surrogates`).
"""

from __future__ import annotations

# GPT-2's pre-tokenization regex: contractions, optional-space + letters, optional-space + digits,
# optional-space + other symbols, whitespace runs (leaving the last space to prefix the next word).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"


def fix_surrogates(text: str) -> str:
    """The text that `encode` actually encodes when `text` has no UTF-8 encoding (see module doc)."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def to_utf8(text: str) -> bytes:
    """UTF-8 bytes of `text`, after `fix_surrogates` when it holds lone surrogates."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return fix_surrogates(text).encode("utf-8")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map used in vocab.json / merges.txt.

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls, space, ...) map to
    U+0100.. in byte order, so every token can be written as visible text without spaces.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + n)
            n += 1
    return mapping
