"""Reading and writing the safetensors format, by hand (never pickled objects).

A safetensors file is::

    8 bytes       N, the header length (unsigned little-endian 64-bit)
    N bytes       a JSON object: {"__metadata__": {str: str},
                                  name: {"dtype": "F32", "shape": [..], "data_offsets": [b, e]}}
    the rest      the raw little-endian tensor bytes; tensor `name` is bytes [b, e) of it

It is what Hugging Face uses for model weights, so files written here load in
``safetensors``/``transformers`` and the other way round. Writes go to a temporary file that
is renamed into place, so a crash never leaves a truncated file under the real name.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from handgrad import backend as B

_CODES: dict[str, np.dtype] = {
    "F64": B.float64,
    "F32": B.float32,
    "F16": B.float16,
    "BF16": B.bfloat16,
    "I64": B.int64,
    "I32": B.int32,
    "I16": B.int16,
    "I8": B.int8,
    "U8": B.uint8,
    "U16": B.uint16,
    "U32": B.uint32,
    "U64": np.dtype(np.uint64),
    "BOOL": B.bool_,
}
_NAMES = {v: k for k, v in _CODES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's limit


class SafetensorsError(ValueError):
    """A file that is not valid safetensors; the message names the file and the problem."""


def save_file(
    tensors: Mapping[str, np.ndarray],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (name -> array) to ``path`` atomically."""
    header: dict[str, object] = {}
    if metadata:
        bad = {k: v for k, v in metadata.items() if not isinstance(v, str)}
        if bad:
            raise TypeError(f"safetensors metadata values must be str; got {bad}")
        header["__metadata__"] = dict(metadata)
    arrays = []
    offset = 0
    for name in sorted(tensors):
        a = np.require(B.to_numpy(tensors[name]), requirements="C")  # keeps 0-d shapes
        if a.dtype not in _NAMES:
            raise TypeError(f"safetensors: tensor {name!r} has unsupported dtype {a.dtype}")
        nbytes = a.nbytes
        header[name] = {
            "dtype": _NAMES[a.dtype],
            "shape": list(a.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        arrays.append(a)
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # pad so the data starts 8-byte aligned
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for a in arrays:
                a = a.astype(a.dtype.newbyteorder("<"), copy=False)
                f.write(memoryview(a.reshape(-1).view(np.uint8)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_header(path: str | os.PathLike) -> tuple[dict, dict[str, str], int]:
    """Parse and validate the header: (entries, metadata, offset of the data section)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such safetensors file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        first = f.read(8)
        if len(first) < 8:
            raise SafetensorsError(f"{path}: only {size} bytes, too short for a safetensors file")
        n = int.from_bytes(first, "little")
        if n > min(_MAX_HEADER, size - 8):
            raise SafetensorsError(
                f"{path}: header length {n} does not fit in a {size}-byte file "
                "(truncated or not a safetensors file)"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    spans = []
    for name, e in header.items():
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= e.keys():
            raise SafetensorsError(f"{path}: entry {name!r} lacks dtype/shape/data_offsets")
        if e["dtype"] not in _CODES:
            raise SafetensorsError(f"{path}: entry {name!r} has unknown dtype {e['dtype']!r}")
        begin, end = e["data_offsets"]
        want = int(np.prod(e["shape"], dtype=np.int64)) * _CODES[e["dtype"]].itemsize
        if end - begin != want:
            raise SafetensorsError(
                f"{path}: entry {name!r} of shape {e['shape']} and dtype {e['dtype']} needs "
                f"{want} bytes but its offsets span {end - begin}"
            )
        spans.append((begin, end, name))
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin != pos:
            raise SafetensorsError(f"{path}: entry {name!r} starts at {begin}, expected {pos}")
        pos = end
    if pos != data_len:
        raise SafetensorsError(
            f"{path}: tensors need {pos} bytes of data but the file holds {data_len} "
            "(truncated or corrupt)"
        )
    return header, metadata, 8 + n


def load_file(path: str | os.PathLike, mmap: bool = False) -> dict[str, np.ndarray]:
    """Read every tensor of a safetensors file into NumPy arrays (name -> array).

    With ``mmap=True`` the arrays are read-only views of a memory map, so a large file costs
    no RAM until it is touched."""
    header, _, start = read_header(path)
    out: dict[str, np.ndarray] = {}
    if mmap:
        buf = np.memmap(path, dtype=np.uint8, mode="r")
    else:
        with open(path, "rb") as f:
            f.seek(start)
            buf = np.frombuffer(bytearray(f.read()), dtype=np.uint8)
        start = 0
    for name, e in header.items():
        begin, end = e["data_offsets"]
        dtype = _CODES[e["dtype"]].newbyteorder("<")
        a = buf[start + begin : start + end].view(dtype).reshape(e["shape"])
        out[name] = a.astype(dtype.newbyteorder("="), copy=False)
    return out


def load_metadata(path: str | os.PathLike) -> dict[str, str]:
    return read_header(path)[1]
