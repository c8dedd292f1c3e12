"""``backend.matmul_bf16`` and ``backend.cuda.gemm_bf16``: bfloat16 products with float32
accumulation, on NumPy (the reference) and through cuBLAS on the CuPy stand-in, whose cuBLAS
reads and writes memory as the cuBLAS documentation defines (column-major, op flags,
leading dimensions, batch strides)."""

from __future__ import annotations

import ctypes

import fakecupy
import ml_dtypes
import numpy as np
import pytest

from handgrad import backend as B
from handgrad.backend import cuda

BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture
def cp():
    with fakecupy.installed(kernels=True, bf16_matmul=True) as ns:
        cuda.GEMM_FLOPS.clear()
        yield ns
        cuda.GEMM_FLOPS.clear()


def bf16(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(BF16)


def want(a: np.ndarray, b: np.ndarray, out: np.dtype = BF16) -> np.ndarray:
    """The float32 product rounded once to ``out``."""
    return (a.astype(np.float32) @ b.astype(np.float32)).astype(out)


def test_numpy_is_the_reference() -> None:
    a, b = bf16(2, 3, 5), bf16(2, 5, 4, seed=1)
    got = B.matmul_bf16(a, b)
    assert got.dtype == BF16 and got.shape == (2, 3, 4)
    np.testing.assert_array_equal(got.view(np.uint16), want(a, b).view(np.uint16))
    got32 = B.matmul_bf16(a, b, out_dtype=B.float32)
    assert got32.dtype == np.float32
    np.testing.assert_array_equal(got32, want(a, b, np.float32))
    with pytest.raises(TypeError, match="bfloat16"):
        B.matmul_bf16(a.astype(np.float32), b)
    with pytest.raises(ValueError, match="leading dims"):
        B.matmul_bf16(a, bf16(3, 5, 4))


SHAPES = [  # (batch dims, m, k, n)
    ((), 5, 7, 3),
    ((3,), 5, 7, 3),
    ((2, 3), 4, 6, 5),
    ((1,), 6, 4, 2),  # a batch of one
    ((2,), 1, 5, 3),  # m = 1
    ((2,), 4, 5, 1),  # n = 1
    ((2,), 4, 1, 3),  # k = 1
    ((2,), 1, 1, 1),
    ((3,), 17, 9, 33),  # non-square, odd sizes
]


@pytest.mark.parametrize("lead,m,k,n", SHAPES)
@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("out", [BF16, np.dtype(np.float32)])
def test_gemm_matches_the_float32_product(cp, lead, m, k, n, trans_a, trans_b, out) -> None:
    a, b = bf16(*lead, m, k), bf16(*lead, k, n, seed=1)
    # a transposed operand: the device holds its transpose contiguous and passes a view
    da = (
        cp.asarray(np.ascontiguousarray(a.swapaxes(-1, -2))).swapaxes(-1, -2)
        if trans_a
        else cp.asarray(a)
    )
    db = (
        cp.asarray(np.ascontiguousarray(b.swapaxes(-1, -2))).swapaxes(-1, -2)
        if trans_b
        else cp.asarray(b)
    )
    fakecupy.stats.reset()
    got = B.matmul_bf16(da, db, out_dtype=out)
    assert isinstance(got, cp.ndarray) and got.dtype == out and got.shape == (*lead, m, n)
    assert fakecupy.stats.syncs == 0 and fakecupy.stats.launches == 1
    ref = want(a, b, out)
    if out == BF16:  # float32 sums in another order: at most one bfloat16 ulp apart
        np.testing.assert_allclose(got.get().astype(np.float32), ref.astype(np.float32),
                                   rtol=2**-7, atol=1e-6)  # fmt: skip
    else:
        np.testing.assert_allclose(got.get(), ref, rtol=1e-5, atol=1e-5)
    batch = int(np.prod(lead)) if lead else 1
    assert cuda.gemm_flops() == {"bfloat16": 2.0 * batch * m * n * k}


def test_the_batched_call_is_used_for_stacked_products(cp) -> None:
    a, b = cp.asarray(bf16(4, 3, 8)), cp.asarray(bf16(4, 8, 2, seed=1))
    fakecupy.stats.reset()
    cuda.gemm_bf16(a, b)
    cuda.gemm_bf16(a[0], b[0], out_dtype=np.float32)
    assert fakecupy.stats.launches_by == {"cublasGemmStridedBatchedEx": 1, "cublasGemmEx": 1}


def test_layouts_that_need_a_copy(cp) -> None:
    a, b = bf16(2, 3, 4, 5), bf16(3, 2, 5, 6, seed=1)
    da = cp.asarray(a)
    db = cp.asarray(b).swapaxes(0, 1)  # leading dims not foldable into one stride
    got = B.matmul_bf16(da, db, out_dtype="float32")
    np.testing.assert_allclose(got.get(), want(a, b.swapaxes(0, 1), np.float32), rtol=1e-5)
    every_other = cp.asarray(bf16(3, 8, 5))[:, ::2, :]  # rows two apart: ld 10, fine
    w = cp.asarray(bf16(3, 5, 2, seed=2))
    ref = want(bf16(3, 8, 5)[:, ::2, :], bf16(3, 5, 2, seed=2), np.float32)
    np.testing.assert_allclose(B.matmul_bf16(every_other, w, "float32").get(), ref, rtol=1e-5)
    strided_cols = cp.asarray(bf16(3, 4, 10))[:, :, ::2]  # neither layout: copied
    ref = want(bf16(3, 4, 10)[:, :, ::2], bf16(3, 5, 2, seed=2), np.float32)
    np.testing.assert_allclose(B.matmul_bf16(strided_cols, w, "float32").get(), ref, rtol=1e-5)


def test_cupy_matmul_refuses_stacked_bf16_as_cupy_14_does(cp) -> None:
    a, b = cp.asarray(bf16(2, 3, 4)), cp.asarray(bf16(2, 4, 5))
    with pytest.raises(TypeError, match="efdFD"):
        _ = a @ b
    two_d = a[0] @ b[0]  # 2-D: gemmEx, float32 accumulation, rounded once
    np.testing.assert_allclose(two_d.get().astype(np.float32),
                               want(a[0].get(), b[0].get()).astype(np.float32), rtol=2**-7)  # fmt: skip


def _call(cp, a, b, c, **change):
    """gemmStridedBatchedEx for row-major c = a @ b (as gemm_bf16 calls it), with the
    arguments in ``change`` replaced."""
    blas = cp.cuda.cublas
    batch, m, k = a.shape
    n = b.shape[-1]
    one, zero = np.array(1.0, np.float32), np.array(0.0, np.float32)
    args = dict(handle=cp.cuda.device.get_cublas_handle(), transa=0, transb=0, m=n, n=m, k=k,
                alpha=one.ctypes.data, A=b.data.ptr, Atype=14, lda=n, strideA=k * n,
                B=a.data.ptr, Btype=14, ldb=k, strideB=m * k, beta=zero.ctypes.data,
                C=c.data.ptr, Ctype=0, ldc=n, strideC=m * n, batchCount=batch,
                computeType=68, algo=-1)  # fmt: skip
    args.update(change)
    blas.gemmStridedBatchedEx(*args.values())
    return c


def test_the_emulated_cublas_catches_wrong_arguments(cp) -> None:
    a, b = bf16(3, 4, 6), bf16(3, 6, 5, seed=1)
    da, db = cp.asarray(a), cp.asarray(b)
    c = _call(cp, da, db, cp.zeros((3, 4, 5), np.float32))
    np.testing.assert_allclose(c.get(), want(a, b, np.float32), rtol=1e-5)
    # a leading dimension too small for the stored matrix: cuBLAS's INVALID_VALUE
    with pytest.raises(cp.cuda.cublas.CUBLASError, match="INVALID_VALUE"):
        _call(cp, da, db, cp.zeros((3, 4, 5), np.float32), lda=4)
    # a wrong but valid lda (one more than the row length) reads other elements ...
    c = _call(cp, da, db, cp.zeros((3, 4, 5), np.float32), lda=6, batchCount=2)
    assert not np.allclose(c.get()[:2], want(a, b, np.float32)[:2], rtol=1e-2)
    # ... and past the end of b's allocation it is an illegal access
    with pytest.raises(RuntimeError, match="illegal memory access"):
        _call(cp, da, db, cp.zeros((3, 4, 5), np.float32), lda=6)
    # the operands swapped (a passed first, as a row-major library would) give other numbers
    # or go out of bounds
    with pytest.raises((RuntimeError, cp.cuda.cublas.CUBLASError)):
        _call(cp, da, db, cp.zeros((3, 4, 5), np.float32), A=da.data.ptr, B=db.data.ptr)


def test_emulated_alpha_beta_and_pointer_mode(cp) -> None:
    a, b = bf16(1, 2, 3), bf16(1, 3, 2, seed=1)
    da, db = cp.asarray(a), cp.asarray(b)
    c = cp.asarray(np.ones((1, 2, 2), np.float32))
    two, half = np.array(2.0, np.float32), np.array(0.5, np.float32)
    _call(cp, da, db, c, alpha=two.ctypes.data, beta=half.ctypes.data)
    np.testing.assert_allclose(c.get(), 2 * want(a, b, np.float32) + 0.5, rtol=1e-5)
    assert ctypes.c_float.from_address(two.ctypes.data).value == 2.0
    blas = cp.cuda.cublas
    handle = cp.cuda.device.get_cublas_handle()
    blas.setPointerMode(handle, blas.CUBLAS_POINTER_MODE_DEVICE)
    try:  # gemm_bf16 sets host mode for its call and puts the caller's mode back
        cuda.gemm_bf16(da, db)
        assert blas.getPointerMode(handle) == blas.CUBLAS_POINTER_MODE_DEVICE
    finally:
        blas.setPointerMode(handle, blas.CUBLAS_POINTER_MODE_HOST)
