"""Every CUDA kernel executed on the CPU: its real source (``kernels/cuda_sources.py``)
compiled as C++ with a header standing in for CUDA (``cuda_emulator.py``), launched by the
project's own launchers (``kernels/cuda.py``: grids, blocks, argument packing) on the CuPy
stand-in's arrays, and held to its NumPy reference (``kernels/reference.py``).

The shapes cover partial blocks, 1,024-thread blocks, T = 1, GPT-2's padded vocabulary
(50,257 in 50,304), NaN and inf, denormals and empty inputs. Denormals: the GPU compiles with
-ftz=true and the emulation flushes them too, so a result may differ from the reference (which
keeps them) by less than the smallest normal float, 1.2e-38, times the output's scale.
"""

from __future__ import annotations

import sys
from pathlib import Path

import cuda_emulator
import ml_dtypes
import numpy as np
import pytest

from handgrad.kernels import cuda as K
from handgrad.kernels import reference as ref
from handgrad.kernels.cuda_sources import SOURCES

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fakecupy  # noqa: E402

pytestmark = pytest.mark.skipif(
    cuda_emulator.unavailable() is not None, reason=cuda_emulator.unavailable() or ""
)

# Relative to the largest finite magnitude of the reference: float32 sums in another order
# (block reductions, atomics) and CUDA-vs-NumPy libm ulps. Observed: at most ~1e-6.
RTOL = 1e-5
TINY = np.float32(1e-39)  # a float32 denormal: 0 on the GPU (-ftz=true) and here
BF16 = np.dtype(ml_dtypes.bfloat16)
# A bfloat16 result against the reference's, each rounded once from float32 computed in
# another order: at most one bfloat16 ulp apart (2^-8 of the element, relative).
BF_RTOL = 1e-2


@pytest.fixture
def emu(emulator_cache: Path, monkeypatch: pytest.MonkeyPatch):
    """The CuPy stand-in installed with ``RawKernel`` running kernels in the emulation."""
    e = cuda_emulator.Emulator(emulator_cache, SOURCES)
    monkeypatch.setattr(K, "_compiled", {})
    monkeypatch.setattr(fakecupy.namespace, "RawKernel", e.RawKernel, raising=False)
    with fakecupy.installed():
        yield e


def dev(a: np.ndarray) -> fakecupy.ndarray:
    return fakecupy.namespace.asarray(a)


def host(a: fakecupy.ndarray) -> np.ndarray:
    return fakecupy.namespace.asnumpy(a)


def close(got, want, what: str, rtol: float = RTOL) -> None:
    """Same shape, NaN and inf in the same places, the rest within ``rtol`` of the largest
    finite magnitude of ``want``."""
    got = host(got) if isinstance(got, fakecupy.ndarray) else np.asarray(got)
    got, want = got.astype(np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.array_equal(np.isnan(got), np.isnan(want)), f"{what}: NaN in other places"
    inf = np.isinf(want)
    assert np.array_equal(got[inf], want[inf]), f"{what}: infinities differ"
    fin = np.isfinite(want)
    assert np.isfinite(got[fin]).all(), f"{what}: not finite where the reference is"
    if fin.any():
        scale = max(np.abs(want[fin]).max(), 1e-30)
        err = np.abs(got[fin] - want[fin]).max() / scale
        assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"


def reference(fn, *args, **kwargs):
    with np.errstate(all="ignore"):
        return fn(*args, **kwargs)


def f32(rng: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def bf16(a: np.ndarray) -> np.ndarray:
    return a.astype(BF16)


def block_of(emu: cuda_emulator.Emulator, name: str) -> int:
    return emu.launches(name)[-1][1][0]


# ---- the launchers hand the shipped sources to the emulated RawKernel


def test_every_kernel_is_built_from_its_shipped_source(emu) -> None:
    rng = np.random.default_rng(0)
    x, w = dev(f32(rng, 2, 8)), dev(f32(rng, 8))
    y, mean, rstd = K.layer_norm_forward(x, w, w)
    K.layer_norm_backward(x, x, w, mean, rstd)
    K.gelu_tanh_backward(x, K.gelu_tanh_forward(x))
    s = dev(f32(rng, 1, 3, 3))
    K.causal_softmax_backward(s, K.causal_softmax_forward(s, 1.0), 1.0)
    t = dev(np.array([1, 2], np.int64))
    loss, lse = K.cross_entropy_forward(x, t, 8)
    K.cross_entropy_backward(x, lse, t, dev(np.ones(2, np.float32)), 8)
    K.embedding_backward(t, x, 3)
    g = dev(f32(rng, 16))
    K.adamw_flat(dev(f32(rng, 16)), g, dev(np.zeros(16, np.float32)),
                 dev(np.zeros(16, np.float32)), lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8,
                 weight_decay=0.1, step=1, n_decay=8, norm_sq=K.sum_squares(g),
                 max_norm=1.0)  # fmt: skip
    for a in (x, dev(bf16(host(x)))):
        for yt in (np.float32, BF16):
            h, _, mean, rstd = K.residual_layer_norm_forward(x, a, w, w, out_dtype=yt)
        K.residual_layer_norm_backward(a, x, h, w, mean, rstd)
        K.bias_gelu_backward(a, x, w), K.bias_gelu_backward(x, a, w)
        K.bias_gelu_backward(a, a, w), K.bias_gelu_forward(a, w)
        s = dev(f32(rng, 1, 3, 3).astype(a.dtype))
        K.causal_softmax_backward(s, K.causal_softmax_forward(s, 1.0), 1.0)
        K.causal_softmax_recompute(s, K.causal_softmax_lse_forward(s, 1.0)[1], 1.0)
        K.fused_classifier(a, t, 8)
    assert sorted(emu.kernels) == sorted(SOURCES) == K.compiled()
    for name, k in emu.kernels.items():
        assert k.code == SOURCES[name] and k.launches, name
    assert emu.module.sources == SOURCES  # all built in one library, each from its source


# ---- layer norm


@pytest.mark.parametrize(
    "N, C, threads",
    [(5, 40, 32), (2, 1030, 288), (3, 4096, 1024), (1, 1, 32)],
    ids=["partial-row", "C1030", "1024-threads", "C1"],
)
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm(emu, rng, N: int, C: int, threads: int, bias: bool) -> None:
    x, w, b, dy = f32(rng, N, C, scale=2) + 1, f32(rng, C), f32(rng, C), f32(rng, N, C)
    want = ref.layer_norm_forward(x, w, b if bias else None)
    got = K.layer_norm_forward(dev(x), dev(w), dev(b) if bias else None)
    assert block_of(emu, "layer_norm_forward") == threads
    for name, o, r in zip(("y", "mean", "rstd"), got, want):
        close(o, r, name)
    dwant = ref.layer_norm_backward(dy, x, w, want[1], want[2])
    dgot = K.layer_norm_backward(dev(dy), dev(x), dev(w), got[1], got[2])
    assert block_of(emu, "residual_layer_norm_backward_input_f32") == threads
    for name, o, r in zip(("dx", "dw", "db"), dgot, dwant):
        close(o, r, name)


def test_layer_norm_backward_params_in_row_chunks(emu, rng) -> None:
    """300 rows in 100 chunks of 3 (blocks along y) meeting by atomicAdd; C = 40 leaves 216
    of each block's 256 threads without a column."""
    N, C = 300, 40
    x, w, dy = f32(rng, N, C), f32(rng, C), f32(rng, N, C)
    _, mean, rstd = ref.layer_norm_forward(x, w, None)
    dgot = K.layer_norm_backward(dev(dy), dev(x), dev(w), dev(mean), dev(rstd))
    assert emu.launches("layer_norm_backward_params") == [((1, 100, 1), (256, 1, 1))]
    for name, o, r in zip(("dx", "dw", "db"), dgot, ref.layer_norm_backward(dy, x, w, mean, rstd)):
        close(o, r, name)


def test_layer_norm_nan_inf_and_denormals(emu, rng) -> None:
    C = 64
    x, w, b = f32(rng, 5, C), f32(rng, C), f32(rng, C)
    x[1, 7], x[2, 3], x[3, 0] = np.nan, np.inf, -np.inf
    x[4] = TINY * (np.arange(C) % 10).astype(np.float32)  # denormals: mean 0, var 0 when flushed
    want = reference(ref.layer_norm_forward, x, w, b)
    got = K.layer_norm_forward(dev(x), dev(w), dev(b))
    for name, o, r in zip(("y", "mean", "rstd"), got, want):
        close(o, r, name)
    y = host(got[0])
    assert np.isnan(y[1:4]).all() and np.isfinite(y[[0, 4]]).all()
    np.testing.assert_array_equal(y[4], b)  # flushed: (0 - 0) rstd w + b
    dy = f32(rng, 5, C)
    dwant = reference(ref.layer_norm_backward, dy, x, w, want[1], want[2])
    dgot = K.layer_norm_backward(dev(dy), dev(x), dev(w), got[1], got[2])
    for name, o, r in zip(("dx", "dw", "db"), dgot, dwant):
        close(o, r, name)


# ---- GELU


@pytest.mark.parametrize("n", [1, 1000, 256 * 3])
def test_gelu(emu, rng, n: int) -> None:
    x, dy = f32(rng, n, scale=3), f32(rng, n)
    close(K.gelu_tanh_forward(dev(x)), ref.gelu_tanh_forward(x), "y")
    close(K.gelu_tanh_backward(dev(dy), dev(x)), ref.gelu_tanh_backward(dy, x), "dx")
    (grid, block), *_ = emu.launches("gelu_tanh_forward")
    assert grid[0] * block[0] >= n  # 1,000: four blocks of 256, the last one partial


def test_gelu_nan_inf_large_and_denormal(emu) -> None:
    x = np.array([np.nan, np.inf, -np.inf, 1e30, -1e30, 20, -20, 0, -0.0, TINY, -TINY, 5e-38],
                 np.float32)  # fmt: skip
    dy = np.ones_like(x)
    y, dx = K.gelu_tanh_forward(dev(x)), K.gelu_tanh_backward(dev(dy), dev(x))
    close(y, reference(ref.gelu_tanh_forward, x), "y")
    close(dx, reference(ref.gelu_tanh_backward, dy, x), "dx")
    # flushed as -ftz=true flushes: gelu(1e-39) is 0 on the GPU, 5e-40 in NumPy
    assert host(y)[9] == 0 and host(y)[11] != 0


def test_grid_stride_loops_cover_more_than_the_grid(emu, rng) -> None:
    """Fewer threads than elements (as the 65,536-block cap gives for large n): each thread
    loops. Launched directly, 2 blocks of 64 threads over 1,000 elements."""
    kern = emu.RawKernel(SOURCES["gelu_tanh_forward"], "gelu_tanh_forward")
    x = f32(rng, 1000)
    y = np.full_like(x, np.nan)
    kern((2,), (64,), (x, y, np.int64(x.size)))
    close(y, ref.gelu_tanh_forward(x), "y")


# ---- causal softmax and attention


@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (2, 1, 5, 5), (1, 1, 33, 33), (1, 1, 130, 130)])
def test_causal_softmax(emu, rng, shape: tuple) -> None:
    s, dp = f32(rng, *shape, scale=3), f32(rng, *shape)
    p = K.causal_softmax_forward(dev(s), 0.3)
    close(p, ref.causal_softmax_forward(s, 0.3), "p")
    rp = ref.causal_softmax_forward(s, 0.3)
    close(K.causal_softmax_backward(dev(dp), dev(rp), 0.3),
          ref.causal_softmax_backward(dp, rp, 0.3), "ds")  # fmt: skip


def test_causal_softmax_nan_inf_and_the_future_unread(emu, rng) -> None:
    T = 9
    s = f32(rng, 1, T, T)
    s[0][np.triu_indices(T, 1)] = np.nan  # the future: never read
    s[0, 4, 2], s[0, 5, 5], s[0, 6, :] = np.nan, np.inf, -np.inf
    s[0, 7, :3] = -np.inf  # masked out by the caller: weight 0
    s[0, 8, :] = TINY  # flushed: uniform either way
    p = K.causal_softmax_forward(dev(s), 1.0)
    want = reference(ref.causal_softmax_forward, s, 1.0)
    want[0][np.triu_indices(T, 1)] = 0  # NaN rows of the reference are NaN there too
    close(p, want, "p")
    ph = host(p)
    assert all(np.isnan(ph[0, i, : i + 1]).all() for i in (4, 5, 6))
    assert np.isfinite(ph[0, [0, 1, 2, 3, 7, 8]]).all()
    assert (ph[0][np.triu_indices(T, 1)] == 0).all()
    rp = np.where(np.isnan(want), 0, want).astype(np.float32)
    dp = f32(rng, 1, T, T)
    close(K.causal_softmax_backward(dev(dp), dev(rp), 0.5),
          ref.causal_softmax_backward(dp, rp, 0.5), "ds")  # fmt: skip


@pytest.mark.parametrize("T", [1, 6])
def test_attention(emu, rng, T: int) -> None:
    q, k, v, do = (f32(rng, 2, 2, T, 8) for _ in range(4))
    out, p = K.attention_forward(dev(q), dev(k), dev(v))
    rout, rp = ref.attention_forward(q, k, v)
    close(out, rout, "out")
    close(p, rp, "p")
    for name, o, r in zip(("dq", "dk", "dv"), K.attention_backward(*map(dev, (do, q, k, v)), p),
                          ref.attention_backward(do, q, k, v, rp)):  # fmt: skip
        close(o, r, name)


# ---- cross entropy over the padded vocabulary


@pytest.mark.parametrize(
    "N, V, Vp, threads", [(4, 50257, 50304, 1024), (9, 65, 128, 32), (1, 65, 65, 32)]
)
def test_cross_entropy(emu, rng, N: int, V: int, Vp: int, threads: int) -> None:
    x = f32(rng, N, Vp, scale=2)
    x[:, V:] = np.nan  # the padding: never read by the forward, zeroed by the backward
    t = rng.integers(0, V, N)
    t[0] = V - 1
    if N > 1:
        t[1] = -1
    dl = np.full(N, 1.0 / N, np.float32)
    loss, lse = K.cross_entropy_forward(dev(x), dev(t), V)
    assert block_of(emu, "cross_entropy_forward") == threads
    rl, rlse = ref.cross_entropy_forward(x, t, V)
    close(loss, rl, "loss")
    close(lse, rlse, "lse")
    gx = dev(x)
    d = K.cross_entropy_backward(gx, lse, dev(t), dev(dl), V, out=gx)  # in place
    assert d is gx
    close(d, ref.cross_entropy_backward(x, rlse, t, dl, V), "dlogits")
    if Vp > 1000:
        assert block_of(emu, "cross_entropy_backward") == 1024


def test_cross_entropy_nan_inf_bad_targets_and_denormals(emu, rng) -> None:
    N, V, Vp = 6, 100, 128
    x = f32(rng, N, Vp)
    x[0, 5], x[1, 9], x[2, :50] = np.nan, np.inf, -np.inf
    x[3] = TINY
    t = np.array([1, 2, 60, 4, V + 3, -7], np.int64)  # out of range: NaN loss, no read
    loss, lse = K.cross_entropy_forward(dev(x), dev(t), V)
    lh = host(loss)
    assert np.isnan(lh[[0, 1, 4, 5]]).all() and np.isfinite(lh[[2, 3]]).all()
    ok = [2, 3]
    rl, rlse = reference(ref.cross_entropy_forward, x[ok], t[ok], V)
    close(lh[ok], rl, "loss")
    close(host(lse)[ok], rlse, "lse")
    assert np.isnan(host(lse)[:2]).all()
    close(lh[3], np.log(np.float32(V)), "loss of a flat row")
    dl = np.ones(N, np.float32)
    d = K.cross_entropy_backward(dev(x), lse, dev(t), dev(dl), V)
    dh = host(d)
    close(dh[ok], reference(ref.cross_entropy_backward, x[ok], rlse, t[ok], dl[ok], V), "d")
    assert np.isnan(dh[:2, :V]).all() and (dh[:, V:] == 0).all()


# ---- embedding backward (atomic scatter-add)


def test_embedding_backward(emu, rng) -> None:
    idx, dout = rng.integers(0, 10, 300), f32(rng, 300, 7)  # 2,100 elements: 9 blocks
    dout[5, 2] = np.nan
    got = K.embedding_backward(dev(idx), dev(dout), 12)
    close(got, ref.embedding_backward(idx, dout, 12), "dweight")
    assert emu.launches("embedding_backward") == [((9, 1, 1), (256, 1, 1))]


# ---- global norm and AdamW


@pytest.mark.parametrize("n", [1, 1000, 5000])
def test_sum_squares(emu, rng, n: int) -> None:
    g = f32(rng, n)
    close(K.sum_squares(dev(g)), np.array([ref.sum_squares(g)]), "sum g^2", 1e-6)
    g[n // 2] = np.inf
    assert host(K.sum_squares(dev(g)))[0] == np.inf
    g[n // 3] = np.nan
    assert np.isnan(host(K.sum_squares(dev(g)))[0])


@pytest.mark.parametrize("max_norm", [1.0, 0.0])
def test_adamw_flat(emu, rng, max_norm: float) -> None:
    n, n_decay = 1000, 600
    w, m, v = f32(rng, n), np.zeros(n, np.float32), np.zeros(n, np.float32)
    dw, dm, dv = dev(w), dev(m), dev(v)
    out = dev(np.zeros(n, ml_dtypes.bfloat16))
    for step in (1, 2, 3):
        g = f32(rng, n, scale=0.05 * step)
        g[7] = TINY  # flushed on the GPU: the same to float32 rounding
        ns = K.sum_squares(dev(g))
        opts = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=step,
                    n_decay=n_decay, max_norm=max_norm)  # fmt: skip
        ref.adamw_flat(w, g, m, v, norm_sq=float(ref.sum_squares(g)), **opts)
        K.adamw_flat(dw, dev(g), dm, dv, norm_sq=ns, out_bf16=out, **opts)
    close(dw, w, "w")
    close(dm, m, "m")
    close(dv, v, "v")
    # the bf16 copy is the emulated w rounded to nearest even, bit for bit
    want = host(dw).astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(host(out).view(np.uint16), want)


def test_adamw_flat_nan_and_inf_gradients(emu, rng) -> None:
    n = 300
    for bad in (np.nan, np.inf):
        w, g = f32(rng, n), f32(rng, n)
        g[3] = bad
        m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
        dw, dm, dv = dev(w), dev(m), dev(v)
        opts = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=1,
                    n_decay=100, max_norm=1.0)  # fmt: skip
        out = dev(np.zeros(n, np.uint16))
        K.adamw_flat(dw, dev(g), dm, dv, norm_sq=K.sum_squares(dev(g)), out_bf16=out, **opts)
        reference(ref.adamw_flat, w, g, m, v, norm_sq=float(ref.sum_squares(g)), **opts)
        close(dw, w, "w")
        close(dv, v, "v")
        assert host(out)[3] & 0x7FFF > 0x7F80  # a bf16 NaN


# ---- empty inputs: no launch with a zero grid (CUDA refuses one)


def test_a_zero_grid_is_refused(emu) -> None:
    kern = emu.RawKernel(SOURCES["gelu_tanh_forward"], "gelu_tanh_forward")
    x = np.zeros(0, np.float32)
    with pytest.raises(cuda_emulator.LaunchError, match="invalid configuration"):
        kern((0,), (256,), (x, x, np.int64(0)))


def test_empty_inputs(emu) -> None:
    z = np.zeros((0, 8), np.float32)
    w = np.ones(8, np.float32)
    y, mean, rstd = K.layer_norm_forward(dev(z), dev(w), dev(w))
    assert y.shape == (0, 8) and mean.shape == rstd.shape == (0,)
    dx, dw, db = K.layer_norm_backward(dev(z), dev(z), dev(w), mean, rstd)
    assert dx.shape == (0, 8)
    assert (host(dw) == 0).all() and (host(db) == 0).all() and dw.shape == (8,)
    assert K.gelu_tanh_forward(dev(z)).shape == (0, 8)
    assert K.gelu_tanh_backward(dev(z), dev(z)).shape == (0, 8)
    for shape in ((0, 4, 4), (2, 0, 0)):
        s = dev(np.zeros(shape, np.float32))
        p = K.causal_softmax_forward(s, 1.0)
        assert p.shape == shape
        assert K.causal_softmax_backward(s, p, 1.0).shape == shape
    t = dev(np.zeros(0, np.int64))
    loss, lse = K.cross_entropy_forward(dev(z), t, 8)
    assert loss.shape == lse.shape == (0,)
    assert K.cross_entropy_backward(dev(z), lse, t, loss, 8).shape == (0, 8)
    e = K.embedding_backward(t, dev(z), 5)
    assert e.shape == (5, 8) and (host(e) == 0).all()
    assert host(K.sum_squares(dev(np.zeros(0, np.float32))))[0] == 0
    e0 = np.zeros(0, np.float32)
    K.adamw_flat(dev(e0), dev(e0), dev(e0), dev(e0), lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8,
                 weight_decay=0.1, step=1, n_decay=0, norm_sq=K.sum_squares(dev(e0)),
                 max_norm=1.0)  # fmt: skip
    for shape in ((0, 8), (4, 0)):
        z, bz = np.zeros(shape, np.float32), np.zeros(shape, BF16)
        w, N = np.ones(shape[1], np.float32), shape[0]
        for rt, yt in ((z, np.float32), (bz, BF16)):
            h, y, mean, rstd = K.residual_layer_norm_forward(dev(z), dev(rt), dev(w), dev(w),
                                                             out_dtype=yt)  # fmt: skip
            assert h.shape == shape and y.shape == shape and y.dtype == yt
            assert mean.shape == rstd.shape == (N,) and np.isnan(host(mean)).all()
            dx, dw, db = K.residual_layer_norm_backward(dev(rt), None, h, dev(w), mean, rstd)
            assert dx.shape == shape and dw.shape == db.shape == w.shape
            assert (host(dw) == 0).all() and (host(db) == 0).all()
            y = K.bias_gelu_forward(dev(rt), dev(w))
            assert y.shape == shape and y.dtype == rt.dtype
            dx, db = K.bias_gelu_backward(dev(rt), dev(rt), dev(w))
            assert dx.shape == shape and dx.dtype == np.float32 and (host(db) == 0).all()
        e = K.embedding_backward(dev(np.zeros(N, np.int64)), dev(z), 3)
        assert e.shape == (3, shape[1]) and (host(e) == 0).all()
    for shape in ((0, 4, 4), (2, 0, 0)):
        s = dev(np.zeros(shape, BF16))
        p = K.causal_softmax_forward(s, 1.0)
        assert p.shape == shape and p.dtype == BF16
        assert K.causal_softmax_backward(s, p, 1.0).shape == shape
    for dt in (np.float32, BF16):
        losses, d = K.fused_classifier(dev(np.zeros((0, 8), dt)), dev(np.zeros(0, np.int64)), 5)
        assert losses.shape == (0,) and d.shape == (0, 8) and d.dtype == dt
    for name, k in emu.kernels.items():
        assert all(min(g) >= 1 for g, _ in k.launches), f"{name}: a zero grid"
    assert not emu.launches("residual_layer_norm_forward_f32_f32")
    assert not emu.launches("fused_classifier_bf16")


# ---- residual add + layer norm, float32 and bfloat16


RLN_CASES = [  # N, C, threads, r, y and dy dtypes, dh given
    (5, 40, 32, np.float32, np.float32, np.float32, True),
    (5, 40, 32, BF16, np.float32, BF16, False),
    (5, 40, 32, np.float32, BF16, np.float32, False),
    (5, 40, 32, BF16, BF16, BF16, True),
    (1, 768, 192, BF16, BF16, BF16, True),  # T = 1: a single row, GPT-2's width
    (2, 4096, 1024, BF16, np.float32, np.float32, True),
    (2, 1030, 288, np.float32, BF16, BF16, False),
]


@pytest.mark.parametrize("N, C, threads, rt, yt, dyt, with_dh", RLN_CASES)
def test_residual_layer_norm(emu, rng, N, C, threads, rt, yt, dyt, with_dh) -> None:
    x, r, w, b = f32(rng, N, C, scale=2) + 1, f32(rng, N, C).astype(rt), f32(rng, C), f32(rng, C)
    dy, dh = f32(rng, N, C).astype(dyt), f32(rng, N, C) if with_dh else None
    want = ref.residual_layer_norm_forward(x, r, w, b, 1e-5, yt)
    got = K.residual_layer_norm_forward(dev(x), dev(r), dev(w), dev(b), 1e-5, out_dtype=yt)
    assert block_of(emu, K.variant_name("residual_layer_norm_forward", *(
        "bf16" if t == BF16 else "float" for t in (rt, yt)))) == threads  # fmt: skip
    assert got[1].dtype == yt and got[0].dtype == np.float32
    for name, o, rr in zip(("h", "y", "mean", "rstd"), got, want):
        close(o, rr, name, BF_RTOL if name == "y" and yt == BF16 else RTOL)
    dwant = ref.residual_layer_norm_backward(dy, dh, *want[:1], w, *want[2:])
    dgot = K.residual_layer_norm_backward(
        dev(dy), dev(dh) if with_dh else None, got[0], dev(w), got[2], got[3]
    )
    for name, o, rr in zip(("dx", "dw", "db"), dgot, dwant):
        assert o.dtype == np.float32
        close(o, rr, name)


def test_residual_layer_norm_nan_inf_and_bias_none(emu, rng) -> None:
    C = 64
    x, r, w = f32(rng, 4, C), bf16(f32(rng, 4, C)), f32(rng, C)
    x[1, 7], r[2, 3] = np.nan, np.inf
    want = reference(ref.residual_layer_norm_forward, x, r, w, None, 1e-5, BF16)
    got = K.residual_layer_norm_forward(dev(x), dev(r), dev(w), None, out_dtype=BF16)
    for name, o, rr in zip(("h", "y", "mean", "rstd"), got, want):
        close(o, rr, name, BF_RTOL)
    y = host(got[1]).astype(np.float32)
    assert np.isnan(y[1:3]).all() and np.isfinite(y[[0, 3]]).all()
    dy = bf16(f32(rng, 4, C))
    dwant = reference(ref.residual_layer_norm_backward, dy, None, want[0], w, *want[2:])
    dgot = K.residual_layer_norm_backward(dev(dy), None, got[0], dev(w), got[2], got[3])
    for name, o, rr in zip(("dx", "dw", "db"), dgot, dwant):
        close(o, rr, name)


# ---- bias + GELU


@pytest.mark.parametrize(
    "shape, xt, bt, dyt",
    [
        ((3, 40), np.float32, np.float32, np.float32),
        ((3, 40), BF16, BF16, BF16),
        ((3, 40), BF16, np.float32, np.float32),
        ((3, 40), np.float32, BF16, BF16),
        ((1, 1030), BF16, np.float32, BF16),  # a single row; 1,030 columns: 5 blocks
        ((300, 7), np.float32, np.float32, BF16),  # 100 row chunks of 3 meet by atomicAdd
        ((2, 3, 5), BF16, BF16, np.float32),  # leading axes flattened into rows
    ],
)
def test_bias_gelu(emu, rng, shape, xt, bt, dyt) -> None:
    C = shape[-1]
    x, b, dy = f32(rng, *shape, scale=3).astype(xt), f32(rng, C).astype(bt), f32(rng, *shape)
    dy = dy.astype(dyt)
    y = K.bias_gelu_forward(dev(x), dev(b))
    assert y.dtype == xt
    close(y, ref.bias_gelu_forward(x, b), "y", BF_RTOL if xt == BF16 else RTOL)
    dx, db = K.bias_gelu_backward(dev(dy), dev(x), dev(b))
    rdx, rdb = ref.bias_gelu_backward(dy, x, b)
    assert dx.dtype == db.dtype == np.float32 and db.shape == (C,)
    close(dx, rdx, "dx")
    close(db, rdb, "db")
    if shape == (300, 7):
        assert emu.launches(K.variant_name("bias_gelu_backward", "bf16", "float")) == [
            ((1, 100, 1), (256, 1, 1))
        ]


def test_bias_gelu_nan_inf_and_large(emu) -> None:
    x = np.array([[np.nan, np.inf, -np.inf, 1e30, -1e30, 20, -20, 0]], np.float32)
    b = np.array([0, 0, 0, 0, 0, 1, -1, 0.5], np.float32)
    dy = np.ones_like(x)
    dy[0, 7] = np.nan
    for xt in (np.float32, BF16):
        xx = x.astype(xt)
        close(K.bias_gelu_forward(dev(xx), dev(b)), reference(ref.bias_gelu_forward, xx, b), "y")
        dx, db = K.bias_gelu_backward(dev(dy), dev(xx), dev(b))
        rdx, rdb = reference(ref.bias_gelu_backward, dy, xx, b)
        close(dx, rdx, "dx")
        close(db, rdb, "db")
        assert np.isnan(host(dx)[0, [0, 7]]).all()


# ---- causal softmax in bfloat16


@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (2, 1, 5, 5), (1, 1, 130, 130)])
def test_causal_softmax_bf16(emu, rng, shape: tuple) -> None:
    s, dp = bf16(f32(rng, *shape, scale=3)), bf16(f32(rng, *shape))
    p = K.causal_softmax_forward(dev(s), 0.3)
    rp = ref.causal_softmax_forward(s, 0.3)
    assert p.dtype == rp.dtype == BF16
    close(p, rp, "p", BF_RTOL)
    ds = K.causal_softmax_backward(dev(dp), dev(rp), 0.3)
    assert ds.dtype == BF16
    close(ds, ref.causal_softmax_backward(dp, rp, 0.3), "ds", BF_RTOL)
    assert block_of(emu, "causal_softmax_forward_bf16") == max(32, 32 * -(-shape[-1] // 128))


def test_causal_softmax_bf16_nan_inf(emu, rng) -> None:
    T = 6
    s = f32(rng, 1, T, T)
    s[0][np.triu_indices(T, 1)] = np.nan  # the future: never read
    s[0, 3, 1], s[0, 4, 4], s[0, 5, :2] = np.nan, np.inf, -np.inf
    s = bf16(s)
    p = host(K.causal_softmax_forward(dev(s), 1.0)).astype(np.float32)
    want = reference(ref.causal_softmax_forward, s, 1.0).astype(np.float32)
    want[0][np.triu_indices(T, 1)] = 0
    close(p, want, "p", BF_RTOL)
    assert np.isnan(p[0, 3, :4]).all() and np.isnan(p[0, 4, :5]).all()
    assert (p[0, 5, :2] == 0).all() and np.isfinite(p[0, [0, 1, 2, 5]]).all()


# ---- causal softmax keeping the rows' log-sum-exp, and p recomputed from it


def softmax_kernel(name: str, dt) -> str:
    return K.variant_name(name, "bf16" if dt == BF16 else "float")


def same_within_one_bf16_ulp(got, want, what: str) -> None:
    """Non-negative bfloat16 values at most one ulp apart: their 16 bits differ by <= 1."""
    g, w = (host(a).view(np.uint16).astype(np.int32) for a in (got, want))
    assert g.shape == w.shape and np.abs(g - w).max() <= 1, f"{what}: more than one ulp apart"


@pytest.mark.parametrize("dt", [np.float32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (2, 1, 5, 5), (1, 1, 33, 33), (1, 1, 130, 130)])
def test_causal_softmax_lse_and_recompute(emu, rng, shape: tuple, dt) -> None:
    """T = 1; partial warps; 64 threads looping over 130 columns. p is the plain softmax's, bit
    for bit; p recomputed from lse is p again (float32: to rounding; bfloat16: within an ulp)."""
    s = f32(rng, *shape, scale=3).astype(dt)
    p, lse = K.causal_softmax_lse_forward(dev(s), 0.3)
    rp, rlse = ref.causal_softmax_lse_forward(s, 0.3)
    assert p.dtype == dt and lse.dtype == np.float32 and lse.shape == shape[:-1]
    close(p, rp, "p", BF_RTOL if dt == BF16 else RTOL)
    close(lse, rlse, "lse")
    np.testing.assert_array_equal(host(p).view(np.uint8),
                                  host(K.causal_softmax_forward(dev(s), 0.3)).view(np.uint8))  # fmt: skip
    T = shape[-1]
    threads = max(32, 32 * -(-T // 128))
    assert block_of(emu, softmax_kernel("causal_softmax_lse_forward", dt)) == threads
    rq = ref.causal_softmax_recompute(s, rlse, 0.3)
    assert rq.dtype == dt
    close(K.causal_softmax_recompute(dev(s), dev(rlse), 0.3), rq, "recomputed p (reference lse)",
          BF_RTOL if dt == BF16 else RTOL)  # fmt: skip
    q = K.causal_softmax_recompute(dev(s), lse, 0.3)
    assert q.dtype == dt and q.shape == shape
    assert block_of(emu, softmax_kernel("causal_softmax_recompute", dt)) == threads
    if dt == BF16:
        same_within_one_bf16_ulp(q, p, "recomputed p")
    else:
        np.testing.assert_allclose(host(q), host(p), rtol=1e-5, atol=0)
    assert (host(q)[..., np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] == 0).all()


def test_causal_softmax_lse_with_1024_threads(emu, rng, monkeypatch) -> None:
    """_row_threads gives 1,024 threads from T = 3,969 on (too many rows to emulate): the
    launchers here are given 1,024 threads for T = 4, so the block reductions meet 32 warps'
    partial results, 31 of them from threads that read nothing."""
    assert K._row_threads(4000) == 1024
    monkeypatch.setattr(K, "_row_threads", lambda width: 1024)
    for dt in (np.float32, BF16):
        s = f32(rng, 1, 1, 4, 4, scale=3).astype(dt)
        p, lse = K.causal_softmax_lse_forward(dev(s), 0.7)
        assert block_of(emu, softmax_kernel("causal_softmax_lse_forward", dt)) == 1024
        rp, rlse = ref.causal_softmax_lse_forward(s, 0.7)
        close(p, rp, "p", BF_RTOL if dt == BF16 else RTOL)
        close(lse, rlse, "lse")
        q = K.causal_softmax_recompute(dev(s), lse, 0.7)
        assert block_of(emu, softmax_kernel("causal_softmax_recompute", dt)) == 1024
        close(q, ref.causal_softmax_recompute(s, rlse, 0.7), "recomputed p",
              BF_RTOL if dt == BF16 else RTOL)  # fmt: skip


@pytest.mark.parametrize("dt", [np.float32, BF16], ids=["f32", "bf16"])
def test_causal_softmax_lse_and_recompute_nan_inf(emu, rng, dt) -> None:
    """As the plain softmax: a NaN or +inf in a row's kept scores, or a row of -inf, gives a
    NaN row and a NaN lse; -inf scores (masked by the caller) weigh 0; the future is never
    read. Recomputing from a NaN lse gives NaN, from lse = +inf zeros."""
    T = 9
    s = f32(rng, 1, T, T)
    s[0][np.triu_indices(T, 1)] = np.nan  # the future: never read
    s[0, 4, 2], s[0, 5, 5], s[0, 6, :] = np.nan, np.inf, -np.inf
    s[0, 7, :3] = -np.inf
    s[0, 8, :] = TINY  # flushed: uniform either way
    s = s.astype(dt)
    rt = BF_RTOL if dt == BF16 else RTOL
    p, lse = K.causal_softmax_lse_forward(dev(s), 1.0)
    rp, rlse = reference(ref.causal_softmax_lse_forward, s, 1.0)
    rp = rp.astype(np.float32)
    rp[0][np.triu_indices(T, 1)] = 0  # NaN rows of the reference are NaN there too
    close(p, rp, "p", rt)
    close(lse, rlse, "lse")
    lh, ph = host(lse), host(p).astype(np.float32)
    assert np.isnan(lh[0, 4:7]).all() and np.isfinite(lh[0, [0, 1, 2, 3, 7, 8]]).all()
    close(lh[0, 8], np.log(np.float32(T)), "lse of a flat row")
    assert (ph[0][np.triu_indices(T, 1)] == 0).all()
    lse_in = host(lse).copy()
    lse_in[0, 0] = np.inf  # a row whose lse is +inf: exp(s - inf) = 0
    q = host(K.causal_softmax_recompute(dev(s), dev(lse_in), 1.0)).astype(np.float32)
    want = reference(ref.causal_softmax_recompute, s, lse_in, 1.0).astype(np.float32)
    close(q, want, "recomputed p", rt)
    assert all(np.isnan(q[0, i, : i + 1]).all() for i in (4, 5, 6))
    assert (q[0, 0] == 0).all() and (q[0][np.triu_indices(T, 1)] == 0).all()
    close(q[0, 1:], ph[0, 1:], "recomputed p vs p", rt)


def test_causal_softmax_lse_and_recompute_empty(emu) -> None:
    for dt in (np.float32, BF16):
        for shape in ((0, 4, 4), (2, 0, 0), (3, 0, 2, 2)):
            s = dev(np.zeros(shape, dt))
            p, lse = K.causal_softmax_lse_forward(s, 1.0)
            assert p.shape == shape and p.dtype == dt
            assert lse.shape == shape[:-1] and lse.dtype == np.float32
            q = K.causal_softmax_recompute(s, lse, 1.0)
            assert q.shape == shape and q.dtype == dt
            rp, rlse = ref.causal_softmax_lse_forward(np.zeros(shape, dt), 1.0)
            assert rp.shape == shape and rlse.shape == shape[:-1]
    assert not any(emu.launches(softmax_kernel(n, dt)) for n in (
        "causal_softmax_lse_forward", "causal_softmax_recompute") for dt in (np.float32, BF16))  # fmt: skip
    s = dev(np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match=r"scores must have shape \(\.\.\., T, T\)"):
        K.causal_softmax_lse_forward(s, 1.0)
    s = dev(np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="lse of shape"):
        K.causal_softmax_recompute(s, dev(np.zeros((2, 3), np.float32)), 1.0)
    with pytest.raises(TypeError, match="lse must be float32, got bfloat16"):
        K.causal_softmax_recompute(s, dev(np.zeros((2, 4), BF16)), 1.0)


# ---- fused classifier (loss and dlogits in one kernel)


@pytest.mark.parametrize(
    "N, V, Vp, threads, dt, in_place",
    [
        (2, 50257, 50304, 1024, np.float32, True),  # GPT-2's padded vocabulary
        (2, 50257, 50304, 1024, BF16, False),
        (9, 65, 128, 32, np.float32, False),
        (9, 65, 128, 32, BF16, True),
        (1, 65, 65, 32, np.float32, False),  # a single row, no padding
    ],
)
def test_fused_classifier(emu, rng, N, V, Vp, threads, dt, in_place) -> None:
    x = f32(rng, N, Vp, scale=2)
    x[:, V:] = np.nan  # the padding: never read, zeroed
    x = x.astype(dt)
    t = rng.integers(0, V, N)
    t[0] = V - 1
    if N > 2:
        t[1], t[2] = -1, 0  # ignored; the first column
    scale = np.array([1.0 / max(1, (t != -1).sum())], np.float32) if N > 1 else None
    rl, rd = ref.fused_classifier(x, t, V, -1, scale)
    gx = dev(x)
    losses, d = K.fused_classifier(gx, dev(t), V, -1, None if scale is None else dev(scale),
                                   out=gx if in_place else None)  # fmt: skip
    assert block_of(emu, "fused_classifier_" + ("bf16" if dt == BF16 else "f32")) == threads
    assert (d is gx) == in_place and d.dtype == dt and d.shape == (N, Vp)
    close(losses, rl, "losses")
    close(d, rd, "dlogits", BF_RTOL if dt == BF16 else RTOL)
    assert (host(d)[:, V:].astype(np.float32) == 0).all()
    if N > 2:
        assert host(losses)[1] == 0 and (host(d)[1].astype(np.float32) == 0).all()
    if dt == np.float32:  # the same as cross entropy's two kernels
        loss, lse = K.cross_entropy_forward(dev(x), dev(t), V)
        close(losses, host(loss), "loss vs cross_entropy_forward")


def test_fused_classifier_nan_inf_and_bad_targets(emu, rng) -> None:
    N, V, Vp = 7, 100, 128
    x = f32(rng, N, Vp)
    x[0, 5], x[1, 9], x[2, :50] = np.nan, np.inf, -np.inf
    x[3] = TINY
    x[6, :] = -np.inf  # a row of -inf: NaN, as float arithmetic gives
    t = np.array([1, 2, 60, 4, V + 3, -7, 3], np.int64)  # out of range: NaN, nothing written
    for dt in (np.float32, BF16):
        xx = x.astype(dt)
        losses, d = K.fused_classifier(dev(xx), dev(t), V)
        rl, rd = reference(ref.fused_classifier, xx, t, V)
        close(losses, rl, "losses")
        close(d, rd, "dlogits", BF_RTOL if dt == BF16 else RTOL)
        lh, dh = host(losses), host(d).astype(np.float32)
        assert np.isnan(lh[[0, 1, 4, 5, 6]]).all() and np.isfinite(lh[[2, 3]]).all()
        close(lh[3], np.log(np.float32(V)), "loss of a flat row")
        assert np.isnan(dh[[0, 1, 4, 5, 6], :V]).all() and (dh[:, V:] == 0).all()
        assert np.isfinite(dh[[2, 3]]).all()


# ---- embedding backward: ids out of range are skipped


def test_embedding_backward_skips_ids_out_of_range(emu, rng) -> None:
    idx = np.array([0, 3, -1, 4, 7, 2, -100, 3], np.int64)
    dout = f32(rng, len(idx), 5)
    got = K.embedding_backward(dev(idx), dev(dout), 4)  # a write outside dw fails the launch
    want = ref.embedding_backward(idx, dout, 4)
    close(got, want, "dweight")
    np.testing.assert_allclose(want[3], dout[1] + dout[7], rtol=1e-6)
    assert (want[1] == 0).all()
