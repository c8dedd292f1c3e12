"""The prelude every CUDA kernel of ``handgrad.kernels.cuda_sources`` starts with (warp and
block reductions, bfloat16 loads and stores) and the registry the sources are added to:
``_kernel`` for one kernel, ``_variants`` for one per storage type (float32, bfloat16)."""

from __future__ import annotations

PRELUDE = r"""
#define HG_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// blockDim.x must be a multiple of 32 (at most 1024); every thread gets the total.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();  // a previous call may still be reading part[]
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? part[lane] : 0.0f;
    return warp_sum(v);
}

__device__ float block_max(float v) {
    __shared__ float part[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    v = lane < (int)(blockDim.x >> 5) ? part[lane] : -HG_INF;
    return warp_max(v);
}
"""

# bfloat16 as its 16 raw bits (``unsigned short``; the launchers pass ``a.view(uint16)``):
# ld() widens either storage type to float32, st() stores a float32 in either, bfloat16
# rounded to nearest even (NaN kept a quiet NaN of the same sign). All math is float32.
BF16 = r"""
typedef unsigned short bf16;
__device__ __forceinline__ float ld(float v) { return v; }
__device__ __forceinline__ float ld(bf16 v) { return __uint_as_float((unsigned int)v << 16); }
__device__ __forceinline__ void st(float* p, float v) { *p = v; }
__device__ __forceinline__ void st(bf16* p, float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) { *p = (bf16)((u >> 16) | 0x40u); return; }  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    *p = (bf16)(u >> 16);
}
"""

_KERNELS: dict[str, str] = {}

# the storage types of a kernel's variants, by the suffix of their names
F32, BF = "float", "bf16"
SUFFIX = {F32: "f32", BF: "bf16"}


def _kernel(names: str, body: str) -> None:
    _KERNELS[names] = PRELUDE + body


def _variants(name: str, body: str, *variants: dict[str, str], plain: dict | None = None) -> None:
    """One kernel per variant: ``body`` (its entry point named KERNEL) after a typedef of each
    storage type the variant gives (``{"x_t": F32, "y_t": BF}``), named ``name`` plus the
    types' suffixes in order (``name_f32_bf16``); the variant equal to ``plain`` keeps the
    bare ``name`` (the float32 kernel of old)."""
    for types in variants:
        full = name if types == plain else "_".join([name, *(SUFFIX[t] for t in types.values())])
        typedefs = "".join(f"typedef {t} {k};\n" for k, t in types.items())
        _KERNELS[full] = PRELUDE + BF16 + typedefs + body.replace("KERNEL", full)


def variant_name(name: str, *types: str) -> str:
    """The name of ``name``'s kernel for storage types ``types`` (F32 or BF), in the order of
    its typedefs."""
    return "_".join([name, *(SUFFIX[t] for t in types)])
