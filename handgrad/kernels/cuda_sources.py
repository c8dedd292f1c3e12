"""CUDA C sources of the kernels in ``handgrad.kernels.cuda``, one standalone translation
unit each (the shared prelude included), so that each compiles alone with NVRTC (CuPy) or
with ``nvcc --ptx``. float32 data; int64 indices; bfloat16 as its 16 raw bits.

Reductions over a row use one block per row: each thread sums a strided part, then
``block_sum`` / ``block_max`` combine the warps' partial results through shared memory.
Each is executed in the tests in a CPU emulation of CUDA (tests/kernels/cuda_emul/cuda_emul.h):
keep them compiling as C++20 with it.
"""

from __future__ import annotations

from handgrad.kernels.cuda_prelude import _KERNELS, BF, F32, _kernel, _variants, variant_name

__all__ = ["BF", "F32", "SOURCES", "variant_name"]

# ---- layer norm: one block per row of C
_kernel(
    "layer_norm_forward",
    r"""
extern "C" __global__ void layer_norm_forward(
    const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
    int has_bias, float* __restrict__ y, float* __restrict__ mean, float* __restrict__ rstd,
    int C, float eps) {
    const long long row = blockIdx.x;
    const float* xr = x + row * C;
    float* yr = y + row * C;
    float s = 0.0f;
    for (int i = threadIdx.x; i < C; i += blockDim.x) s += xr[i];
    const float mu = block_sum(s) / C;
    float q = 0.0f;  // two passes: sum (x - mu)^2 does not cancel as E[x^2] - mu^2 can
    for (int i = threadIdx.x; i < C; i += blockDim.x) { float d = xr[i] - mu; q += d * d; }
    const float r = 1.0f / sqrtf(block_sum(q) / C + eps);
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        float v = (xr[i] - mu) * r * w[i];
        yr[i] = has_bias ? v + b[i] : v;
    }
    if (threadIdx.x == 0) { mean[row] = mu; rstd[row] = r; }
}
""",
)

_variants(
    "layer_norm_backward_params",
    r"""
// dw[c] = sum_n dy xhat, db[c] = sum_n dy. Thread = column (coalesced over a row); the
// rows are cut into gridDim.y chunks whose partial sums meet with atomicAdd (dw, db zeroed).
extern "C" __global__ void KERNEL(
    const dy_t* __restrict__ dy, const float* __restrict__ x, const float* __restrict__ mean,
    const float* __restrict__ rstd, float* dw, float* db, int N, int C, int rows_per_chunk) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const int r0 = blockIdx.y * rows_per_chunk;
    const int r1 = min(N, r0 + rows_per_chunk);
    float aw = 0.0f, ab = 0.0f;
    for (int n = r0; n < r1; ++n) {
        const long long k = (long long)n * C + c;
        const float g = ld(dy[k]);
        aw += g * (x[k] - mean[n]) * rstd[n];
        ab += g;
    }
    atomicAdd(dw + c, aw);
    atomicAdd(db + c, ab);
}
""",
    {"dy_t": F32},
    {"dy_t": BF},
    plain={"dy_t": F32},
)

# ---- residual add + layer norm: one block per row of C
_variants(
    "residual_layer_norm_forward",
    r"""
// h = x + r;  mean = sum_c h / C,  rstd = 1 / sqrt(sum_c (h - mean)^2 / C + eps),
// y = (h - mean) rstd w + b.  h, mean, rstd float32 (kept for backward), y in y_t.
// h is read back only by the thread that wrote it: no barrier needed between.
extern "C" __global__ void KERNEL(
    const float* __restrict__ x, const r_t* __restrict__ r, const float* __restrict__ w,
    const float* __restrict__ b, int has_bias, float* __restrict__ h, y_t* __restrict__ y,
    float* __restrict__ mean, float* __restrict__ rstd, int C, float eps) {
    const long long row = blockIdx.x;
    const float* xr = x + row * C;
    const r_t* rr = r + row * C;
    float* hr = h + row * C;
    y_t* yr = y + row * C;
    float s = 0.0f;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        const float v = xr[i] + ld(rr[i]);
        hr[i] = v;
        s += v;
    }
    const float mu = block_sum(s) / C;
    float q = 0.0f;  // two passes: sum (h - mu)^2 does not cancel as E[h^2] - mu^2 can
    for (int i = threadIdx.x; i < C; i += blockDim.x) { float d = hr[i] - mu; q += d * d; }
    const float rs = 1.0f / sqrtf(block_sum(q) / C + eps);
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        const float v = (hr[i] - mu) * rs * w[i];
        st(yr + i, has_bias ? v + b[i] : v);
    }
    if (threadIdx.x == 0) { mean[row] = mu; rstd[row] = rs; }
}
""",
    {"r_t": F32, "y_t": F32},
    {"r_t": BF, "y_t": F32},
    {"r_t": F32, "y_t": BF},
    {"r_t": BF, "y_t": BF},
)

_variants(
    "residual_layer_norm_backward_input",
    r"""
// dx = dh + rstd (g - mean_c(g) - xhat mean_c(g xhat)),  g = dy w,  xhat = (h - mean) rstd:
// the gradient of h = x + r, for x and r alike (dh: what reaches h past the norm, the
// residual stream's own gradient; has_dh = 0 reads none: plain layer norm's dx).
extern "C" __global__ void KERNEL(
    const dy_t* __restrict__ dy, const float* __restrict__ dh, int has_dh,
    const float* __restrict__ h, const float* __restrict__ w, const float* __restrict__ mean,
    const float* __restrict__ rstd, float* __restrict__ dx, int C) {
    const long long row = blockIdx.x;
    const dy_t* dyr = dy + row * C;
    const float* hr = h + row * C;
    float* dxr = dx + row * C;
    const float mu = mean[row], r = rstd[row];
    float sg = 0.0f, sgx = 0.0f;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        const float g = ld(dyr[i]) * w[i];
        sg += g;
        sgx += g * (hr[i] - mu) * r;
    }
    const float a = block_sum(sg) / C;
    const float bb = block_sum(sgx) / C;
    for (int i = threadIdx.x; i < C; i += blockDim.x) {
        const float xhat = (hr[i] - mu) * r;
        const float d = r * (ld(dyr[i]) * w[i] - a - xhat * bb);
        dxr[i] = has_dh ? dh[row * C + i] + d : d;
    }
}
""",
    {"dy_t": F32},
    {"dy_t": BF},
)

# ---- GELU, tanh form: elementwise, grid-stride
_kernel(
    "gelu_tanh_forward",
    r"""
extern "C" __global__ void gelu_tanh_forward(
    const float* __restrict__ x, float* __restrict__ y, long long n) {
    const float c = 0.7978845608028654f, a = 0.044715f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = x[i];
        y[i] = 0.5f * v * (1.0f + tanhf(c * (v + a * v * v * v)));
    }
}
""",
)

_kernel(
    "gelu_tanh_backward",
    r"""
extern "C" __global__ void gelu_tanh_backward(
    const float* __restrict__ dy, const float* __restrict__ x, float* __restrict__ dx,
    long long n) {
    const float c = 0.7978845608028654f, a = 0.044715f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float v = x[i];
        const float t = tanhf(c * (v + a * v * v * v));
        const float du = c * (1.0f + 3.0f * a * v * v);
        dx[i] = dy[i] * (0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * du);
    }
}
""",
)

# ---- bias + GELU (tanh form) over (N, C) rows: u = x + b[c]
_variants(
    "bias_gelu_forward",
    r"""
// y = u (1 + tanh(k (u + a u^3))) / 2,  u = x + b,  k = sqrt(2 / pi),  a = 0.044715.
extern "C" __global__ void KERNEL(
    const x_t* __restrict__ x, const float* __restrict__ b, x_t* __restrict__ y, long long n,
    int C) {
    const float k = 0.7978845608028654f, a = 0.044715f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float u = ld(x[i]) + b[i % C];
        st(y + i, 0.5f * u * (1.0f + tanhf(k * (u + a * u * u * u))));
    }
}
""",
    {"x_t": F32},
    {"x_t": BF},
)

_variants(
    "bias_gelu_backward",
    r"""
// dx = dy gelu'(u) = dy ((1 + t) / 2 + u (1 - t^2) k (1 + 3 a u^2) / 2),  t = tanh(k (u + a
// u^3)), u = x + b;  db[c] = sum_n dx[n, c]. Thread = column (coalesced over a row), rows cut
// into gridDim.y chunks whose partial sums meet with atomicAdd (db zeroed).
extern "C" __global__ void KERNEL(
    const dy_t* __restrict__ dy, const x_t* __restrict__ x, const float* __restrict__ b,
    float* __restrict__ dx, float* db, int N, int C, int rows_per_chunk) {
    const float k = 0.7978845608028654f, a = 0.044715f;
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= C) return;
    const int r0 = blockIdx.y * rows_per_chunk;
    const int r1 = min(N, r0 + rows_per_chunk);
    const float bc = b[c];
    float acc = 0.0f;
    for (int n = r0; n < r1; ++n) {
        const long long i = (long long)n * C + c;
        const float u = ld(x[i]) + bc;
        const float t = tanhf(k * (u + a * u * u * u));
        const float du = k * (1.0f + 3.0f * a * u * u);
        const float d = ld(dy[i]) * (0.5f * (1.0f + t) + 0.5f * u * (1.0f - t * t) * du);
        dx[i] = d;
        acc += d;
    }
    atomicAdd(db + c, acc);
}
""",
    {"dy_t": F32, "x_t": F32},
    {"dy_t": BF, "x_t": F32},
    {"dy_t": F32, "x_t": BF},
    {"dy_t": BF, "x_t": BF},
)

# ---- causal softmax over (R, T, T) scores: one block per row; row i keeps columns j <= i.
# s_t / p_t: float (the kernels of old, names without a suffix) or bf16 (``_bf16``).
# One row of the causal softmax, shared by the two forward kernels: block-wide max and sum
# over the row's first i + 1 scores, p written (zeros past the diagonal); returns the row's
# log-sum-exp m + log z. One block per row of T: row r of the (R, T, T) scores is query
# i = r mod T.
_CAUSAL_ROW = r"""
__device__ float causal_softmax_row(const s_t* __restrict__ s, s_t* __restrict__ p, int T,
                                    float scale) {
    const long long row = blockIdx.x;
    const int i = (int)(row % T);
    const s_t* sr = s + row * T;
    s_t* pr = p + row * T;
    float m = -HG_INF;
    for (int j = threadIdx.x; j <= i; j += blockDim.x) m = fmaxf(m, ld(sr[j]) * scale);
    m = block_max(m);
    float z = 0.0f;
    for (int j = threadIdx.x; j <= i; j += blockDim.x) z += expf(ld(sr[j]) * scale - m);
    z = block_sum(z);
    const float inv = 1.0f / z;
    for (int j = threadIdx.x; j < T; j += blockDim.x)
        st(pr + j, j <= i ? expf(ld(sr[j]) * scale - m) * inv : 0.0f);
    return m + logf(z);
}
"""

_SOFTMAX_TYPES = ({"s_t": F32}, {"s_t": BF})
_variants(
    "causal_softmax_forward",
    _CAUSAL_ROW
    + r"""
// p_ij = exp(scale s_ij - m_i) / sum_{k <= i} exp(scale s_ik - m_i) for j <= i, else 0;
// m_i = max_{k <= i} scale s_ik.
extern "C" __global__ void KERNEL(
    const s_t* __restrict__ s, s_t* __restrict__ p, int T, float scale) {
    causal_softmax_row(s, p, T, scale);
}
""",
    *_SOFTMAX_TYPES,
    plain={"s_t": F32},
)

_variants(
    "causal_softmax_backward",
    r"""
// ds = scale p (dp - sum_j p dp)
extern "C" __global__ void KERNEL(
    const s_t* __restrict__ dp, const s_t* __restrict__ p, s_t* __restrict__ ds, int T,
    float scale) {
    const long long row = blockIdx.x;
    const int i = (int)(row % T);
    const s_t* dpr = dp + row * T;
    const s_t* pr = p + row * T;
    s_t* dsr = ds + row * T;
    float dot = 0.0f;
    for (int j = threadIdx.x; j <= i; j += blockDim.x) dot += ld(pr[j]) * ld(dpr[j]);
    dot = block_sum(dot);
    for (int j = threadIdx.x; j < T; j += blockDim.x)
        st(dsr + j, j <= i ? scale * ld(pr[j]) * (ld(dpr[j]) - dot) : 0.0f);
}
""",
    *_SOFTMAX_TYPES,
    plain={"s_t": F32},
)

# The same softmax keeping each row's log-sum-exp (float32), so that a backward pass can
# recompute p from the scores instead of storing the (R, T, T) probabilities.
_variants(
    "causal_softmax_lse_forward",
    _CAUSAL_ROW
    + r"""
// p_ij = exp(scale s_ij - m_i) / z_i for j <= i, else 0 (causal_softmax_forward's p, by the
// same operations), and lse_i = m_i + log z_i = log sum_{j <= i} exp(scale s_ij), where
// m_i = max_{j <= i} scale s_ij and z_i = sum_{j <= i} exp(scale s_ij - m_i) (no overflow).
// Then p_ij = exp(scale s_ij - lse_i): what causal_softmax_recompute computes.
extern "C" __global__ void KERNEL(
    const s_t* __restrict__ s, s_t* __restrict__ p, float* __restrict__ lse, int T, float scale) {
    const float l = causal_softmax_row(s, p, T, scale);
    if (threadIdx.x == 0) lse[blockIdx.x] = l;
}
""",
    *_SOFTMAX_TYPES,
)

_variants(
    "causal_softmax_recompute",
    r"""
// p_ij = exp(scale s_ij - lse_i) for j <= i, else 0: the causal softmax again from the row's
// log-sum-exp (causal_softmax_lse_forward's), with no reduction. The future is not read.
extern "C" __global__ void KERNEL(
    const s_t* __restrict__ s, const float* __restrict__ lse, s_t* __restrict__ p, int T,
    float scale) {
    const long long row = blockIdx.x;
    const int i = (int)(row % T);
    const s_t* sr = s + row * T;
    s_t* pr = p + row * T;
    const float l = lse[row];
    for (int j = threadIdx.x; j < T; j += blockDim.x)
        st(pr + j, j <= i ? expf(ld(sr[j]) * scale - l) : 0.0f);
}
""",
    *_SOFTMAX_TYPES,
)

# ---- cross entropy over a padded vocabulary: one block per row
_kernel(
    "cross_entropy_forward",
    r"""
// lse = log sum_{c < V} exp(x_c); loss = lse - x_t (0 for ignored rows, NaN for a target
// out of range). Two reads of the row, no probabilities stored.
extern "C" __global__ void cross_entropy_forward(
    const float* __restrict__ logits, const long long* __restrict__ targets,
    float* __restrict__ loss, float* __restrict__ lse, int V, int Vp, long long ignore_index) {
    const long long row = blockIdx.x;
    const float* xr = logits + row * Vp;
    float m = -HG_INF;
    for (int c = threadIdx.x; c < V; c += blockDim.x) m = fmaxf(m, xr[c]);
    m = block_max(m);
    float z = 0.0f;
    for (int c = threadIdx.x; c < V; c += blockDim.x) z += expf(xr[c] - m);
    z = block_sum(z);
    if (threadIdx.x == 0) {
        const float l = m + logf(z);
        const long long t = targets[row];
        lse[row] = l;
        if (t == ignore_index) loss[row] = 0.0f;
        else if (t < 0 || t >= V) loss[row] = __int_as_float(0x7fc00000);
        else loss[row] = l - xr[t];
    }
}
""",
)

_kernel(
    "cross_entropy_backward",
    r"""
// dx_c = dloss (exp(x_c - lse) - [c == t]) for c < V, 0 in the padding and ignored rows.
// dlogits may be the logits buffer itself: each element is read, then written, by one thread.
extern "C" __global__ void cross_entropy_backward(
    const float* logits, const float* __restrict__ lse, const long long* __restrict__ targets,
    const float* __restrict__ dloss, float* dlogits, int V, int Vp, long long ignore_index) {
    const long long row = blockIdx.x;
    const float* xr = logits + row * Vp;
    float* dr = dlogits + row * Vp;
    const long long t = targets[row];
    const bool keep = t != ignore_index;
    const float l = lse[row], g = dloss[row];
    for (int c = threadIdx.x; c < Vp; c += blockDim.x) {
        float d = 0.0f;
        if (keep && c < V) d = (expf(xr[c] - l) - (c == t ? 1.0f : 0.0f)) * g;
        dr[c] = d;
    }
}
""",
)

# ---- fused classifier (llm.c's): loss and dlogits in one kernel, one block per row
_variants(
    "fused_classifier",
    r"""
// Over the first V of Vp columns (the rest: padding, never read):
//   lse = log sum_{c < V} exp(x_c),  loss = lse - x_t  (0 if t == ignore_index; NaN for a t
//   outside [0, V)),  dx_c = scale (exp(x_c - lse) - [c == t])  for c < V, 0 for c >= V and
//   ignored rows (NaN for c < V in a row whose t is out of range).
// One read for (max, sum) kept online per thread, then merged over the block; a second read
// writes dx. dx may be the logits buffer: every element is read and then written by one
// thread, the block's reductions (barriers) lie between the first read and any write, and
// x_t is read before them.
extern "C" __global__ void KERNEL(
    const x_t* logits, const long long* __restrict__ targets, const float* scale, int has_scale,
    float* __restrict__ losses, x_t* dlogits, int V, int Vp, long long ignore_index) {
    const long long row = blockIdx.x;
    const x_t* xr = logits + row * Vp;
    x_t* dr = dlogits + row * Vp;
    const long long t = targets[row];
    const bool ignored = t == ignore_index, bad = !ignored && (t < 0 || t >= V);
    const float xt = (ignored || bad || threadIdx.x != 0) ? 0.0f : ld(xr[t]);
    float m = -HG_INF, z = 0.0f;  // this thread's max, and sum of exp(x - m)
    for (int c = threadIdx.x; c < V; c += blockDim.x) {
        const float v = ld(xr[c]);
        if (v > m) { z = z * expf(m - v) + 1.0f; m = v; }
        else if (v != -HG_INF) z += expf(v - m);  // NaN lands here: z NaN
    }
    const float M = block_max(m);
    // a thread that saw no finite value has z = 0 (0 * 0 unless M = -inf too: NaN, as a row
    // of -inf gives NaN); a +inf max gives inf - inf = NaN, as in float arithmetic
    const float Z = block_sum(z * expf(m - M));
    const float lse = M + logf(Z);
    if (threadIdx.x == 0)
        losses[row] = ignored ? 0.0f : bad ? __int_as_float(0x7fc00000) : lse - xt;
    const float g = has_scale ? scale[0] : 1.0f;
    for (int c = threadIdx.x; c < Vp; c += blockDim.x) {
        float d = 0.0f;
        if (!ignored && c < V)
            d = bad ? __int_as_float(0x7fc00000) : g * (expf(ld(xr[c]) - lse) - (c == t ? 1.0f : 0.0f));
        st(dr + c, d);
    }
}
""",
    {"x_t": F32},
    {"x_t": BF},
)

# ---- embedding backward: scatter-add, one thread per element of dout
_kernel(
    "embedding_backward",
    r"""
// dw[idx[n], c] += dout[n, c]; a row index outside [0, V) is skipped (never written).
extern "C" __global__ void embedding_backward(
    const long long* __restrict__ idx, const float* __restrict__ dout, float* dw, long long N,
    int C, long long V) {
    for (long long k = blockIdx.x * (long long)blockDim.x + threadIdx.x; k < N * C;
         k += (long long)gridDim.x * blockDim.x) {
        const long long n = k / C, j = idx[n];
        if (j >= 0 && j < V) atomicAdd(dw + j * C + (k - n * C), dout[k]);
    }
}
""",
)

# ---- the global gradient norm: one reduction over the flat gradient buffer
_kernel(
    "sum_squares",
    r"""
// out[0] += sum g^2 (out zeroed first): per-thread float sums, block sums, then one double
// atomicAdd per block so 124M terms keep float64's precision where it matters.
extern "C" __global__ void sum_squares(const float* __restrict__ g, long long n, double* out) {
    float s = 0.0f;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) s += g[i] * g[i];
    s = block_sum(s);
    if (threadIdx.x == 0) atomicAdd(out, (double)s);
}
""",
)

# ---- AdamW over the flat buffer, clipping by the global norm read on the device
_kernel(
    "adamw_flat",
    r"""
__device__ __forceinline__ unsigned short to_bf16(float f) {
    unsigned int u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    return (unsigned short)(u >> 16);
}

// The norm is read from device memory (no host round trip between the two kernels).
extern "C" __global__ void adamw_flat(
    float* __restrict__ w, const float* __restrict__ g, float* __restrict__ m,
    float* __restrict__ v, unsigned short* __restrict__ out_bf16, int has_out, long long n,
    long long n_decay, const double* __restrict__ norm_sq, float max_norm, float lr,
    float beta1, float beta2, float eps, float weight_decay, float step_size,
    float bias_correction2_sqrt) {
    float coef = 1.0f;
    if (max_norm > 0.0f) coef = fminf(1.0f, max_norm / ((float)sqrt(norm_sq[0]) + 1e-6f));
    const float decay = 1.0f - lr * weight_decay;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float gi = g[i] * coef;
        float wi = w[i];
        if (i < n_decay) wi *= decay;
        const float mi = m[i] + (1.0f - beta1) * (gi - m[i]);
        const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        wi -= step_size * mi / (sqrtf(vi) / bias_correction2_sqrt + eps);
        m[i] = mi;
        v[i] = vi;
        w[i] = wi;
        if (has_out) out_bf16[i] = to_bf16(wi);
    }
}
""",
)

SOURCES: dict[str, str] = dict(_KERNELS)
"""kernel name -> its complete CUDA C source (one ``extern "C" __global__`` entry each)."""
