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
import ctypes
import math
import types
import weakref
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin


class Stats:
    """What a GPU would have paid for, counted since the last ``reset()``:

    - ``syncs``: host synchronisations (``.get()``, ``asnumpy``, ``item``, ``float`` ...);
    - ``uploads``: host-to-device copies;
    - ``launches``: device work queued: each namespace call, ufunc, method or fancy index
      that writes device memory (a new array or ``out=``; views and ``empty`` launch
      nothing), each assignment into an array, each cuBLAS call, each handgrad kernel
      (``handgrad.kernels.cuda._launch`` or a reference launcher: as many as the real
      launcher queues); ``launches_by`` holds them by name;
    - ``allocations`` / ``allocated_bytes`` and ``frees`` / ``freed_bytes``: device arrays
      that own their memory (a view allocates nothing), freed when collected;
      ``live_bytes`` is what is allocated now (kept by ``reset``), ``peak_bytes`` its
      maximum since the last ``reset`` or ``reset_peak``. Bytes are the arrays' own sizes
      (CuPy's pool rounds each block up to 512 bytes).
    """

    def __init__(self) -> None:
        self.live_bytes = 0
        self.reset()

    def reset(self) -> None:
        self.syncs = 0
        self.uploads = 0
        self.launches = 0
        self.launches_by: dict[str, int] = {}
        self.allocations = 0
        self.allocated_bytes = 0
        self.frees = 0
        self.freed_bytes = 0
        self.peak_bytes = self.live_bytes

    def reset_peak(self) -> None:
        """Start a new peak from what is live now (as ``torch.cuda.reset_peak_memory_stats``)."""
        self.peak_bytes = self.live_bytes

    def launch(self, name: str, n: int = 1) -> None:
        self.launches += n
        self.launches_by[name] = self.launches_by.get(name, 0) + n

    def snapshot(self) -> dict[str, Any]:
        """The counters as a dict (``launches_by`` copied)."""
        keys = ("syncs", "uploads", "launches", "allocations", "allocated_bytes", "frees",
                "freed_bytes", "live_bytes", "peak_bytes")  # fmt: skip
        return {**{k: getattr(self, k) for k in keys}, "launches_by": dict(self.launches_by)}


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


# ---- device memory: every NumPy buffer behind a device array, by the id of the array that
# owns it: (address, bytes, owner). Views share their owner's entry; an entry goes when its
# owner is collected (that is the free).
_BUFFERS: dict[int, tuple[int, int, Any]] = {}


def _owner(a: np.ndarray) -> np.ndarray:
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def _freed(key: int, nbytes: int) -> None:
    if _BUFFERS.pop(key, None) is not None:
        stats.live_bytes -= nbytes
        stats.frees += 1
        stats.freed_bytes += nbytes


_tracking = True  # False while a reference launcher computes (its temporaries are host's)


def _track(a: np.ndarray) -> None:
    """Count ``a``'s buffer as a device allocation the first time an array on it is seen."""
    if not _tracking:
        return
    root = _owner(a)
    key = id(root)
    if key in _BUFFERS:
        return
    nbytes = root.nbytes
    _BUFFERS[key] = (root.__array_interface__["data"][0], nbytes, weakref.ref(root))
    weakref.finalize(root, _freed, key, nbytes)
    stats.allocations += 1
    stats.allocated_bytes += nbytes
    stats.live_bytes += nbytes
    stats.peak_bytes = max(stats.peak_bytes, stats.live_bytes)


def _launched(name: str, allocations_before: int, wrote: bool = False) -> None:
    """Count one launch for an op that wrote device memory: ``out=``, an assignment, or a
    new array (a view or an op that returned its input allocated nothing)."""
    if wrote or stats.allocations > allocations_before:
        stats.launch(name)


def _matmul(ufunc: Any, args: Any, kwargs: dict[str, Any]) -> Any:
    """``matmul`` as CuPy 14 does it: bfloat16 operands with at most 2 dims are a cuBLAS GEMM
    (float32 accumulation, one rounding of the result; computed here by float32 BLAS), with
    more dims they are refused (CuPy's batched path takes the dtype chars 'efdFD' only)."""
    a, b = args[0], args[1]
    bf16 = np.dtype(ml_dtypes.bfloat16)
    if not any(getattr(x, "dtype", None) == bf16 for x in (a, b)):
        return ufunc(*args, **kwargs)
    if max(np.ndim(a), np.ndim(b)) > 2:
        raise TypeError(
            f"matmul of bfloat16 arrays of shapes {np.shape(a)} and {np.shape(b)}: CuPy's "
            "batched matmul supports the dtype chars 'efdFD' only (use backend.matmul_bf16)"
        )
    dtype = np.result_type(a, b)
    f32 = [x.astype(np.float32) if x.dtype == bf16 else x for x in (a, b)]
    out = kwargs.get("out")
    result = np.matmul(*f32).astype(dtype)
    if out is not None:
        out[0][...] = result
        return out[0]
    return result


def _memory_at(ptr: int, nbytes: int, what: str) -> np.ndarray:
    """The ``nbytes`` bytes of device memory at address ``ptr`` as a writable uint8 array;
    an access outside every live allocation raises (as compute-sanitizer would report)."""
    for start, size, _owner_ref in _BUFFERS.values():
        if start <= ptr < start + max(size, 1):
            if ptr + nbytes > start + size:
                raise RuntimeError(
                    f"illegal memory access: {what} reads {nbytes} bytes at offset "
                    f"{ptr - start} of a {size}-byte allocation"
                )
            return np.ctypeslib.as_array((ctypes.c_uint8 * max(nbytes, 1)).from_address(ptr))
    raise RuntimeError(f"illegal memory access: {what} at {ptr:#x} is no device allocation")


class _Device:
    def __init__(self, id: int = 0) -> None:
        self.id = id

    def __enter__(self) -> _Device:
        return self

    def __exit__(self, *exc: Any) -> None:
        return None

    def synchronize(self) -> None:
        stats.syncs += 1

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
        _track(a)

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
        before = stats.allocations
        if ufunc is np.matmul and method == "__call__":
            result = _matmul(ufunc, args, kwargs)
        else:
            result = getattr(ufunc, method)(*args, **kwargs)
        if outs is not None:
            _launched(ufunc.__name__, before, wrote=True)
            return outs[0] if len(outs) == 1 else outs  # the caller's own device arrays
        result = _wrap(result)
        _launched(ufunc.__name__, before)
        return result

    def __array_function__(self, func: Any, types_: Any, args: Any, kwargs: Any) -> Any:
        name = getattr(func, "__name__", "function")
        before = stats.allocations
        result = _wrap(func(*_unwrap(args, f"an argument of {name}"), **_unwrap(kwargs, name)))
        _launched(name, before, wrote="out" in kwargs and kwargs["out"] is not None)
        return result

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
        before = stats.allocations
        result = _wrap(self._a[_index(key)])
        _launched("getitem", before)  # a gather for an index array; a slice is a view
        return result

    def __setitem__(self, key: Any, value: Any) -> None:
        self._a[_index(key)] = _unwrap(value, "an assigned value")
        stats.launch("setitem")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):  # __array_interface__, __array_struct__, __dlpack__ ...
            raise AttributeError(f"fakecupy.ndarray has no attribute {name!r}")
        attr = getattr(self._a, name)  # AttributeError names the missing method
        if not callable(attr):
            return _wrap(attr)

        def method(*args: Any, **kwargs: Any) -> Any:
            before = stats.allocations
            if "out" in kwargs:
                out = kwargs["out"]
                kwargs["out"] = _unwrap(out, f"out= of .{name}")
                attr(*_unwrap(args, f"an argument of .{name}"), **kwargs)
                _launched(name, before, wrote=out is not None)
                return out
            result = _wrap(attr(*_unwrap(args, f"an argument of .{name}"), **kwargs))
            _launched(name, before, wrote=name in _IN_PLACE_METHODS)
            return result

        return method

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "shape":
            self._a.shape = value
            return
        raise AttributeError(f"fakecupy.ndarray has no settable attribute {name!r}")

    def __copy__(self) -> ndarray:
        stats.launch("copy")
        return ndarray(self._a.copy())

    def __deepcopy__(self, memo: Any) -> ndarray:
        stats.launch("copy")
        return ndarray(self._a.copy())

    def __reduce__(self) -> Any:
        raise TypeError("fakecupy.ndarray cannot be pickled (handgrad never pickles)")


_IN_PLACE_METHODS = {"fill", "sort", "put", "partition", "itemset"}


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
        if dtype is None or a.dtype == dtype:
            return a
        stats.launch("astype")
        return ndarray(a._a.astype(dtype))
    stats.uploads += 1
    data = _unwrap(a, "data") if isinstance(a, list | tuple) and _has_device(a) else a
    return ndarray(np.array(data, dtype=dtype, order=order or "K"))


def _has_device(seq: Any) -> bool:
    return any(
        isinstance(v, ndarray) or (isinstance(v, list | tuple) and _has_device(v)) for v in seq
    )


def array(a: Any, dtype: Any = None, copy: bool = True, order: Any = None, **kw: Any) -> ndarray:
    if isinstance(a, ndarray):
        stats.launch("copy")
        return ndarray(np.array(a._a, dtype=dtype, copy=True, order=order or "K"))
    return asarray(a, dtype=dtype, order=order)


def ascontiguousarray(a: Any, dtype: Any = None) -> ndarray:
    """``a`` itself when it is a C-contiguous device array of ``dtype``, else a C-ordered
    copy (of host data: an upload)."""
    if isinstance(a, ndarray):
        if a._a.flags.c_contiguous and (dtype is None or a.dtype == dtype):
            return a
        stats.launch("copy")
        return ndarray(np.ascontiguousarray(a._a, dtype=dtype))
    return asarray(a, dtype=dtype, order="C")


def asnumpy(a: Any, stream: Any = None, order: str = "C", out: Any = None) -> np.ndarray:
    if isinstance(a, ndarray):
        return a.get()
    return np.asarray(a, order=order)


def get_array_module(*args: Any) -> Any:
    return namespace if any(isinstance(a, ndarray) for a in args) else np


# keywords NumPy takes and CuPy 14 refuses (its documentation: "out, order and casting
# options are not supported" for einsum)
_REFUSED_KWARGS = {"einsum": {"out", "order", "casting"}}


# calls that allocate without running anything on the device
_NO_KERNEL = {"empty", "empty_like", "ndarray"}


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
            before = stats.allocations
            if "out" in kwargs and kwargs["out"] is not None:
                out = kwargs.pop("out")
                kwargs = _unwrap(kwargs, name)
                kwargs["out"] = _unwrap(out, f"out= of {name}")
                attr(*_unwrap(args, f"an argument of {name}"), **kwargs)
                _launched(name, before, wrote=True)
                return out
            result = _wrap(attr(*_unwrap(args, f"an argument of {name}"), **_unwrap(kwargs, name)))
            if name not in _NO_KERNEL:
                _launched(name, before)
            return result

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
# ---- cuBLAS: the entry points handgrad calls, as the cuBLAS documentation defines them
# (column-major matrices, op flags, leading dimensions, strides between batch matrices),
# reading and writing the fake arrays' memory through their addresses.

_CUDA_TYPES = {0: np.dtype(np.float32), 2: np.dtype(np.float16), 14: np.dtype(ml_dtypes.bfloat16)}
_COMPUTE_32F = (68, 0)  # CUBLAS_COMPUTE_32F, or CUDA_R_32F as the legacy compute type
_pointer_modes: dict[int, int] = {}


class CUBLASError(RuntimeError):
    """As ``cupy_backends.cuda.libs.cublas.CUBLASError``."""


def _check_gemm(transa: int, transb: int, m: int, n: int, k: int, lda: int, ldb: int,
                ldc: int, batch: int, types_: tuple[int, int, int], compute: int) -> None:  # fmt: skip
    """cuBLAS's argument checks (CUBLAS_STATUS_INVALID_VALUE / NOT_SUPPORTED)."""
    a_rows = m if transa == 0 else k
    b_rows = k if transb == 0 else n
    if (transa not in (0, 1) or transb not in (0, 1) or min(m, n, k, batch) < 0
            or lda < max(1, a_rows) or ldb < max(1, b_rows) or ldc < max(1, m)):  # fmt: skip
        raise CUBLASError(
            f"CUBLAS_STATUS_INVALID_VALUE: trans=({transa}, {transb}) m={m} n={n} k={k} "
            f"lda={lda} ldb={ldb} ldc={ldc} batch={batch}"
        )
    a_type, b_type, c_type = types_
    if (a_type != b_type or a_type not in _CUDA_TYPES or c_type not in _CUDA_TYPES
            or compute not in _COMPUTE_32F):  # fmt: skip
        raise CUBLASError(f"CUBLAS_STATUS_NOT_SUPPORTED: types {types_}, compute {compute}")


def _matrices(ptr: int, dtype: np.dtype, rows: int, cols: int, ld: int, stride: int,
              batch: int, what: str) -> np.ndarray:  # fmt: skip
    """The ``batch`` column-major (rows x cols) matrices at ``ptr`` (element (i, j) of
    matrix b at ptr + (b stride + i + j ld) elements), as a writable (batch, rows, cols) view."""
    item = dtype.itemsize
    if min(rows, cols, batch) == 0:
        return np.zeros((batch, rows, cols), dtype)
    span = (batch - 1) * stride + (cols - 1) * ld + rows
    raw = _memory_at(ptr, span * item, what).view(dtype)
    return np.lib.stride_tricks.as_strided(
        raw, shape=(batch, rows, cols), strides=(stride * item, item, ld * item)
    )


def _gemm(handle: int, transa: int, transb: int, m: int, n: int, k: int, alpha: int,
          a: int, a_type: int, lda: int, stride_a: int, b: int, b_type: int, ldb: int,
          stride_b: int, beta: int, c: int, c_type: int, ldc: int, stride_c: int,
          batch: int, compute: int, name: str) -> None:  # fmt: skip
    """C_i = alpha op(A_i) op(B_i) + beta C_i for i < batch, column-major, float32 compute."""
    _check_gemm(transa, transb, m, n, k, lda, ldb, ldc, batch, (a_type, b_type, c_type), compute)
    stats.launch(name)
    if _pointer_modes.get(handle, 0) != 0:
        raise CUBLASError("fakecupy: only CUBLAS_POINTER_MODE_HOST is emulated")
    if min(m, n, batch) == 0:
        return
    alpha_v = ctypes.c_float.from_address(alpha).value  # host pointers to the compute type
    beta_v = ctypes.c_float.from_address(beta).value
    a_t, b_t, c_t = _CUDA_TYPES[a_type], _CUDA_TYPES[b_type], _CUDA_TYPES[c_type]
    A = _matrices(a, a_t, *((m, k) if transa == 0 else (k, m)), lda, stride_a, batch, "A")
    B = _matrices(b, b_t, *((k, n) if transb == 0 else (n, k)), ldb, stride_b, batch, "B")
    C = _matrices(c, c_t, m, n, ldc, stride_c, batch, "C")
    op_a = A if transa == 0 else A.swapaxes(-1, -2)
    op_b = B if transb == 0 else B.swapaxes(-1, -2)
    result = alpha_v * np.matmul(op_a.astype(np.float32), op_b.astype(np.float32))
    if beta_v != 0:  # beta = 0: C is written, never read
        result += beta_v * C.astype(np.float32)
    C[...] = result.astype(c_t)


def _gemm_ex(handle: int, transa: int, transb: int, m: int, n: int, k: int, alpha: int,
             A: int, Atype: int, lda: int, B: int, Btype: int, ldb: int, beta: int, C: int,
             Ctype: int, ldc: int, computeType: int, algo: int) -> None:  # fmt: skip
    _gemm(handle, transa, transb, m, n, k, alpha, A, Atype, lda, 0, B, Btype, ldb, 0,
          beta, C, Ctype, ldc, 0, 1, computeType, "cublasGemmEx")  # fmt: skip


def _gemm_strided_batched_ex(handle: int, transa: int, transb: int, m: int, n: int, k: int,
                             alpha: int, A: int, Atype: int, lda: int, strideA: int, B: int,
                             Btype: int, ldb: int, strideB: int, beta: int, C: int,
                             Ctype: int, ldc: int, strideC: int, batchCount: int,
                             computeType: int, algo: int) -> None:  # fmt: skip
    _gemm(handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA, B, Btype, ldb,
          strideB, beta, C, Ctype, ldc, strideC, batchCount, computeType,
          "cublasGemmStridedBatchedEx")  # fmt: skip


def _set_pointer_mode(handle: int, mode: int) -> None:
    _pointer_modes[handle] = mode


cublas = types.SimpleNamespace(
    CUBLAS_OP_N=0, CUBLAS_OP_T=1, CUBLAS_OP_C=2,
    CUBLAS_POINTER_MODE_HOST=0, CUBLAS_POINTER_MODE_DEVICE=1,
    CUBLAS_GEMM_DEFAULT=-1, CUBLAS_GEMM_DEFAULT_TENSOR_OP=99,
    CUBLAS_DEFAULT_MATH=0, CUBLAS_TENSOR_OP_MATH=1, CUBLAS_COMPUTE_32F=68,
    CUBLASError=CUBLASError,
    getPointerMode=lambda handle: _pointer_modes.get(handle, 0),
    setPointerMode=_set_pointer_mode,
    gemmEx=_gemm_ex,
    gemmStridedBatchedEx=_gemm_strided_batched_ex,
)  # fmt: skip


def _synchronize() -> None:
    stats.syncs += 1


namespace.cuda = types.SimpleNamespace(
    Device=_Device,
    runtime=types.SimpleNamespace(
        getDeviceCount=lambda: 1,
        CUDA_R_32F=0,
        CUDA_R_16F=2,
        CUDA_R_16BF=14,
        deviceSynchronize=_synchronize,
    ),
    Stream=types.SimpleNamespace(null=None),
    cublas=cublas,
    device=types.SimpleNamespace(get_cublas_handle=lambda: 1),
)
namespace.newaxis = None
namespace.pi = math.pi


_saved: list[Any] = []


def _counting_launch(launch: Any) -> Any:
    """``handgrad.kernels.cuda._launch`` counting each kernel it launches (an empty grid
    launches none)."""

    def counted(name: str, grid: tuple, block: tuple, args: tuple) -> None:
        if min(grid) > 0:
            stats.launch(name)
        launch(name, grid, block, args)

    counted.__wrapped__ = launch  # type: ignore[attr-defined]
    return counted


def install(kernels: bool = False, bf16_matmul: bool = False) -> Any:
    """Register the fake with handgrad (array namespace and ``handgrad.backend.cuda``'s CuPy).

    The fake cannot run CUDA kernels nor compile them, so by default ops take their generic
    array path (``kernels=False``) and bfloat16 products are computed in float32
    (``bf16_matmul=False``); ``uninstall`` restores both switches. Tests of the kernel path
    pass ``kernels=True`` and replace the launchers (see ``reference_kernels``)."""
    from handgrad.backend import cuda, register_array_module
    from handgrad.kernels import cuda as K

    register_array_module(ndarray, namespace)
    switches = (cuda._kernels_on, cuda._bf16_on)
    _saved.append((cuda._set_cupy_module(namespace), switches, K._launch))
    K._launch = _counting_launch(K._launch)
    cuda.use_kernels(kernels)
    cuda.use_bf16_matmul(bf16_matmul)
    stats.reset()
    return namespace


def uninstall() -> None:
    from handgrad.backend import cuda
    from handgrad.kernels import cuda as K

    if not _saved:
        cuda._set_cupy_module(None)
        cuda._kernels_on = cuda._bf16_on = None
        return
    module, switches, launch = _saved.pop()
    cuda._set_cupy_module(module)
    cuda._kernels_on, cuda._bf16_on = switches
    K._launch = launch


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
              "bias_gelu_forward", "bias_gelu_backward", "fused_classifier",
              "causal_softmax_lse_forward", "causal_softmax_recompute")  # fmt: skip


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


# what each real launcher queues on the device, for ``stats.launches``: its kernels, and the
# memsets of its ``cp.zeros`` (``cp.empty`` queues nothing); one unless listed
_QUEUED = {"layer_norm_backward": 4, "embedding_backward": 2, "sum_squares": 2}


def _as_launched(name: str, launcher: Any) -> Any:
    """``launcher`` (a NumPy reference) as the device sees the real one: its launches are
    counted (``_QUEUED``), its outputs are the only new device memory (the reference's
    temporaries are not), and with ``out=`` the result is written into ``out``."""

    def launched(*args: Any, **kwargs: Any) -> Any:
        global _tracking
        out = kwargs.get("out")
        _tracking = False
        try:
            result = launcher(*args, **kwargs)
        finally:
            _tracking = True
        stats.launch(name, _QUEUED.get(name, 1))
        if isinstance(out, ndarray) and isinstance(result, ndarray):
            out._a[...] = result._a
            return out
        for r in result if isinstance(result, tuple) else (result,):
            if isinstance(r, ndarray):
                _track(r._a)
        return result

    return launched


def reference_kernels(monkeypatch: Any) -> dict[str, int]:
    """Replace every launcher of ``handgrad.kernels.cuda`` that the ops dispatch to with its
    NumPy reference (see ``_reference_launcher``); returns the call counts by name."""
    from handgrad.kernels import cuda as K

    calls: dict[str, int] = {}
    for name in _LAUNCHERS:
        monkeypatch.setattr(K, name, _as_launched(name, _reference_launcher(name, calls)))
    return calls
