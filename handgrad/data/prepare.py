"""`data prepare`: text documents -> tokenizer -> flat token shards `train.bin` / `val.bin`.

Output directory layout:

    tokenizer.json   the tokenizer the shards were made with (JSON, loadable by load_tokenizer)
    train.bin        all training tokens, concatenated, as raw little-endian uint16 (or uint32)
    val.bin          the same for validation
    meta.json        format version, dtype, vocab size, token/document counts, each shard's size
                     and sha256, source, what was skipped or repaired, and the preparation's
                     identity; written last, its absence means "not finished", so readers refuse

Resumable (see resume.py): while it runs the directory holds progress.json and
{train,val}.bin.partial; a preparation killed at any moment, `kill -9` included, and started
again with the same command goes on from its last checkpoint, and its final files are
byte-identical to those of a run that was never interrupted. A different source, tokenizer or
option into a directory holding another preparation is refused.

Every document is followed by the end-of-text token, so the model learns where documents stop and
a training window that spans two documents sees the boundary (GPT-2 does the same). The char
tokenizer has no such token and adds nothing, which is what nanoGPT's shakespeare_char does.

Split. With several documents each document goes wholly to one split, decided by a hash of
(seed, document index): reproducible, independent of chunking and worker count, and val gets
about `val_fraction` of the documents (at least one when val_fraction > 0). A source that is a
single document (tiny Shakespeare) is split by position instead: the first (1 - val_fraction) of
its characters train, the rest validate, exactly like nanoGPT's prepare.py.

Tokenizing runs on a process pool: documents are grouped into chunks of about `chunk_chars`
characters, at most MAX_IN_FLIGHT chunks per worker are in flight (memory bounded by the chunks in
flight and the workers, however large the source), and results are appended to the shards in
submission order, so output is byte-identical for any number of workers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from handgrad.data.encode import MAX_IN_FLIGHT, chunks, encode_all
from handgrad.data.report import Progress
from handgrad.data.resume import (
    FORMAT_VERSION,
    META_FILE,
    PROGRESS_FILE,
    PreparationRefused,
    check_out_dir,
    identity,
    open_partials,
    partial_path,
    read_progress,
    remove_stale_temporaries,
    sync,
    write_progress,
)
from handgrad.data.sources import TextSource, open_source
from handgrad.diskspace import raise_if_disk_full
from handgrad.fileio import atomic_path, fsync_dir, write_json_atomic
from handgrad.manifest import hash_file

__all__ = [
    "ENDOFTEXT",
    "FORMAT_VERSION",
    "MAX_IN_FLIGHT",
    "META_FILE",
    "SPLITS",
    "TOKENIZER_FILE",
    "PreparationRefused",
    "build_tokenizer",
    "default_workers",
    "is_val_document",
    "prepare",
    "split_documents",
    "split_stream",
    "token_dtype",
]

ENDOFTEXT = "<|endoftext|>"
SPLITS = ("train", "val")
TOKENIZER_FILE = "tokenizer.json"
# Least seconds between two checkpoints: each one syncs the shards to disk.
CHECKPOINT_SECONDS = 5.0
_NOTHING_KEPT = "nothing was written"
_KEPT = "the work done so far is kept in {out}: free some space and run the same command to resume"


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
    """Assign documents to splits: yields (split, text, ends_document), each split's documents in
    source order.

    `ends_document` is False only for the train part of a single document split by position (the
    text goes on in val, so no end-of-text token belongs there).
    """
    stream = ((text, {}) for text in documents)
    for split, text, ends, _ in split_stream(stream, val_fraction, seed):
        yield split, text, ends


def split_stream(
    stream: Iterable[tuple[str, dict[str, Any]]],
    val_fraction: float,
    seed: int,
    start: dict[str, Any] | None = None,
) -> Iterator[tuple[str, str, bool, dict[str, Any] | None]]:
    """`split_documents` over (text, source position) pairs, resumable: each piece comes with
    the checkpoint to resume from once it and every piece before it are written, or None where
    no such point exists (a piece held back, see below). `start` is such a checkpoint.

    Until the first val document, one train document is held back: if the source ends without
    having sent anything to val, the last document goes there, so a positive val_fraction never
    yields an empty val split. A checkpoint then points before the held document, which the
    resumed run reads again.
    """
    stream = iter(stream)
    index = start["index"] if start else 0
    n_val = start["n_val"] if start else 0
    mode = start["split_mode"] if start else None
    position = start["source"] if start else None
    head = []
    if mode is None:
        head = list(islice(stream, 2))
        if not head:
            raise ValueError("the source has no documents")
        mode = "position" if len(head) == 1 else "document"

    def state() -> dict[str, Any]:
        return {"source": position, "index": index, "n_val": n_val, "split_mode": mode}

    if mode == "position":
        if head:
            text, position = head[0]
            cut = int(len(text) * (1 - val_fraction))
            index, n_val = 1, int(cut < len(text))
            if cut < len(text):
                yield "train", text[:cut], False, None
                yield "val", text[cut:], True, state()
            else:
                yield "train", text, True, state()
        return
    hold = val_fraction > 0
    held: str | None = None
    for text, at in _chain(head, stream):
        before = state()
        position = at
        is_val = is_val_document(index, seed, val_fraction)
        index += 1
        if is_val:
            n_val += 1
            if held is not None:
                yield "val", text, True, None
                yield "train", held, True, state()
                held = None
            else:
                yield "val", text, True, state()
        elif hold and n_val == 0:
            if held is not None:
                yield "train", held, True, before
            held = text
        else:
            yield "train", text, True, state()
    if held is not None:
        n_val += 1
        yield "val", held, True, state()


def _chain(head: list, rest: Iterator) -> Iterator:
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
# prepare


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _tokenizer_identity(spec: Any) -> tuple[str, str | None]:
    """(spec as recorded, sha256 of a tokenizer file or object); checks the spec's form early,
    before anything is written."""
    if hasattr(spec, "encode_ordinary"):
        return type(spec).__name__, hashlib.sha256(
            json.dumps(spec.to_dict(), sort_keys=True).encode()
        ).hexdigest()
    text = os.fspath(spec)
    if text == "char":
        return text, None
    if text.startswith("train:"):
        try:
            int(text.removeprefix("train:"))
        except ValueError:
            raise ValueError(f"--tokenizer {text!r}: expected train:N with an integer N") from None
        return text, None
    path = Path(text)
    if path.suffix != ".json":
        raise ValueError(
            f"--tokenizer {text!r}: expected a tokenizer .json file, 'char' or 'train:N'"
        )
    if not path.is_file():
        raise FileNotFoundError(f"--tokenizer {text}: no such file")
    return text, hash_file(path, "sha256")


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
    checkpoint_seconds: float = CHECKPOINT_SECONDS,
) -> dict[str, Any]:
    """Tokenize `source` into `out/{train,val}.bin` + `tokenizer.json` + `meta.json`.

    source: `pydocs`, `shakespeare`, `openwebtext`, or a file/directory/glob of .txt/.jsonl/.parquet.
    tokenizer: a tokenizer .json file, `char`, `train:N` (BPE with N tokens learnt on train), or a
        tokenizer object.
    val_fraction: share of documents (or, for a single document, of characters) kept for val.
    workers: tokenizer processes (default: all cores).
    rows: replaces the hub stream for `openwebtext` (an iterable of {text_field: str} dicts).
    checkpoint_seconds: least time between two checkpoints of the progress (0: every chunk).
    Returns the meta dict also written to `out/meta.json`.

    `out` may be absent or empty (a new preparation), hold an unfinished run of this same
    preparation (resumed) or a finished one (returned as is); anything else is refused with
    PreparationRefused.

    With workers > 1 the pool uses the "spawn" start method (no fork: the caller may have threads),
    so a script that calls prepare() needs the usual `if __name__ == "__main__":` guard.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    workers = default_workers() if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    tok_spec, tok_sha = _tokenizer_identity(tokenizer)
    src = open_source(source, text_field=text_field, skip_bad_lines=skip_bad_lines, rows=rows)
    out = Path(out)
    ident = identity(src, tok_spec, tok_sha, val_fraction, seed)
    found = check_out_dir(out, ident)
    if found == "finished":
        if progress:
            print(f"data prepare: {out} is already prepared; nothing to do", file=sys.stderr)
        return json.loads((out / META_FILE).read_text(encoding="utf-8"))
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tok_path = out / TOKENIZER_FILE
    try:
        if found == "new":
            write_progress(out, ident, None)
            checkpoint = None
        else:
            remove_stale_temporaries(out)
            checkpoint = read_progress(out)["checkpoint"]
        if tok_path.is_file():  # learnt or copied by an earlier run: reused
            tok = _load_own_tokenizer(tok_path, tok_sha)
        else:
            tok = build_tokenizer(tokenizer, src, val_fraction, seed)
            with atomic_path(tok_path, suffix=".json") as tmp:  # a save() may care for .json
                if isinstance(tokenizer, str | os.PathLike):
                    if Path(tokenizer).suffix == ".json":
                        shutil.copyfile(tokenizer, tmp)
                    else:
                        tok.save(tmp)
                else:
                    tok.save(tmp)
        if tok.eot_token is None and type(tok).__name__ != "CharTokenizer":
            warnings.warn(
                f"the tokenizer has no {ENDOFTEXT} token: documents are concatenated without a "
                "separator",
                stacklevel=2,
            )
        dtype = token_dtype(tok.vocab_size)
        if not (checkpoint and checkpoint.get("finished")):
            checkpoint = _write_shards(
                src, out, ident, checkpoint, dtype, val_fraction, seed, workers, chunk_chars,
                progress, checkpoint_seconds,
            )  # fmt: skip
        return _finish(out, src, tok, ident, checkpoint, dtype, val_fraction, seed)
    except BaseException as err:
        kept = _discard_if_nothing_done(out, created)
        if isinstance(err, OSError):
            note = _KEPT.format(out=out) if kept else _NOTHING_KEPT
            raise_if_disk_full(err, "token shards", out, note=note)
        raise


def _discard_if_nothing_done(out: Path, created: bool) -> bool:
    """After a failure: with no tokens recorded yet, remove what this preparation wrote (and the
    directory, if it made it), so that a failed start leaves nothing to be mistaken for data.
    Returns whether work was kept for a resume."""
    try:
        if read_progress(out)["checkpoint"] is not None:
            return True
    except (OSError, ValueError):
        pass  # no progress file (or not a readable one): nothing of ours to keep
    for name in (TOKENIZER_FILE, *(partial_path(out, s).name for s in SPLITS), PROGRESS_FILE):
        (out / name).unlink(missing_ok=True)
    remove_stale_temporaries(out)
    if created and not any(out.iterdir()):
        out.rmdir()
    return False


def _load_own_tokenizer(path: Path, sha: str | None) -> Any:
    from handgrad.tokenizer import load_tokenizer

    if sha is not None and hash_file(path, "sha256") != sha:
        raise PreparationRefused(
            f"{path} is not the tokenizer this preparation was started with; delete "
            f"{path.parent} to prepare it again"
        )
    return load_tokenizer(path)


def _write_shards(
    src: TextSource,
    out: Path,
    ident: dict[str, Any],
    start: dict[str, Any] | None,
    dtype: np.dtype,
    val_fraction: float,
    seed: int,
    workers: int,
    chunk_chars: int,
    progress: bool,
    checkpoint_seconds: float,
) -> dict[str, Any]:
    """Tokenize from checkpoint `start` (None: the beginning) to the end of the source into the
    partial shards, checkpointing on the way; returns the final checkpoint."""
    counts = (
        start["splits"] if start else {split: {"tokens": 0, "documents": 0} for split in SPLITS}
    )
    text_bytes = start["text_bytes"] if start else 0
    sizes = {s: counts[s]["tokens"] * dtype.itemsize for s in SPLITS}
    files = open_partials(out, SPLITS, sizes if start else None)
    stream = src.stream(start=start["source"] if start else None)
    pieces = split_stream(stream, val_fraction, seed, start)
    report = Progress(
        progress,
        src.size,
        start={
            "documents": sum(counts[s]["documents"] for s in SPLITS),
            "text_bytes": text_bytes,
            "tokens": sum(counts[s]["tokens"] for s in SPLITS),
            "input": (start["source"] or {}).get("at", {}).get("bytes", 0) if start else 0,
        },
    )
    last_checkpoint = time.perf_counter()
    state: dict[str, Any] | None = None
    try:
        encoded = encode_all(chunks(pieces, chunk_chars), out / TOKENIZER_FILE, dtype, workers)
        for splits, tokens, lengths, n_bytes, state in encoded:
            offset = 0
            for split, length in zip(splits, lengths):
                tokens[offset : offset + length].tofile(files[split])
                counts[split]["tokens"] += int(length)
                counts[split]["documents"] += 1
                offset += length
            text_bytes += n_bytes
            at = (state["source"] or {}).get("at", {}) if state else {}
            report.update(len(splits), n_bytes, int(lengths.sum()), at.get("bytes", 0))
            if time.perf_counter() - last_checkpoint >= checkpoint_seconds:
                sync(files)
                write_progress(out, ident, {**state, "splits": counts, "text_bytes": text_bytes})
                last_checkpoint = time.perf_counter()
        sync(files)
    except ValueError as e:
        if str(e) == "the source has no documents":
            raise ValueError(
                f"source {src.description} has no documents "
                f"({src.stats.empty_documents_skipped} empty skipped)"
            ) from None
        raise
    finally:
        for f in files.values():
            f.close()
    final = {
        **(state or start or {}),
        "splits": counts,
        "text_bytes": text_bytes,
        "stats": src.stats.as_dict(),
        "finished": True,
    }
    write_progress(out, ident, final)
    report.close(summary=final)
    return final


def _finish(
    out: Path,
    src: TextSource,
    tok: Any,
    ident: dict[str, Any],
    checkpoint: dict[str, Any],
    dtype: np.dtype,
    val_fraction: float,
    seed: int,
) -> dict[str, Any]:
    """Publish a finished preparation: partial shards renamed, meta.json written, progress.json
    removed. Each step can be redone, so a kill in between is finished by the next run."""
    splits = {}
    for split in SPLITS:
        part, final = partial_path(out, split), out / f"{split}.bin"
        if part.exists():
            os.replace(part, final)
        info = checkpoint["splits"][split]
        splits[split] = {
            "file": final.name,
            "tokens": info["tokens"],
            "documents": info["documents"],
            "bytes": info["tokens"] * dtype.itemsize,
            "sha256": hash_file(final, "sha256"),  # `handgrad verify` checks the shards against it
        }
    fsync_dir(out)
    meta = {
        "format_version": FORMAT_VERSION,
        "source": src.description,
        "tokenizer": {
            "file": TOKENIZER_FILE,
            "sha256": hash_file(out / TOKENIZER_FILE, "sha256"),
            "spec": ident["tokenizer"],
            "type": type(tok).__name__,
        },
        "vocab_size": int(tok.vocab_size),
        "eot_token": tok.eot_token,
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "seed": seed,
        "split_mode": checkpoint["split_mode"],
        "splits": splits,
        **checkpoint["stats"],
        "preparation": ident,
    }
    write_json_atomic(out / META_FILE, meta)
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    return meta
