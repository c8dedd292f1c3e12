"""The array seam: every op computes with the NumPy-like module of its inputs.

``get_array_module(*arrays)`` gives that module: NumPy for host arrays, CuPy for arrays on a
GPU (``backend/device.py`` moves arrays between them; ``backend/cuda.py`` finds CuPy). A
tensor's device is where its array lives, so no global switch picks a backend: ops ask their
inputs. The few idioms in which the libraries differ (host copies, in-place scatter, random
numbers drawn on the host) are the functions below; compute modules import no array library.

Dtypes are NumPy dtype objects. bfloat16 comes from ``ml_dtypes``; NumPy can store it but
has no fast kernels for it, so ops compute in float32 and cast back (see ``compute_dtype``).
"""

from __future__ import annotations

import ctypes
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import ml_dtypes
import numpy as np

try:  # optional: lets handgrad set how many threads BLAS uses
    from threadpoolctl import ThreadpoolController
except ImportError:
    ThreadpoolController = None


float16 = np.dtype(np.float16)
float32 = np.dtype(np.float32)
float64 = np.dtype(np.float64)
bfloat16 = np.dtype(ml_dtypes.bfloat16)
int8 = np.dtype(np.int8)
int16 = np.dtype(np.int16)
int32 = np.dtype(np.int32)
int64 = np.dtype(np.int64)
uint8 = np.dtype(np.uint8)
uint16 = np.dtype(np.uint16)
uint32 = np.dtype(np.uint32)
bool_ = np.dtype(np.bool_)

default_float = float32
default_int = int64

_BY_NAME: dict[str, np.dtype] = {
    "float16": float16,
    "half": float16,
    "fp16": float16,
    "float32": float32,
    "float": float32,
    "fp32": float32,
    "float64": float64,
    "double": float64,
    "fp64": float64,
    "bfloat16": bfloat16,
    "bf16": bfloat16,
    "int8": int8,
    "int16": int16,
    "int32": int32,
    "int64": int64,
    "long": int64,
    "uint8": uint8,
    "uint16": uint16,
    "uint32": uint32,
    "bool": bool_,
}
_SUPPORTED = frozenset(_BY_NAME.values())


def to_dtype(dtype: Any) -> np.dtype:
    """Normalise a dtype given as a name ('bf16', 'float32'), a NumPy dtype or a Python type."""
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.").removeprefix("handgrad.")
        if name not in _BY_NAME:
            raise TypeError(f"unknown dtype {dtype!r}; expected one of {sorted(_BY_NAME)}")
        return _BY_NAME[name]
    if dtype is float:
        return default_float
    if dtype is int:
        return default_int
    if dtype is bool:
        return bool_
    try:
        d = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"unknown dtype {dtype!r}; expected one of {sorted(_BY_NAME)}") from None
    if d not in _SUPPORTED:
        raise TypeError(f"unsupported dtype {d}; expected one of {sorted(_BY_NAME)}")
    return d


def is_floating(dtype: np.dtype) -> bool:
    return dtype in (float16, float32, float64, bfloat16)


def compute_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype NumPy computes in for a stored dtype: float32 for the 16-bit floats."""
    return float32 if dtype in (bfloat16, float16) else dtype


def dtype_name(dtype: np.dtype) -> str:
    return "bfloat16" if dtype == bfloat16 else str(dtype)


def _keep_freed_memory() -> None:
    """Let glibc's malloc reuse freed blocks instead of handing them back to the kernel.

    NumPy allocates every array with malloc. By default glibc serves blocks above 128 KB (a
    threshold it adapts up to 32 MB) with fresh ``mmap`` pages and returns freed memory to
    the OS, so every new activation or gradient array of a training step pays a page fault
    per 4 KB on first touch; on this project's shakespeare-char run that was ~20% of the
    step. Keeping freed memory in the process (what PyTorch's caching allocator achieves)
    removes that cost; peak memory is unchanged. A no-op where libc is not glibc.
    """
    if sys.platform != "linux" or os.environ.get("HANDGRAD_KEEP_MALLOC_DEFAULTS"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(1 << 30))  # heap blocks up to 1 GiB
        libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2**31 - 1))  # never shrink the heap
    except (OSError, AttributeError):
        pass


_keep_freed_memory()


# ----------------------------------------------------------------------------------------
# threads: how many cores one op may use (BLAS's threads and handgrad's own op threads)


def available_cores() -> int:
    """The cores this process may run on (a container or taskset can give fewer than the
    machine has)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


_num_threads: int | None = None  # None: every available core


def _blas() -> Any:
    """threadpoolctl's handle on the BLAS libraries loaded now; None without threadpoolctl,
    whose absence leaves BLAS at its own setting. Made anew at each use (about 0.5 ms): a
    library loaded after the first scan (SciPy's own OpenBLAS, say) would otherwise keep
    its threads."""
    return ThreadpoolController() if ThreadpoolController is not None else None


def can_limit_blas() -> bool:
    return ThreadpoolController is not None


def get_num_threads() -> int:
    """Threads one op may use (as ``torch.get_num_threads``)."""
    return _num_threads or available_cores()


def _check_count(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"set_num_threads: n must be an int >= 1, got {n!r}")


def set_num_threads(n: int) -> None:
    """Let each op use at most ``n`` threads, BLAS included (as ``torch.set_num_threads``).

    Data-parallel training sets 1 in each of its worker processes: one process per core,
    each with single-threaded ops, instead of one process whose ops share the cores."""
    global _num_threads
    _check_count(n)
    _num_threads = n
    if _blas() is not None:
        _blas().limit(limits=n, user_api="blas")  # applied now, kept until changed


@contextmanager
def num_threads(n: int) -> Iterator[None]:
    """Inside the block each op uses at most ``n`` threads, BLAS included; the previous
    settings (BLAS's exactly as they were) come back after it."""
    global _num_threads
    _check_count(n)
    previous = _num_threads
    limiter = _blas().limit(limits=n, user_api="blas") if _blas() is not None else None
    _num_threads = n
    try:
        yield
    finally:
        _num_threads = previous
        if limiter is not None:
            limiter.restore_original_limits()


# ----------------------------------------------------------------------------------------
# the array namespace: taken from the arrays, as ``cupy.get_array_module`` does

_NAMESPACES: dict[type, Any] = {np.ndarray: np}


def register_array_module(array_type: type, module: Any) -> None:
    """Tell handgrad that arrays of ``array_type`` compute with ``module`` (a NumPy-like
    namespace). CuPy registers itself on first sight; tests register a stand-in."""
    _NAMESPACES[array_type] = module


def get_array_module(*arrays: Any) -> Any:
    """The NumPy-like module that computes on ``arrays``: NumPy unless one of them belongs
    to another registered library (CuPy on a GPU). Scalars and None are skipped."""
    for a in arrays:
        t = type(a)
        if t is np.ndarray or a is None or isinstance(a, (int, float, bool, np.generic)):
            continue
        module = _NAMESPACES.get(t)
        if module is None:
            module = _lookup_namespace(t)
        if module is not np:
            return module
    return np


def _lookup_namespace(t: type) -> Any:
    for base in t.__mro__:
        if base in _NAMESPACES:
            _NAMESPACES[t] = _NAMESPACES[base]
            return _NAMESPACES[base]
    if t.__module__.split(".")[0] == "cupy":
        import cupy  # noqa: PLC0415  (optional: only reached when a CuPy array exists)

        _NAMESPACES[t] = cupy
        return cupy
    _NAMESPACES[t] = np
    return np


def asarray(data: Any, dtype: np.dtype | None = None) -> np.ndarray:
    return np.asarray(data, dtype=dtype)


def to_numpy(a: Any) -> np.ndarray:
    """``a`` as a host NumPy array: itself for NumPy data, an explicit device-to-host copy
    (``cupy.asnumpy``, one synchronisation) for the arrays of another namespace."""
    module = get_array_module(a)
    if module is np:
        return np.asarray(a)
    return module.asnumpy(a)


# ----------------------------------------------------------------------------------------
# array idioms the autograd core needs that are not plain array-API calls. The core (ops,
# engine, Tensor, creation) never imports NumPy; what it needs beyond ``xp.<function>`` on
# the arrays' own namespace is here, so another array library only has to fit these.

Array = Any  # an array of a registered namespace (numpy.ndarray, cupy.ndarray, ...)
HostArray = np.ndarray  # the type of host (CPU) arrays
DType = np.dtype
Generator = np.random.Generator

# Python and NumPy scalars: an operand of these types takes the tensor's dtype.
SCALAR_TYPES: tuple[type, ...] = (int, float, bool, np.number)


def has_dtype(data: Any) -> bool:
    """Whether ``data`` carries its own dtype (an array of a registered namespace, a NumPy
    scalar or anything exposing ``__array_interface__``), so no default dtype applies."""
    return (
        isinstance(data, np.ndarray | np.generic)
        or hasattr(data, "__array_interface__")
        or get_array_module(data) is not np
    )


def ignore_float_errors() -> Any:
    """A context that lets x/0 and log(x <= 0) give inf/nan silently, as torch does."""
    return np.errstate(divide="ignore", invalid="ignore")


def is_writeable(a: Array) -> bool:
    """False for read-only views (``broadcast_to`` results, arrays a caller froze)."""
    flags = getattr(a, "flags", None)
    return bool(getattr(flags, "writeable", True))


def owns_data(a: Array) -> bool:
    """True when ``a`` is not a view of another array's memory."""
    return getattr(a, "base", None) is None


def scatter_add(out: Array, index: Any, values: Array) -> None:
    """``out[index] += values`` where a repeated index adds every time (a gather's adjoint)."""
    get_array_module(out).add.at(out, index, values)


def format_array(a: Array) -> str:
    """The values of ``a`` as ``repr(tensor)`` shows them (16-bit floats printed as float32)."""
    return np.array2string(to_numpy(a).astype(compute_dtype(a.dtype)), separator=", ")


# array helpers for nn/ and optim/: the few NumPy-only idioms those modules need, each taking
# the namespace from the arrays it is given, so that the modules above never import NumPy.
# On NumPy every helper does exactly what the inline NumPy code did (same draws, same bits).


def is_numpy(module: Any) -> bool:
    """Whether ``module`` (from ``get_array_module``) is NumPy, i.e. arrays live on the host."""
    return module is np


def is_array(a: Any) -> bool:
    """Whether ``a`` is an array of NumPy or of a registered namespace (not a Python or NumPy
    scalar, a Tensor or None)."""
    if isinstance(a, np.ndarray):
        return True
    if a is None or isinstance(a, (int, float, bool, np.generic)):
        return False
    t = type(a)
    return t in _NAMESPACES or t.__module__.split(".")[0] == "cupy"


def is_scalar(a: Any) -> bool:
    """Whether ``a`` is a NumPy scalar (``np.float32(1.0)``, ``np.int64(3)`` ...)."""
    return isinstance(a, np.generic)


def host_scalar(a: Any) -> Any:
    """A 0-d host array as a NumPy scalar (itself when it is one); None for anything else.
    CuPy passes NumPy scalars to its kernels by value, where a 0-d array would first be
    copied to the GPU (a copy from pageable memory that waits for the GPU's queue)."""
    if isinstance(a, np.generic):
        return a
    if isinstance(a, np.ndarray) and a.ndim == 0:
        return a[()]
    return None


def scalar_like(value: Any, dtype: np.dtype, like: Any) -> Any:
    """``value`` (a Python or NumPy number) in ``dtype`` to combine with the array ``like``:
    a 0-d NumPy array on the host, a NumPy scalar for another namespace (see host_scalar)."""
    if get_array_module(like) is np:
        return np.asarray(value, dtype=dtype)
    return np.asarray(value, dtype=dtype)[()]


def broadcast_shapes(*shapes: tuple[int, ...]) -> tuple[int, ...]:
    """The shape ``shapes`` broadcast to; ValueError when they do not broadcast."""
    return np.broadcast_shapes(*shapes)


_host_erf = np.vectorize(math.erf, otypes=[np.float64])


def erf(a: Any) -> Any:
    """The error function elementwise. NumPy has no vectorised erf (and handgrad does not depend
    on SciPy), so on the host it is ``math.erf`` per element, in float64; on CuPy it is
    ``cupyx.scipy.special.erf``."""
    xp = get_array_module(a)
    if xp is np:
        return _host_erf(a)
    import cupyx.scipy.special  # noqa: PLC0415  (only reached for CuPy arrays)

    return cupyx.scipy.special.erf(a)


def make_read_only(a: Any) -> Any:
    """Mark ``a`` read-only where the namespace supports it (NumPy), so that a cached array
    shared between calls cannot be changed in place by mistake. Returns ``a``."""
    if isinstance(a, np.ndarray):
        a.flags.writeable = False
    return a


def from_host(a: np.ndarray, like: Any) -> Any:
    """The host array ``a`` in the namespace of ``like`` (``a`` itself when that is NumPy)."""
    xp = get_array_module(like)
    return a if xp is np else xp.asarray(a)


def host_generator(seed: int) -> np.random.Generator:
    """A NumPy generator seeded with ``seed`` (random draws always happen on the host, so that
    a seed gives the same numbers on every backend)."""
    return np.random.default_rng(seed)


def dropout_scale(
    generator: np.random.Generator, shape: tuple[int, ...], p: float, like: Any
) -> Any:
    """The dropout multiplier m / (1 - p), m ~ Bernoulli(1 - p), of ``shape`` in ``like``'s dtype
    and namespace. The uniforms are drawn in float32 on the host generator (keep where u >= p),
    so a seed gives the same mask on every backend."""
    keep = generator.random(shape, dtype=np.float32) >= p
    return from_host((keep / (1.0 - p)).astype(like.dtype), like)


def zeros_like(a: Any) -> Any:
    """Zeros of ``a``'s shape and dtype, in its namespace (optimizer moments start here)."""
    return get_array_module(a).zeros_like(a)


def contiguous(a: Any) -> Any:
    """``a`` as a C-contiguous array of its namespace (``a`` itself when it already is one)."""
    return get_array_module(a).ascontiguousarray(a)


def copy_as(a: Any, dtype: np.dtype, like: Any = None) -> Any:
    """A C-contiguous copy of ``a`` in ``dtype``, in the namespace of ``like`` (default: of
    ``a``). Optimizer master weights (float32 copies of 16-bit parameters) and restored state
    are made with it."""
    xp = get_array_module(a if like is None else like)
    if xp is not np and get_array_module(a) is not xp:
        a = xp.asarray(a)
    return xp.array(a, dtype=dtype, copy=True, order="C")


def to_host_contiguous(a: Any) -> np.ndarray:
    """A C-contiguous NumPy copy of ``a`` (``a`` itself when it already is one), for writing."""
    if not isinstance(a, np.ndarray) and hasattr(a, "get"):
        a = a.get()  # CuPy: device -> host
    return np.ascontiguousarray(a)


def check_bf16_product(name: str, a: Array, b: Array, out_dtype: Any) -> np.dtype:
    """``out_dtype`` as a dtype, once a (..., m, k) @ b (..., k, n) of bfloat16 operands with
    equal leading dims into bfloat16 or float32 is what was asked; else the error, by ``name``."""
    out_dtype = to_dtype(out_dtype)
    if out_dtype not in (bfloat16, float32):
        raise TypeError(f"{name}: out_dtype must be bfloat16 or float32, got {out_dtype}")
    if a.dtype != bfloat16 or b.dtype != bfloat16:
        raise TypeError(f"{name}: operands must be bfloat16, got {a.dtype} and {b.dtype}")
    if a.ndim < 2 or a.ndim != b.ndim or a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
        raise ValueError(f"{name}: shapes {a.shape} and {b.shape} do not multiply as "
                         "(..., m, k) @ (..., k, n) with equal leading dims")  # fmt: skip
    return out_dtype


def matmul_bf16(a: Array, b: Array, out_dtype: Any = bfloat16) -> Array:
    """a (..., m, k) @ b (..., k, n) -> (..., m, n) for bfloat16 ``a`` and ``b`` (equal
    leading dims), computed as a bfloat16 GEMM does: the products accumulated in float32 and
    the result rounded once to ``out_dtype`` (bfloat16 or float32).

    On NumPy this is the reference, ``(a.astype(float32) @ b.astype(float32)).astype(out)``.
    On CuPy a 2-D product with a bfloat16 result is CuPy's matmul (``cublasGemmEx``); any
    other goes to cuBLAS directly (``backend.cuda.gemm_bf16``: ``cublasGemmEx`` or, stacked,
    ``cublasGemmStridedBatchedEx``, which CuPy 14's matmul cannot do for bfloat16), and the
    FLOPs are counted (``backend.cuda.gemm_flops``). Either operand may be a transposed view
    (``x.swapaxes(-1, -2)``)."""
    out_dtype = check_bf16_product("matmul_bf16", a, b, out_dtype)
    xp = get_array_module(a, b)
    if xp is np:
        return np.matmul(a.astype(float32), b.astype(float32)).astype(out_dtype, copy=False)
    from handgrad.backend import cuda  # noqa: PLC0415  (imports this module)

    return cuda.matmul_bf16(a, b, out_dtype)
