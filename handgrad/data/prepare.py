"""`data prepare`: text documents -> tokenizer -> flat token shards `train.bin` / `val.bin`.

Output directory layout (everything written under a temporary name first, `meta.json` last):

    tokenizer.json   the tokenizer the shards were made with (JSON, loadable by load_tokenizer)
    train.bin        all training tokens, concatenated, as raw little-endian uint16 (or uint32)
    val.bin          the same for validation
    meta.json        format version, dtype, vocab size, token/document counts, each shard's size
                     and sha256, source, what was skipped or repaired; its absence means "not
                     finished", so readers refuse

Every document is followed by the end-of-text token, so the model learns where documents stop and
a training window that spans two documents sees the boundary (GPT-2 does the same). The char
tokenizer has no such token and adds nothing, which is what nanoGPT's shakespeare_char does.

Split. With several documents each document goes wholly to one split, decided by a hash of
(seed, document index): reproducible, independent of chunking and worker count, and val gets
about `val_fraction` of the documents (at least one when val_fraction > 0). A source that is a
single document (tiny Shakespeare) is split by position instead: the first (1 - val_fraction) of
its characters train, the rest validate, exactly like nanoGPT's prepare.py.

Tokenizing runs on a process pool: documents are grouped into chunks of about `chunk_chars`
characters, at most 4 chunks per worker are in flight (bounded memory however large the source),
and results are appended to the shards in submission order, so output is byte-identical for any
number of workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import ExitStack
from itertools import islice
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from handgrad.data.sources import TextSource, open_source
from handgrad.diskspace import raise_if_disk_full
from handgrad.fileio import atomic_path
from handgrad.manifest import hash_file

FORMAT_VERSION = 1
ENDOFTEXT = "<|endoftext|>"
SPLITS = ("train", "val")
TOKENIZER_FILE = "tokenizer.json"
META_FILE = "meta.json"
# Chunks per worker queued or running: enough to keep every worker busy while this process reads
# and writes, few enough that memory stays bounded (4 x 256k characters per worker).
MAX_IN_FLIGHT = 4
_NOTHING_LOST = "the partial files were removed and files already there are unchanged"


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every token id 0..vocab_size-1, little-endian."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def is_val_document(index: int, seed: int, val_fraction: float) -> bool:
    """Whether document `index` goes to val: a uniform number in [0, 1) from a hash of
    (seed, index), compared with val_fraction."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def split_documents(
    documents: Iterable[str], val_fraction: float, seed: int
) -> Iterator[tuple[str, str, bool]]:
    """Assign documents to splits: yields (split, text, ends_document) in source order.

    `ends_document` is False only for the train part of a single document split by position (the
    text goes on in val, so no end-of-text token belongs there).
    """
    documents = iter(documents)
    head = list(islice(documents, 2))
    if len(head) == 1:
        text = head[0]
        cut = int(len(text) * (1 - val_fraction))
        yield "train", text[:cut], cut == len(text)
        if cut < len(text):
            yield "val", text[cut:], True
        return
    # One train document is held back: if the source ends without having sent anything to val,
    # the last document goes there, so a positive val_fraction never yields an empty val split.
    held: str | None = None
    n_val = 0
    for index, text in enumerate(_chain(head, documents)):
        if is_val_document(index, seed, val_fraction):
            n_val += 1
            yield "val", text, True
            continue
        if held is not None:
            yield "train", held, True
        held = text
    if held is not None:
        yield ("val" if n_val == 0 and val_fraction > 0 else "train"), held, True


def _chain(head: list[str], rest: Iterator[str]) -> Iterator[str]:
    yield from head
    yield from rest


# ---------------------------------------------------------------------------------------------
# Tokenizer: a file, `char`, or `train:N`


def build_tokenizer(spec: Any, source: TextSource, val_fraction: float, seed: int) -> Any:
    """Load or build the tokenizer named by `--tokenizer`.

    `char` takes its alphabet from all the text, train and val: nanoGPT does this for
    shakespeare_char (65 symbols), and an alphabet learnt on train alone could not encode a val
    document holding a character train never had. `train:N` learns BPE on train documents only.
    A tokenizer object (anything with encode_ordinary) is used as is.
    """
    from handgrad.tokenizer import BPETokenizer, CharTokenizer, load_tokenizer

    if hasattr(spec, "encode_ordinary"):
        return spec
    spec = str(spec)
    if spec == "char":
        return CharTokenizer.train(source.documents(quiet=True))
    if spec.startswith("train:"):
        try:
            vocab_size = int(spec.removeprefix("train:"))
        except ValueError:
            raise ValueError(f"--tokenizer {spec!r}: expected train:N with an integer N") from None
        pieces = split_documents(source.documents(quiet=True), val_fraction, seed)
        train_texts = (text for split, text, _ in pieces if split == "train")  # streamed
        return BPETokenizer.train(train_texts, vocab_size, special_tokens=(ENDOFTEXT,))
    path = Path(spec)
    if path.suffix != ".json":
        raise ValueError(
            f"--tokenizer {spec!r}: expected a tokenizer .json file, 'char' or 'train:N'"
        )
    if not path.is_file():
        raise FileNotFoundError(f"--tokenizer {spec}: no such file")
    return load_tokenizer(path)


# ---------------------------------------------------------------------------------------------
# Encoding, in worker processes or in this one

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


def _chunks(
    pieces: Iterable[tuple[str, str, bool]], chunk_chars: int
) -> Iterator[tuple[list[str], list[tuple[str, bool]]]]:
    """Group (split, text, ends) pieces into chunks of about chunk_chars characters."""
    splits: list[str] = []
    items: list[tuple[str, bool]] = []
    size = 0
    for split, text, ends in pieces:
        splits.append(split)
        items.append((text, ends))
        size += len(text)
        if size >= chunk_chars:
            yield splits, items
            splits, items, size = [], [], 0
    if items:
        yield splits, items


def _encode_all(
    chunks: Iterator[tuple[list[str], list[tuple[str, bool]]]],
    tokenizer_path: Path,
    dtype: np.dtype,
    workers: int,
) -> Iterator[tuple[list[str], np.ndarray, np.ndarray, int]]:
    """Yield (splits, tokens, lengths, n_bytes) per chunk, in order, encoding on `workers`
    processes with at most MAX_IN_FLIGHT chunks per worker queued or running."""
    if workers == 1:
        _init_worker(str(tokenizer_path), dtype.str)
        for splits, items in chunks:
            yield (splits, *_encode_chunk(items))
        return
    # spawn, not fork: the parent may hold threads (tqdm, datasets' streaming) whose locks a
    # forked child would inherit in an undefined state.
    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=get_context("spawn"),
        initializer=_init_worker,
        initargs=(str(tokenizer_path), dtype.str),
    ) as pool:
        pending: deque[tuple[list[str], Future]] = deque()
        for splits, items in chunks:
            pending.append((splits, pool.submit(_encode_chunk, items)))
            if len(pending) >= MAX_IN_FLIGHT * workers:
                splits_done, future = pending.popleft()
                yield (splits_done, *future.result())
        while pending:
            splits_done, future = pending.popleft()
            yield (splits_done, *future.result())


# ---------------------------------------------------------------------------------------------
# prepare


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def prepare(
    source: str | os.PathLike,
    tokenizer: Any,
    out: str | os.PathLike,
    val_fraction: float = 0.0005,
    workers: int | None = None,
    text_field: str = "text",
    seed: int = 1337,
    skip_bad_lines: bool = False,
    rows: Iterable[dict[str, Any]] | None = None,
    chunk_chars: int = 1 << 18,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize `source` into `out/{train,val}.bin` + `tokenizer.json` + `meta.json`.

    source: `pydocs`, `shakespeare`, `openwebtext`, or a file/directory/glob of .txt/.jsonl/.parquet.
    tokenizer: a tokenizer .json file, `char`, `train:N` (BPE with N tokens learnt on train), or a
        tokenizer object.
    val_fraction: share of documents (or, for a single document, of characters) kept for val.
    workers: tokenizer processes (default: all cores).
    rows: replaces the hub stream for `openwebtext` (an iterable of {text_field: str} dicts).
    Returns the meta dict also written to `out/meta.json`.

    With workers > 1 the pool uses the "spawn" start method (no fork: the caller may have threads),
    so a script that calls prepare() needs the usual `if __name__ == "__main__":` guard.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    src = open_source(source, text_field=text_field, skip_bad_lines=skip_bad_lines, rows=rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # Every file is written under a temporary name and renamed when the block ends, in the
    # reverse order of entering: tokenizer, shards, and meta.json last.
    try:
        with ExitStack() as stack:
            tmp = {
                name: stack.enter_context(
                    # The tokenizer's temp name keeps a .json suffix in case its save() cares.
                    atomic_path(out / name, suffix=".json" if name == TOKENIZER_FILE else "")
                )
                for name in (META_FILE, "val.bin", "train.bin", TOKENIZER_FILE)
            }
            tok = build_tokenizer(tokenizer, src, val_fraction, seed)
            if isinstance(tokenizer, str | os.PathLike) and Path(tokenizer).suffix == ".json":
                shutil.copyfile(tokenizer, tmp[TOKENIZER_FILE])
            else:
                tok.save(tmp[TOKENIZER_FILE])
            if tok.eot_token is None and type(tok).__name__ != "CharTokenizer":
                warnings.warn(
                    f"the tokenizer has no {ENDOFTEXT} token: documents are concatenated without a "
                    "separator",
                    stacklevel=2,
                )
            dtype = token_dtype(tok.vocab_size)
            counts = _write_shards(
                src, tmp, dtype, val_fraction, seed, workers, chunk_chars, progress
            )
            for split in SPLITS:  # `handgrad verify` checks the shards against these
                counts[split]["sha256"] = hash_file(tmp[f"{split}.bin"], "sha256")
            meta = {
                "format_version": FORMAT_VERSION,
                "source": src.description,
                "tokenizer": {
                    "file": TOKENIZER_FILE,
                    "sha256": hash_file(tmp[TOKENIZER_FILE], "sha256"),
                    "spec": (
                        os.fspath(tokenizer)
                        if isinstance(tokenizer, str | os.PathLike)
                        else type(tokenizer).__name__
                    ),
                    "type": type(tok).__name__,
                },
                "vocab_size": int(tok.vocab_size),
                "eot_token": tok.eot_token,
                "dtype": dtype.name,
                "val_fraction": val_fraction,
                "seed": seed,
                "split_mode": counts.pop("split_mode"),
                "splits": counts,
                **src.stats.as_dict(),
            }
            tmp[META_FILE].write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            # Publish: drop the old meta.json first, so that until the new one lands no reader can
            # pair old metadata with new shards.
            (out / META_FILE).unlink(missing_ok=True)
    except OSError as err:
        raise_if_disk_full(err, "token shards", out, note=_NOTHING_LOST)
        raise
    return meta


def _write_shards(
    src: TextSource,
    tmp: dict[str, Path],
    dtype: np.dtype,
    val_fraction: float,
    seed: int,
    workers: int,
    chunk_chars: int,
    progress: bool,
) -> dict[str, Any]:
    counts = {split: {"file": f"{split}.bin", "tokens": 0, "documents": 0} for split in SPLITS}
    documents = src.documents()
    head = list(islice(documents, 2))
    if not head:
        raise ValueError(
            f"source {src.description} has no documents "
            f"({src.stats.empty_documents_skipped} empty skipped)"
        )
    split_mode = "position" if len(head) == 1 else "document"
    pieces = split_documents(_chain(head, documents), val_fraction, seed)
    chunks = _chunks(pieces, chunk_chars)
    files = {split: open(tmp[f"{split}.bin"], "wb") for split in SPLITS}
    bar = tqdm(
        desc="tokenizing",
        unit="B",
        unit_scale=True,
        unit_divisor=1000,
        disable=not progress or None,  # None: tqdm turns itself off when stderr is not a TTY
        file=sys.stderr,
    )
    start, n_tokens = time.perf_counter(), 0
    try:
        for splits, tokens, lengths, n_bytes in _encode_all(
            chunks, tmp[TOKENIZER_FILE], dtype, workers
        ):
            offset = 0
            for split, length in zip(splits, lengths):
                tokens[offset : offset + length].tofile(files[split])
                counts[split]["tokens"] += int(length)
                counts[split]["documents"] += 1
                offset += length
            n_tokens += int(lengths.sum())
            bar.update(n_bytes)
            bar.set_postfix_str(f"{n_tokens / (time.perf_counter() - start):,.0f} tok/s")
    finally:
        bar.close()
        for f in files.values():
            f.close()
    for split in SPLITS:
        counts[split]["bytes"] = counts[split]["tokens"] * dtype.itemsize
    counts["split_mode"] = split_mode
    return counts
