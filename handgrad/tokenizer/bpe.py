"""Byte-level BPE (Sennrich et al. 2016, as used by GPT-2: Radford et al. 2019), trained from scratch.

Vocabulary layout of a tokenizer trained here (the GPT-2 sizes in brackets)::

    ids 0..255                 the 256 single bytes, id b = byte b
    ids 256..256+M-1           the M merges in rank order        [M = 50,000]
    ids 256+M..                special tokens, e.g. <|endoftext|> [50256]

A tokenizer loaded with `from_hf` keeps the ids of its files (OpenAI's GPT-2 files order the byte
tokens differently), so internally everything goes through a general bytes <-> id map. The id of a
non-special token doubles as its merge *rank*, exactly as in tiktoken: to encode a piece we start
from single bytes and repeatedly join the adjacent pair whose concatenation has the lowest rank.

Training (`BPETokenizer.train`)::

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

Lone surrogates: a Python str may hold surrogate code points (U+D800..U+DFFF) that have no UTF-8
encoding. Like tiktoken, `encode` then round-trips the text through UTF-16 with 'surrogatepass':
a high+low surrogate pair becomes the character it encodes, and each lone surrogate becomes U+FFFD.
So `decode(encode(s)) == s` for every str without surrogates, and == `fix_surrogates(s)` otherwise.
"""

from __future__ import annotations

import heapq
import multiprocessing
import os
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Sequence
from itertools import chain
from typing import Any, Literal

import regex

from handgrad.tokenizer.io import (
    FORMAT_NAME,
    FORMAT_VERSION,
    TokenizerFileError,
    read_tokenizer_json,
    write_json_atomic,
)

# GPT-2's pre-tokenization regex: contractions, optional-space + letters, optional-space + digits,
# optional-space + other symbols, whitespace runs (leaving the last space to prefix the next word).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"

# Entries of the per-instance word cache before it is emptied (bounds memory on huge corpora).
WORD_CACHE_SIZE = 500_000
# Pre-tokens longer than this (bytes) are merged with a heap instead of a linear scan per step.
LONG_PIECE = 64
# File streaming during training: characters read per step, and how many characters at the end of
# a chunk stay unsplit for the next step (a pre-token may depend on up to 3 characters after it).
TRAIN_CHUNK_CHARS = 1 << 20
_CHUNK_MARGIN = 16


def fix_surrogates(text: str) -> str:
    """The text that `encode` actually encodes when `text` has no UTF-8 encoding (see module doc)."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _utf8(text: str) -> bytes:
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


def _hf_byte_keys() -> list[int]:
    """key[b] = the id Hugging Face's BpeTrainer gives byte b (its alphabet is sorted by char)."""
    b2u = bytes_to_unicode()
    order = sorted(range(256), key=lambda b: b2u[b])
    keys = [0] * 256
    for position, b in enumerate(order):
        keys[b] = position
    return keys


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
        self._cache: dict[str, list[int]] = {}
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

    def _bpe(self, piece: bytes) -> list[int]:
        """Encode one pre-token: join the lowest-rank adjacent pair until none is in the vocab."""
        ranks = self.encoder
        whole = ranks.get(piece)
        if whole is not None:  # as tiktoken: a piece that is itself a token is that token
            return [whole]
        if len(piece) > LONG_PIECE:
            return self._bpe_heap(piece)
        parts = [piece[i : i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            best_rank, best_i = None, -1
            for i in range(len(parts) - 1):
                rank = ranks.get(parts[i] + parts[i + 1])
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best_i = rank, i
            if best_rank is None:
                break
            parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        return [ranks[p] for p in parts]

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
        words = self._pat.findall(text)
        cache = self._cache
        try:
            # Fast path: every pre-token seen before (the common case on real text).
            return list(chain.from_iterable(map(cache.__getitem__, words)))
        except KeyError:
            pass
        if len(cache) > WORD_CACHE_SIZE:
            cache.clear()
        try:
            for word in words:
                if word not in cache:
                    cache[word] = self._bpe(word.encode("utf-8"))
        except UnicodeEncodeError:
            return self.encode_ordinary(fix_surrogates(text))
        return list(chain.from_iterable(map(cache.__getitem__, words)))

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
        word_counts = count_words(texts_or_files, pat, special_tokens, show_progress)
        token_bytes, merges = learn_merges(word_counts, n_merges, show_progress)
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
        write_json_atomic(path, self.to_dict())

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
        from handgrad.tokenizer.interop import export_hf

        export_hf(self, directory)

    def to_tiktoken(self, name: str = "handgrad-bpe"):
        """A `tiktoken.Encoding` with our ranks, pattern and special tokens (same ids as ours)."""
        from handgrad.tokenizer.interop import to_tiktoken

        return to_tiktoken(self, name)

    @classmethod
    def from_hf(cls, directory: str | os.PathLike[str]) -> BPETokenizer:
        """Load a GPT-2-style vocab.json + merges.txt (e.g. OpenAI's GPT-2 files)."""
        from handgrad.tokenizer.interop import from_hf

        return from_hf(cls, directory)


# ---------------------------------------------------------------------- process pool workers

_worker_tokenizer: BPETokenizer | None = None


def _init_worker(state: dict[str, Any]) -> None:
    global _worker_tokenizer
    _worker_tokenizer = BPETokenizer.from_dict(state, source="<worker state>")


def _encode_in_worker(text: str, allowed: frozenset[str], disallowed: frozenset[str]) -> list[int]:
    assert _worker_tokenizer is not None
    return _worker_tokenizer.encode(text, allowed, disallowed)


# ---------------------------------------------------------------------- training internals


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

    def split_words(segment: str, source: str) -> list[str]:
        words = pat.findall(segment)
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
        word_counts[_utf8(word)] += n
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

        new_pairs = set()
        for i in where.pop((a, b)):
            word = words[i]
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
            if len(out) == n:
                continue  # stale index: the pair was already merged away in this word
            count = counts[i]
            for pair in zip(word, word[1:]):
                pair_counts[pair] -= count
            for pair in zip(out, out[1:]):
                pair_counts[pair] += count
                if new in pair:
                    where[pair].add(i)
                    new_pairs.add(pair)
            words[i] = out
        pair_counts.pop((a, b), None)
        for pair in new_pairs:
            c = pair_counts[pair]
            if c > 0:
                heapq.heappush(heap, (-c, key[pair[0]], key[pair[1]], pair[0], pair[1]))
    bar.close()
    return token_bytes, merges
