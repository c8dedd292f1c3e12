"""Byte-level BPE (Sennrich et al. 2016, as used by GPT-2: Radford et al. 2019): the tokenizer.

Vocabulary layout of a tokenizer trained here (the GPT-2 sizes in brackets)::

    ids 0..255                 the 256 single bytes, id b = byte b
    ids 256..256+M-1           the M merges in rank order        [M = 50,000]
    ids 256+M..                special tokens, e.g. <|endoftext|> [50256]

A tokenizer loaded with `from_hf` keeps the ids of its files (OpenAI's GPT-2 files order the byte
tokens differently; Hugging Face's BpeTrainer puts special tokens first), so internally everything
goes through a general bytes <-> id map. The id of a non-special token doubles as its merge
*rank*, exactly as in tiktoken: to encode a piece we start from single bytes and repeatedly join
the adjacent pair whose concatenation has the lowest rank.

Training lives in `bpe_train` (pair counting and merging), the GPT-2 / Hugging Face / tiktoken
formats in `interop`, the byte-level text helpers in `bytelevel`.

Lone surrogates (see `bytelevel`): `decode(encode(s)) == s` for every str without surrogates,
and == `fix_surrogates(s)` otherwise.
"""

from __future__ import annotations

import heapq
import multiprocessing
import os
import warnings
from collections.abc import Callable, Collection, Iterable, Sequence
from functools import reduce
from operator import iadd
from pathlib import Path
from typing import Any, Literal

import regex

from handgrad.tokenizer import interop
from handgrad.tokenizer.bpe_train import count_words, learn_merges
from handgrad.tokenizer.bytelevel import ENDOFTEXT, GPT2_PATTERN, fix_surrogates
from handgrad.tokenizer.io import (
    FORMAT_NAME,
    FORMAT_VERSION,
    TokenizerFileError,
    read_tokenizer_json,
    write_tokenizer_json,
)
from handgrad.tokenizer.pretokenize import split_gpt2

# Re-exported: the byte-level helpers are part of this module's public surface.
__all__ = ["BPETokenizer"]

# Entries of the per-instance word cache before it is emptied (bounds memory on huge corpora:
# about 200 bytes an entry). 10 MB of web-like text has about 75,000 distinct pre-tokens.
WORD_CACHE_SIZE = 1 << 17
# Pre-tokens longer than this (bytes) are merged with a heap instead of a linear scan per step.
LONG_PIECE = 64
# Rank of a pair that is not a token (above every real rank).
_NO_RANK = 1 << 62


class BPETokenizer:
    """Byte-level BPE tokenizer with a tiktoken-like API.

    Args:
        encoder: bytes -> id (= merge rank) for every non-special token; must hold all 256 bytes.
        merges: (id_a, id_b) pairs in rank order; merge i creates the token bytes(a) + bytes(b).
        special_tokens: special token text -> id.
        pattern: pre-tokenization regex (`regex` package syntax).
    """

    def __init__(
        self,
        encoder: dict[bytes, int],
        merges: Sequence[tuple[int, int]],
        special_tokens: dict[str, int] | None = None,
        pattern: str = GPT2_PATTERN,
    ):
        special_tokens = dict(special_tokens or {})
        self.encoder: dict[bytes, int] = dict(encoder)
        self.decoder: dict[int, bytes] = {i: b for b, i in self.encoder.items()}
        if len(self.decoder) != len(self.encoder):
            raise ValueError("encoder maps two different byte strings to the same id")
        missing = [b for b in range(256) if bytes([b]) not in self.encoder]
        if missing:
            raise ValueError(f"encoder lacks single-byte tokens, e.g. byte {missing[0]}")
        self._merges = [(int(a), int(b)) for a, b in merges]
        previous = -1
        for rank, (a, b) in enumerate(self._merges):
            if a not in self.decoder or b not in self.decoder:
                raise ValueError(f"merge {rank} ({a}, {b}) references an unknown token id")
            merged = self.encoder.get(self.decoder[a] + self.decoder[b])
            if merged is None:
                raise ValueError(f"merge {rank} ({a}, {b}): its result is not in the encoder")
            if merged <= previous:
                raise ValueError(
                    f"merge {rank} ({a}, {b}): result id {merged} is not above the previous "
                    f"merge's id {previous}; ids must increase with merge rank"
                )
            previous = merged
        for text, i in special_tokens.items():
            if i in self.decoder:
                raise ValueError(f"special token {text!r} reuses id {i}")
            self.decoder[i] = text.encode("utf-8")
        n = len(self.decoder)
        if set(self.decoder) != set(range(n)):
            raise ValueError(f"token ids must be exactly 0..{n - 1}")
        self._special_tokens = special_tokens
        self.pattern = pattern
        self._pat = regex.compile(pattern)
        self._gpt2 = pattern == GPT2_PATTERN
        self._cache = _WordCache(self._bpe)
        self._byte_ids = [self.encoder[bytes([b])] for b in range(256)]
        self._shift = max(1, n.bit_length())
        self._joins: dict[int, int] | None = None
        self._special_res: dict[frozenset[str], regex.Pattern] = {}

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        return len(self.decoder)

    @property
    def n_vocab(self) -> int:
        """Alias of vocab_size (tiktoken's name)."""
        return len(self.decoder)

    @property
    def eot_token(self) -> int | None:
        return self._special_tokens.get(ENDOFTEXT)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    @property
    def merges(self) -> list[tuple[int, int]]:
        return list(self._merges)

    def __repr__(self) -> str:
        return (
            f"BPETokenizer(vocab_size={self.vocab_size}, merges={len(self._merges)}, "
            f"special_tokens={self._special_tokens})"
        )

    # ------------------------------------------------------------------ encoding

    def _joins_table(self) -> dict[int, int]:
        """(u << shift | v) -> id of the token bytes(u) + bytes(v), for all tokens u, v whose
        concatenation is a token: every way of cutting every token in two (about 2 entries per
        token). Built on first use."""
        ranks = self.encoder
        shift = self._shift
        joins = {}
        for token, i in ranks.items():
            for k in range(1, len(token)):
                u, v = ranks.get(token[:k]), ranks.get(token[k:])
                if u is not None and v is not None:
                    joins[u << shift | v] = i
        self._joins = joins
        return joins

    def _bpe(self, piece: bytes) -> list[int]:
        """Encode one pre-token: join the lowest-rank adjacent pair until none is in the vocab.

        Parts are token ids; pair_ranks[j] is the rank (= id) of the token that parts j and
        j + 1 make together (_NO_RANK if none), looked up by ids in `_joins_table`, which
        equals looking up their bytes joined. A merge changes only the two ranks beside it, and
        min / index find the leftmost lowest rank in C.
        """
        ranks = self.encoder
        whole = ranks.get(piece)
        if whole is not None:  # as tiktoken: a piece that is itself a token is that token
            return [whole]
        if len(piece) > LONG_PIECE:
            return self._bpe_heap(piece)
        joins = self._joins if self._joins is not None else self._joins_table()
        get = joins.get
        shift = self._shift
        ids = list(map(self._byte_ids.__getitem__, piece))
        pair_ranks = [get(u << shift | v, _NO_RANK) for u, v in zip(ids, ids[1:])]
        while pair_ranks:
            best = min(pair_ranks)
            if best == _NO_RANK:
                break
            i = pair_ranks.index(best)
            ids[i] = best  # a token's rank is its id
            del ids[i + 1]
            del pair_ranks[i]
            if i < len(pair_ranks):
                pair_ranks[i] = get(best << shift | ids[i + 1], _NO_RANK)
            if i:
                pair_ranks[i - 1] = get(ids[i - 1] << shift | best, _NO_RANK)
        return ids

    def _bpe_heap(self, piece: bytes) -> list[int]:
        """`_bpe` in O(n log n) for long pieces (a run of 10^5 spaces would take O(n^2) there).

        Same result: a min-heap of (rank, start, end) over adjacent pairs pops the lowest rank,
        leftmost first, exactly the pair the linear scan picks. Parts form a linked list of start
        offsets; an entry is stale once either of its parts has changed.
        """
        ranks = self.encoder
        n = len(piece)
        nxt = list(range(1, n + 1))  # nxt[i]: start of the part after the part starting at i
        prv = list(range(-1, n - 1))
        alive = [True] * n

        def pair(i: int) -> tuple[int, int, int] | None:
            """Heap entry for the part starting at i joined with its successor, if a token."""
            j = nxt[i]
            if j >= n:
                return None
            rank = ranks.get(piece[i : nxt[j]])
            return None if rank is None else (rank, i, nxt[j])

        heap = [e for i in range(n - 1) if (e := pair(i)) is not None]
        heapq.heapify(heap)
        while heap:
            _, i, end = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j >= n or nxt[j] != end:
                continue  # stale: a part of this pair was merged with something else
            alive[j] = False
            nxt[i] = end
            if end < n:
                prv[end] = i
            for k in (prv[i], i):
                if k >= 0 and (e := pair(k)) is not None:
                    heapq.heappush(heap, e)
        ids = []
        i = 0
        while i < n:
            ids.append(ranks[piece[i : nxt[i]]])
            i = nxt[i]
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        """Encode `text`, treating special-token strings as ordinary text."""
        words = split_gpt2(self._pat, text) if self._gpt2 else self._pat.findall(text)
        cache = self._cache
        if len(cache) > WORD_CACHE_SIZE:
            cache.clear()
        try:
            # A pre-token not in the cache is encoded by the cache's __missing__ (`_bpe`);
            # reduce(iadd) extends one new list by each word's ids (faster than chain here).
            return reduce(iadd, map(cache.__getitem__, words), [])
        except UnicodeEncodeError:
            return self.encode_ordinary(fix_surrogates(text))

    def _special_re(self, tokens: frozenset[str]) -> regex.Pattern:
        pat = self._special_res.get(tokens)
        if pat is None:
            # Longest first, so a special token that is a prefix of another never wins.
            alternatives = sorted(tokens, key=len, reverse=True)
            pat = regex.compile("|".join(regex.escape(t) for t in alternatives))
            self._special_res[tokens] = pat
        return pat

    def _resolve_special(
        self,
        allowed_special: Literal["all"] | Collection[str],
        disallowed_special: Literal["all"] | Collection[str],
    ) -> tuple[frozenset[str], frozenset[str]]:
        known = frozenset(self._special_tokens)
        allowed = known if allowed_special == "all" else frozenset(allowed_special)
        disallowed = (
            known - allowed if disallowed_special == "all" else frozenset(disallowed_special)
        )
        unknown = (allowed | disallowed) - known
        if unknown:
            raise ValueError(
                f"not special tokens of this tokenizer: {sorted(unknown)} (known: {sorted(known)})"
            )
        return allowed, disallowed

    def encode(
        self,
        text: str,
        allowed_special: Literal["all"] | Collection[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[int]:
        """Encode `text` to token ids, handling special tokens like tiktoken.

        Special-token strings in `text` are encoded as their special id only if named in
        `allowed_special` (or it is "all"). A special-token string that is in
        `disallowed_special` ("all" = every special token not allowed) raises ValueError; pass
        `disallowed_special=()` to encode such strings as ordinary text.
        """
        allowed, disallowed = self._resolve_special(allowed_special, disallowed_special)
        if disallowed:
            match = self._special_re(disallowed).search(text)
            if match:
                raise ValueError(
                    f"text contains the special token {match.group()!r} at character "
                    f"{match.start()}; pass allowed_special={{{match.group()!r}}} (or 'all') to "
                    f"encode it as a special token, or disallowed_special=() to encode it as "
                    f"ordinary text"
                )
        if not allowed:
            return self.encode_ordinary(text)
        ids: list[int] = []
        start = 0
        for match in self._special_re(allowed).finditer(text):
            ids += self.encode_ordinary(text[start : match.start()])
            ids.append(self._special_tokens[match.group()])
            start = match.end()
        ids += self.encode_ordinary(text[start:])
        return ids

    def encode_batch(
        self,
        texts: Sequence[str],
        workers: int = 1,
        allowed_special: Literal["all"] | Collection[str] = frozenset(),
        disallowed_special: Literal["all"] | Collection[str] = "all",
    ) -> list[list[int]]:
        """Encode many texts; `workers` > 1 uses a process pool (workers == 1 runs inline)."""
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        allowed, disallowed = self._resolve_special(allowed_special, disallowed_special)
        if workers == 1 or len(texts) < 2:
            return [self.encode(t, allowed, disallowed) for t in texts]
        # Workers rebuild the tokenizer from its plain JSON-able state (no pickled objects).
        chunksize = max(1, len(texts) // (workers * 8))
        with multiprocessing.Pool(workers, _init_worker, (self.to_dict(),)) as pool:
            return pool.starmap(
                _encode_in_worker, ((t, allowed, disallowed) for t in texts), chunksize
            )

    # ------------------------------------------------------------------ decoding

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of the tokens `ids`, concatenated. Unknown ids raise ValueError."""
        decoder = self.decoder
        ids = list(ids)
        try:
            return b"".join([decoder[i] for i in ids])
        except (KeyError, TypeError):
            for position, i in enumerate(ids):
                if i not in decoder:
                    raise ValueError(
                        f"unknown token id {i!r} at position {position} (valid ids are "
                        f"0..{self.vocab_size - 1})"
                    ) from None
            raise

    def decode(self, ids: Iterable[int]) -> str:
        """Decode to text; bytes that are not valid UTF-8 become U+FFFD (never raises for that)."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ training

    @classmethod
    def train(
        cls,
        texts_or_files: Iterable[str | os.PathLike[str]] | str | os.PathLike[str],
        vocab_size: int,
        special_tokens: Sequence[str] = (ENDOFTEXT,),
        pattern: str = GPT2_PATTERN,
        *,
        show_progress: bool | None = None,
    ) -> BPETokenizer:
        """Learn a byte-level BPE vocabulary of `vocab_size` = 256 + merges + len(special_tokens).

        `texts_or_files` items that are `str` are documents; `os.PathLike` items (pathlib.Path)
        are UTF-8 text files, streamed in chunks. Special-token strings inside the text act as
        boundaries (they are not learned from). Training stops early, with a smaller vocabulary,
        if no pair is left to merge. `show_progress=None` shows tqdm bars only on a terminal.
        """
        special_tokens = tuple(special_tokens)
        if len(set(special_tokens)) != len(special_tokens) or "" in special_tokens:
            raise ValueError(f"special tokens must be distinct non-empty strings: {special_tokens}")
        n_merges = vocab_size - 256 - len(special_tokens)
        if n_merges < 0:
            raise ValueError(
                f"vocab_size {vocab_size} is below 256 bytes + {len(special_tokens)} special tokens"
            )
        pat = regex.compile(pattern)
        items = (
            [texts_or_files] if isinstance(texts_or_files, str | os.PathLike) else texts_or_files
        )
        for item in items if isinstance(items, list | tuple) else ():
            if (
                isinstance(item, str)
                and "\n" not in item
                and len(item) < 4096
                and os.path.isfile(item)
            ):
                warnings.warn(
                    f"BPETokenizer.train: {item!r} is learnt from as text, not read as a file; "
                    "pass pathlib.Path(...) to read a file",
                    stacklevel=2,
                )
        word_counts = count_words(texts_or_files, pat, special_tokens, show_progress)
        token_bytes, merges = learn_merges(word_counts, n_merges, show_progress)
        if len(merges) < n_merges:
            warnings.warn(
                f"BPETokenizer.train: the text has only {len(merges)} pairs to merge, so the "
                f"vocabulary is {256 + len(merges) + len(special_tokens)} tokens, not the "
                f"{vocab_size} asked for",
                stacklevel=2,
            )
        encoder = {b: i for i, b in enumerate(token_bytes)}
        specials = {t: len(token_bytes) + k for k, t in enumerate(special_tokens)}
        return cls(encoder, merges, specials, pattern)

    # ------------------------------------------------------------------ save / load

    def to_dict(self) -> dict[str, Any]:
        """The JSON document written by `save` (token bytes as hex, so any bytes survive)."""
        dec = self.decoder
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "type": "bpe",
            "pattern": self.pattern,
            "vocab_size": self.vocab_size,
            "special_tokens": dict(self._special_tokens),
            "byte_ids": [self.encoder[bytes([b])] for b in range(256)],
            "merges": [[dec[a].hex(), dec[b].hex()] for a, b in self._merges],
            "merge_ids": [self.encoder[dec[a] + dec[b]] for a, b in self._merges],
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer as one JSON file (atomically: temp file + os.replace)."""
        write_tokenizer_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> BPETokenizer:
        obj = read_tokenizer_json(path, expect_type="bpe")
        return cls.from_dict(obj, source=str(path))

    @classmethod
    def from_dict(cls, obj: dict[str, Any], source: str = "<dict>") -> BPETokenizer:
        """Rebuild from `to_dict()` output, checking every field (errors name `source`)."""

        def fail(problem: str) -> TokenizerFileError:
            return TokenizerFileError(source, problem)

        def field(key: str, kind: type | tuple[type, ...]) -> Any:
            if key not in obj:
                raise fail(f'missing key "{key}"')
            if not isinstance(obj[key], kind):
                raise fail(f'"{key}" has the wrong type ({type(obj[key]).__name__})')
            return obj[key]

        pattern = field("pattern", str)
        try:
            regex.compile(pattern)
        except regex.error as e:
            raise fail(f'"pattern" is not a valid regex: {e}') from None
        vocab_size = field("vocab_size", int)
        specials = field("special_tokens", dict)
        byte_ids = field("byte_ids", list)
        merges_hex = field("merges", list)
        merge_ids = field("merge_ids", list)
        if len(byte_ids) != 256:
            raise fail(f'"byte_ids" must list 256 ids, has {len(byte_ids)}')
        if len(merge_ids) != len(merges_hex):
            raise fail(
                f'"merge_ids" has {len(merge_ids)} entries but "merges" has {len(merges_hex)}'
            )
        all_ids = [*byte_ids, *merge_ids, *specials.values()]
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in all_ids):
            raise fail("token ids must be integers")
        if not all(isinstance(t, str) and t for t in specials):
            raise fail('"special_tokens" keys must be non-empty strings')
        if sorted(all_ids) != list(range(vocab_size)):
            raise fail(
                f"inconsistent vocab_size: the file says {vocab_size} but its "
                f"{len(all_ids)} token ids (bytes + merges + special tokens) are not "
                f"exactly 0..{vocab_size - 1}"
            )
        encoder = {bytes([b]): i for b, i in enumerate(byte_ids)}
        merges = []
        for rank, (item, new_id) in enumerate(zip(merges_hex, merge_ids)):
            try:
                a, b = (bytes.fromhex(h) for h in item)
            except (TypeError, ValueError):
                raise fail(f"merge {rank} is not a pair of hex byte strings: {item!r}") from None
            for part in (a, b):
                if part not in encoder:
                    raise fail(
                        f"merge {rank} references unknown token {part!r} (not a byte "
                        "or the result of an earlier merge)"
                    )
            if a + b in encoder:
                raise fail(f"merge {rank} repeats the existing token {a + b!r}")
            encoder[a + b] = new_id
            merges.append((encoder[a], encoder[b]))
        try:
            return cls(encoder, merges, specials, pattern)
        except ValueError as e:
            raise fail(str(e)) from None

    # ------------------------------------------------------------------ interop

    def export_hf(self, directory: str | os.PathLike[str]) -> None:
        """Write GPT-2-style vocab.json + merges.txt + tokenizer.json (our ids, unchanged)."""
        interop.export_hf(self, directory)

    def to_tiktoken(self, name: str = "handgrad-bpe") -> Any:
        """A `tiktoken.Encoding` with our ranks, pattern and special tokens (same ids as ours)."""
        return interop.to_tiktoken(self, name)

    @classmethod
    def from_hf(cls, directory: str | os.PathLike[str]) -> BPETokenizer:
        """Load GPT-2-style files from `directory`: vocab.json + merges.txt (Hugging Face) or
        encoder.json + vocab.bpe (OpenAI's GPT-2 release), else a byte-level BPE tokenizer.json
        (all that `transformers` >= 5 saves). Ids are kept as in the files."""
        encoder, merges, specials = interop.read_gpt2_files(directory)
        try:
            return cls(encoder, merges, specials, GPT2_PATTERN)
        except ValueError as e:
            raise ValueError(f"{Path(directory)}: {e}") from None


class _WordCache(dict):
    """Pre-token (str) -> its token ids; a missing pre-token is encoded and stored on lookup, so
    `map(cache.__getitem__, words)` encodes a text with no Python-level loop over its words.

    Ids are kept as tuples: a tuple of ints leaves the garbage collector's watch, a list would
    make every collection walk the whole cache.
    """

    def __init__(self, bpe: Callable[[bytes], list[int]]):
        super().__init__()
        self._bpe = bpe

    def __missing__(self, word: str) -> tuple[int, ...]:
        ids = self[word] = tuple(self._bpe(word.encode("utf-8")))
        return ids


# ---------------------------------------------------------------------- process pool workers

_worker_tokenizer: BPETokenizer | None = None


def _init_worker(state: dict[str, Any]) -> None:
    global _worker_tokenizer
    _worker_tokenizer = BPETokenizer.from_dict(state, source="<worker state>")


def _encode_in_worker(text: str, allowed: frozenset[str], disallowed: frozenset[str]) -> list[int]:
    assert _worker_tokenizer is not None
    return _worker_tokenizer.encode(text, allowed, disallowed)
