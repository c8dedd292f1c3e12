"""Read prepared token shards and cut them into training batches.

A prepared directory (see prepare.py) holds `train.bin`/`val.bin` (flat token ids), `meta.json` and
`tokenizer.json`. The shards are memory-mapped, never read whole: a 9 GB OpenWebText train.bin
costs no RAM until batches touch it. Before mapping, the file size is checked against meta.json,
so a half-written or truncated shard is refused instead of silently training on garbage.

Batches follow nanoGPT: a window of block_size + 1 consecutive tokens w gives the input
x = w[:-1] and the next-token targets y = w[1:], so y[t] is the token that follows x[..t].
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from handgrad.data.prepare import FORMAT_VERSION, META_FILE, SPLITS
from handgrad.manifest import hash_file


def load_meta(data_dir: str | os.PathLike) -> dict[str, Any]:
    """meta.json of a prepared directory; a clear error when it is missing or of another format."""
    path = Path(data_dir) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {data_dir} is not a prepared data directory, or its preparation "
            "did not finish (meta.json is written last); run `handgrad data prepare` again"
        )
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format_version {version!r}, this handgrad reads {FORMAT_VERSION}; "
            "prepare the data again"
        )
    return meta


def load_split(
    data_dir: str | os.PathLike, split: str, meta: dict[str, Any] | None = None
) -> np.ndarray:
    """The tokens of `split` ("train" or "val") as a read-only memmap, checked against meta.json.

    An empty split is returned as an empty array (a zero-length file cannot be mapped).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    meta = load_meta(data_dir) if meta is None else meta
    info = meta["splits"][split]
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")  # shards are little-endian everywhere
    path = Path(data_dir) / info["file"]
    expected = info["tokens"] * dtype.itemsize
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found (meta.json expects {expected} bytes = {info['tokens']} {dtype} "
            "tokens); prepare the data again"
        )
    actual = path.stat().st_size
    if actual != expected:
        raise ValueError(
            f"{path} is {actual} bytes but meta.json expects {expected} bytes "
            f"({info['tokens']} {dtype} tokens): the shard is truncated or from another run; "
            "prepare the data again"
        )
    if expected == 0:
        return np.empty(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(info["tokens"],))


class TokenShards:
    """A prepared data directory: `meta`, `vocab_size`, `tokenizer_path`, and the splits.

    data = TokenShards("data/shakespeare_char")
    model = GPT(GPTConfig(vocab_size=data.vocab_size, ...))
    x, y = get_batch(data.train, batch_size=12, block_size=64, rng=rng)
    """

    def __init__(self, data_dir: str | os.PathLike):
        self.dir = Path(data_dir)
        self.meta = load_meta(self.dir)
        self._splits = {split: load_split(self.dir, split, self.meta) for split in SPLITS}

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eot_token(self) -> int | None:
        return self.meta["eot_token"]

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / self.meta["tokenizer"]["file"]

    @property
    def train(self) -> np.ndarray:
        return self._splits["train"]

    @property
    def val(self) -> np.ndarray:
        return self._splits["val"]

    def mask(self, name: str) -> np.ndarray | None:
        """The loss mask of split ``name`` (1: a target to train on), or None when every
        token is one. Chat data has one (``data/chat.py``)."""
        info = self.meta["splits"][name]
        if "mask_file" not in info:
            return None
        path = self.dir / info["mask_file"]
        if not path.is_file() or path.stat().st_size != info["tokens"]:
            raise ValueError(
                f"{path}: missing, or not one byte per token of {info['file']} "
                f"({info['tokens']}); prepare the data again"
            )
        if info["tokens"] == 0:
            return np.empty(0, dtype=np.uint8)
        return np.memmap(path, dtype=np.uint8, mode="r", shape=(info["tokens"],))

    def split(self, name: str) -> np.ndarray:
        if name not in self._splits:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        return self._splits[name]

    def load_tokenizer(self) -> Any:
        """The tokenizer the shards were made with, after checking its sha256 against meta.json."""
        from handgrad.tokenizer import load_tokenizer

        path = self.tokenizer_path
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found (named in {self.dir / META_FILE})")
        expected, actual = self.meta["tokenizer"]["sha256"], hash_file(path, "sha256")
        if actual != expected:
            raise ValueError(
                f"{path}: sha256 {actual} does not match meta.json's {expected}; "
                "the tokenizer was replaced after the data was prepared"
            )
        return load_tokenizer(path)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={len(self._splits[s]):,}" for s in SPLITS)
        return f"TokenShards({str(self.dir)!r}, vocab_size={self.vocab_size}, {sizes})"


def _check_length(tokens: np.ndarray, block_size: int) -> None:
    if len(tokens) < block_size + 1:
        raise ValueError(
            f"split has {len(tokens)} tokens, fewer than block_size + 1 = {block_size + 1} "
            "needed for one (x, y) window; use a smaller block_size or more data"
        )


def _windows(
    tokens: np.ndarray, starts: np.ndarray, block_size: int, mask: np.ndarray | None = None
) -> tuple[np.ndarray, ...]:
    # (B, T+1) windows in one fancy-indexing gather; int64 because that is what embedding lookup
    # and cross-entropy index with.
    index = starts[:, None] + np.arange(block_size + 1)
    w = tokens[index].astype(np.int64)
    x, y = np.ascontiguousarray(w[:, :-1]), np.ascontiguousarray(w[:, 1:])
    if mask is not None:  # targets the loss leaves out: -1, cross_entropy's ignore_index
        y = y.copy()  # for one window, x and y above are views of the same w
        y[mask[index[:, 1:]] == 0] = -1
    return x, y


def get_batch(
    tokens: np.ndarray,
    batch_size: int,
    block_size: int,
    rng: np.random.Generator,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """A random batch: x, y of shape (batch_size, block_size), int64, with y = x shifted by one.
    With a loss ``mask`` (one per token), targets whose mask is 0 are -1 (ignored by the loss)
    and a window without any target left is drawn again.

    Window starts are uniform over [0, len(tokens) - block_size - 1], drawn from `rng` only, so
    the batch sequence is fixed by the generator state (save `rng.bit_generator.state` to resume).
    """
    _check_length(tokens, block_size)
    starts = rng.integers(0, len(tokens) - block_size, size=batch_size)
    if mask is not None:  # a window with no target to learn from is drawn again
        for _ in range(1000):
            empty = ~mask[starts[:, None] + np.arange(1, block_size + 1)].any(axis=1)
            if not empty.any():
                break
            starts[empty] = rng.integers(0, len(tokens) - block_size, size=int(empty.sum()))
        else:
            raise ValueError(
                f"the loss mask leaves (almost) no window of {block_size} tokens with a target "
                "to train on; is the data's mask empty?"
            )
    return _windows(tokens, starts, block_size, mask)


def iter_batches_sequential(
    tokens: np.ndarray,
    batch_size: int,
    block_size: int,
    n_batches: int,
    mask: np.ndarray | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`n_batches` fixed batches for evaluation: batch_size * n_batches windows with evenly spaced
    starts from the first to the last possible one. Same data, same batches, whoever asks."""
    _check_length(tokens, block_size)
    n_windows = batch_size * n_batches
    last_start = len(tokens) - block_size - 1
    # Integer arithmetic: start_i = floor(i * last_start / (n_windows - 1)), exact on every platform.
    starts = np.arange(n_windows, dtype=np.int64) * last_start // max(n_windows - 1, 1)
    for b in range(n_batches):
        yield _windows(tokens, starts[b * batch_size : (b + 1) * batch_size], block_size, mask)
