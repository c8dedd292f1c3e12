"""Tokenizing chunks of documents on a process pool, in order, with bounded memory.

Documents are grouped into chunks of about `chunk_chars` characters; a chunk closes only where
the splitter gave a checkpoint (see prepare.split_stream), so every chunk written ends at a point
a preparation can resume from. At most MAX_IN_FLIGHT chunks per worker are queued or running, and
results come back in submission order, so the output is byte-identical for any number of workers
and memory does not grow with the corpus.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

# Chunks per worker queued or running: enough to keep every worker busy while this process reads
# and writes, few enough that memory stays bounded (4 x 256k characters per worker).
MAX_IN_FLIGHT = 4

Chunk = tuple[list[str], list[tuple[str, bool]], Any]


_worker_tokenizer: Any = None
_worker_dtype: np.dtype | None = None


def _init_worker(tokenizer_path: str, dtype: str) -> None:
    from handgrad.tokenizer import load_tokenizer

    global _worker_tokenizer, _worker_dtype
    _worker_tokenizer = load_tokenizer(tokenizer_path)
    _worker_dtype = np.dtype(dtype)


def _encode_chunk(items: list[tuple[str, bool]]) -> tuple[np.ndarray, np.ndarray, int]:
    """Encode (text, ends_document) items; returns (all tokens, tokens per item, utf-8 bytes)."""
    tok, eot = _worker_tokenizer, _worker_tokenizer.eot_token
    ids: list[int] = []
    lengths = np.empty(len(items), dtype=np.int64)
    n_bytes = 0
    for i, (text, ends_document) in enumerate(items):
        start = len(ids)
        # encode_ordinary: a document that happens to contain the text "<|endoftext|>" is encoded
        # as plain text, so only we place end-of-text tokens.
        ids.extend(tok.encode_ordinary(text))
        if ends_document and eot is not None:
            ids.append(eot)
        lengths[i] = len(ids) - start
        n_bytes += len(text.encode("utf-8"))
    tokens = np.asarray(ids, dtype=np.int64)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= tok.vocab_size):
        raise ValueError(
            f"tokenizer produced id {int(tokens.max())} outside its vocabulary of {tok.vocab_size}"
        )
    return tokens.astype(_worker_dtype), lengths, n_bytes


def chunks(pieces: Iterable[tuple[str, str, bool, Any]], chunk_chars: int) -> Iterator[Chunk]:
    """Group (split, text, ends, checkpoint) pieces into chunks of about chunk_chars characters,
    each closed at a piece with a checkpoint; yields (splits, (text, ends) items, checkpoint)."""
    splits: list[str] = []
    items: list[tuple[str, bool]] = []
    size = 0
    for split, text, ends, checkpoint in pieces:
        splits.append(split)
        items.append((text, ends))
        size += len(text)
        if size >= chunk_chars and checkpoint is not None:
            yield splits, items, checkpoint
            splits, items, size = [], [], 0
        last = checkpoint
    if items:
        yield splits, items, last


def encode_all(
    chunks: Iterator[Chunk],
    tokenizer_path: Path,
    dtype: np.dtype,
    workers: int,
) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, int, Any]]:
    """Yield (splits, tokens, lengths, n_bytes, checkpoint) per chunk, in order, encoding on
    `workers` processes with at most MAX_IN_FLIGHT chunks per worker queued or running."""
    if workers == 1:
        _init_worker(str(tokenizer_path), dtype.str)
        for splits, items, checkpoint in chunks:
            yield (splits, *_encode_chunk(items), checkpoint)
        return
    # spawn, not fork: the parent may hold threads (tqdm, datasets' streaming) whose locks a
    # forked child would inherit in an undefined state.
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=get_context("spawn"),
        initializer=_init_worker,
        initargs=(str(tokenizer_path), dtype.str),
    ) as pool:
        pending: deque[tuple[list[str], Future, Any]] = deque()
        for splits, items, checkpoint in chunks:
            pending.append((splits, pool.submit(_encode_chunk, items), checkpoint))
            if len(pending) >= MAX_IN_FLIGHT * workers:
                splits_done, future, done = pending.popleft()
                yield (splits_done, *future.result(), done)
        while pending:
            splits_done, future, done = pending.popleft()
            yield (splits_done, *future.result(), done)
