"""Tensors to and from safetensors files (never pickled objects), through the ``safetensors``
package.

A safetensors file is::

    8 bytes       N, the header length (unsigned little-endian 64-bit)
    N bytes       a JSON object: {"__metadata__": {str: str},
                                  name: {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}}
    the rest      the raw little-endian tensor bytes; tensor `name` is bytes [b, e) of it

It is what Hugging Face uses for model weights, so files written here load in
``safetensors``/``transformers`` and the other way round. This module adds what the package
leaves to its callers: writes are atomic (a crash never leaves a truncated file under the real
name), and a bad file is refused with its name and the problem in words, never a raw error.

``handgrad.save(state_dict, path)`` / ``handgrad.load(path)`` (in ``creation.py``) are built on
``save_file`` / ``load_file``: state dicts of Tensors (or arrays) in, Tensors out.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file as _st_save_file

from handgrad import backend as B
from handgrad.fileio import atomic_path

# The NumPy dtypes a handgrad array can have and safetensors stores (bfloat16 from ml_dtypes).
_DTYPES = frozenset(
    np.dtype(d)
    for d in (B.float64, B.float32, B.float16, B.bfloat16, B.int64, B.int32, B.int16, B.int8,
              B.uint8, B.uint16, B.uint32, np.uint64, B.bool_)
)  # fmt: skip
_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}  # fmt: skip


class SafetensorsError(ValueError):
    """A file that is not valid safetensors; the message names the file and the problem."""


# ----------------------------------------------------------------------------------------
# arrays


def save_file(
    tensors: Mapping[str, Any],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (name -> array or Tensor) to ``path`` atomically; ``metadata`` is
    free text (str -> str) kept in the header."""
    if metadata:
        bad = {k: v for k, v in metadata.items() if not isinstance(v, str)}
        if bad:
            raise TypeError(f"safetensors metadata values must be str; got {bad}")
    arrays = {}
    for name, value in tensors.items():
        # np.require keeps 0-d shapes (ascontiguousarray would make them 1-d).
        a = np.require(B.to_numpy(_array_of(value)), requirements="C")
        if a.dtype not in _DTYPES:
            raise TypeError(f"safetensors: tensor {name!r} has unsupported dtype {a.dtype}")
        arrays[name] = a
    with atomic_path(path) as tmp:
        _st_save_file(arrays, tmp, metadata=dict(metadata) if metadata else None)


def load_file(path: str | os.PathLike, mmap: bool = False) -> Mapping[str, np.ndarray]:
    """Every tensor of a safetensors file as NumPy arrays (name -> array).

    With ``mmap=True`` the result is a read-only mapping that reads a tensor from the memory
    mapped file when it is looked up, so loading a large model into its parameters one tensor
    at a time needs memory for one tensor beyond the model, not for a second model."""
    with _open(path) as f:
        if mmap:
            return _LazyTensors(path, f.keys())
        return _tensors(path, f, f.keys())


def load_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header's ``__metadata__`` (empty when the file has none)."""
    with _open(path) as f:
        return dict(f.metadata() or {})


def _array_of(value: Any) -> Any:
    """The array of a Tensor (its ``.data``), or ``value`` itself when it is an array: NumPy
    and CuPy arrays have a ``.data`` too (a raw buffer), so they are told apart by the array
    interfaces only arrays expose."""
    if hasattr(value, "__array_interface__") or hasattr(value, "__cuda_array_interface__"):
        return value
    return getattr(value, "data", value)


# ----------------------------------------------------------------------------------------
# reading, with errors that say what is wrong


class _open:
    """``safe_open`` with our errors: a missing file is FileNotFoundError, anything else
    unreadable a SafetensorsError naming the file."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __enter__(self) -> Any:
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such safetensors file")
        try:
            self.handle = safe_open(self.path, framework="np")
        except SafetensorError as e:
            raise SafetensorsError(_explain(self.path, str(e))) from None
        return self.handle.__enter__()

    def __exit__(self, *exc: object) -> None:
        self.handle.__exit__(*exc)


def _tensors(path: str | os.PathLike, f: Any, names: Any) -> dict[str, np.ndarray]:
    try:
        return {name: f.get_tensor(name) for name in names}
    except SafetensorError as e:  # the file changed after its header was read
        raise SafetensorsError(f"{path}: {e}") from None


class _LazyTensors(Mapping):
    def __init__(self, path: str | os.PathLike, names: Any) -> None:
        self._path, self._names = path, list(names)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        with _open(self._path) as f:
            return _tensors(self._path, f, [name])[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _explain(path: Path, message: str) -> str:
    """The package's error message for ``path``, in words that say what is wrong. The package
    words its errors in sentences ("header too small", 0.7 on) or as Rust enum names
    ("HeaderTooSmall", before): both are matched with spaces and case removed."""
    size = path.stat().st_size
    key = message.replace(" ", "").lower()
    if "headertoosmall" in key:
        return f"{path}: only {size} bytes, too short for a safetensors file"
    if "headertoolarge" in key:
        return (
            f"{path}: its header length does not fit in a {size}-byte file "
            "(truncated or not a safetensors file)"
        )
    dtype = re.search(r"unknown variant `([^`]*)`", message)
    if dtype:
        return f"{path}: unknown dtype {dtype.group(1)!r} in the header"
    if "invalidjson" in key or "invalidheaderdeserialization" in key:
        detail = message.split("invalid JSON in header:", 1)[-1].strip()
        return _explain_header(path) or f"{path}: header is not valid JSON ({detail})"
    if "notfullycovered" in key or "metadataincompletebuffer" in key:
        return f"{path}: the tensors do not cover the file's {size} bytes (truncated or corrupt)"
    if any(k in key for k in ("invalidshape", "tensorinvalidinfo", "invalidoffset")):
        return _explain_header(path) or f"{path}: {message}"
    return f"{path}: not a valid safetensors file ({message})"


def _explain_header(path: Path) -> str | None:
    """What is wrong with the header, where the package does not say: the JSON error, an
    unknown dtype, or which entry's byte span disagrees with its shape and dtype."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return f"{path}: header is not valid JSON ({e})"
    if not isinstance(header, dict):
        return f"{path}: header is not a JSON object"
    for name, e in header.items():
        if name == "__metadata__" or not isinstance(e, dict):
            continue
        if e.get("dtype") not in _ITEMSIZE:
            return f"{path}: unknown dtype {e.get('dtype')!r} in the header"
        try:
            begin, end = e["data_offsets"]
            want = int(np.prod(e["shape"], dtype=np.int64)) * _ITEMSIZE[e["dtype"]]
        except (KeyError, TypeError, ValueError):
            return f"{path}: entry {name!r} lacks a valid shape or data_offsets"
        if end - begin != want:
            return (
                f"{path}: entry {name!r} of shape {e['shape']} and dtype {e['dtype']} needs "
                f"{want} bytes but its offsets span {end - begin}"
            )
    return None
