"""The CUDA kernels: every source compiles with nvcc (when present), every launcher passes
the arguments its kernel declares (checked on the CPU with the CuPy stand-in), and on a GPU
every kernel agrees with its NumPy reference."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from handgrad.backend import cuda
from handgrad.kernels import cuda as K
from handgrad.kernels import reference as ref
from handgrad.kernels.cuda_sources import SOURCES

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fakecupy  # noqa: E402

NVCC = shutil.which("nvcc")


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_source_compiles_with_nvcc(name: str, tmp_path: Path) -> None:
    src = tmp_path / f"{name}.cu"
    src.write_text(SOURCES[name])
    ptx = tmp_path / f"{name}.ptx"
    r = subprocess.run(
        [NVCC, "--ptx", "-arch=sm_90", "--Werror", "all-warnings", "-o", str(ptx), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, f"nvcc failed on {name}:\n{r.stderr}"
    assert re.search(rf"\.entry\s+{name}\s*\(", ptx.read_text()), f"no entry {name} in the PTX"


def _nvrtc() -> object | None:
    """CuPy's NVRTC bindings when CuPy imports and its NVRTC library loads (no GPU needed)."""
    try:
        from cupy.cuda import nvrtc

        nvrtc.getVersion()
    except Exception:  # noqa: BLE001  (no CuPy, or no NVRTC library for it)
        return None
    return nvrtc


NVRTC = _nvrtc()


@pytest.mark.skipif(NVRTC is None, reason="no CuPy with a loadable NVRTC")
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_source_compiles_with_nvrtc_as_cupy_compiles_it(name: str) -> None:
    """What ``cupy.RawKernel(..., options=K.NVRTC_OPTIONS)`` runs on an H100/H200: handgrad's
    options plus the ones CuPy 14 adds, for sm_90 (machine code) and compute_90 (PTX)."""
    added = ["--device-as-default-execution-space", "-ftz=true"]
    for arch, out in (("-arch=sm_90", NVRTC.getCUBIN), ("-arch=compute_90", NVRTC.getPTX)):
        prog = NVRTC.createProgram(SOURCES[name], f"{name}.cu", [], [])
        try:
            NVRTC.compileProgram(prog, [*K.NVRTC_OPTIONS, *added, arch])
        except Exception as e:  # noqa: BLE001  (the log says why)
            pytest.fail(f"NVRTC {NVRTC.getVersion()} failed on {name} ({arch}): {e}\n"
                        f"{NVRTC.getProgramLog(prog)}")  # fmt: skip
        binary = out(prog)
        NVRTC.destroyProgram(prog)
        assert len(binary) > 0
        if arch.endswith("compute_90"):
            text = binary.decode() if isinstance(binary, bytes) else binary
            assert re.search(rf"\.entry\s+{name}\s*\(", text), f"no entry {name} in the PTX"


# ---- launch arguments against the declared parameters, without a GPU

_C_TYPES = {
    "const float*": np.float32,
    "float*": np.float32,
    "const long long*": np.int64,
    "const double*": np.float64,
    "double*": np.float64,
    "unsigned short*": np.uint16,
    "const unsigned short*": np.uint16,
    "int": np.int32,
    "long long": np.int64,
    "float": np.float32,
}


def _parameters(name: str) -> list[str]:
    """The C types of kernel ``name``'s parameters, qualifiers other than const dropped."""
    m = re.search(rf'extern "C" __global__ void {name}\((.*?)\)\s*\{{', SOURCES[name], re.S)
    assert m, f"no kernel {name} in its source"
    typedefs = dict((b, a) for a, b in re.findall(r"typedef ([\w ]+?) (\w+);", SOURCES[name]))
    types = []
    for param in m.group(1).split(","):
        words = param.replace("__restrict__", "").replace("*", " * ").split()[:-1]
        words = [typedefs.get(w, w) for w in words]
        words = [typedefs.get(w, w) for w in words]  # bf16 -> unsigned short, via x_t
        types.append(" ".join(words).replace(" *", "*"))
    return types


class _Recorder:
    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def __call__(self, grid: tuple, block: tuple, args: tuple) -> None:
        self.calls.append((self.name, grid, block, args))


def _check_call(name: str, grid: tuple, block: tuple, args: tuple) -> None:
    types = _parameters(name)
    assert len(args) == len(types), f"{name}: {len(args)} arguments for {len(types)} parameters"
    assert all(g >= 1 for g in grid) and block[0] % 32 == 0 and block[0] <= 1024
    for i, (t, a) in enumerate(zip(types, args)):
        want = np.dtype(_C_TYPES[t])
        if t.endswith("*"):
            assert isinstance(a, fakecupy.ndarray), f"{name} arg {i} ({t}): {type(a).__name__}"
        else:
            assert isinstance(a, np.generic), f"{name} arg {i} ({t}): {type(a).__name__}"
        assert a.dtype == want, f"{name} arg {i} ({t}): dtype {a.dtype}, expected {want}"


def test_launchers_pass_what_the_kernels_declare(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list = []
    monkeypatch.setattr(K, "_kernel", lambda name: _Recorder(name, calls))
    rng = np.random.default_rng(0)
    with fakecupy.installed() as cp:

        def a(*shape: int) -> fakecupy.ndarray:
            return cp.asarray(rng.standard_normal(shape).astype(np.float32))

        x, w, b = a(6, 40), a(40), a(40)
        y, mean, rstd = K.layer_norm_forward(x, w, b)
        K.layer_norm_forward(x, w, None)
        K.layer_norm_backward(a(6, 40), x, w, mean, rstd)
        K.gelu_tanh_backward(a(3, 7), K.gelu_tanh_forward(a(3, 7)))
        p = K.causal_softmax_forward(a(2, 5, 5), 0.5)
        K.causal_softmax_backward(a(2, 5, 5), p, 0.5)
        t = cp.asarray(np.array([1, -1, 3], dtype=np.int64))
        loss, lse = K.cross_entropy_forward(a(3, 16), t, 10)
        K.cross_entropy_backward(a(3, 16), lse, t, a(3), 10)
        K.embedding_backward(t.clip(0), a(3, 4), 5)
        K.embedding_backward(t, a(3, 4), 5)
        bf = ml_dtypes.bfloat16
        for rt in (np.float32, bf):
            for yt in (np.float32, bf):
                h, y, mean, rstd = K.residual_layer_norm_forward(x, a(6, 40).astype(rt), w, b,
                                                                 out_dtype=yt)  # fmt: skip
            K.residual_layer_norm_backward(a(6, 40).astype(rt), a(6, 40), h, w, mean, rstd)
        K.residual_layer_norm_backward(a(6, 40), None, h, w, mean, rstd)
        K.residual_layer_norm_forward(x, x, w, None)
        for xt in (np.float32, bf):
            K.bias_gelu_forward(a(3, 7).astype(xt), a(7).astype(bf))
            for dt in (np.float32, bf):
                K.bias_gelu_backward(a(3, 7).astype(dt), a(3, 7).astype(xt), a(7))
            p = K.causal_softmax_forward(a(2, 5, 5).astype(xt), 0.5)
            K.causal_softmax_backward(a(2, 5, 5).astype(xt), p, 0.5)
            _, lse = K.causal_softmax_lse_forward(a(2, 5, 5).astype(xt), 0.5)
            K.causal_softmax_recompute(a(2, 5, 5).astype(xt), lse, 0.5)
            lg = a(3, 16).astype(xt)
            K.fused_classifier(lg, t, 10)
            K.fused_classifier(lg, t, 10, scale=a(1), out=lg)
        ns = K.sum_squares(a(100))
        out = cp.zeros(100, dtype=ml_dtypes.bfloat16)
        for o in (None, out):
            K.adamw_flat(
                a(100), a(100), a(100), a(100), lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8,
                weight_decay=0.1, step=1, n_decay=60, norm_sq=ns, max_norm=1.0, out_bf16=o,
            )  # fmt: skip
        with pytest.raises(TypeError, match="layer_norm_forward: x must be float32"):
            K.layer_norm_forward(x.astype(np.float64), w, b)
        with pytest.raises(TypeError, match="targets must be int64"):
            K.cross_entropy_forward(a(3, 16), t.astype(np.int32), 10)
        with pytest.raises(TypeError, match="x must be float32, got bfloat16"):
            K.residual_layer_norm_forward(x.astype(bf), x, w, b)
        with pytest.raises(TypeError, match="r must be float32 or bfloat16, got float16"):
            K.residual_layer_norm_forward(x, x.astype(np.float16), w, b)
        with pytest.raises(ValueError, match="vocab_size 17 not in"):
            K.fused_classifier(a(3, 16), t, 17)
        with pytest.raises(TypeError, match="give both one dtype"):
            K.causal_softmax_backward(p, p.astype(np.float32), 0.5)
    launched = {c[0] for c in calls}
    assert launched == set(SOURCES), f"never launched: {set(SOURCES) - launched}"
    for call in calls:
        _check_call(*call)


def test_launch_without_cupy_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "_cupy", None)
    monkeypatch.setattr(cuda, "_cupy_error", "No module named 'cupy'")
    with pytest.raises(RuntimeError, match="CUDA is not available: no CuPy"):
        K.gelu_tanh_forward(np.zeros(3, np.float32))


# ---- on a GPU: each kernel against its reference

gpu = pytest.mark.skipif(not cuda.is_available(), reason="no CUDA GPU (or no CuPy)")
RTOL = 1e-4


def _close(ours, want, what: str, rtol: float = RTOL) -> None:
    ours = cuda.require().asnumpy(ours).astype(np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert ours.shape == want.shape, f"{what}: shape {ours.shape} != {want.shape}"
    err = np.abs(ours - want).max() / max(np.abs(want).max(), 1e-2) if want.size else 0.0
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol}"


@pytest.fixture
def cp():
    return cuda.require()


def _f32(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("N, C", [(7, 48), (64, 768), (3, 1030)])
def test_gpu_layer_norm(cp, N: int, C: int) -> None:
    rng = np.random.default_rng(C)
    x, w, b, dy = _f32(rng, N, C) * 2 + 1, _f32(rng, C), _f32(rng, C), _f32(rng, N, C)
    want = ref.layer_norm_forward(x, w, b)
    got = K.layer_norm_forward(cp.asarray(x), cp.asarray(w), cp.asarray(b))
    for name, o, r in zip(("y", "mean", "rstd"), got, want):
        _close(o, r, name)
    dwant = ref.layer_norm_backward(dy, x, w, want[1], want[2])
    dgot = K.layer_norm_backward(cp.asarray(dy), cp.asarray(x), cp.asarray(w), got[1], got[2])
    for name, o, r in zip(("dx", "dw", "db"), dgot, dwant):
        _close(o, r, name)


@pytest.mark.cuda
@gpu
def test_gpu_gelu(cp) -> None:
    rng = np.random.default_rng(1)
    x, dy = _f32(rng, 1000, 37) * 3, _f32(rng, 1000, 37)
    _close(K.gelu_tanh_forward(cp.asarray(x)), ref.gelu_tanh_forward(x), "y")
    _close(K.gelu_tanh_backward(cp.asarray(dy), cp.asarray(x)), ref.gelu_tanh_backward(dy, x), "dx")


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("T", [1, 5, 64, 1024])
def test_gpu_causal_softmax_and_attention(cp, T: int) -> None:
    rng = np.random.default_rng(T)
    s, dp = _f32(rng, 2, 3, T, T) * 3, _f32(rng, 2, 3, T, T)
    p = K.causal_softmax_forward(cp.asarray(s), 0.3)
    _close(p, ref.causal_softmax_forward(s, 0.3), "p")
    rp = ref.causal_softmax_forward(s, 0.3)
    _close(K.causal_softmax_backward(cp.asarray(dp), cp.asarray(rp), 0.3),
           ref.causal_softmax_backward(dp, rp, 0.3), "ds")  # fmt: skip
    q, k, v, do = (_f32(rng, 2, 3, T, 16) for _ in range(4))
    out, pp = K.attention_forward(cp.asarray(q), cp.asarray(k), cp.asarray(v))
    rout, rpp = ref.attention_forward(q, k, v)
    _close(out, rout, "attention out")
    grads = K.attention_backward(*(cp.asarray(a) for a in (do, q, k, v)), pp)
    for name, o, r in zip(("dq", "dk", "dv"), grads, ref.attention_backward(do, q, k, v, rpp)):
        _close(o, r, name)


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("N, V, Vp", [(9, 65, 128), (32, 50257, 50304)])
def test_gpu_cross_entropy(cp, N: int, V: int, Vp: int) -> None:
    rng = np.random.default_rng(V)
    x = _f32(rng, N, Vp) * 2
    t = rng.integers(0, V, N)
    t[1] = -1
    dl = np.full(N, 1.0 / (N - 1), np.float32)
    loss, lse = K.cross_entropy_forward(cp.asarray(x), cp.asarray(t), V)
    rl, rlse = ref.cross_entropy_forward(x, t, V)
    _close(loss, rl, "loss")
    _close(lse, rlse, "lse")
    gx = cp.asarray(x)
    d = K.cross_entropy_backward(gx, lse, cp.asarray(t), cp.asarray(dl), V, out=gx)
    assert d is gx
    _close(d, ref.cross_entropy_backward(x, rlse, t, dl, V), "dlogits (in place)")
    bad = K.cross_entropy_forward(cp.asarray(x), cp.asarray(np.full(N, V + 3)), V)[0]
    assert np.isnan(cp.asnumpy(bad)).all()


@pytest.mark.cuda
@gpu
def test_gpu_embedding_backward(cp) -> None:
    rng = np.random.default_rng(2)
    idx, dout = rng.integers(0, 50, 4096), _f32(rng, 4096, 64)
    got = K.embedding_backward(cp.asarray(idx), cp.asarray(dout), 50)
    _close(got, ref.embedding_backward(idx, dout, 50), "dweight")


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("max_norm", [1.0, 0.0])
def test_gpu_adamw_flat(cp, max_norm: float) -> None:
    rng = np.random.default_rng(3)
    n, n_decay = 1_000_003, 700_001
    w, m, v = _f32(rng, n), np.zeros(n, np.float32), np.zeros(n, np.float32)
    dw, dm, dv = cp.asarray(w), cp.zeros(n, np.float32), cp.zeros(n, np.float32)
    out = cp.zeros(n, np.uint16)
    for step in (1, 2, 3):
        g = _f32(rng, n) * 0.01 * step
        ns = K.sum_squares(cp.asarray(g))
        _close(ns, np.array([ref.sum_squares(g)]), "norm^2", 1e-5)
        opts = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=step,
                    n_decay=n_decay, max_norm=max_norm)  # fmt: skip
        ref.adamw_flat(w, g, m, v, norm_sq=float(ref.sum_squares(g)), **opts)
        K.adamw_flat(dw, cp.asarray(g), dm, dv, norm_sq=ns, out_bf16=out, **opts)
    _close(dw, w, "w")
    _close(dm, m, "m")
    _close(dv, v, "v")
    bf = cp.asnumpy(out).view(ml_dtypes.bfloat16).astype(np.float32)
    assert np.abs(bf - cp.asnumpy(dw)).max() <= np.abs(w).max() * 2**-8


@pytest.mark.cuda
@gpu
def test_gpu_fused_kernels_float32_and_bfloat16(cp) -> None:
    """The kernels of a bfloat16-autocast step at GPT-2's sizes (C = 768, 4C, the padded
    vocabulary), each storage type, against the references."""
    rng = np.random.default_rng(7)
    bf, N, C = ml_dtypes.bfloat16, 64, 768
    x, w, b = _f32(rng, N, C), _f32(rng, C), _f32(rng, C)
    for rt, yt in ((np.float32, np.float32), (bf, bf), (bf, np.float32)):
        r, dy, dh = _f32(rng, N, C).astype(rt), _f32(rng, N, C).astype(yt), _f32(rng, N, C)
        want = ref.residual_layer_norm_forward(x, r, w, b, 1e-5, yt)
        got = K.residual_layer_norm_forward(*map(cp.asarray, (x, r, w, b)), out_dtype=yt)
        for name, o, rr in zip(("h", "y", "mean", "rstd"), got, want):
            _close(o, rr.astype(np.float32), name, 1e-2 if yt == bf else RTOL)
        dwant = ref.residual_layer_norm_backward(dy, dh, want[0], w, *want[2:])
        dgot = K.residual_layer_norm_backward(cp.asarray(dy), cp.asarray(dh), got[0],
                                              cp.asarray(w), got[2], got[3])  # fmt: skip
        for name, o, rr in zip(("dx", "dw", "db"), dgot, dwant):
            _close(o, rr, name)
    u, bu = _f32(rng, N, 4 * C) * 3, _f32(rng, 4 * C)
    for xt in (np.float32, bf):
        ux, du = u.astype(xt), _f32(rng, N, 4 * C).astype(xt)
        _close(K.bias_gelu_forward(cp.asarray(ux), cp.asarray(bu)),
               ref.bias_gelu_forward(ux, bu).astype(np.float32), "y", 1e-2)  # fmt: skip
        dgot = K.bias_gelu_backward(cp.asarray(du), cp.asarray(ux), cp.asarray(bu))
        for name, o, rr in zip(("dx", "db"), dgot, ref.bias_gelu_backward(du, ux, bu)):
            _close(o, rr, name)
        s = (_f32(rng, 2, 3, 64, 64) * 3).astype(xt)
        p = K.causal_softmax_forward(cp.asarray(s), 0.3)
        rp = ref.causal_softmax_forward(s, 0.3)
        _close(p, rp.astype(np.float32), "p", 1e-2)
        _close(K.causal_softmax_backward(cp.asarray(s), cp.asarray(rp), 0.3),
               ref.causal_softmax_backward(s, rp, 0.3).astype(np.float32), "ds", 1e-2)  # fmt: skip
        V, Vp = 50257, 50304
        lg = (_f32(rng, 8, Vp) * 2).astype(xt)
        t = rng.integers(0, V, 8)
        t[3] = -1
        scale = np.array([1 / 7], np.float32)
        rl, rd = ref.fused_classifier(lg, t, V, -1, scale)
        glg = cp.asarray(lg)
        losses, d = K.fused_classifier(glg, cp.asarray(t), V, -1, cp.asarray(scale), out=glg)
        _close(losses, rl, "losses")
        _close(d, rd.astype(np.float32), "dlogits", 1e-2)
