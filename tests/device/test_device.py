"""handgrad.backend.device and handgrad.backend.cuda: parsing, equality, errors, moving arrays."""

from __future__ import annotations

import fakecupy
import numpy as np
import pytest

from handgrad.backend import cuda
from handgrad.backend.device import as_device, device, device_of, to_device


@pytest.mark.parametrize(
    "spec, kind, index, text",
    [
        ("cpu", "cpu", None, "cpu"),
        ("cuda", "cuda", None, "cuda"),
        ("cuda:0", "cuda", 0, "cuda:0"),
        ("cuda:1", "cuda", 1, "cuda:1"),
        ("cpu:0", "cpu", 0, "cpu:0"),
    ],
)
def test_parse(spec: str, kind: str, index: int | None, text: str) -> None:
    d = device(spec)
    assert (d.type, d.index, str(d)) == (kind, index, text)
    assert device(d) == d and device(str(d)) == d


def test_repr_as_torch() -> None:
    assert repr(device("cuda:1")) == "device(type='cuda', index=1)"
    assert repr(device("cpu")) == "device(type='cpu')"


def test_equality_and_hashing() -> None:
    assert device("cuda", 1) == device("cuda:1") == device(1)
    assert device("cuda") != device("cuda:0")  # torch: no index is "the current GPU"
    assert device("cpu") != device("cuda")
    assert device("cuda:2") == "cuda:2" and device("cpu") != "gpu"
    assert len({device("cuda:1"), device("cuda", 1), device("cpu"), device("cpu")}) == 2
    assert {device("cuda:0"): "a"}[device("cuda", 0)] == "a"


@pytest.mark.parametrize(
    "spec, words",
    [
        ("gpu", "unknown device type in 'gpu'"),
        ("cuda:x", "invalid device index in 'cuda:x'"),
        ("cuda:-1", "invalid device index in 'cuda:-1'"),
        ("cpu:1", "only index 0, got 'cpu:1'"),
        ("", "unknown device type in ''"),
    ],
)
def test_parse_errors_name_the_string(spec: str, words: str) -> None:
    with pytest.raises(ValueError, match=words.replace("(", r"\(")):
        device(spec)


def test_other_errors() -> None:
    with pytest.raises(TypeError, match="expected a string"):
        device(1.5)
    with pytest.raises(ValueError, match="index given twice"):
        device("cuda:1", 2)
    with pytest.raises(ValueError, match="index must be an int >= 0"):
        device("cuda", -3)


def test_cpu_arrays() -> None:
    a = np.arange(3.0)
    assert device_of(a) == device("cpu") and device_of(np.float32(1)) == device("cpu")
    assert to_device(a, "cpu") is a and to_device(a, None) is a
    assert as_device(None) == device("cpu")


def test_cuda_without_cupy_says_no_cupy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "_cupy", None)
    monkeypatch.setattr(cuda, "_cupy_error", "No module named 'cupy'")
    assert cuda.is_available() is False and cuda.device_count() == 0
    with pytest.raises(RuntimeError, match="CUDA is not available: no CuPy"):
        to_device(np.ones(2), "cuda")


def use_cupy_without_gpu(monkeypatch: pytest.MonkeyPatch, error: str) -> None:
    """Make handgrad see a CuPy whose device count raises ``RuntimeError(error)``, as CuPy's
    does without a GPU or driver."""

    def count() -> int:
        raise RuntimeError(error)

    fake = type(fakecupy.namespace)("nogpu")
    fake.cuda = type(fakecupy.namespace.cuda)(runtime=type(fakecupy.namespace.cuda)())
    fake.cuda.runtime.getDeviceCount = count
    monkeypatch.setattr(cuda, "_cupy", fake)


def test_cuda_without_gpu_says_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    use_cupy_without_gpu(monkeypatch, "cudaErrorNoDevice")
    assert cuda.device_count() == 0 and not cuda.is_available()
    with pytest.raises(RuntimeError, match="CUDA is not available: no GPU"):
        to_device(np.ones(2), device("cuda:0"))


def test_a_cupy_that_fails_to_load_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not only ImportError: a CuPy whose CUDA libraries do not match raises others."""

    def broken(name: str) -> None:
        raise OSError("libnvrtc.so.13: cannot open shared object file")

    monkeypatch.setattr(cuda, "_cupy", None)
    monkeypatch.setattr(cuda, "_cupy_error", None)
    monkeypatch.setattr(cuda.importlib, "import_module", broken)
    assert cuda.is_available() is False
    assert cuda.import_error() == "OSError: libnvrtc.so.13: cannot open shared object file"
    with pytest.raises(RuntimeError, match="no CuPy .* OSError: libnvrtc"):
        cuda.require()
    info = cuda.describe()
    assert info["cupy"].startswith("not importable: OSError") and "numpy" in info


def test_describe_reports_what_it_cannot_read() -> None:
    with fakecupy.installed():  # the stand-in has no runtime versions nor device properties
        info = cuda.describe()
    assert info["device_count"] == 1 and info["numpy"] == np.__version__
    for key in ("cuda_runtime", "cuda_driver", "gpus"):
        assert "Error" in info[key], (key, info[key])


def test_bf16_arrays_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    with fakecupy.installed():
        assert cuda.bf16_arrays_supported() == (True, None)
    with fakecupy.installed() as cp:

        def refuse(a, *args, **kwargs):
            if a.dtype.name == "bfloat16":
                raise TypeError("Unsupported dtype bfloat16")
            return fakecupy.asarray(a, *args, **kwargs)

        monkeypatch.setattr(cp, "asarray", refuse)
        ok, why = cuda.bf16_arrays_supported()
        assert ok is False and why == "TypeError: Unsupported dtype bfloat16"


def test_matmul_precision_with_cupy_but_no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """CuPy's TF32 setter asks the GPU for its capability: without a GPU only CUPY_TF32 is
    set, and nothing raises (the error there was cudaErrorInsufficientDriver)."""
    use_cupy_without_gpu(monkeypatch, "cudaErrorInsufficientDriver")
    monkeypatch.setenv("CUPY_TF32", "0")
    cuda.set_matmul_precision("high")
    assert cuda.os.environ["CUPY_TF32"] == "1"
    cuda.set_matmul_precision("highest")
    assert cuda.os.environ["CUPY_TF32"] == "0"
    with pytest.raises(RuntimeError, match="no GPU .*cudaErrorInsufficientDriver"):
        cuda.require()


def test_missing_gpu_index_is_named() -> None:
    with fakecupy.installed():
        assert cuda.is_available() and cuda.device_count() == 1
        with pytest.raises(RuntimeError, match="cuda:3 does not exist: 1 GPU"):
            to_device(np.ones(2), "cuda:3")


def test_round_trip_through_a_device() -> None:
    with fakecupy.installed() as cp:
        a = np.arange(6, dtype=np.float32).reshape(2, 3)
        d = to_device(a, "cuda")
        assert isinstance(d, cp.ndarray) and device_of(d) == device("cuda:0")
        assert to_device(d, "cuda:0") is d  # already there: no copy
        with pytest.raises(TypeError, match="Implicit conversion"):
            np.asarray(d)
        back = to_device(d * 2, "cpu")
        assert type(back) is np.ndarray and back.dtype == np.float32
        np.testing.assert_array_equal(back, a * 2)
        assert fakecupy.stats.syncs == 1 and fakecupy.stats.uploads == 1


@pytest.mark.cuda
@pytest.mark.skipif(not cuda.is_available(), reason="no CUDA GPU (or no CuPy)")
def test_real_gpu_round_trip() -> None:
    a = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    d = to_device(a, "cuda:0")
    assert device_of(d) == device("cuda:0") and type(d).__module__.startswith("cupy")
    np.testing.assert_array_equal(to_device(d, "cpu"), a)
