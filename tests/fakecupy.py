"""A stand-in for CuPy that runs on the CPU, to catch device data leaking into NumPy.

``ndarray`` holds a NumPy array but, as ``cupy.ndarray`` does, refuses to be turned into a
NumPy array implicitly: ``np.asarray(x)`` raises TypeError, and so does mixing it with a
NumPy array in an op (``x + np.ones(3)``). Copies to the host are explicit (``x.get()``,
``asnumpy(x)``) and so are the host synchronisations a GPU would pay for (``.item()``,
``float(x)``, ``bool(x)``, ``int(x)``, ``tolist()``, printing): each one is counted in
``stats.syncs`` (and ``stats.uploads`` counts host-to-device copies). Reductions return
0-d arrays, not scalars, as CuPy's do.

It is a wrapper, not an ``np.ndarray`` subclass: NumPy converts any subclass implicitly
(``np.asarray`` never calls ``__array__`` on one), so a subclass could not refuse.

``install()`` registers it with ``handgrad.backend.register_array_module`` and makes it
``handgrad.backend.cuda``'s CuPy with one fake GPU; ``uninstall()`` undoes that.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator
from typing import Any

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin


class Stats:
    def __init__(self) -> None:
        self.syncs = 0
        self.uploads = 0

    def reset(self) -> None:
        self.syncs = 0
        self.uploads = 0


stats = Stats()

_IMPLICIT = (
    "Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct "
    "a NumPy array explicitly."
)


def _unwrap(x: Any, what: str = "argument") -> Any:
    """The NumPy array inside ``x`` (recursing into lists, tuples and dicts); a raw NumPy
    array is refused, as CuPy refuses one (that is a host array leaking into device code)."""
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, np.ndarray):
        raise TypeError(f"Unsupported type {type(x)} ({what} of shape {x.shape}): a host array")
    if isinstance(x, list | tuple):
        return type(x)(_unwrap(v, what) for v in x)
    if isinstance(x, dict):
        return {k: _unwrap(v, what) for k, v in x.items()}
    return x


def _wrap(x: Any) -> Any:
    if isinstance(x, np.ndarray):
        return ndarray(x)
    if isinstance(x, np.generic) and not isinstance(x, np.dtype):
        return ndarray(np.asarray(x))  # CuPy's reductions give 0-d arrays, not scalars
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


class _Device:
    def __init__(self, id: int = 0) -> None:
        self.id = id

    def __enter__(self) -> _Device:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def synchronize(self) -> None:
        return None

    def use(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"<CUDA Device {self.id} (fake)>"


class _Memory:
    """``ndarray.data`` as CuPy's ``MemoryPointer``: ``ptr`` is the address of the first
    element (host memory here, which tests/fakenccl.py reads and writes through)."""

    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class ndarray(NDArrayOperatorsMixin):  # noqa: N801  (named as cupy.ndarray)
    """A device array: NumPy underneath, no implicit way back to NumPy."""

    __slots__ = ("_a",)

    def __init__(self, a: np.ndarray) -> None:
        object.__setattr__(self, "_a", a)

    # ---- the refusals
    def __array__(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError(_IMPLICIT)

    # ---- explicit copies and host synchronisations
    def get(self, stream: Any = None, order: str = "C", out: Any = None) -> np.ndarray:
        stats.syncs += 1
        return np.array(self._a, order=order)

    def item(self, *args: Any) -> Any:
        stats.syncs += 1
        return self._a.item(*args)

    def tolist(self) -> Any:
        stats.syncs += 1
        return self._a.tolist()

    def __float__(self) -> float:
        stats.syncs += 1
        return float(self._a)

    def __int__(self) -> int:
        stats.syncs += 1
        return int(self._a)

    def __index__(self) -> int:
        stats.syncs += 1
        return self._a.__index__()

    def __bool__(self) -> bool:
        stats.syncs += 1
        return bool(self._a)

    def __complex__(self) -> complex:
        stats.syncs += 1
        return complex(self._a)

    def __repr__(self) -> str:
        stats.syncs += 1
        return "fakecupy." + repr(self._a)

    def __str__(self) -> str:
        stats.syncs += 1
        return str(self._a)

    def __format__(self, spec: str) -> str:
        stats.syncs += 1
        return format(self._a.item() if self._a.ndim == 0 else self._a, spec)

    # ---- NumPy protocols: compute underneath, answer with device arrays
    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        args = _unwrap(inputs, f"an input of {ufunc.__name__}")
        outs = kwargs.get("out")
        if outs is not None:
            kwargs["out"] = _unwrap(outs, f"out= of {ufunc.__name__}")
        result = getattr(ufunc, method)(*args, **kwargs)
        if outs is not None:
            return outs[0] if len(outs) == 1 else outs  # the caller's own device arrays
        return _wrap(result)

    def __array_function__(self, func: Any, types_: Any, args: Any, kwargs: Any) -> Any:
        name = getattr(func, "__name__", "function")
        return _wrap(func(*_unwrap(args, f"an argument of {name}"), **_unwrap(kwargs, name)))

    # ---- attributes, methods, indexing
    @property
    def shape(self) -> tuple[int, ...]:
        return self._a.shape

    @property
    def dtype(self) -> np.dtype:
        return self._a.dtype

    @property
    def ndim(self) -> int:
        return self._a.ndim

    @property
    def size(self) -> int:
        return self._a.size

    @property
    def itemsize(self) -> int:
        return self._a.itemsize

    @property
    def nbytes(self) -> int:
        return self._a.nbytes

    @property
    def strides(self) -> tuple[int, ...]:
        return self._a.strides

    @property
    def flags(self) -> Any:
        return self._a.flags

    @property
    def T(self) -> ndarray:
        return ndarray(self._a.T)

    @property
    def mT(self) -> ndarray:
        return ndarray(np.swapaxes(self._a, -1, -2))

    @property
    def real(self) -> ndarray:
        return ndarray(self._a.real)

    @property
    def base(self) -> Any:
        return None if self._a.base is None else ndarray(self._a.base)

    @property
    def device(self) -> _Device:
        return _Device(0)

    @property
    def data(self) -> _Memory:
        return _Memory(self._a.__array_interface__["data"][0])

    @property
    def __cuda_array_interface__(self) -> dict[str, Any]:
        # CuPy's arrays expose it; code that tells arrays from tensors by ``.data`` needs it
        face = dict(self._a.__array_interface__)
        face["version"] = 3
        return face

    def __len__(self) -> int:
        return len(self._a)

    def __iter__(self) -> Iterator[ndarray]:
        for row in self._a:
            yield _wrap(row)

    def __getitem__(self, key: Any) -> Any:
        return _wrap(self._a[_index(key)])

    def __setitem__(self, key: Any, value: Any) -> None:
        self._a[_index(key)] = _unwrap(value, "an assigned value")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # __array_interface__, __array_struct__, __dlpack__ ...
            raise AttributeError(f"fakecupy.ndarray has no attribute {name!r}")
        attr = getattr(self._a, name)  # AttributeError names the missing method
        if not callable(attr):
            return _wrap(attr)

        def method(*args: Any, **kwargs: Any) -> Any:
            if "out" in kwargs:
                out = kwargs["out"]
                kwargs["out"] = _unwrap(out, f"out= of .{name}")
                attr(*_unwrap(args, f"an argument of .{name}"), **kwargs)
                return out
            return _wrap(attr(*_unwrap(args, f"an argument of .{name}"), **kwargs))

        return method

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "shape":
            self._a.shape = value
            return
        raise AttributeError(f"fakecupy.ndarray has no settable attribute {name!r}")

    def __copy__(self) -> ndarray:
        return ndarray(self._a.copy())

    def __deepcopy__(self, memo: Any) -> ndarray:
        return ndarray(self._a.copy())

    def __reduce__(self) -> Any:
        raise TypeError("fakecupy.ndarray cannot be pickled (handgrad never pickles)")


def _index(key: Any) -> Any:
    """An index with device arrays unwrapped; a NumPy index array is copied to the device
    first (CuPy accepts one, at the price of an upload)."""
    if isinstance(key, tuple):
        return tuple(_index(k) for k in key)
    if isinstance(key, ndarray):
        return key._a
    if isinstance(key, np.ndarray):
        stats.uploads += 1
        return key
    return key


# ---- the namespace (what ``import cupy as cp`` gives)

_CREATORS = {"asarray", "array", "ascontiguousarray", "asanyarray"}


def asarray(a: Any, dtype: Any = None, order: Any = None, **kwargs: Any) -> ndarray:
    """A device array from anything: a copy (an upload) of host data."""
    if isinstance(a, ndarray):
        return a if dtype is None or a.dtype == dtype else ndarray(a._a.astype(dtype))
    stats.uploads += 1
    data = _unwrap(a, "data") if isinstance(a, list | tuple) and _has_device(a) else a
    return ndarray(np.array(data, dtype=dtype, order=order or "K"))


def _has_device(seq: Any) -> bool:
    return any(
        isinstance(v, ndarray) or (isinstance(v, list | tuple) and _has_device(v)) for v in seq
    )


def array(a: Any, dtype: Any = None, copy: bool = True, order: Any = None, **kw: Any) -> ndarray:
    if isinstance(a, ndarray):
        return ndarray(np.array(a._a, dtype=dtype, copy=True, order=order or "K"))
    return asarray(a, dtype=dtype, order=order)


ascontiguousarray = asarray


def asnumpy(a: Any, stream: Any = None, order: str = "C", out: Any = None) -> np.ndarray:
    if isinstance(a, ndarray):
        return a.get()
    return np.asarray(a, order=order)


def get_array_module(*args: Any) -> Any:
    return namespace if any(isinstance(a, ndarray) for a in args) else np


# keywords NumPy takes and CuPy 14 refuses (its documentation: "out, order and casting
# options are not supported" for einsum)
_REFUSED_KWARGS = {"einsum": {"out", "order", "casting"}}


class _Namespace(types.ModuleType):
    """Every NumPy function, taking and giving device arrays."""

    def __getattr__(self, name: str) -> Any:
        attr = getattr(np, name)
        if isinstance(attr, np.ufunc):
            return attr  # ufuncs dispatch through __array_ufunc__
        if isinstance(attr, type) or not callable(attr):
            return attr  # dtypes, constants

        def function(*args: Any, **kwargs: Any) -> Any:
            refused = sorted(set(kwargs) & _REFUSED_KWARGS.get(name, set()))
            if refused:  # as CuPy refuses them: a NumPy-only keyword must not pass here
                raise TypeError(f"Did not understand the following kwargs: {refused}")
            if "out" in kwargs and kwargs["out"] is not None:
                out = kwargs.pop("out")
                kwargs = _unwrap(kwargs, name)
                kwargs["out"] = _unwrap(out, f"out= of {name}")
                attr(*_unwrap(args, f"an argument of {name}"), **kwargs)
                return out
            return _wrap(attr(*_unwrap(args, f"an argument of {name}"), **_unwrap(kwargs, name)))

        function.__name__ = name
        return function


namespace = _Namespace("fakecupy")
namespace.ndarray = ndarray
namespace.asarray = asarray
namespace.array = array
namespace.ascontiguousarray = ascontiguousarray
namespace.asnumpy = asnumpy
namespace.get_array_module = get_array_module
namespace.stats = stats
namespace.cuda = types.SimpleNamespace(
    Device=_Device,
    runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
    Stream=types.SimpleNamespace(null=None),
)
namespace.newaxis = None
namespace.pi = math.pi


_saved: list[Any] = []


def install(kernels: bool = False, bf16_matmul: bool = False) -> Any:
    """Register the fake with handgrad (array namespace and ``handgrad.backend.cuda``'s CuPy).

    The fake cannot run CUDA kernels nor compile them, so by default ops take their generic
    array path (``kernels=False``) and bfloat16 products are computed in float32
    (``bf16_matmul=False``); ``uninstall`` restores both switches. Tests of the kernel path
    pass ``kernels=True`` and replace the launchers (see ``reference_kernels``)."""
    from handgrad.backend import cuda, register_array_module

    register_array_module(ndarray, namespace)
    switches = (cuda._kernels_on, cuda._bf16_on)
    _saved.append((cuda._set_cupy_module(namespace), switches))
    cuda.use_kernels(kernels)
    cuda.use_bf16_matmul(bf16_matmul)
    stats.reset()
    return namespace


def uninstall() -> None:
    from handgrad.backend import cuda

    module, switches = _saved.pop() if _saved else (None, (None, None))
    cuda._set_cupy_module(module)
    cuda._kernels_on, cuda._bf16_on = switches


@contextlib.contextmanager
def installed(kernels: bool = False, bf16_matmul: bool = False) -> Iterator[Any]:
    install(kernels, bf16_matmul)
    try:
        yield namespace
    finally:
        uninstall()


# ---- the CUDA launchers, run by their NumPy references on the fake's arrays

_LAUNCHERS = ("layer_norm_forward", "layer_norm_backward", "gelu_tanh_forward",
              "gelu_tanh_backward", "causal_softmax_forward", "causal_softmax_backward",
              "cross_entropy_forward", "cross_entropy_backward", "embedding_backward",
              "adamw_flat", "residual_layer_norm_forward", "residual_layer_norm_backward",
              "bias_gelu_forward", "bias_gelu_backward", "fused_classifier")  # fmt: skip


def _as_device(x: Any) -> Any:
    if isinstance(x, tuple):
        return tuple(_as_device(v) for v in x)
    return ndarray(np.asarray(x)) if isinstance(x, np.ndarray | np.generic) else x


def _reference_launcher(name: str, calls: dict[str, int]) -> Any:
    """``handgrad.kernels.cuda.<name>`` done by ``handgrad.kernels.reference.<name>``: the
    arguments are checked as the real launcher checks them (CuPy arrays, float32 / int64,
    C-contiguous), then the reference runs on the arrays underneath (no sync counted)."""
    from handgrad.kernels import cuda as K
    from handgrad.kernels import reference as ref

    def launcher(*args: Any, **kwargs: Any) -> Any:
        calls[name] = calls.get(name, 0) + 1
        if name == "adamw_flat":
            kwargs["norm_sq"] = float(kwargs["norm_sq"]._a[0])
        given = [*enumerate(args), *kwargs.items()]
        floats = {f"{k}": a for k, a in given if isinstance(a, ndarray) and a.dtype.kind == "f"}
        K._check(name, **floats)
        for k, a in given:
            if isinstance(a, ndarray) and a.dtype.kind in "iu":
                assert a.dtype == np.int64 and a.flags.c_contiguous, f"{name}: indices {k}"
        kwargs.pop("out", None)
        result = getattr(ref, name)(*_unwrap(args), **_unwrap(kwargs))
        return _as_device(result)

    return launcher


def reference_kernels(monkeypatch: Any) -> dict[str, int]:
    """Replace every launcher of ``handgrad.kernels.cuda`` that the ops dispatch to with its
    NumPy reference (see ``_reference_launcher``); returns the call counts by name."""
    from handgrad.kernels import cuda as K

    calls: dict[str, int] = {}
    for name in _LAUNCHERS:
        monkeypatch.setattr(K, name, _reference_launcher(name, calls))
    return calls
