"""The CPU emulation of CUDA that runs the kernels (``cuda_emulator.py``,
``cuda_emul/cuda_emul.h``): small CUDA kernels whose results are known, and the mistakes it
must report instead of computing something."""

from __future__ import annotations

import cuda_emulator
import ml_dtypes
import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    cuda_emulator.unavailable() is not None, reason=cuda_emulator.unavailable() or ""
)


BLOCK_REVERSE = r"""
extern "C" __global__ void block_reverse(const float* x, float* y) {
    __shared__ float buf[64];
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    buf[threadIdx.x] = x[i];
    __syncthreads();
    y[i] = buf[blockDim.x - 1 - threadIdx.x];
}
"""


def test_shared_memory_is_per_block_and_syncthreads_waits(build) -> None:
    k = build("block_reverse")
    x = np.arange(3 * 64, dtype=np.float32)
    y = np.zeros_like(x)
    k((3,), (64,), (x, y))
    np.testing.assert_array_equal(y, x.reshape(3, 64)[:, ::-1].reshape(-1))


WARP = r"""
extern "C" __global__ void warp(const int* x, int* out) {
    const int t = threadIdx.x, n = blockDim.x, v = x[t];
    out[0 * n + t] = __shfl_xor_sync(0xffffffffu, v, 5);
    out[1 * n + t] = __shfl_down_sync(0xffffffffu, v, 3);
    out[2 * n + t] = __shfl_up_sync(0xffffffffu, v, 2);
    out[3 * n + t] = __shfl_sync(0xffffffffu, v, 7);
    out[4 * n + t] = __shfl_xor_sync(0xffffffffu, v, 9, 8);  // groups of 8
    out[5 * n + t] = (int)__ballot_sync(0xffffffffu, v & 1);
    out[6 * n + t] = __any_sync(0xffffffffu, v == 40) + 2 * __all_sync(0xffffffffu, v >= 0);
}
"""


def test_warp_shuffles_and_votes(build, rng) -> None:
    n = 64
    x = rng.integers(0, 100, n).astype(np.int32)
    out = np.zeros(7 * n, np.int32)
    build("warp")((1,), (n,), (x, out))
    lane, base = np.arange(n) % 32, np.arange(n) - np.arange(n) % 32
    o = out.reshape(7, n)
    np.testing.assert_array_equal(o[0], x[base + (lane ^ 5)])
    np.testing.assert_array_equal(o[1], x[np.where(lane + 3 < 32, np.arange(n) + 3, np.arange(n))])
    np.testing.assert_array_equal(o[2], x[np.where(lane >= 2, np.arange(n) - 2, np.arange(n))])
    np.testing.assert_array_equal(o[3], x[base + 7])
    src = lane ^ 9  # in groups of 8, a lane in a later group gives the caller's own value
    np.testing.assert_array_equal(o[4], x[base + np.where(src // 8 > lane // 8, lane, src)])
    for w in range(2):
        bits = sum(int(b) << i for i, b in enumerate(x[32 * w : 32 * w + 32] & 1))
        assert (o[5, 32 * w : 32 * w + 32].view(np.uint32) == bits).all()
        assert (o[6, 32 * w : 32 * w + 32] == (40 in x[32 * w : 32 * w + 32]) + 2).all()


EARLY_EXIT = r"""
extern "C" __global__ void early_exit(const float* x, float* out, int n) {
    __shared__ float part[4];
    if (threadIdx.x >= n) return;  // the rest of the block synchronises without these
    float v = x[threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x] = part[0] + part[1];
}
"""


def test_threads_that_return_leave_the_barriers(build) -> None:
    x = np.arange(128, dtype=np.float32)
    out = np.zeros(2, np.float32)
    build("early_exit")((2,), (128,), (x, out, np.int32(64)))
    np.testing.assert_array_equal(out, [x[:64].sum()] * 2)


ATOMICS = r"""
extern "C" __global__ void atomics(int* count, float* fsum, double* dsum, int* top) {
    atomicAdd(count, 1);
    atomicAdd(fsum, 0.5f);
    atomicAdd(dsum, (double)threadIdx.x);
    atomicMax(top, (int)(blockIdx.x * blockDim.x + threadIdx.x));
}
"""


def test_atomics(build) -> None:
    c, f, d, t = (np.zeros(1, dt) for dt in (np.int32, np.float32, np.float64, np.int32))
    build("atomics")((4,), (256,), (c, f, d, t))
    assert (c[0], f[0], d[0], t[0]) == (1024, 512.0, 4 * 255 * 256 / 2, 1023)


NUMBERS = r"""
#include <cuda_bf16.h>
extern "C" __global__ void numbers(const float* x, float* y, unsigned short* b, float* back,
                                   long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        y[i] = x[i] * 2.0f * 0.5f;  // exact, but for denormals (flushed)
        const __nv_bfloat16 h = __float2bfloat16(x[i]);
        b[i] = __bfloat16_as_ushort(h);
        back[i] = __bfloat162float(h);
    }
}
"""


def test_denormals_flush_and_bf16_rounds_to_nearest_even(build, rng) -> None:
    k = build("numbers")
    ties = (rng.integers(0x00800000, 0x7E000000, 64, dtype=np.uint32) & 0xFFFF0000) | 0x8000
    x = np.concatenate([f32 := rng.standard_normal(200).astype(np.float32) * 1e3,
                        ties.view(np.float32), np.float32([np.inf, -np.inf, 1.0e38, 0.0])])  # fmt: skip
    y, b, back = np.zeros_like(x), np.zeros(x.size, np.uint16), np.zeros_like(x)
    k((2,), (96,), (x, y, b, back, np.int64(x.size)))  # partial last block, grid-stride
    np.testing.assert_array_equal(b, x.astype(ml_dtypes.bfloat16).view(np.uint16))
    np.testing.assert_array_equal(back, x.astype(ml_dtypes.bfloat16).astype(np.float32))
    np.testing.assert_array_equal(y, x)
    assert f32.size == 200
    tiny = np.float32([1e-39, -3e-40, 1.2e-38])  # the last one is normal
    y, b, back = np.ones_like(tiny), np.zeros(3, np.uint16), np.zeros_like(tiny)
    k((1,), (32,), (tiny, y, b, back, np.int64(3)))
    assert k.flushes_denormals
    np.testing.assert_array_equal(y, [0, 0, tiny[2]])  # -ftz=true: flushed, as on the GPU
    nan = np.float32([np.nan])
    k((1,), (32,), (nan, np.zeros(1, np.float32), b[:1], np.zeros(1, np.float32), np.int64(1)))
    assert b[0] == 0x7FFF  # cuda_bf16.h's canonical NaN


# ---- what the emulation reports


def test_writes_outside_an_array_fail_and_reads_give_nan(build) -> None:
    k = build("off_by_one")
    x, y = np.arange(8, dtype=np.float32), np.zeros(8, np.float32)
    k((1,), (32,), (x, y, np.int32(8), np.int32(0)))
    np.testing.assert_array_equal(y[:7], x[1:])
    assert np.isnan(y[7])  # the guard bytes are a NaN
    with pytest.raises(cuda_emulator.LaunchError, match="wrote after array 1 of shape"):
        k((1,), (32,), (x, y, np.int32(8), np.int32(1)))


def test_arguments_are_checked_against_the_parameters(build) -> None:
    k = build("block_reverse")
    x = np.zeros(64, np.float32)
    assert k.params == ["*f4", "*f4"]
    with pytest.raises(cuda_emulator.LaunchError, match="float64 for a parameter of type f4"):
        k((1,), (64,), (x.astype(np.float64), x))
    with pytest.raises(cuda_emulator.LaunchError, match="1 arguments for 2"):
        k((1,), (64,), (x,))
    k2 = build("off_by_one_args")
    with pytest.raises(cuda_emulator.LaunchError, match="pass a NumPy scalar, not int"):
        k2((1,), (32,), (x, 3))
    with pytest.raises(cuda_emulator.LaunchError, match="int64 for a parameter of type i4"):
        k2((1,), (32,), (x, np.int64(3)))


@pytest.mark.parametrize(
    "grid, block", [((0,), (32,)), ((1,), (1025,)), ((1, 70000), (32,)), ((1,), (32, 33))]
)
def test_launch_dimensions_cuda_refuses(build, grid, block) -> None:
    x = np.zeros(64, np.float32)
    with pytest.raises(cuda_emulator.LaunchError, match="invalid configuration argument"):
        build("block_reverse")(grid, block, (x, x))


def test_a_shuffle_with_an_absent_lane_fails(build) -> None:
    k = build("absent_lane")
    with pytest.raises(cuda_emulator.LaunchError, match="lane 2 reads lane 3, which did not"):
        k((1,), (32,), (np.zeros(32, np.float32),))
    part = build("part_mask")
    with pytest.raises(cuda_emulator.LaunchError, match="part of the warp"):
        part((1,), (32,), (np.zeros(32, np.float32),))
    with pytest.raises(cuda_emulator.LaunchError, match="names lanes outside the block"):
        build("warp")((1,), (48,), (np.zeros(48, np.int32), np.zeros(7 * 48, np.int32)))


def test_divergent_syncthreads_fail(build) -> None:
    k = build("divergent")
    with pytest.raises(cuda_emulator.LaunchError, match="wait at different calls"):
        k((1,), (64,), (np.zeros(64, np.float32),))


def test_a_deadlock_fails_after_the_timeout(build) -> None:
    """Lane 0 of warp 1 waits for the block while its warp waits for it in a shuffle."""
    k = build("deadlock", timeout_s=1.0)
    with pytest.raises(cuda_emulator.LaunchError, match="deadlock"):
        k((1,), (64,), (np.zeros(64, np.float32),))


# ---- the kernels above and below, built into one library

OFF_BY_ONE = r"""
extern "C" __global__ void off_by_one(const float* x, float* y, int n, int write_past) {
    const int i = threadIdx.x;
    if (i < n) y[i] = x[i + 1];  // reads one past the end
    if (write_past && i == 0) y[n] = 1.0f;
}
"""

OFF_BY_ONE_ARGS = r"""
extern "C" __global__ void off_by_one_args(float* y, int n) { y[0] = n; }
"""

ABSENT_LANE = r"""
extern "C" __global__ void absent_lane(float* y) {
    if (threadIdx.x == 3) return;
    y[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}
"""

PART_MASK = r"""
extern "C" __global__ void part_mask(float* y) {
    y[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0f, 1);
}
"""

DIVERGENT = r"""
extern "C" __global__ void divergent(float* y) {
    if (threadIdx.x < 32) __syncthreads();
    y[threadIdx.x] = 1.0f;
    __syncthreads();
}
"""

DEADLOCK = r"""
extern "C" __global__ void deadlock(float* y) {
    if (threadIdx.x == 32) __syncthreads();
    else if (threadIdx.x > 32) y[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
    else __syncthreads();
}
"""

KERNELS = {
    "block_reverse": BLOCK_REVERSE,
    "warp": WARP,
    "early_exit": EARLY_EXIT,
    "atomics": ATOMICS,
    "numbers": NUMBERS,
    "off_by_one": OFF_BY_ONE,
    "off_by_one_args": OFF_BY_ONE_ARGS,
    "absent_lane": ABSENT_LANE,
    "part_mask": PART_MASK,
    "divergent": DIVERGENT,
    "deadlock": DEADLOCK,
}


@pytest.fixture
def build(emulator_cache):
    module = cuda_emulator.Module(KERNELS, emulator_cache)

    def kernel(name: str, timeout_s: float = 60.0) -> cuda_emulator.Kernel:
        return module.kernel(name, timeout_s)

    return kernel
