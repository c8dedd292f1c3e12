"""handgrad's CUDA kernels run on the CPU: each kernel's real CUDA C source, as
``handgrad/kernels/cuda_sources.py`` ships it, compiled by g++ as C++20 with
``cuda_emul/cuda_emul.h`` standing in for CUDA (one ``std::thread`` per CUDA thread of a
block, ``std::barrier`` for ``__syncthreads`` and the warps' shuffles; see that header).

``Emulator.RawKernel`` has ``cupy.RawKernel``'s constructor and call, so the project's own
launchers (``handgrad.kernels.cuda``: their grids, blocks and argument packing) run
unchanged on the CuPy stand-in's arrays (``tests/fakecupy.py``) or on NumPy arrays:

    kernel(grid, block, args, shared_mem=0)

packs ``args`` as ``cuLaunchKernel`` does (one pointer per parameter, to the parameter's
value) after checking each against the parameter the compiled kernel declares (a device
array for a pointer, a NumPy scalar of the same kind and size for a value). Each array is
copied into a buffer with guard bytes on both sides, launched on, checked (a kernel that
wrote outside its arrays fails the launch) and copied back; arguments that are the same
array share one buffer, as an in-place kernel needs. The guards hold NaN patterns, so a
read past an array's end shows as NaN in the results.

Kernels are built together into one shared library (each source inside a namespace of its
own, so that their common helpers do not clash: one g++ run instead of one per kernel),
cached by the hash of the sources, the header and the flags, and loaded with ctypes.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

HEADER_DIR = Path(__file__).resolve().parent / "cuda_emul"
CXX = os.environ.get("CXX", "g++")
FLAGS = ("-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-Wall", "-Wno-unused-function")
GUARD = 4096  # bytes on each side of every array
_PATTERN = {1: 0xA5, 2: 0x7FC5, 4: 0x7FC5A5A5, 8: 0x7FF8A5A5A5A5A5A5}  # NaN as a float


@functools.cache
def unavailable() -> str | None:
    """Why kernels cannot be emulated here (no g++, or one without C++20's <barrier>), or
    None when they can."""
    exe = shutil.which(CXX)
    if exe is None:
        return f"no C++ compiler {CXX!r} on PATH (the CUDA emulation needs g++ with C++20)"
    probe = "#include <barrier>\n#include <atomic>\nint main() { std::barrier b(1); float f = 0;"
    probe += " std::atomic_ref<float>(f).fetch_add(1.0f); b.arrive_and_wait(); }\n"
    r = subprocess.run(
        [exe, "-std=c++20", "-pthread", "-fsyntax-only", "-x", "c++", "-"],
        input=probe,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        tail = r.stderr.strip().splitlines()[-1:] or ["?"]
        return f"{CXX} cannot compile C++20 <barrier> / std::atomic_ref: {tail[0]}"
    return None


def translation_unit(kernels: dict[str, str]) -> str:
    """The C++ g++ compiles: the header, then each kernel's CUDA source, unchanged, in a
    namespace of its own, and its entry points."""
    parts = ['#include "cuda_emul.h"']
    for name, code in kernels.items():
        parts += [f"namespace hg_{name} {{", f'#line 1 "{name}.cu"', code, "}",
                  f'#line 1 "{name}.entry"', f"HG_EXPORT_KERNEL(hg_{name}::{name}, {name})"]  # fmt: skip
    return "\n".join(parts) + "\n"


def build(kernels: dict[str, str], cache_dir: Path) -> Path:
    """The shared library of ``kernels`` (name -> CUDA source), compiled unless cached. A
    lock file lets one process build it while the others (pytest-xdist workers) wait."""
    header = (HEADER_DIR / "cuda_emul.h").read_bytes()
    tu = translation_unit(kernels)
    key = hashlib.sha256(header + tu.encode() + " ".join((CXX, *FLAGS)).encode()).hexdigest()
    so = cache_dir / f"kernels-{key[:24]}.so"
    if so.exists():
        return so
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(so.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if so.exists():
            return so
        tmp = so.with_suffix(f".{os.getpid()}.tmp")
        r = subprocess.run(
            [CXX, *FLAGS, "-I", str(HEADER_DIR), "-x", "c++", "-", "-o", str(tmp)],
            input=tu,
            capture_output=True,
            text=True,
            timeout=600,
        )
        if r.returncode != 0:
            raise RuntimeError(f"g++ could not compile {sorted(kernels)} as C++:\n{r.stderr}")
        os.replace(tmp, so)
    return so


class Module:
    """The kernels of one shared library."""

    def __init__(self, kernels: dict[str, str], cache_dir: Path) -> None:
        self.sources = dict(kernels)
        self.lib = ctypes.CDLL(str(build(self.sources, cache_dir)))
        self.flushes_denormals = bool(self.lib.hg_flushes_denormals())

    def kernel(self, name: str, timeout_s: float = 60.0) -> Kernel:
        return Kernel(self, name, timeout_s)


class LaunchError(RuntimeError):
    """What CUDA would report (an invalid configuration), or what the emulation caught."""


def _array(a: Any) -> np.ndarray | None:
    """The NumPy array under a device array (the CuPy stand-in's or a NumPy one)."""
    if isinstance(a, np.ndarray):
        return a
    inner = getattr(a, "_a", None)  # fakecupy.ndarray
    return inner if isinstance(inner, np.ndarray) else None


def _dims(d: Any) -> tuple[int, int, int]:
    d = (d,) if isinstance(d, int | np.integer) else tuple(d)
    if not 1 <= len(d) <= 3:
        raise LaunchError(f"a grid or block has 1 to 3 dimensions, got {d}")
    return (*(int(v) for v in d), *(1,) * (3 - len(d)))


class Kernel:
    """One compiled kernel; calls it as ``cupy.RawKernel.__call__`` does."""

    def __init__(self, module: Module, name: str, timeout_s: float = 60.0) -> None:
        self.name, self.timeout_s, self.code = name, timeout_s, module.sources[name]
        signature = getattr(module.lib, f"hg_signature_{name}")
        signature.restype = ctypes.c_char_p
        self._launch = getattr(module.lib, f"hg_launch_{name}")
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [
            ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint), ctypes.c_uint,
            ctypes.POINTER(ctypes.c_void_p), ctypes.c_double, ctypes.c_char_p, ctypes.c_int,
        ]  # fmt: skip
        self.params = signature().decode().split(",")
        self.flushes_denormals = module.flushes_denormals
        self.launches: list[tuple[tuple[int, ...], tuple[int, ...]]] = []

    def __call__(self, grid: Any, block: Any, args: tuple, *, shared_mem: int = 0, **_: Any):
        g, b = _dims(grid), _dims(block)
        if len(args) != len(self.params):
            raise LaunchError(f"{self.name}: {len(args)} arguments for {len(self.params)} params")
        values: list[np.ndarray] = []  # each parameter's value, as bytes the pointer points at
        buffers: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        for i, (param, a) in enumerate(zip(self.params, args)):
            arr = _array(a)
            if param.startswith("*"):
                if arr is None:
                    raise LaunchError(f"{self.name} arg {i} ({param}): {type(a).__name__}")
                self._check_kind(i, param[1:], arr.dtype)
                if not arr.flags.c_contiguous:
                    raise LaunchError(f"{self.name} arg {i}: not C-contiguous")
                key = (arr.__array_interface__["data"][0], arr.nbytes)
                for other in buffers:
                    if other != key and _overlap(key, other):
                        raise LaunchError(f"{self.name} arg {i} partly overlaps another")
                if key not in buffers:
                    buffers[key] = (arr, _guarded(arr))
                ptr = buffers[key][1].ctypes.data + GUARD
                values.append(np.array([ptr], dtype=np.uintp))
            else:
                if not isinstance(a, np.generic):
                    raise LaunchError(
                        f"{self.name} arg {i} ({param}): pass a NumPy scalar, not "
                        f"{type(a).__name__} (its C type would be CuPy's guess)"
                    )
                self._check_kind(i, param, a.dtype)
                values.append(np.array([a]))
        ptrs = (ctypes.c_void_p * max(1, len(values)))(*(v.ctypes.data for v in values))
        err = ctypes.create_string_buffer(1024)
        self.launches.append((g, b))
        rc = self._launch(
            (ctypes.c_uint * 3)(*g), (ctypes.c_uint * 3)(*b), shared_mem, ptrs,
            self.timeout_s, err, len(err),
        )  # fmt: skip
        for i, (arr, buf) in enumerate(buffers.values()):
            lo, hi = buf[:GUARD], buf[GUARD + arr.nbytes :]
            if not (np.array_equal(lo, _guard_bytes(arr)) and np.array_equal(hi, lo)):
                side = "before" if not np.array_equal(lo, _guard_bytes(arr)) else "after"
                raise LaunchError(f"{self.name}: wrote {side} array {i} of shape {arr.shape}")
            arr.reshape(-1).view(np.uint8)[...] = buf[GUARD : GUARD + arr.nbytes]
        if rc != 0:
            raise LaunchError(f"{self.name}: {err.value.decode()}")

    def _check_kind(self, i: int, code: str, dtype: np.dtype) -> None:
        want = (code[0], int(code[1:]))
        if code[0] == "E":  # __nv_bfloat16: ml_dtypes.bfloat16, or its raw 16 bits
            ok = dtype.itemsize == 2 and dtype.kind in "Vu"
        else:
            ok = (dtype.kind, dtype.itemsize) == want
        if not ok:
            raise LaunchError(f"{self.name} arg {i}: {dtype} for a parameter of type {code}")


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return a[0] < b[0] + b[1] and b[0] < a[0] + a[1]


@functools.cache
def _guard_pattern(itemsize: int) -> np.ndarray:
    unit = np.array([_PATTERN[itemsize]], dtype=f"<u{itemsize}").view(np.uint8)
    return np.tile(unit, GUARD // itemsize)


def _guard_bytes(arr: np.ndarray) -> np.ndarray:
    return _guard_pattern(arr.itemsize if arr.itemsize in _PATTERN else 1)


def _guarded(arr: np.ndarray) -> np.ndarray:
    """Guard bytes, the array's bytes, guard bytes."""
    g = _guard_bytes(arr)
    return np.concatenate([g, arr.reshape(-1).view(np.uint8), g])


class Emulator:
    """A ``cupy.RawKernel`` stand-in that runs kernels in the CPU emulation. ``sources``
    (name -> CUDA source) are built together on the first kernel asked for; a kernel asked
    for with any other source is built alone. ``kernels`` holds each kernel made, by name
    (with its launches)."""

    def __init__(
        self, cache_dir: Path, sources: dict[str, str] | None = None, timeout_s: float = 60.0
    ) -> None:
        self.cache_dir, self.sources, self.timeout_s = cache_dir, dict(sources or {}), timeout_s
        self.module: Module | None = None
        self.kernels: dict[str, Kernel] = {}

    def RawKernel(self, code: str, name: str, options: tuple = (), **_: Any) -> Kernel:  # noqa: N802
        if self.sources.get(name) == code:
            if self.module is None:
                self.module = Module(self.sources, self.cache_dir)
            module = self.module
        else:
            module = Module({name: code}, self.cache_dir)
        k = module.kernel(name, self.timeout_s)
        self.kernels[name] = k
        return k

    def launches(self, name: str) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
        k = self.kernels.get(name)
        return k.launches if k else []
