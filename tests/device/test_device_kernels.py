"""The fused ops' CUDA kernel path: dispatched to on CuPy arrays when kernels are on, with the
CPU's numbers, and never when they are off, on the host, or for inputs the kernels do not
take. Here the launchers are run by their NumPy references on the CuPy stand-in's arrays;
on a real GPU (tests marked ``cuda``) each op's kernel path is held to CuPy's generic path."""

from __future__ import annotations

import fakecupy
import numpy as np
import pytest

import handgrad as hg
import handgrad.nn.functional as F
from handgrad.backend import cuda
from handgrad.models.gpt2 import GPT2, GPT2Config
from handgrad.nn.utils import clip_grad_norm_
from handgrad.optim import AdamW

RTOL = 1e-5  # float32, relative to the largest magnitude (as tests/core's rel_err)


def _close(got, want, what: str, rtol: float = RTOL) -> None:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    err = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30) if want.size else 0.0
    assert err <= rtol, f"{what}: relative error {err:.3g} > {rtol:g}"


@pytest.fixture
def calls(monkeypatch):
    """The stand-in installed with kernels on; the launchers are the NumPy references."""
    counts = fakecupy.reference_kernels(monkeypatch)
    with fakecupy.installed(kernels=True):
        yield counts


def _run(fn, arrays: list[np.ndarray], device: str, grad: list[bool] | None = None):
    """fn(*tensors) on ``device`` -> (output, grads of the inputs) as host arrays; the
    backward seed is a fixed random array of the output's shape."""
    grad = grad or [a.dtype.kind == "f" for a in arrays]
    ts = [hg.tensor(a).to(device).requires_grad_(g) for a, g in zip(arrays, grad)]
    out = fn(*ts)
    seed = np.random.default_rng(7).standard_normal(out.shape).astype(np.float32)
    out.backward(hg.tensor(seed).to(device))
    grads = [t.grad.to("cpu").numpy() if t.grad is not None else None for t in ts]
    return out.detach().to("cpu").numpy(), grads


def _same_as_cpu(fn, arrays, **kw) -> None:
    want, want_g = _run(fn, arrays, "cpu", **kw)
    got, got_g = _run(fn, arrays, "cuda", **kw)
    _close(got, want, "output")
    for i, (g, w) in enumerate(zip(got_g, want_g)):
        assert (g is None) == (w is None), f"grad {i}: {g is None} vs {w is None}"
        if w is not None:
            _close(g, w, f"grad {i}")


def _f32(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ---- each op: the kernel runs, and gives the CPU's forward and backward


@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm(calls, bias: bool) -> None:
    rng = np.random.default_rng(0)
    x, w, b = _f32(rng, 3, 5, 16, scale=2) + 1, _f32(rng, 16), _f32(rng, 16)
    args = [x, w, b] if bias else [x, w]
    _same_as_cpu(lambda *t: F.layer_norm(t[0], 16, *t[1:]), args)
    assert calls["layer_norm_forward"] == calls["layer_norm_backward"] == 1
    _same_as_cpu(lambda t: F.layer_norm(t, (5, 16)), [x])  # no weight, two axes
    assert calls["layer_norm_forward"] == 2


def test_gelu_tanh(calls) -> None:
    x = _f32(np.random.default_rng(1), 4, 33, scale=3)
    _same_as_cpu(lambda t: F.gelu(t, approximate="tanh"), [x])
    assert calls["gelu_tanh_forward"] == calls["gelu_tanh_backward"] == 1


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy(calls, reduction: str) -> None:
    rng = np.random.default_rng(2)
    x, t = _f32(rng, 6, 11, scale=2), rng.integers(0, 11, 6)
    t[2] = -100  # ignored
    _same_as_cpu(lambda a, b: F.cross_entropy(a, b, reduction=reduction), [x, t])
    assert calls["cross_entropy_forward"] == calls["cross_entropy_backward"] == 1
    # (N, C, d) logits: permuted, so not contiguous before the kernel sees them
    x3, t3 = _f32(rng, 2, 7, 3), rng.integers(0, 7, (2, 3))
    _same_as_cpu(lambda a, b: F.cross_entropy(a, b, reduction=reduction), [x3, t3])
    assert calls["cross_entropy_forward"] == 2


def test_cross_entropy_with_label_smoothing_takes_the_generic_path(calls) -> None:
    rng = np.random.default_rng(3)
    x, t = _f32(rng, 5, 9), rng.integers(0, 9, 5)
    _same_as_cpu(lambda a, b: F.cross_entropy(a, b, label_smoothing=0.1), [x, t])
    assert "cross_entropy_forward" not in calls


def test_embedding_backward(calls) -> None:
    rng = np.random.default_rng(4)
    idx, w = rng.integers(0, 7, (3, 10)), _f32(rng, 7, 5)  # ids repeat
    _same_as_cpu(F.embedding, [idx, w])
    assert calls["embedding_backward"] == 1


@pytest.mark.parametrize("shape", [(2, 3, 8, 4), (1, 2, 1100, 4)])  # the second: > tiled size
def test_causal_attention(calls, shape) -> None:
    rng = np.random.default_rng(5)
    q, k, v = (_f32(rng, *shape) for _ in range(3))
    _same_as_cpu(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True),
                 [q, k, v])  # fmt: skip
    assert calls["causal_softmax_forward"] == calls["causal_softmax_backward"] == 1


@pytest.mark.parametrize("mask", [False, True])
def test_large_attention_on_a_device_is_tiled_over_all_heads_at_once(
    calls, monkeypatch, mask: bool
) -> None:
    """Above _DEVICE_KEEP_SCORES the device keeps no (..., L, S) probabilities: the tiled
    path runs, each tile one batched product over every (batch, head)."""
    from handgrad.nn import attention as A

    monkeypatch.setattr(A, "_ATTN_BATCH_ALL", 0)  # the CPU tiles too, one head per item
    monkeypatch.setattr(A, "_DEVICE_KEEP_SCORES", 100)  # (2, 3, 12, 12) has 864 scores
    monkeypatch.setattr(A, "_ATTN_TILE", 5)  # 3 tiles, the last one short
    items = []
    forward_item = A._AttentionTiled._forward_item
    monkeypatch.setattr(A._AttentionTiled, "_forward_item",
                        lambda self, item, buf: (items.append(item), forward_item(self, item, buf)))  # fmt: skip
    rng = np.random.default_rng(8)
    q, k, v = (_f32(rng, 2, 3, 12, 4) for _ in range(3))
    if mask:
        allowed = rng.random((12, 12)) < 0.7
        np.fill_diagonal(allowed, True)  # no fully masked row
        attend = lambda a, b, c: F.scaled_dot_product_attention(  # noqa: E731
            a, b, c, attn_mask=hg.tensor(allowed).to(a.device)
        )
    else:
        attend = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True)  # noqa: E731
    fakecupy.stats.reset()
    _same_as_cpu(attend, [q, k, v])
    assert "causal_softmax_forward" not in calls
    assert () in items and items.count(()) == 1  # the device run: one item, all heads
    assert len(items) == 1 + 2 * 3  # the CPU run: one item per (batch, head)


def test_tiled_attention_dropout_on_a_device_draws_the_cpus_masks(calls, monkeypatch) -> None:
    """All heads form one item on a device, but each (batch, head) keeps its own dropout
    seed: the same masks, outputs and gradients as the CPU, and the host generator left in
    the same state (the next draw is the CPU's)."""
    from handgrad.nn import attention as A

    monkeypatch.setattr(A, "_ATTN_BATCH_ALL", 0)  # both tile: (2, 3, 12, 12) is 864 scores
    monkeypatch.setattr(A, "_DEVICE_KEEP_SCORES", 100)
    monkeypatch.setattr(A, "_ATTN_TILE", 5)
    rng = np.random.default_rng(9)
    q, k, v = (_f32(rng, 2, 3, 12, 4) for _ in range(3))

    def attend(a, b, c):  # type: ignore[no-untyped-def]
        return F.scaled_dot_product_attention(a, b, c, is_causal=True, dropout_p=0.3)

    runs = {}
    for device in ("cpu", "cuda"):
        hg.manual_seed(5)
        out, grads = _run(attend, [q, k, v], device)
        runs[device] = out, grads, hg.rand(4).numpy()
    (want, want_g, want_next), (got, got_g, got_next) = runs["cpu"], runs["cuda"]
    assert (want == 0).mean() > 0.05  # dropout did drop some of the output's terms
    _close(got, want, "output")
    for i, (g, w) in enumerate(zip(got_g, want_g)):
        _close(g, w, f"grad {i}")
    np.testing.assert_array_equal(got_next, want_next)


def test_attention_with_a_mask_takes_the_generic_path(calls) -> None:
    rng = np.random.default_rng(6)
    q, k, v = (_f32(rng, 2, 6, 4) for _ in range(3))
    mask = np.tril(np.ones((6, 6), bool))
    _same_as_cpu(
        lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=hg.tensor(mask).to(
            a.device)), [q, k, v])  # fmt: skip
    assert "causal_softmax_forward" not in calls


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adamw(calls, dtype: str) -> None:
    def run(device: str):
        hg.manual_seed(1)
        model = hg.nn.Sequential(hg.nn.Linear(8, 16), hg.nn.GELU("tanh"), hg.nn.Linear(16, 4))
        model.to(device, dtype)
        opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        x = hg.randn(5, 8).to(device)
        for _ in range(3):
            loss = (model(x).float() ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return [p.detach().to("cpu").float().numpy() for p in model.parameters()], opt

    want, _ = run("cpu")
    got, opt = run("cuda")
    assert calls["adamw_flat"] == 3 * 4
    for g, w in zip(got, want):
        _close(g, w, "parameter", 1e-5 if dtype == "float32" else 2**-7)
    for state in opt.state.values():
        assert isinstance(state["exp_avg"], fakecupy.ndarray)


def test_float64_and_host_arrays_never_reach_the_kernels(calls) -> None:
    x = np.random.default_rng(8).standard_normal((4, 6))
    _same_as_cpu(lambda t: F.gelu(t, approximate="tanh"), [x])  # float64 on the device
    a = hg.tensor(x.astype(np.float32), requires_grad=True)  # the host
    F.layer_norm(a, 6).sum().backward()
    assert calls == {}


def test_switching_kernels_off_falls_back(calls) -> None:
    rng = np.random.default_rng(9)
    x, w = _f32(rng, 4, 16), _f32(rng, 16)
    cuda.use_kernels(False)
    assert not cuda.kernels_enabled()
    _same_as_cpu(lambda a, b: F.layer_norm(F.gelu(a, approximate="tanh"), 16, b), [x, w])
    assert calls == {}
    cuda.use_kernels(True)
    _same_as_cpu(lambda a, b: F.layer_norm(F.gelu(a, approximate="tanh"), 16, b), [x, w])
    assert calls["gelu_tanh_forward"] == calls["layer_norm_forward"] == 1


def test_the_switch_reads_the_environment(monkeypatch) -> None:
    monkeypatch.setattr(cuda, "_kernels_on", None)
    monkeypatch.setenv("HANDGRAD_CUDA_KERNELS", "0")
    assert cuda.kernels_enabled() is False
    monkeypatch.setattr(cuda, "_kernels_on", None)
    monkeypatch.setenv("HANDGRAD_CUDA_KERNELS", "1")
    assert cuda.kernels_enabled() is True
    monkeypatch.setattr(cuda, "_kernels_on", None)
    monkeypatch.setenv("HANDGRAD_CUDA_KERNELS", "maybe")
    with pytest.raises(ValueError, match="HANDGRAD_CUDA_KERNELS='maybe': expected 0 or 1"):
        cuda.kernels_enabled()
    with pytest.raises(TypeError, match="use_kernels: expected True or False"):
        cuda.use_kernels("yes")


# ---- GPT-2 training steps through every kernel

CONFIG = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=50, dropout=0.0)


def _train(device: str, steps: int = 3, dtype: str = "float32", autocast=False, bias=True):
    hg.manual_seed(0)
    model = GPT2(GPT2Config(**CONFIG, dtype=dtype, bias=bias)).to(device)
    opt = AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    losses, syncs = [], []
    for step in range(steps):
        rng = np.random.default_rng(step)
        x, y = rng.integers(0, 50, (3, 16)), rng.integers(0, 50, (3, 16))
        fakecupy.stats.reset()
        with hg.autocast(hg.device(device).type, enabled=autocast):
            _, loss = model(hg.tensor(x).to(device), hg.tensor(y).to(device))
        opt.zero_grad()
        loss.backward()
        clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        syncs.append(fakecupy.stats.syncs)
    return losses, syncs


def test_gpt2_training_steps_use_every_kernel_and_match_the_cpu(calls) -> None:
    ran = set()
    for bias in (True, False):  # with biases, GELU takes c_fc's bias (bias_gelu)
        cpu_losses, _ = _train("cpu", bias=bias)
        losses, syncs = _train("cuda", bias=bias)
        np.testing.assert_allclose(losses, cpu_losses, rtol=1e-5)
        assert max(syncs) <= 1, f"host synchronisations per step: {syncs}"
        ran |= {name for name, n in calls.items() if n >= 3}
        calls.clear()
    # under bf16 autocast: bf16 products, the bf16 softmax kernels, the fused classifier
    cuda.use_bf16_matmul(True)
    assert cuda.bf16_matmul_enabled()  # its probe reads the device once, before the steps
    cpu_losses, _ = _train("cpu", autocast=True)
    losses, syncs = _train("cuda", autocast=True)
    # the same bf16 operands on both sides; what differs is the softmax's rounding of p to
    # bf16 (the CPU reference keeps it float32) and the order of float32 sums
    np.testing.assert_allclose(losses, cpu_losses, rtol=5e-3)
    assert max(syncs) <= 1, f"host synchronisations per step: {syncs}"
    assert calls["fused_classifier"] >= 3 and "cross_entropy_forward" not in calls
    ran |= {name for name, n in calls.items() if n >= 3}
    missing = set(fakecupy._LAUNCHERS) - ran
    assert not missing, f"kernels no GPT-2 step ran: {sorted(missing)}"


def test_autocast_step_on_the_device_multiplies_only_in_bf16(calls) -> None:
    cuda.use_bf16_matmul(True)
    cuda.GEMM_FLOPS.clear()
    _train("cuda", steps=1, autocast=True)
    flops = cuda.gemm_flops()
    assert set(flops) == {"bfloat16"}, flops


# ---- bfloat16 products on the device


def test_bf16_linear_multiplies_in_bf16_on_the_device(monkeypatch) -> None:
    products = []
    real_matmul = fakecupy.ndarray.__matmul__

    def matmul(a, b):
        products.append((a.dtype, b.dtype))
        return real_matmul(a, b)

    monkeypatch.setattr(fakecupy.ndarray, "__matmul__", matmul)
    rng = np.random.default_rng(10)
    x, w, b = _f32(rng, 2, 3, 8), _f32(rng, 5, 8), _f32(rng, 5)

    def run(device):
        ts = [hg.tensor(a).to(device, "bf16").requires_grad_() for a in (x, w, b)]
        out = F.linear(*ts)
        out.float().sum().backward()
        return out, [t.grad for t in ts]

    want, want_g = run("cpu")
    with fakecupy.installed(bf16_matmul=True):
        assert cuda.bf16_matmul_enabled(), cuda.bf16_matmul_error()
        got, got_g = run("cuda")
        assert got.dtype == hg.bfloat16 and all(g.dtype == hg.float32 for g in got_g)
        bf16 = np.dtype(hg.bfloat16)
        assert products and all(d == (bf16, bf16) for d in products), products
        _close(got.detach().to("cpu").float().numpy(), want.detach().float().numpy(), "y", 2**-7)
        for g, w_ in zip(got_g, want_g):
            _close(g.to("cpu").numpy(), w_.numpy(), "grad", 2**-7)
        products.clear()
        cuda.use_bf16_matmul(False)
        run("cuda")
        assert all(d == (np.float32, np.float32) for d in products), products


def test_a_failing_bf16_probe_keeps_float32_products(monkeypatch) -> None:
    monkeypatch.setattr(cuda, "_probe_bf16_matmul", lambda cp: (False, "TypeError: no bf16"))
    with fakecupy.installed(bf16_matmul=True):
        assert not cuda.bf16_matmul_enabled()
        assert cuda.bf16_matmul_error() == "TypeError: no bf16"
        x = hg.randn(3, 4).to("cuda", "bf16")
        w = hg.randn(2, 4).to("cuda", "bf16")
        assert F.linear(x, w).dtype == hg.bfloat16


# ---- on a real GPU: each op's kernel path against CuPy's generic path

gpu = pytest.mark.skipif(not cuda.is_available(), reason="no CUDA GPU (or no CuPy)")


def _both_paths(fn, arrays, grad=None):
    """fn's output and input grads with kernels on, then off, on the GPU."""
    results = []
    for on in (True, False):
        cuda.use_kernels(on)
        try:
            results.append(_run(fn, arrays, "cuda", grad))
        finally:
            cuda.use_kernels(True)
    return results


GPU_CASES = {
    "layer_norm": (lambda a, w, b: F.layer_norm(a, 768, w, b), [(8, 64, 768), (768,), (768,)]),
    "gelu_tanh": (lambda a: F.gelu(a, approximate="tanh"), [(8, 64, 3072)]),
    "attention": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                  [(2, 12, 256, 64)] * 3),
    "cross_entropy": (lambda a, t: F.cross_entropy(a, t), [(512, 50257), "targets"]),
    "embedding": (F.embedding, ["ids", (50257, 768)]),
}  # fmt: skip


@pytest.mark.cuda
@gpu
@pytest.mark.parametrize("op", sorted(GPU_CASES))
def test_gpu_kernel_path_matches_the_generic_path(op: str) -> None:
    fn, shapes = GPU_CASES[op]
    rng = np.random.default_rng(11)
    arrays = []
    for s in shapes:
        if s == "targets":
            arrays.append(rng.integers(0, 50257, 512))
        elif s == "ids":
            arrays.append(rng.integers(0, 50257, (8, 64)))
        else:
            arrays.append(_f32(rng, *s))
    (out_k, g_k), (out_g, g_g) = _both_paths(fn, arrays)
    _close(out_k, out_g, f"{op} output", 1e-4)
    for i, (a, b) in enumerate(zip(g_k, g_g)):
        if b is not None:
            _close(a, b, f"{op} grad {i}", 1e-4)


@pytest.mark.cuda
@gpu
def test_gpu_adamw_kernel_matches_the_generic_path() -> None:
    results = []
    for on in (True, False):
        cuda.use_kernels(on)
        try:
            hg.manual_seed(2)
            lin = hg.nn.Linear(256, 512).to("cuda", "bf16")
            opt = AdamW(lin.parameters(), lr=1e-2, weight_decay=0.1)
            x = hg.randn(64, 256).to("cuda", "bf16")
            for _ in range(3):
                loss = (lin(x).float() ** 2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            results.append([opt.state[p]["master"].get() for p in lin.parameters()])
        finally:
            cuda.use_kernels(True)
    for a, b in zip(*results):
        _close(a, b, "master weights", 1e-5)


@pytest.mark.cuda
@gpu
def test_gpu_bf16_linear_matches_float32() -> None:
    rng = np.random.default_rng(12)
    x, w = _f32(rng, 512, 768), _f32(rng, 3072, 768)
    assert cuda.bf16_matmul_enabled(), f"bf16 matmul unusable: {cuda.bf16_matmul_error()}"
    got = F.linear(hg.tensor(x).to("cuda", "bf16"), hg.tensor(w).to("cuda", "bf16"))
    want = F.linear(hg.tensor(x).to("bf16").float(), hg.tensor(w).to("bf16").float())
    _close(got.to("cpu").float().numpy(), want.numpy(), "bf16 linear", 2**-7)


@pytest.mark.cuda
@gpu
def test_gpu_tiled_attention_matches_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path a GPU takes above _DEVICE_KEEP_SCORES (tiles over all heads, p recomputed
    in backward), forced at a smaller size, against the CPU."""
    from handgrad.nn import attention as A

    monkeypatch.setattr(A, "_DEVICE_KEEP_SCORES", 0)
    rng = np.random.default_rng(13)
    arrays = [_f32(rng, 2, 12, 512, 64) for _ in range(3)]

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    want, want_g = _run(attend, arrays, "cpu")
    got, got_g = _run(attend, arrays, "cuda")
    _close(got, want, "output", 1e-4)
    for i, (g, w) in enumerate(zip(got_g, want_g)):
        _close(g, w, f"grad {i}", 1e-4)


def test_gemm_flops_count_what_ran_on_the_device():
    with fakecupy.installed():
        cuda.GEMM_FLOPS.clear()
        hg.manual_seed(0)
        cfg = GPT2Config(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)
        model = GPT2(cfg).to("cuda")
        x = hg.tensor(np.zeros((2, 8), dtype=np.int64), device="cuda")
        _, loss = model(x, x)
        forward = cuda.gemm_flops()
        loss.backward()
        both = cuda.gemm_flops()
    # forward: c_attn, c_proj, c_fc, mlp c_proj and the tied classifier, 2 m n k each
    m, C, V = 16, 16, 32
    linears = 2 * m * (C * 3 * C + C * C + C * 4 * C + 4 * C * C + C * V)
    assert forward["float32"] >= linears and set(forward) == {"float32"}
    assert both["float32"] >= 3 * linears  # backward: dx and dW of each
    assert cuda.gemm_flops().get("bfloat16", 0.0) == 0  # float32 activations: no bf16 product
    cuda.GEMM_FLOPS.clear()
    assert cuda.gemm_flops() == {}


@pytest.mark.cuda
@gpu
def test_gpu_autocast_steps_match_the_cpu_reference() -> None:
    """Three GPT-2 steps under bf16 autocast on the GPU (bf16 cuBLAS products, the bf16
    softmax, lse and recompute kernels, bias + GELU, residual + layer norm, the fused
    classifier) against the CPU's reference path, as the stand-in test above does."""
    cpu_losses, _ = _train("cpu", autocast=True)
    cuda.GEMM_FLOPS.clear()
    losses, _ = _train("cuda", autocast=True)
    assert set(cuda.gemm_flops()) == {"bfloat16"}, cuda.gemm_flops()
    np.testing.assert_allclose(losses, cpu_losses, rtol=5e-3)
