"""Functions that make tensors, as ``torch.<name>``: from data (``tensor``, ``from_numpy``),
filled (``zeros``, ``full``, ``arange`` ...), random (``randn``, ``rand``), and from other
tensors (``cat``, ``stack``, ``split``, ``where`` and the functional forms of Tensor methods).

Each takes ``device=`` ('cpu', 'cuda', 'cuda:N' or a ``device``; the CPU when None): filled
tensors are made on that device directly; random samples come from the host generator of
``handgrad.random`` and are then copied there, so a seed gives the same numbers on every
device.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from handgrad import backend as B
from handgrad import serialization
from handgrad.backend.device import new_array, to_device
from handgrad.ops.matmul import MatMul
from handgrad.ops.shape import Cat, Stack
from handgrad.random import default_generator
from handgrad.tensor import Tensor

# ----------------------------------------------------------------------------------------
# from data


def tensor(data: Any, dtype: Any = None, requires_grad: bool = False, device: Any = None) -> Tensor:
    """Make a tensor from a list, scalar or array on ``device`` (where an array lives already
    when None). Floats default to float32, ints to int64."""
    return Tensor(data, dtype=dtype, requires_grad=requires_grad, device=device)


def from_numpy(array: B.Array) -> Tensor:
    """A tensor that shares ``array``'s memory (as ``torch.from_numpy``): writes through either
    are seen by both, and the dtype is kept (float64 stays float64). ``array`` may be of any
    registered array namespace (a CuPy array stays on its GPU)."""
    if not (B.has_dtype(array) and hasattr(array, "dtype") and hasattr(array, "shape")):
        raise TypeError(f"from_numpy: expected an array, got {type(array).__name__}")
    B.to_dtype(array.dtype)  # raises, naming the dtype, on unsupported ones such as complex
    xp = B.get_array_module(array)
    return Tensor._make(xp.asanyarray(array))  # the array itself; a NumPy scalar becomes 0-d


def _shape(size: tuple[Any, ...]) -> tuple[int, ...]:
    if len(size) == 1 and isinstance(size[0], tuple | list):
        return tuple(size[0])
    return tuple(size)


# ----------------------------------------------------------------------------------------
# filled


def _filled(
    kind: str, size: tuple[Any, ...], dtype: Any, requires_grad: bool, device: Any
) -> Tensor:
    """A tensor of shape ``size`` made by the namespace's ``kind`` ("zeros", "ones",
    "empty") on ``device``, in ``dtype`` (the default float when None)."""
    arr = new_array(device, kind, _shape(size), dtype=B.to_dtype(dtype or B.default_float))
    return Tensor._make(arr).requires_grad_(requires_grad)


def zeros(*size: Any, dtype: Any = None, requires_grad: bool = False, device: Any = None) -> Tensor:
    return _filled("zeros", size, dtype, requires_grad, device)


def ones(*size: Any, dtype: Any = None, requires_grad: bool = False, device: Any = None) -> Tensor:
    return _filled("ones", size, dtype, requires_grad, device)


def empty(*size: Any, dtype: Any = None, requires_grad: bool = False, device: Any = None) -> Tensor:
    return _filled("empty", size, dtype, requires_grad, device)


def full(
    size: Sequence[int],
    fill_value: float,
    dtype: Any = None,
    requires_grad: bool = False,
    device: Any = None,
) -> Tensor:
    if dtype is None:
        dtype = (
            B.default_int
            if isinstance(fill_value, int) and not isinstance(fill_value, bool)
            else B.default_float
        )
    arr = new_array(device, "full", tuple(size), fill_value, dtype=B.to_dtype(dtype))
    return Tensor._make(arr).requires_grad_(requires_grad)


def _filled_like(kind: str, t: Tensor, dtype: Any, requires_grad: bool, device: Any) -> Tensor:
    """``kind`` ("zeros", "ones") of ``t``'s shape, in ``t``'s dtype and on its device unless
    given."""
    dtype = B.to_dtype(dtype or t.dtype)
    if device is None:
        arr = getattr(B.get_array_module(t.data), kind)(t.shape, dtype=dtype)
    else:
        arr = new_array(device, kind, t.shape, dtype=dtype)
    return Tensor._make(arr).requires_grad_(requires_grad)


def zeros_like(
    t: Tensor, dtype: Any = None, requires_grad: bool = False, device: Any = None
) -> Tensor:
    """Zeros of ``t``'s shape, in ``t``'s dtype and on its device unless given."""
    return _filled_like("zeros", t, dtype, requires_grad, device)


def ones_like(
    t: Tensor, dtype: Any = None, requires_grad: bool = False, device: Any = None
) -> Tensor:
    """Ones of ``t``'s shape, in ``t``'s dtype and on its device unless given."""
    return _filled_like("ones", t, dtype, requires_grad, device)


def arange(
    start: float,
    end: float | None = None,
    step: float = 1,
    dtype: Any = None,
    device: Any = None,
) -> Tensor:
    if end is None:
        start, end = 0, start
    if dtype is None:
        ints = all(isinstance(v, int) for v in (start, end, step))
        dtype = B.default_int if ints else B.default_float
    return Tensor._make(new_array(device, "arange", start, end, step, dtype=B.to_dtype(dtype)))


# ----------------------------------------------------------------------------------------
# random


def randn(
    *size: Any,
    dtype: Any = None,
    requires_grad: bool = False,
    generator: B.Generator | None = None,
    device: Any = None,
) -> Tensor:
    """Standard normal samples from the global generator (see ``manual_seed``), drawn on the
    host and copied to ``device``."""
    dtype = B.to_dtype(dtype or B.default_float)
    gen = generator or default_generator()
    arr = gen.standard_normal(
        _shape(size),
        dtype=B.compute_dtype(dtype)
        if B.compute_dtype(dtype) in (B.float32, B.float64)
        else B.float64,
    )
    arr = to_device(arr.astype(dtype, copy=False), device)
    return Tensor._make(arr).requires_grad_(requires_grad)


def rand(
    *size: Any,
    dtype: Any = None,
    requires_grad: bool = False,
    generator: B.Generator | None = None,
    device: Any = None,
) -> Tensor:
    """Uniform samples in [0, 1) from the global generator, drawn on the host and copied to
    ``device``."""
    dtype = B.to_dtype(dtype or B.default_float)
    gen = generator or default_generator()
    arr = gen.random(_shape(size), dtype=B.float32 if dtype != B.float64 else B.float64)
    arr = to_device(arr.astype(dtype, copy=False), device)
    return Tensor._make(arr).requires_grad_(requires_grad)


# ----------------------------------------------------------------------------------------
# from other tensors


def cat(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    if not tensors:
        raise ValueError("cat: expected a non-empty sequence of tensors")
    return Cat.apply(*tensors, dim=dim)


def stack(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    if not tensors:
        raise ValueError("stack: expected a non-empty sequence of tensors")
    return Stack.apply(*tensors, dim=dim)


def split(
    t: Tensor, split_size_or_sections: int | Sequence[int], dim: int = 0
) -> tuple[Tensor, ...]:
    """Split along ``dim`` into chunks of ``split_size`` (the last may be smaller) or the given
    section sizes. Each piece is a slice, so its gradient flows back into place."""
    return t.split(split_size_or_sections, dim)


def where(condition: Tensor | Any, input: Tensor | Any, other: Tensor | Any) -> Tensor:
    """``input`` where ``condition`` is True, ``other`` elsewhere; a non-tensor side takes the
    dtype of the tensor side."""
    if not isinstance(input, Tensor):
        input = other._other(input) if isinstance(other, Tensor) else Tensor(input)
    return input.where(condition, other)


def masked_fill(t: Tensor, mask: Tensor | Any, value: float) -> Tensor:
    """``value`` where ``mask`` is True, ``t`` elsewhere; no gradient flows to filled spots."""
    return t.masked_fill(mask, value)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    return MatMul.apply(a, b)


def exp(t: Tensor) -> Tensor:
    return t.exp()


def log(t: Tensor) -> Tensor:
    return t.log()


def sqrt(t: Tensor) -> Tensor:
    return t.sqrt()


def tanh(t: Tensor) -> Tensor:
    return t.tanh()


def relu(t: Tensor) -> Tensor:
    return t.relu()


# ----------------------------------------------------------------------------------------
# state dicts to and from .safetensors files, used as PyTorch's save and load are for them


def save(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Save a state dict (name -> Tensor or array), e.g. ``model.state_dict()``, as one
    .safetensors file at ``path``, atomically. Dtypes are kept (bfloat16 stays bfloat16)."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(
            f"save: expected a state dict (name -> Tensor), got {type(state_dict).__name__}"
        )
    bad = [k for k in state_dict if not isinstance(k, str)]
    if bad:
        raise TypeError(f"save: state dict keys must be str; got {bad[:3]}")
    serialization.save_file(state_dict, path)


def load(path: str | os.PathLike, device: Any = None) -> dict[str, Tensor]:
    """The state dict of a .safetensors file as name -> Tensor (what ``save`` wrote, or any
    safetensors file, e.g. Hugging Face weights), on ``device`` (the CPU when None);
    ``model.load_state_dict(load(path))``."""
    arrays = serialization.load_file(path)
    return {name: Tensor(array, device=device) for name, array in arrays.items()}
