"""``handgrad.backend.cuda``: is a CUDA GPU usable here, how many, and the CuPy module that drives it.

CuPy is optional (``pip install handgrad[cuda]``): this module imports without it, and
``is_available()`` is then False. Asking for a CUDA device without one raises one clear
error that says which piece is missing: CuPy itself, or a GPU that CuPy can see.
"""

from __future__ import annotations

import importlib
import math
import os
from typing import Any

_cupy: Any = None
_cupy_error: str | None = None
_device_error: str | None = None  # why CuPy counted no GPU, when it raised


def _import_cupy() -> Any:
    """CuPy, or None when it is not installed (or fails to load its CUDA libraries)."""
    global _cupy, _cupy_error
    if _cupy is None and _cupy_error is None:
        try:
            _cupy = importlib.import_module("cupy")
        except Exception as e:  # noqa: BLE001  (not installed, or its CUDA libraries fail to load)
            _cupy_error = f"{type(e).__name__}: {e}"
    return _cupy


def _set_cupy_module(module: Any) -> Any:
    """Use ``module`` as CuPy (a stand-in in tests; None forgets it); returns the previous."""
    global _cupy, _cupy_error, _bf16_works, _bf16_error, _bf16_arrays
    previous = _cupy
    _cupy, _cupy_error = module, None
    _bf16_works = _bf16_error = _bf16_arrays = None  # probe the new module afresh
    return previous


def import_error() -> str | None:
    """Why ``import cupy`` failed (None when it worked or has not been tried)."""
    _import_cupy()
    return _cupy_error


def device_count() -> int:
    """How many CUDA GPUs CuPy sees (0 without CuPy, a driver or a GPU)."""
    cp = _import_cupy()
    if cp is None:
        return 0
    global _device_error
    _device_error = None
    try:
        return int(cp.cuda.runtime.getDeviceCount())
    except Exception as e:  # noqa: BLE001  (CUDARuntimeError: no driver, no GPU, a broken install)
        _device_error = f"{type(e).__name__}: {e}"[:300]
        return 0


def is_available() -> bool:
    """True when CuPy is installed and sees at least one GPU (as ``torch.cuda.is_available``)."""
    return device_count() > 0


def require(index: int | None = None) -> Any:
    """The CuPy module, after checking that GPU ``index`` (default 0) exists; otherwise a
    RuntimeError that says what is missing."""
    cp = _import_cupy()
    if cp is None:
        raise RuntimeError(
            "CUDA is not available: no CuPy (install the wheel for your CUDA version, e.g. "
            f"`pip install cupy-cuda12x` or `cupy-cuda13x`; import failed with: {_cupy_error})"
        )
    n = device_count()
    if n == 0:
        why = f": {_device_error}" if _device_error else ""
        raise RuntimeError(
            "CUDA is not available: no GPU (CuPy is installed but finds no CUDA device or "
            f"driver{why})"
        )
    i = 0 if index is None else index
    if not 0 <= i < n:
        raise RuntimeError(
            f"CUDA device cuda:{i} does not exist: {n} GPU{'s' if n != 1 else ''} visible "
            f"(cuda:0 .. cuda:{n - 1})"
        )
    return cp


def synchronize(index: int | None = None) -> None:
    """Wait until every kernel queued on GPU ``index`` (default: the current one) has run."""
    cp = require(index)
    if index is None:
        cp.cuda.Device().synchronize()
    else:
        cp.cuda.Device(index).synchronize()


_PRECISIONS = ("highest", "high")


def set_matmul_precision(precision: str) -> None:
    """How float32 matmuls run on CUDA, as ``torch.set_float32_matmul_precision``: "highest"
    computes them in float32; "high" lets cuBLAS use TF32 tensor cores (inputs rounded to a
    10-bit mantissa, float32 accumulation; ~8x the float32 throughput on an A100/H100).

    CuPy reads ``CUPY_TF32`` when a dtype's cuBLAS compute type is first needed, so the
    variable is set for that, and the compute type of float32 is set directly where this
    CuPy exposes it (``cupy._core._routines_linalg.set_compute_type``, in CuPy 13 and 14; a
    cached choice would otherwise win). Without CuPy or a GPU only the variable changes: a
    no-op on the CPU."""
    if precision not in _PRECISIONS:
        raise ValueError(
            f"set_matmul_precision: expected one of {list(_PRECISIONS)}, got {precision!r}"
        )
    tf32 = precision == "high"
    os.environ["CUPY_TF32"] = "1" if tf32 else "0"
    cp = _import_cupy()
    if cp is None or device_count() == 0:  # TF32 is set after asking the GPU's capability
        return
    try:
        # the module of the CuPy in use (a stand-in has none: it is left alone)
        linalg = importlib.import_module(f"{cp.__name__}._core._routines_linalg")
        kind = linalg.COMPUTE_TYPE_TF32 if tf32 else linalg.COMPUTE_TYPE_DEFAULT
        linalg.set_compute_type(cp.float32, kind)
    except (ImportError, AttributeError):  # a CuPy without the setter, or a stand-in
        pass


# ----------------------------------------------------------------------------------------
# which GPU code paths run: handgrad's CUDA kernels, and bfloat16 matrix products

# FLOPs of the matrix products run on a GPU since the last reset, by operand dtype ("float32",
# "bfloat16"): what a report says ran, rather than what a probe says could run. The products
# of linear layers (the tied classifier included) and of attention's kernel path count.
GEMM_FLOPS: dict[str, float] = {}


def count_gemm(dtype: Any, flops: float) -> None:
    """Add a GPU matrix product of ``flops`` (2 m n k) with ``dtype`` operands."""
    name = str(dtype)
    GEMM_FLOPS[name] = GEMM_FLOPS.get(name, 0.0) + float(flops)


def gemm_flops() -> dict[str, float]:
    """A copy of ``GEMM_FLOPS``; ``GEMM_FLOPS.clear()`` starts a new count."""
    return dict(GEMM_FLOPS)


def _env_flag(name: str) -> bool:
    """``name`` read as a switch: unset, "1", "true", "on" or "yes" is on; "0", "false",
    "off" or "no" is off; anything else is a ValueError naming the variable."""
    value = os.environ.get(name, "1").strip().lower()
    if value in ("1", "true", "on", "yes", ""):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"environment variable {name}={value!r}: expected 0 or 1")


_kernels_on: bool | None = None  # None: from HANDGRAD_CUDA_KERNELS on first use


def use_kernels(enabled: bool) -> None:
    """Run the fused CUDA kernels of ``handgrad.kernels.cuda`` for ops on CuPy arrays (the
    default; env ``HANDGRAD_CUDA_KERNELS=0`` turns them off), or, with False, the generic
    array code that runs on any namespace. NumPy arrays never see the kernels."""
    global _kernels_on
    if not isinstance(enabled, bool):
        raise TypeError(f"use_kernels: expected True or False, got {enabled!r}")
    _kernels_on = enabled


def kernels_enabled() -> bool:
    """Whether ops on CuPy arrays run handgrad's CUDA kernels (see ``use_kernels``)."""
    global _kernels_on
    if _kernels_on is None:
        _kernels_on = _env_flag("HANDGRAD_CUDA_KERNELS")
    return _kernels_on


def is_cupy(xp: Any) -> bool:
    """Whether the array namespace ``xp`` is the CuPy that drives the GPU here (a stand-in
    installed by the tests counts)."""
    if xp is None or getattr(xp, "__name__", "") == "numpy":
        return False
    return xp is (_cupy if _cupy is not None else _import_cupy())


_bf16_arrays: tuple[bool, str | None] | None = None  # None: not probed yet


def bf16_arrays_supported() -> tuple[bool, str | None]:
    """Whether this CuPy holds bfloat16 arrays (``ml_dtypes.bfloat16``, experimental in
    CuPy 14: needs NumPy >= 2.1.2 and may fail to compile its kernels with some CUDA
    versions): (True, None), or (False, why). Probed once: a host bfloat16 array uploaded,
    added to itself on the device, cast to float32 and read back, against the host's result.
    Without bfloat16 arrays a model must stay in float32 on the GPU."""
    global _bf16_arrays
    if _bf16_arrays is None:
        cp = require()
        import ml_dtypes  # noqa: PLC0415  (a dependency of handgrad; only needed here)
        import numpy as np  # noqa: PLC0415

        host = (np.arange(-8, 8, dtype=np.float32) / 4).astype(ml_dtypes.bfloat16)
        want = (host + host).astype(np.float32)
        try:
            d = cp.asarray(host)
            got = cp.asnumpy((d + d).astype(np.float32))
            back = cp.asnumpy(d)
            ok = np.array_equal(got, want) and back.dtype == host.dtype
            ok = ok and np.array_equal(back.view(np.uint16), host.view(np.uint16))
            _bf16_arrays = (True, None) if ok else (False, f"wrong values: {got} vs {want}")
        except Exception as e:  # noqa: BLE001  (any failure means: not usable here)
            _bf16_arrays = (False, f"{type(e).__name__}: {e}"[:500])
    return _bf16_arrays


_bf16_on: bool | None = None  # None: from HANDGRAD_CUDA_BF16_MATMUL on first use
_bf16_works: bool | None = None  # None: not probed yet
_bf16_error: str | None = None


def use_bf16_matmul(enabled: bool) -> None:
    """Let ``linear`` multiply bfloat16 operands on the GPU as bfloat16 (cuBLAS, float32
    accumulation; the default, env ``HANDGRAD_CUDA_BF16_MATMUL=0`` turns it off), or, with
    False, in float32 after a cast, as on the CPU."""
    global _bf16_on
    if not isinstance(enabled, bool):
        raise TypeError(f"use_bf16_matmul: expected True or False, got {enabled!r}")
    _bf16_on = enabled


def bf16_matmul_error() -> str | None:
    """Why the bfloat16 matmul probe failed (None when it passed or has not run)."""
    return _bf16_error


def bf16_matmul_enabled() -> bool:
    """Whether bfloat16 products on the GPU run in bfloat16: switched on (``use_bf16_matmul``)
    and CuPy's bfloat16 support (experimental in CuPy 14, through ``ml_dtypes``) passed a
    probe the first time it is asked: a small product against its float32 result. When the
    probe fails, products stay in float32 and ``bf16_matmul_error`` says why."""
    global _bf16_on, _bf16_works, _bf16_error
    if _bf16_on is None:
        _bf16_on = _env_flag("HANDGRAD_CUDA_BF16_MATMUL")
    if not _bf16_on or _cupy is None:
        return False
    if _bf16_works is None:
        _bf16_works, _bf16_error = _probe_bf16_matmul(_cupy)
    return _bf16_works


def _probe_bf16_matmul(cp: Any) -> tuple[bool, str | None]:
    import ml_dtypes  # noqa: PLC0415  (a dependency of handgrad; only needed here)
    import numpy as np  # noqa: PLC0415

    a = np.arange(-24, 24, dtype=np.float32).reshape(6, 8) / 8  # exact in bfloat16
    b = np.arange(-20, 20, dtype=np.float32).reshape(8, 5) / 4
    try:
        da = cp.asarray(a).astype(ml_dtypes.bfloat16)  # cast on the device
        db = cp.asarray(b.astype(ml_dtypes.bfloat16))
        got = cp.asnumpy((da @ db).astype(np.float32))
        got_t = cp.asnumpy((db.T @ da.T).astype(np.float32))
    except Exception as e:  # noqa: BLE001  (any failure means: not usable here)
        return False, f"{type(e).__name__}: {e}"
    # exact in float32; a bfloat16 result is that rounded once (float32 accumulation)
    exact = a @ b
    rounded = exact.astype(ml_dtypes.bfloat16).astype(np.float32)
    want = exact if np.array_equal(got, exact) else rounded
    if not (np.array_equal(got, want) and np.array_equal(got_t, want.T)):
        return False, (
            f"bfloat16 product differs from float32: {got.ravel()[:4]} vs {want.ravel()[:4]}"
        )
    return True, None


# ----------------------------------------------------------------------------------------
# bfloat16 matrix products through cuBLAS. CuPy 14's ``matmul`` multiplies bfloat16 arrays of
# at most 2 dims (its batched path accepts only the dtype chars 'efdFD'; bfloat16 is 'E'),
# so stacked products (attention's) call cuBLAS's strided batched GEMM here.

# cuBLAS and CUDA constants (cublas.pxd and driver_types.h; read from CuPy where it has them)
_CUDA_R_32F, _CUDA_R_16BF = 0, 14
_CUBLAS_OP_N, _CUBLAS_OP_T = 0, 1
_CUBLAS_COMPUTE_32F = 68
_CUBLAS_GEMM_DEFAULT = -1
_CUBLAS_POINTER_MODE_HOST = 0


def _cublas_operand(x: Any, rows: int, cols: int) -> tuple[int, int] | None:
    """How cuBLAS (column-major) reads the row-major (..., rows, cols) array ``x``: (op, ld)
    where op is N when x's memory, read column-major, is x^T (rows contiguous), T when it is
    x itself (a transposed view: columns contiguous); None when neither (then copy)."""
    item = x.itemsize
    s0, s1 = x.strides[-2], x.strides[-1]
    if s0 % item or s1 % item or s0 < 0 or s1 < 0:
        return None
    s0, s1 = s0 // item, s1 // item
    # rows contiguous: column j of x^T (= row j of x) starts s0 elements after row j - 1
    if s1 == 1 or cols == 1:
        ld = s0 if rows > 1 else cols
        if ld >= max(1, cols):
            return _CUBLAS_OP_N, ld
    if s0 == 1 or rows == 1:  # columns contiguous
        ld = s1 if cols > 1 else rows
        if ld >= max(1, rows):
            return _CUBLAS_OP_T, ld
    return None


def _batch_stride(x: Any) -> int | None:
    """The one stride, in elements, that steps over all of ``x``'s leading dims taken as one
    flat batch; None when they cannot be folded so (then copy)."""
    lead = [(n, s) for n, s in zip(x.shape[:-2], x.strides[:-2], strict=True) if n != 1]
    if not lead:
        return 0
    for (_, s), (n_next, s_next) in zip(lead, lead[1:], strict=False):
        if s != s_next * n_next:
            return None
    s = lead[-1][1]
    if s < 0 or s % x.itemsize:
        return None
    return s // x.itemsize


def _gemm_operand(cp: Any, x: Any) -> tuple[Any, int, int, int]:
    """(array, op, ld, batch stride) of one operand, copied to C order when its layout does
    not fit a strided batched GEMM."""
    rows, cols = x.shape[-2], x.shape[-1]
    layout, stride = _cublas_operand(x, rows, cols), _batch_stride(x)
    if layout is None or stride is None:
        x = cp.ascontiguousarray(x)
        layout, stride = _cublas_operand(x, rows, cols), _batch_stride(x)
        assert layout is not None and stride is not None
    op, ld = layout
    return x, op, ld, stride


def gemm_bf16(a: Any, b: Any, out_dtype: Any = None) -> Any:
    """a (..., m, k) @ b (..., k, n) -> (..., m, n) for bfloat16 CuPy arrays, by cuBLAS with
    float32 accumulation (CUBLAS_COMPUTE_32F) and one rounding to ``out_dtype`` (bfloat16, the
    default, or float32). The leading dims must be equal; each operand may be a transposed
    view of its last two axes (``x.swapaxes(-1, -2)``) and is copied only when its leading
    dims cannot be stepped with one stride. 2-D products call ``cublasGemmEx``, stacked ones
    ``cublasGemmStridedBatchedEx``; the FLOPs (2 m n k per matrix) are counted as bfloat16."""
    import ml_dtypes  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    from handgrad.backend import check_bf16_product  # noqa: PLC0415  (imports this module)

    cp = require()
    bf16 = np.dtype(ml_dtypes.bfloat16)
    out_dtype = check_bf16_product("gemm_bf16", a, b, bf16 if out_dtype is None else out_dtype)
    lead, (m, k), n = a.shape[:-2], a.shape[-2:], b.shape[-1]
    batch = math.prod(lead)
    if batch == 0 or m == 0 or n == 0 or k == 0:
        return cp.zeros((*lead, m, n), dtype=out_dtype)
    a, op_a, lda, stride_a = _gemm_operand(cp, a)
    b, op_b, ldb, stride_b = _gemm_operand(cp, b)
    c = cp.empty((*lead, m, n), dtype=out_dtype)
    runtime, cublas = cp.cuda.runtime, cp.cuda.cublas
    bf16_type = getattr(runtime, "CUDA_R_16BF", _CUDA_R_16BF)
    c_type = bf16_type if out_dtype == bf16 else getattr(runtime, "CUDA_R_32F", _CUDA_R_32F)
    compute = getattr(cublas, "CUBLAS_COMPUTE_32F", _CUBLAS_COMPUTE_32F)
    algo = getattr(cublas, "CUBLAS_GEMM_DEFAULT", _CUBLAS_GEMM_DEFAULT)
    host_mode = getattr(cublas, "CUBLAS_POINTER_MODE_HOST", _CUBLAS_POINTER_MODE_HOST)
    one, zero = np.array(1.0, np.float32), np.array(0.0, np.float32)  # scalars of the compute type
    handle = cp.cuda.device.get_cublas_handle()
    mode = cublas.getPointerMode(handle)
    cublas.setPointerMode(handle, host_mode)  # alpha and beta are read from host memory
    try:
        # cuBLAS is column-major: a row-major C = A B is, read column-major, C^T = B^T A^T,
        # so the call passes b first (op_b, ldb), then a, and sizes (n, m, k): C^T is n x m
        # with ldc = n, which is C's row-major memory. A row-major operand read column-major
        # is already its transpose (op N); a transposed view is the matrix itself (op T).
        if batch == 1 and len(lead) == 0:
            cublas.gemmEx(handle, op_b, op_a, n, m, k, one.ctypes.data,
                          b.data.ptr, bf16_type, ldb, a.data.ptr, bf16_type, lda,
                          zero.ctypes.data, c.data.ptr, c_type, n, compute, algo)  # fmt: skip
        else:
            cublas.gemmStridedBatchedEx(handle, op_b, op_a, n, m, k, one.ctypes.data,
                                        b.data.ptr, bf16_type, ldb, stride_b,
                                        a.data.ptr, bf16_type, lda, stride_a,
                                        zero.ctypes.data, c.data.ptr, c_type, n, m * n,
                                        batch, compute, algo)  # fmt: skip
    finally:
        cublas.setPointerMode(handle, mode)
    count_gemm(bf16, 2 * batch * m * n * k)
    return c


def matmul_bf16(a: Any, b: Any, out_dtype: Any = None) -> Any:
    """``backend.matmul_bf16`` for CuPy arrays: a 2-D product with a bfloat16 result by
    CuPy's matmul (``cublasGemmEx``, float32 accumulation), anything else by ``gemm_bf16``.
    FLOPs are counted as bfloat16."""
    import ml_dtypes  # noqa: PLC0415

    bf16 = ml_dtypes.bfloat16
    if a.ndim == 2 and b.ndim == 2 and (out_dtype is None or out_dtype == bf16):
        if a.dtype != bf16 or b.dtype != bf16:
            raise TypeError(f"matmul_bf16: operands must be bfloat16, got {a.dtype}, {b.dtype}")
        count_gemm(a.dtype, 2 * a.shape[0] * a.shape[1] * b.shape[1])
        return a @ b
    return gemm_bf16(a, b, out_dtype)


def describe() -> dict[str, Any]:
    """What a GPU report needs to be read alone: CuPy's, NumPy's and ml_dtypes' versions,
    the CUDA runtime, driver and NVRTC versions, and each GPU's name, compute capability
    and memory. Every entry that cannot be read holds the error instead; never raises."""
    import numpy as np  # noqa: PLC0415

    info: dict[str, Any] = {"numpy": np.__version__}
    try:
        import ml_dtypes  # noqa: PLC0415

        info["ml_dtypes"] = ml_dtypes.__version__
    except Exception as e:  # noqa: BLE001
        info["ml_dtypes"] = f"{type(e).__name__}: {e}"
    cp = _import_cupy()
    if cp is None:
        info["cupy"] = f"not importable: {_cupy_error}"
        return info
    info["cupy"] = getattr(cp, "__version__", "?")

    def read(key: str, fn: Any) -> None:
        try:
            info[key] = fn()
        except Exception as e:  # noqa: BLE001  (reported, not raised)
            info[key] = f"{type(e).__name__}: {e}"[:300]

    runtime = cp.cuda.runtime
    read("cuda_runtime", lambda: _cuda_version(runtime.runtimeGetVersion()))
    read("cuda_driver", lambda: _cuda_version(runtime.driverGetVersion()))
    read("nvrtc", lambda: ".".join(map(str, cp.cuda.nvrtc.getVersion())))
    read("device_count", device_count)

    def gpus() -> list[dict[str, Any]]:
        out = []
        for i in range(device_count()):
            props = runtime.getDeviceProperties(i)
            name = props["name"]
            free, total = cp.cuda.Device(i).mem_info
            out.append({"name": name.decode() if isinstance(name, bytes) else str(name),
                        "compute_capability": f"{props['major']}.{props['minor']}",
                        "memory_gib": round(total / 2**30, 1),
                        "free_gib": round(free / 2**30, 1)})  # fmt: skip
        return out

    read("gpus", gpus)
    read("cupy_tf32_env", lambda: os.environ.get("CUPY_TF32"))
    return info


def _cuda_version(v: int) -> str:
    """CUDA's integer version (1000 * major + 10 * minor) as "major.minor"."""
    return f"{v // 1000}.{v % 1000 // 10}"


__all__ = [
    "bf16_arrays_supported",
    "bf16_matmul_enabled",
    "bf16_matmul_error",
    "describe",
    "device_count",
    "gemm_bf16",
    "import_error",
    "is_available",
    "is_cupy",
    "kernels_enabled",
    "matmul_bf16",
    "require",
    "set_matmul_precision",
    "synchronize",
    "use_bf16_matmul",
    "use_kernels",
]
