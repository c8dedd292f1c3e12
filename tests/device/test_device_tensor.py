"""Tensors on a device, through the CuPy stand-in: ``.device``, ``.to``, ``.cuda``, ``.cpu``,
creation with ``device=``, the same-device check of ops, and autograd across a copy. The
stand-in refuses implicit conversion to NumPy and counts host synchronisations, so a leak of
device data into NumPy fails here as it would on a GPU."""

from __future__ import annotations

import fakecupy
import numpy as np
import pytest

import handgrad as hg


@pytest.fixture
def cp():
    with fakecupy.installed() as ns:
        yield ns


A = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5


def test_device_property_and_round_trip(cp) -> None:
    t = hg.tensor(A)
    assert t.device == hg.device("cpu") and not t.is_cuda
    d = t.to("cuda")
    assert isinstance(d.data, cp.ndarray) and d.device == hg.device("cuda:0") and d.is_cuda
    assert d.to("cuda") is d and d.to("cuda:0") is d and t.to("cpu") is t
    back = d.cpu()
    assert type(back.data) is np.ndarray and back.device == hg.device("cpu")
    np.testing.assert_array_equal(back.numpy(), A)
    assert t.cuda().device == hg.device("cuda:0") and t.cuda(0).device == hg.device("cuda:0")
    assert t.to(hg.device("cuda", 0)).is_cuda and t.to(0).is_cuda


def test_to_with_dtype_device_or_both(cp) -> None:
    t = hg.tensor(A)
    assert t.to("bf16").dtype == hg.bfloat16 and t.to("bf16").device == hg.device("cpu")
    for both in (t.to("cuda", "bf16"), t.to(hg.bfloat16, "cuda"), t.to(device="cuda", dtype="bf16")):  # fmt: skip
        assert both.dtype == hg.bfloat16 and isinstance(both.data, cp.ndarray)
    widened = t.to("bf16").to("cuda", hg.float64)
    assert widened.dtype == hg.float64 and widened.is_cuda
    like = hg.zeros(1, dtype="float16").to("cuda")
    assert t.to(like).dtype == hg.float16 and t.to(like).is_cuda
    np.testing.assert_array_equal(t.to("cuda", "float64").numpy(), A.astype(np.float64))


def test_to_errors_name_the_problem(cp) -> None:
    t = hg.tensor(A)
    with pytest.raises(TypeError, match="device given twice"):
        t.to("cuda", "cpu")
    with pytest.raises(TypeError, match="dtype given twice"):
        t.to("bf16", "float32")
    with pytest.raises(TypeError, match="unexpected keyword argument 'non_blocking_typo'"):
        t.to("cuda", non_blocking_typo=True)
    with pytest.raises(TypeError, match="'cuda0' is neither a device"):
        t.to("cuda0")
    with pytest.raises(RuntimeError, match="cuda:2 does not exist: 1 GPU"):
        t.to("cuda:2")


def test_numpy_copies_to_the_host_with_one_sync(cp) -> None:
    d = hg.tensor(A, device="cuda")
    fakecupy.stats.reset()
    host = d.numpy()
    assert type(host) is np.ndarray and fakecupy.stats.syncs == 1
    np.testing.assert_array_equal(host, A)
    assert d.sum().item() == pytest.approx(float(A.sum()))
    assert "tensor([[-2.5" in repr(d)  # printing copies to the host, explicitly


def test_creation_on_the_device(cp) -> None:
    fakecupy.stats.reset()
    made = [
        hg.zeros(2, 3, device="cuda"),
        hg.ones((2, 3), device="cuda"),
        hg.empty(2, 3, device="cuda"),
        hg.full((2, 3), 7.0, device="cuda"),
        hg.arange(6, device="cuda"),
        hg.zeros_like(hg.tensor(A), device="cuda"),
        hg.ones_like(hg.tensor(A), device="cuda"),
        hg.tensor([[1.0, 2.0]], device="cuda"),
        hg.tensor(3, device="cuda"),
    ]
    for t in made:
        assert isinstance(t.data, cp.ndarray) and t.device == hg.device("cuda:0")
    assert fakecupy.stats.syncs == 0
    assert made[3].numpy().tolist() == [[7.0] * 3] * 2 and made[4].dtype == hg.int64
    assert made[7].dtype == hg.float32 and made[8].dtype == hg.int64
    d = hg.tensor(A, device="cuda")
    assert hg.zeros_like(d).is_cuda and hg.ones_like(d, dtype="bf16").is_cuda
    assert hg.tensor(d).is_cuda and type(hg.tensor(d, device="cpu").data) is np.ndarray
    assert hg.tensor(A, requires_grad=True, device="cuda").requires_grad


def test_random_tensors_are_the_same_on_every_device(cp) -> None:
    hg.manual_seed(5)
    host_n, host_u = hg.randn(4, 5).numpy(), hg.rand(3, dtype="bf16").numpy()
    hg.manual_seed(5)
    dev_n, dev_u = hg.randn(4, 5, device="cuda"), hg.rand(3, dtype="bf16", device="cuda")
    assert dev_n.is_cuda and dev_u.is_cuda and dev_u.dtype == hg.bfloat16
    np.testing.assert_array_equal(dev_n.numpy(), host_n)
    np.testing.assert_array_equal(dev_u.numpy(), host_u)


@pytest.mark.parametrize(
    "op, name",
    [
        (lambda a, b: a + b, "Add"),
        (lambda a, b: a @ b.T, "MatMul"),
        (lambda a, b: hg.cat([a, b]), "Cat"),
        (lambda a, b: hg.where(a > 0, a, b), "Where"),
    ],
)
def test_mixing_devices_raises_naming_both(cp, op, name) -> None:
    a, b = hg.tensor(A), hg.tensor(A, device="cuda")
    with pytest.raises(RuntimeError, match=f"{name}: expected all tensors on the same device, got cpu and cuda:0"):  # fmt: skip
        op(a, b)
    with pytest.raises(RuntimeError, match="got cuda:0 and cpu"):
        op(b, a)


def test_scalars_meet_device_tensors(cp) -> None:
    d = hg.tensor(A, device="cuda")
    for out in (d + 2.0, 2 * d, d / np.float32(4.0), d * hg.tensor(3.0), hg.tensor(3.0) - d):
        assert out.is_cuda and out.shape == (2, 3)
    np.testing.assert_array_equal((hg.tensor(3.0) - d).numpy(), 3.0 - A)
    assert (hg.tensor(2.0, device="cuda") * hg.tensor(3.0)).is_cuda  # 0-d on both sides


def test_autograd_on_the_device_without_syncs(cp) -> None:
    x = hg.tensor(A, requires_grad=True, device="cuda")
    w = hg.tensor(np.eye(3, dtype=np.float32) * 2, requires_grad=True, device="cuda")
    fakecupy.stats.reset()
    h = (x @ w).tanh()
    y = (hg.cat([h, h[[1, 0]]], dim=0).softmax(-1) * h.exp()[:, :1].sum()).sum()
    y.backward()
    assert fakecupy.stats.syncs == 0
    assert x.grad.is_cuda and w.grad.is_cuda

    xc = hg.tensor(A, requires_grad=True)
    wc = hg.tensor(np.eye(3, dtype=np.float32) * 2, requires_grad=True)
    hc = (xc @ wc).tanh()
    (hg.cat([hc, hc[[1, 0]]], dim=0).softmax(-1) * hc.exp()[:, :1].sum()).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), xc.grad.numpy(), rtol=1e-6)
    np.testing.assert_allclose(w.grad.numpy(), wc.grad.numpy(), rtol=1e-6)


def test_gradient_flows_back_across_the_copy(cp) -> None:
    x = hg.tensor(A, requires_grad=True)
    y = x.to("cuda", "bf16")
    assert y.requires_grad and y.is_cuda
    (y.float() * y.float()).sum().backward()
    assert type(x.grad.data) is np.ndarray and x.grad.dtype == hg.float32
    np.testing.assert_allclose(x.grad.numpy(), 2 * A, rtol=1e-2)
    d = hg.tensor(A, requires_grad=True, device="cuda")
    d.cpu().sum().backward()
    assert d.grad.is_cuda
    np.testing.assert_array_equal(d.grad.numpy(), np.ones_like(A))


def test_backward_gradient_indexing_and_assignment_across_devices(cp) -> None:
    d = hg.tensor(A, requires_grad=True, device="cuda")
    (d * 2).backward(hg.tensor(np.ones_like(A)))  # a host gradient is copied to the device
    assert d.grad.is_cuda
    np.testing.assert_array_equal(d.grad.numpy(), np.full_like(A, 2.0))
    e = hg.tensor(A, device="cuda")
    picked = e[hg.tensor([1, 0])]  # a host index tensor is copied to the device
    assert picked.is_cuda
    np.testing.assert_array_equal(picked.numpy(), A[[1, 0]])
    np.testing.assert_array_equal(e[e > 0].numpy(), A[A > 0])
    e[0] = hg.tensor([9.0, 9.0, 9.0])  # a host value is copied to the device
    e[1, 1:] = np.array([7.0, 7.0], dtype=np.float32)
    np.testing.assert_array_equal(e.numpy(), [[9, 9, 9], [A[1, 0], 7, 7]])
    h = hg.tensor(A)
    np.testing.assert_array_equal(h[hg.tensor([1], device="cuda")].numpy(), A[[1]])


def test_cuda_module_at_the_top_level(cp) -> None:
    assert hg.cuda.is_available() and hg.cuda.device_count() == 1
    hg.cuda.synchronize()


def test_save_on_a_device_and_load_onto_one(cp, tmp_path) -> None:
    state = {"w": hg.tensor(A, device="cuda"), "b": hg.tensor(A[0], dtype="bf16")}
    hg.save(state, tmp_path / "s.safetensors")
    back = hg.load(tmp_path / "s.safetensors")
    assert type(back["w"].data) is np.ndarray and back["b"].dtype == hg.bfloat16
    np.testing.assert_array_equal(back["w"].numpy(), A)
    on = hg.load(tmp_path / "s.safetensors", device="cuda")
    assert on["w"].is_cuda and on["b"].is_cuda and on["b"].dtype == hg.bfloat16


def test_a_cpu_scalar_tensor_gets_its_gradient_on_the_cpu(cp) -> None:
    s = hg.tensor(2.0, requires_grad=True)
    d = hg.tensor(A, requires_grad=True, device="cuda")
    (d * s).sum().backward()
    assert type(s.grad.data) is np.ndarray and d.grad.is_cuda
    assert s.grad.item() == pytest.approx(float(A.sum()))
    np.testing.assert_array_equal(d.grad.numpy(), np.full_like(A, 2.0))


def test_cuda_without_cupy_or_with_a_bad_name_is_one_clear_error(monkeypatch) -> None:
    from handgrad.backend import cuda

    monkeypatch.setattr(cuda, "_cupy", None)
    monkeypatch.setattr(cuda, "_cupy_error", "No module named 'cupy'")
    for make in (
        lambda: hg.zeros(2, device="cuda"),
        lambda: hg.randn(2, device="cuda:0"),
        lambda: hg.tensor([1.0]).cuda(),
        lambda: hg.nn.Linear(2, 2).to("cuda"),
    ):
        with pytest.raises(RuntimeError, match="CUDA is not available: no CuPy"):
            make()
    with pytest.raises(ValueError, match="unknown device type in 'tpu'"):
        hg.ones(2, device="tpu")
