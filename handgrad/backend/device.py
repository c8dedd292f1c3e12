"""Devices, as ``torch.device``: ``device("cpu")``, ``device("cuda")``, ``device("cuda:1")``.

An array lives on the CPU (a NumPy array) or on a CUDA GPU (a CuPy array). ``to_device``
copies an array to a device (a no-op when it is there already) and ``device_of`` says where
one lives. CuPy is imported only when a CUDA device is used, so all of this works without it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from handgrad.backend import cuda, get_array_module, to_dtype

_TYPES = ("cpu", "cuda")


class device:  # noqa: N801  (named as torch.device)
    """Where tensors live: ``.type`` is 'cpu' or 'cuda', ``.index`` the GPU number or None.

    ``device("cuda:1") == device("cuda", 1)``; ``device("cuda") != device("cuda:0")`` (as
    torch: no index means "the current GPU"). An int means that CUDA GPU. Hashable.
    """

    __slots__ = ("_type", "_index")

    def __init__(self, spec: str | device | int, index: int | None = None) -> None:
        if isinstance(spec, device):
            if index is not None:
                raise ValueError(f"device: an index ({index}) cannot be given with {spec!r}")
            self._type, self._index = spec.type, spec.index
            return
        if isinstance(spec, int) and not isinstance(spec, bool):
            if index is not None:
                raise ValueError(f"device: two indices given ({spec} and {index})")
            spec, index = "cuda", spec
        if not isinstance(spec, str):
            raise TypeError(f"device: expected a string such as 'cuda:0', got {spec!r}")
        kind, sep, number = spec.strip().partition(":")
        if kind not in _TYPES:
            raise ValueError(
                f"device: unknown device type in {spec!r}; expected 'cpu', 'cuda' or 'cuda:N'"
            )
        if sep:
            if index is not None:
                raise ValueError(f"device: index given twice ({spec!r} and index={index})")
            if not number.isdigit():
                raise ValueError(
                    f"device: invalid device index in {spec!r}; expected a non-negative integer"
                )
            index = int(number)
        if index is not None:
            if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                raise ValueError(f"device: index must be an int >= 0, got {index!r} for {spec!r}")
            if kind == "cpu" and index != 0:
                raise ValueError(f"device: the CPU has only index 0, got {spec!r}")
        self._type, self._index = kind, index

    @property
    def type(self) -> str:
        return self._type

    @property
    def index(self) -> int | None:
        return self._index

    def __str__(self) -> str:
        return self._type if self._index is None else f"{self._type}:{self._index}"

    def __repr__(self) -> str:
        if self._index is None:
            return f"device(type='{self._type}')"
        return f"device(type='{self._type}', index={self._index})"

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            try:
                other = device(other)
            except (TypeError, ValueError):
                return False
        if not isinstance(other, device):
            return NotImplemented
        return (self._type, self._index) == (other._type, other._index)

    def __hash__(self) -> int:
        return hash((self._type, self._index))

    def __reduce__(self) -> Any:
        return (device, (str(self),))


cpu = device("cpu")


def as_device(d: str | device | int | None) -> device:
    """``d`` as a device; None means the CPU."""
    return cpu if d is None else d if isinstance(d, device) else device(d)


def device_of(array: Any) -> device:
    """The device an array lives on: the CPU for NumPy arrays and scalars, ``cuda:i`` for a
    CuPy array on GPU i."""
    if isinstance(array, np.ndarray | np.generic | int | float | bool):
        return cpu
    if get_array_module(array) is np:
        return cpu
    dev = getattr(array, "device", None)
    return device("cuda", int(getattr(dev, "id", 0) or 0))


def is_on(array: Any, target: str | device | int | None) -> bool:
    """Whether ``array`` lives on ``target`` already ('cuda' without an index matches any
    GPU, as it means the current one)."""
    target, here = as_device(target), device_of(array)
    if target.type != here.type:
        return False
    return target.index is None or target.type == "cpu" or here.index == target.index


def to_device(array: Any, target: str | device | int | None) -> Any:
    """``array`` on ``target``: itself when it is there already, otherwise a copy (to the
    host with ``asnumpy``; to GPU i with ``cupy.asarray`` under that GPU). A CUDA target
    without CuPy or a GPU raises a RuntimeError that says which is missing."""
    target = as_device(target)
    if is_on(array, target):
        return array
    if target.type == "cpu":
        return get_array_module(array).asnumpy(array)
    cp = cuda.require(target.index)
    index = 0 if target.index is None else target.index
    here = device_of(array)
    with cp.cuda.Device(index):
        if here.type == "cuda":
            return array.copy()  # CuPy copies onto the current device
        return cp.asarray(array)


def devices_of(arrays: Sequence[Any]) -> list[device]:
    """Each distinct device of ``arrays``, in order of first appearance."""
    out: list[device] = []
    for a in arrays:
        d = device_of(a)
        if d not in out:
            out.append(d)
    return out


def new_array(target: str | device | int | None, name: str, *args: Any, **kwargs: Any) -> Any:
    """``<namespace>.<name>(*args, **kwargs)`` made directly on ``target`` (``zeros``,
    ``full``, ``arange`` ...): NumPy on the CPU, CuPy under GPU i, with no host copy."""
    target = as_device(target)
    if target.type == "cpu":
        return getattr(np, name)(*args, **kwargs)
    cp = cuda.require(target.index)
    with cp.cuda.Device(0 if target.index is None else target.index):
        return getattr(cp, name)(*args, **kwargs)


def parse_to(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[device | None, Any]:
    """The (device, dtype) of a ``Tensor.to`` / ``Module.to`` call, either possibly None.

    Accepts what torch's ``.to`` does: ``to(device)``, ``to(dtype)``, ``to(device, dtype)``,
    ``to(other_tensor)`` (anything with ``.device`` and ``.dtype``) and the keywords
    ``device=`` / ``dtype=``. A device is a ``device``, 'cpu' / 'cuda' / 'cuda:N' or an int
    (that CUDA GPU); anything else is read as a dtype ('bf16', ``float``, a NumPy dtype)."""
    unknown = set(kwargs) - {"device", "dtype"}
    if unknown:
        raise TypeError(f"to(): unexpected keyword argument {sorted(unknown)[0]!r}")
    if len(args) > 2:
        raise TypeError(f"to(): expected at most 2 positional arguments, got {len(args)}")
    dev, dtype = kwargs.get("device"), kwargs.get("dtype")
    for a in args:
        if hasattr(a, "device") and hasattr(a, "dtype") and not isinstance(a, type):
            dev, dtype = a.device, a.dtype  # another tensor: its device and dtype
        elif _is_device_spec(a):
            if dev is not None:
                raise TypeError(f"to(): device given twice ({dev} and {a!r})")
            dev = a
        else:
            if dtype is not None:
                raise TypeError(f"to(): dtype given twice ({dtype} and {a!r})")
            if isinstance(a, str):
                try:
                    to_dtype(a)
                except TypeError:
                    raise TypeError(
                        f"to(): {a!r} is neither a device ('cpu', 'cuda', 'cuda:N') nor a "
                        "dtype ('float32', 'bf16', ...)"
                    ) from None
            dtype = a
    return (None if dev is None else as_device(dev)), dtype


def _is_device_spec(a: Any) -> bool:
    if isinstance(a, device):
        return True
    if isinstance(a, int) and not isinstance(a, bool):
        return True
    return isinstance(a, str) and a.strip().partition(":")[0] in _TYPES


__all__ = [
    "as_device",
    "cpu",
    "device",
    "device_of",
    "devices_of",
    "is_on",
    "new_array",
    "parse_to",
    "to_device",
]
