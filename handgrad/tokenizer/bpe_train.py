"""Learning a byte-level BPE vocabulary from text (Sennrich et al. 2016, as GPT-2 does).

Steps (`BPETokenizer.train` calls `count_words` then `learn_merges`)::

    1. pre-tokenize with the regex pattern and count each distinct "word" once (a dict, not the
       text, is kept in memory, so the corpus may be larger than RAM);
    2. count adjacent token pairs over the words, weighted by word count, and remember which
       words contain each pair;
    3. repeat: take the most frequent pair (a, b), give a+b a new id, rewrite only the words that
       contain (a, b), and update the pair counts by the difference (no full recount).

Ties between equally frequent pairs are broken like Hugging Face `tokenizers`' BpeTrainer (with a
ByteLevel pre-tokenizer and the 256-byte initial alphabet): the pair (a, b) with the smallest
(key(a), key(b)) wins, where key(merge token) = its id and key(byte b) = the position of
bytes_to_unicode(b) among the 256 byte-level characters sorted by code point (the id HF gives
that byte). Our merge list therefore equals HF's, ties included.
"""

from __future__ import annotations

import heapq
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import regex

from handgrad.tokenizer.bytelevel import GPT2_PATTERN, bytes_to_unicode, to_utf8
from handgrad.tokenizer.pretokenize import split_gpt2

# File streaming: characters read per step, and how many characters at the end of a chunk stay
# unsplit for the next step (a pre-token may depend on up to 3 characters after it).
TRAIN_CHUNK_CHARS = 1 << 20
_CHUNK_MARGIN = 16
_GPT2_FLAGS = regex.compile(GPT2_PATTERN).flags


def _hf_byte_keys() -> list[int]:
    """key[b] = the id Hugging Face's BpeTrainer gives byte b (its alphabet is sorted by char)."""
    b2u = bytes_to_unicode()
    order = sorted(range(256), key=lambda b: b2u[b])
    keys = [0] * 256
    for position, b in enumerate(order):
        keys[b] = position
    return keys


def _iter_sources(texts_or_files: Any) -> Iterable[str | os.PathLike[str]]:
    if isinstance(texts_or_files, str | os.PathLike):
        return [texts_or_files]
    return texts_or_files


def count_words(
    texts_or_files: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
    pat: regex.Pattern,
    special_tokens: Sequence[str] = (),
    show_progress: bool | None = None,
) -> dict[bytes, int]:
    """Pre-tokenize every document / file and count each distinct pre-token (as UTF-8 bytes).

    Files are read TRAIN_CHUNK_CHARS characters at a time. The pre-tokens ending in the last
    _CHUNK_MARGIN characters of a chunk are carried over to the next one, because a pre-token can
    depend on what follows it (a contraction like 'll, the end of a whitespace run); every earlier
    pre-token is final. This needs a pattern that matches every character, which is checked.
    """
    from tqdm import tqdm

    special_re = None
    if special_tokens:
        special_re = regex.compile(
            "|".join(regex.escape(t) for t in sorted(special_tokens, key=len, reverse=True))
        )
    margin = max(_CHUNK_MARGIN, max((len(t) for t in special_tokens), default=0) + 1)
    counts: Counter[str] = Counter()

    gpt2 = pat.pattern == GPT2_PATTERN and pat.flags == _GPT2_FLAGS

    def split_words(segment: str, source: str) -> list[str]:
        words = split_gpt2(pat, segment) if gpt2 else pat.findall(segment)
        if sum(map(len, words)) != len(segment):
            raise ValueError(
                f"{source}: the pre-tokenization pattern does not match every "
                f"character, so text would be lost: {pat.pattern!r}"
            )
        return words

    bar = tqdm(desc="count words", unit="char", unit_scale=True, disable=_disabled(show_progress))
    for item in _iter_sources(texts_or_files):
        if isinstance(item, str):
            for segment in special_re.split(item) if special_re else [item]:
                counts.update(split_words(segment, "document"))
            bar.update(len(item))
            continue
        if not isinstance(item, os.PathLike):
            raise TypeError(
                f"expected str documents or os.PathLike files, got {type(item).__name__}"
            )
        carry = ""
        with open(item, encoding="utf-8") as f:
            while True:
                try:
                    chunk = f.read(TRAIN_CHUNK_CHARS)
                except UnicodeDecodeError as e:
                    raise ValueError(f"{item}: not UTF-8 text ({e})") from None
                text = carry + chunk
                segments = special_re.split(text) if special_re else [text]
                for segment in segments[:-1]:
                    counts.update(split_words(segment, str(item)))
                last = segments[-1]
                words = split_words(last, str(item))
                if not chunk:  # end of file: everything is final
                    counts.update(words)
                    break
                end, n_final = len(last), len(words)
                while n_final > 0 and end > len(last) - margin:
                    n_final -= 1
                    end -= len(words[n_final])
                counts.update(words[:n_final])
                carry = last[end:]
                bar.update(len(chunk))
    bar.close()
    word_counts: dict[bytes, int] = defaultdict(int)
    for word, n in counts.items():
        word_counts[to_utf8(word)] += n
    return word_counts


def _disabled(show_progress: bool | None) -> bool | None:
    # tqdm's disable=None means "disable unless writing to a terminal".
    return None if show_progress is None else not show_progress


def learn_merges(
    word_counts: dict[bytes, int], n_merges: int, show_progress: bool | None = None
) -> tuple[list[bytes], list[tuple[int, int]]]:
    """Learn up to `n_merges` merges from word counts. Returns (token bytes by id, merges).

    Data structures (all incremental, see the module doc for the tie rule):
        words[i]        token ids of distinct word i, counts[i] its number of occurrences
        pair_counts     (a, b) -> sum over words of count * occurrences of a, b adjacent
        where[(a, b)]   indices of the words that contain (a, b) (may include stale ones)
        heap            max-heap of (-count, key(a), key(b), a, b); an entry whose count is out of
                        date is re-pushed with the current count when popped (lazy update). Counts
                        of existing pairs only ever fall, so a popped entry with a current count
                        is the true maximum.
    """
    from tqdm import tqdm

    words = [list(w) for w in word_counts]
    counts = list(word_counts.values())
    token_bytes = [bytes([b]) for b in range(256)]
    token_ids = {t: i for i, t in enumerate(token_bytes)}
    key = _hf_byte_keys()

    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for i, (word, count) in enumerate(zip(words, counts)):
        for pair in zip(word, word[1:]):
            pair_counts[pair] += count
            where[pair].add(i)
    heap = [(-c, key[a], key[b], a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    bar = tqdm(total=n_merges, desc="merges", disable=_disabled(show_progress))
    while len(merges) < n_merges and heap:
        neg_count, _, _, a, b = heapq.heappop(heap)
        count = pair_counts.get((a, b), 0)
        if count != -neg_count:
            if count > 0:
                heapq.heappush(heap, (-count, key[a], key[b], a, b))
            continue
        merged = token_bytes[a] + token_bytes[b]
        new = token_ids.get(merged)
        if new is None:
            new = len(token_bytes)
            token_bytes.append(merged)
            token_ids[merged] = new
            key.append(new)
            merges.append((a, b))
            bar.update(1)
        # else: a+b already exists as a token made by another merge. HF's trainer then reuses
        # that token's id without a new vocabulary entry; we do the same and record no merge
        # (a rank-based vocabulary can hold each byte string once).

        new_pairs: set[tuple[int, int]] = set()
        for i in where.pop((a, b)):
            word = words[i]
            try:  # the first (a, b) in the word
                k = word.index(a)
                while word[k + 1] != b:
                    k = word.index(a, k + 1)
            except (ValueError, IndexError):
                continue  # stale index: the pair was already merged away in this word
            count = counts[i]
            if word.count(a) == 1:
                _merge_once(word, k, new, count, i, pair_counts, where, new_pairs)
            else:
                words[i] = _merge_all(word, a, b, new, count, i, pair_counts, where, new_pairs)
        pair_counts.pop((a, b), None)
        for pair in new_pairs:
            c = pair_counts[pair]
            if c > 0:
                heapq.heappush(heap, (-c, key[pair[0]], key[pair[1]], pair[0], pair[1]))
    bar.close()
    return token_bytes, merges


def _merge_once(
    word: list[int],
    k: int,
    new: int,
    count: int,
    i: int,
    pair_counts: dict[tuple[int, int], int],
    where: dict[tuple[int, int], set[int]],
    new_pairs: set[tuple[int, int]],
) -> None:
    """Merge the only (a, b) of word i, at k, in place: only the pairs beside it change.

    (The count of (a, b) itself is dropped by the caller.) Pairs that leave the word also leave
    `where`, so fewer stale indices are visited later.
    """
    a, b = word[k], word[k + 1]
    if k:
        x = word[k - 1]
        pair_counts[x, a] -= count
        where[x, a].discard(i)  # a is only here, so (x, a) is gone from the word
        pair = (x, new)
        pair_counts[pair] += count
        where[pair].add(i)
        new_pairs.add(pair)
    if k + 2 < len(word):
        y = word[k + 2]
        pair_counts[b, y] -= count
        if word.count(b) == 1:
            where[b, y].discard(i)
        pair = (new, y)
        pair_counts[pair] += count
        where[pair].add(i)
        new_pairs.add(pair)
    word[k : k + 2] = (new,)


def _merge_all(
    word: list[int],
    a: int,
    b: int,
    new: int,
    count: int,
    i: int,
    pair_counts: dict[tuple[int, int], int],
    where: dict[tuple[int, int], set[int]],
    new_pairs: set[tuple[int, int]],
) -> list[int]:
    """Word i with every (a, b) merged left to right; pair counts updated by the whole-word
    difference (for words where a occurs more than once, e.g. a == b)."""
    n = len(word)
    out = []
    j = 0
    while j < n:
        if j + 1 < n and word[j] == a and word[j + 1] == b:
            out.append(new)
            j += 2
        else:
            out.append(word[j])
            j += 1
    for pair in zip(word, word[1:]):
        pair_counts[pair] -= count
    for pair in zip(out, out[1:]):
        pair_counts[pair] += count
        if new in pair:
            where[pair].add(i)
            new_pairs.add(pair)
    return out
