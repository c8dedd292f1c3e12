"""GPT-2's pre-tokenization (splitting text into the "words" BPE merges within), made fast.

`split_gpt2(pat, text)` returns exactly `pat.findall(text)` for pat = GPT2_PATTERN compiled with
`regex`, but runs the stdlib `re` (about twice as fast as `regex`) on the ASCII stretches of the
text, which on English text is nearly all of it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import regex

# Runs of non-ASCII characters (where the ASCII fast path of `split_gpt2` must hand over), looked
# for only in the blocks of this many characters that are not ASCII (str.isascii is far faster).
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")
_ASCII_BLOCK = 4096


def _ascii_gpt2_pattern() -> re.Pattern:
    """GPT2_PATTERN for ASCII-only text, in the stdlib `re` (about twice as fast as `regex` there).

    The classes \\s, \\p{L}, \\p{N} are spelt out as the ASCII characters that `regex` itself puts
    in them, so on ASCII text both patterns match the same pre-tokens.
    """

    def ascii_class(*props: str, negate: bool = False) -> str:
        chars = [c for c in range(128) if any(regex.match(p, chr(c)) for p in props) != negate]
        spans: list[list[int]] = []  # runs of consecutive characters, written as ranges
        for c in chars:
            if spans and spans[-1][1] == c - 1:
                spans[-1][1] = c
            else:
                spans.append([c, c])
        return "[" + "".join(f"\\x{a:02x}-\\x{b:02x}" for a, b in spans) + "]"

    space, letter, number = ascii_class(r"\s"), ascii_class(r"\p{L}"), ascii_class(r"\p{N}")
    other = ascii_class(r"\s", r"\p{L}", r"\p{N}", negate=True)
    not_space = ascii_class(r"\s", negate=True)
    return re.compile(
        rf"'(?:[sdmt]|ll|ve|re)| ?{letter}+| ?{number}+| ?{other}+|{space}+(?!{not_space})|{space}+"
    )


_ASCII_GPT2 = _ascii_gpt2_pattern()


def _safe_before(text: str, start: int, end: int) -> int:
    """The last position p in (start, end] where GPT-2's pattern surely starts a pre-token, else
    `start`: text[p] is a space and text[p - 1] printable ASCII (a pre-token holding a non-space
    character never goes on over whitespace, and none looks behind itself)."""
    p = text.rfind(" ", start, end)
    while p > start and not "!" <= text[p - 1] <= "~":
        p = text.rfind(" ", start, p)
    return p if p > start else start


def _safe_after(text: str, start: int) -> int:
    """The first such position p >= start (see `_safe_before`), else len(text)."""
    p = text.find(" ", start)
    while p != -1 and not "!" <= text[p - 1] <= "~":
        p = text.find(" ", p + 1)
    return len(text) if p == -1 else p


def _non_ascii_runs(text: str) -> Iterator[tuple[int, int]]:
    """(start, end) of each run of non-ASCII characters (a run across blocks comes in parts)."""
    for block in range(0, len(text), _ASCII_BLOCK):
        if not text[block : block + _ASCII_BLOCK].isascii():
            for m in _NON_ASCII.finditer(text, block, block + _ASCII_BLOCK):
                yield m.span()


def split_gpt2(pat: regex.Pattern, text: str) -> list[str]:
    """`pat.findall(text)` for pat = GPT2_PATTERN, with ASCII stretches split by the stdlib `re`.

    Non-ASCII characters are widened to pre-token boundaries (`_safe_before` / `_safe_after`) and
    those stretches go through `regex`; text dense in non-ASCII goes through `regex` whole.
    """
    if text.isascii():
        return _ASCII_GPT2.findall(text)
    fast, slow = _ASCII_GPT2.findall, pat.findall
    words: list[str] = []
    pos = n_runs = 0
    for start, end in _non_ascii_runs(text):
        if end <= pos:
            continue  # already inside the last `regex` stretch
        n_runs += 1
        if n_runs > 8 and n_runs * 128 > start:  # under 128 characters a stretch: not worth it
            break
        left = _safe_before(text, pos, start)
        if left > pos:
            words += fast(text[pos:left])
        pos = _safe_after(text, end)
        words += slow(text[left:pos])
    else:
        if pos < len(text):
            words += fast(text, pos)
        return words
    words += slow(text, pos)
    return words
