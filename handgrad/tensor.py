"""Tensor and reverse-mode automatic differentiation.

A ``Tensor`` wraps one backend array (``xp``). Every differentiable op is a ``Function``
with a ``forward`` on arrays and a hand-derived ``backward`` that maps the gradient of the
output, ``g = dL/dout``, to the gradients of the inputs. Calling an op records the
``Function`` on its output (``out._ctx``); ``loss.backward()`` walks that graph once, in
reverse topological order, without recursion.

Conventions used in the derivations below: ``g`` is dL/d(out); "unbroadcast" sums a
gradient over the axes that broadcasting expanded, because an input that was broadcast to
many positions receives the sum of their gradients.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from handgrad import backend as B
from handgrad.backend import xp

# ----------------------------------------------------------------------------------------
# grad mode and random state


class _GradMode:
    enabled = True


def is_grad_enabled() -> bool:
    return _GradMode.enabled


class no_grad:
    """Context manager (and decorator) that disables graph recording, like ``torch.no_grad``."""

    def __enter__(self) -> None:
        self._prev = _GradMode.enabled
        _GradMode.enabled = False

    def __exit__(self, *exc: object) -> None:
        _GradMode.enabled = self._prev

    def __call__(self, fn):  # type: ignore[no-untyped-def]
        def wrapper(*args, **kwargs):  # type: ignore[no-untyped-def]
            with type(self)():  # no_grad or enable_grad, whichever decorated fn
                return fn(*args, **kwargs)

        wrapper.__name__ = getattr(fn, "__name__", "wrapper")
        wrapper.__doc__ = getattr(fn, "__doc__", None)
        return wrapper


class enable_grad(no_grad):
    def __enter__(self) -> None:
        self._prev = _GradMode.enabled
        _GradMode.enabled = True


class _RNG:
    gen = np.random.default_rng(0)


def manual_seed(seed: int) -> None:
    """Seed the global generator used by ``randn``, ``rand``, dropout and init helpers."""
    _RNG.gen = np.random.default_rng(int(seed))


def default_generator() -> np.random.Generator:
    return _RNG.gen


def get_rng_state() -> dict:
    """The global generator's state as a JSON-serialisable dict (for exact resume)."""
    return _RNG.gen.bit_generator.state


def set_rng_state(state: dict) -> None:
    gen = np.random.default_rng()
    gen.bit_generator.state = state
    _RNG.gen = gen


# ----------------------------------------------------------------------------------------
# Function: one node of the graph

_LOW_PRECISION = (B.bfloat16, B.float16)


class Function:
    """Base class of differentiable ops.

    Subclasses implement ``forward(*arrays, **kwargs) -> array`` (saving on ``self`` what
    backward needs) and ``backward(g) -> tuple`` with one gradient (or None) per tensor input.
    ``self.needs_input_grad`` tells backward which input gradients are wanted. Backward must
    not write into ``g`` (the same array may be handed to several ops), and returns new arrays
    or views, never an array it keeps elsewhere (new arrays are written into in place).

    NumPy has no fast bfloat16/float16 kernels, so unless a subclass sets ``native = True``
    (pure data movement: reshape, slicing, concatenation), 16-bit inputs are computed in
    float32 and the output is cast back to the 16-bit dtype.
    """

    native = False
    needs_input_grad: tuple[bool, ...] = ()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def backward(self, g: Any) -> tuple[Any, ...]:
        raise NotImplementedError

    @classmethod
    def apply(cls, *inputs: Tensor, **kwargs: Any) -> Tensor:
        ctx = cls()
        arrays = [t.data for t in inputs]
        cast_back = None
        if not cls.native and any(a.dtype in _LOW_PRECISION for a in arrays):
            floats = [a.dtype for a in arrays if B.is_floating(a.dtype)]
            cast_back = np.result_type(*floats)
            arrays = [a.astype(B.float32) if a.dtype in _LOW_PRECISION else a for a in arrays]
        record = _GradMode.enabled and any(t.requires_grad for t in inputs)
        ctx.needs_input_grad = tuple(t.requires_grad for t in inputs) if record else ()
        out = ctx.forward(*arrays, **kwargs)
        if cast_back in _LOW_PRECISION and out.dtype == B.float32:
            out = out.astype(cast_back)
        result = Tensor._make(out, requires_grad=record)
        if record:
            # Edges point at the op that produced each input (or at the leaf itself), never
            # at intermediate tensors, so an intermediate's array is freed as soon as no op
            # saved it for backward.
            ctx.parents = tuple(
                t._ctx if t._ctx is not None else (t if t.requires_grad else None) for t in inputs
            )
            result._ctx = ctx
        return result


def _unbroadcast(g: Any, shape: tuple[int, ...]) -> Any:
    """Sum ``g`` down to ``shape``: the adjoint of broadcasting ``shape`` up to ``g.shape``."""
    if g.shape == shape:
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and g.shape[lead + i] != 1
    )
    return g.sum(axis=axes, keepdims=True).reshape(shape) if axes else g.reshape(shape)


def _broadcast_shape(a: tuple[int, ...], b: tuple[int, ...], op: str) -> None:
    try:
        np.broadcast_shapes(a, b)
    except ValueError:
        raise ValueError(
            f"{op}: shapes {a} and {b} cannot be broadcast together "
            f"(trailing dimensions must be equal or 1)"
        ) from None


# ----------------------------------------------------------------------------------------
# elementwise arithmetic (broadcasting)


class Add(Function):
    # out = a + b  =>  da = g, db = g (each unbroadcast to its input's shape)
    def forward(self, a, b):
        _broadcast_shape(a.shape, b.shape, "add")
        self.sa, self.sb = a.shape, b.shape
        return a + b

    def backward(self, g):
        return _unbroadcast(g, self.sa), _unbroadcast(g, self.sb)


class Sub(Function):
    # out = a - b  =>  da = g, db = -g
    def forward(self, a, b):
        _broadcast_shape(a.shape, b.shape, "sub")
        self.sa, self.sb = a.shape, b.shape
        return a - b

    def backward(self, g):
        db = -_unbroadcast(g, self.sb) if self.needs_input_grad[1] else None
        return _unbroadcast(g, self.sa), db


class Mul(Function):
    # out = a * b  =>  da = g * b, db = g * a
    def forward(self, a, b):
        _broadcast_shape(a.shape, b.shape, "mul")
        self.a, self.b = a, b
        return a * b

    def backward(self, g):
        da = _unbroadcast(g * self.b, self.a.shape) if self.needs_input_grad[0] else None
        db = _unbroadcast(g * self.a, self.b.shape) if self.needs_input_grad[1] else None
        return da, db


class Div(Function):
    # out = a / b  =>  da = g / b, db = -g * a / b^2 = -g * out / b
    def forward(self, a, b):
        _broadcast_shape(a.shape, b.shape, "div")
        self.a, self.b = a, b
        out = a / b
        if not (B.is_floating(a.dtype) or B.is_floating(b.dtype)):
            out = out.astype(B.default_float)  # int / int is float32 as in torch, not float64
        return out

    def backward(self, g):
        a, b = self.a, self.b
        da = _unbroadcast(g / b, a.shape) if self.needs_input_grad[0] else None
        db = _unbroadcast(-g * a / (b * b), b.shape) if self.needs_input_grad[1] else None
        return da, db


class Pow(Function):
    # out = a^b  =>  da = g * b * a^(b-1), db = g * a^b * ln(a)
    def forward(self, a, b):
        _broadcast_shape(a.shape, b.shape, "pow")
        self.a, self.b = a, b
        self.out = a**b
        return self.out

    def backward(self, g):
        a, b = self.a, self.b
        da = _unbroadcast(g * b * a ** (b - 1), a.shape) if self.needs_input_grad[0] else None
        db = None
        if self.needs_input_grad[1]:
            # ln(a) is undefined for a <= 0; torch returns nan there too, we match it.
            with np.errstate(divide="ignore", invalid="ignore"):
                db = _unbroadcast(g * self.out * xp.log(a), b.shape)
        return da, db


class Neg(Function):
    # out = -a  =>  da = -g
    def forward(self, a):
        return -a

    def backward(self, g):
        return (-g,)


# ----------------------------------------------------------------------------------------
# unary elementwise


class Exp(Function):
    # out = e^a  =>  da = g * out
    def forward(self, a):
        self.out = xp.exp(a)
        return self.out

    def backward(self, g):
        return (g * self.out,)


class Log(Function):
    # out = ln a  =>  da = g / a
    def forward(self, a):
        self.a = a
        return xp.log(a)

    def backward(self, g):
        return (g / self.a,)


class Sqrt(Function):
    # out = sqrt(a)  =>  da = g / (2 out)
    def forward(self, a):
        self.out = xp.sqrt(a)
        return self.out

    def backward(self, g):
        return (g / (2 * self.out),)


class Tanh(Function):
    # out = tanh(a)  =>  da = g * (1 - out^2)
    def forward(self, a):
        self.out = xp.tanh(a)
        return self.out

    def backward(self, g):
        return (g * (1 - self.out * self.out),)


class Sigmoid(Function):
    # out = 1 / (1 + e^-a)  =>  da = g * out * (1 - out)
    def forward(self, a):
        self.out = 0.5 * (1 + xp.tanh(0.5 * a))  # overflow-free form of the logistic
        return self.out

    def backward(self, g):
        return (g * self.out * (1 - self.out),)


class Relu(Function):
    # out = max(a, 0)  =>  da = g * [a > 0]
    def forward(self, a):
        self.mask = a > 0
        return xp.where(self.mask, a, 0).astype(a.dtype, copy=False)

    def backward(self, g):
        return (g * self.mask,)


class Abs(Function):
    # out = |a|  =>  da = g * sign(a)
    def forward(self, a):
        self.a = a
        return xp.abs(a)

    def backward(self, g):
        return (g * xp.sign(self.a),)


class Cast(Function):
    # out = a converted to another dtype  =>  da = g converted back
    native = True

    def forward(self, a, dtype):
        self.dtype = a.dtype
        return a.astype(dtype)

    def backward(self, g):
        return (g.astype(B.compute_dtype(self.dtype), copy=False),)


# ----------------------------------------------------------------------------------------
# matmul


class MatMul(Function):
    """out = a @ b with NumPy's batched/broadcast semantics.

    For 2-D blocks: da = g @ b^T and db = a^T @ g; batch dimensions that were broadcast are
    summed. 1-D operands are promoted (a: (n,) -> (1, n); b: (n,) -> (n, 1)) and the added
    axis is removed again from the result and the gradient.
    """

    def forward(self, a, b):
        if a.ndim == 0 or b.ndim == 0:
            raise ValueError(
                "matmul: both operands need at least one dimension (use * for scalars)"
            )
        self.a_shape, self.b_shape = a.shape, b.shape
        a2 = a[None, :] if a.ndim == 1 else a
        b2 = b[:, None] if b.ndim == 1 else b
        if a2.shape[-1] != b2.shape[-2]:
            raise ValueError(
                f"matmul: shapes {a.shape} and {b.shape} are not aligned "
                f"({a.shape[-1]} (dim -1 of the first) != {b2.shape[-2]} (dim -2 of the second))"
            )
        try:
            np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
        except ValueError:
            raise ValueError(
                f"matmul: batch dimensions of {a.shape} and {b.shape} cannot be broadcast"
            ) from None
        self.a, self.b = a2, b2
        if b2.ndim == 2 and a2.ndim > 2:
            # (..., m, k) @ (k, n): one 2-D GEMM over the folded leading dims, not one per index
            out = (a2.reshape(-1, a2.shape[-1]) @ b2).reshape(*a2.shape[:-1], b2.shape[-1])
        else:
            out = a2 @ b2
        if a.ndim == 1:
            out = out[..., 0, :]
        if b.ndim == 1:
            out = out[..., 0]
        return out

    def backward(self, g):
        a, b = self.a, self.b
        # undo the squeezes in reverse order (b's axis was removed last), so that the
        # 1-D @ 1-D case goes () -> (1,) -> (1, 1)
        if len(self.b_shape) == 1:
            g = xp.expand_dims(g, -1)
        if len(self.a_shape) == 1:
            g = xp.expand_dims(g, -2)
        da = db = None
        if self.needs_input_grad[0]:
            if b.ndim == 2 and a.ndim > 2:
                da = (g.reshape(-1, g.shape[-1]) @ b.T).reshape(a.shape)
            else:
                da = _unbroadcast(g @ xp.swapaxes(b, -1, -2), a.shape)
            da = da.reshape(self.a_shape)
        if self.needs_input_grad[1]:
            if b.ndim == 2 and a.ndim > 2:
                # Shared weight (the Linear case): fold the batch into one GEMM instead of
                # materialising a per-batch (.., k, n) product and summing it.
                k, n = a.shape[-1], g.shape[-1]
                db = a.reshape(-1, k).T @ g.reshape(-1, n)
            else:
                db = _unbroadcast(xp.swapaxes(a, -1, -2) @ g, b.shape)
            db = db.reshape(self.b_shape)
        return da, db


# ----------------------------------------------------------------------------------------
# reductions


def _norm_axes(dim: int | Sequence[int] | None, ndim: int) -> tuple[int, ...]:
    if dim is None:
        return tuple(range(ndim))
    dims = (dim,) if isinstance(dim, int) else tuple(dim)
    out = []
    for d in dims:
        if not -max(ndim, 1) <= d < max(ndim, 1):
            raise IndexError(f"dimension {d} out of range for a tensor with {ndim} dimensions")
        out.append(d % max(ndim, 1))
    return tuple(sorted(set(out))) if ndim else ()


def _expand_reduced(g: Any, shape: tuple[int, ...], axes: tuple[int, ...], keepdim: bool) -> Any:
    """Re-insert the reduced axes (size 1) so ``g`` broadcasts against the input."""
    if not keepdim:
        for ax in axes:
            g = xp.expand_dims(g, ax)
    return g


class Sum(Function):
    # out = sum_i a_i  =>  da_i = g (broadcast back over the reduced axes)
    def forward(self, a, axes, keepdim):
        self.shape, self.axes, self.keepdim = a.shape, axes, keepdim
        return a.sum(axis=axes, keepdims=keepdim)

    def backward(self, g):
        g = _expand_reduced(g, self.shape, self.axes, self.keepdim)
        return (xp.broadcast_to(g, self.shape),)


class Mean(Function):
    # out = (1/n) sum_i a_i  =>  da_i = g / n
    def forward(self, a, axes, keepdim):
        self.shape, self.axes, self.keepdim = a.shape, axes, keepdim
        self.n = math.prod(a.shape[ax] for ax in axes)
        return a.mean(axis=axes, keepdims=keepdim)

    def backward(self, g):
        g = _expand_reduced(g, self.shape, self.axes, self.keepdim)
        return (xp.broadcast_to(g / self.n, self.shape),)


class Max(Function):
    # out = max_i a_i  =>  da_i = g * [a_i == out] / (number of maxima), so ties share g
    # (the subgradient torch uses for full reductions; for dim reductions torch picks one
    # index, which differs only when values tie exactly)
    def forward(self, a, axes, keepdim):
        self.shape, self.axes, self.keepdim = a.shape, axes, keepdim
        out = a.max(axis=axes, keepdims=True)
        self.mask = a == out
        return out if keepdim else out.squeeze(axis=axes)

    def backward(self, g):
        g = _expand_reduced(g, self.shape, self.axes, self.keepdim)
        count = self.mask.sum(axis=self.axes, keepdims=True).astype(g.dtype)  # int would promote
        return (g * self.mask / count,)


class Var(Function):
    # out = sum_i (a_i - m)^2 / (n - c) with m the mean  =>  da_i = g * 2 (a_i - m) / (n - c)
    # (the m-dependence drops out because sum_i (a_i - m) = 0)
    def forward(self, a, axes, keepdim, correction):
        self.shape, self.axes, self.keepdim = a.shape, axes, keepdim
        n = math.prod(a.shape[ax] for ax in axes)
        self.denom = float(max(n - correction, 0))  # 0 gives nan/inf as in torch, not an error
        self.centered = a - a.mean(axis=axes, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = (self.centered * self.centered).sum(axis=axes, keepdims=keepdim) / self.denom
        return out.astype(a.dtype, copy=False)

    def backward(self, g):
        g = _expand_reduced(g, self.shape, self.axes, self.keepdim)
        with np.errstate(divide="ignore", invalid="ignore"):
            return (g * self.centered * (2.0 / self.denom if self.denom else math.inf),)


# ----------------------------------------------------------------------------------------
# shape and indexing (pure data movement: gradients are moved back the same way)


class Reshape(Function):
    # out = a viewed with a new shape  =>  da = g viewed with the old shape
    native = True

    def forward(self, a, shape):
        self.shape = a.shape
        try:
            return a.reshape(shape)
        except ValueError:
            raise ValueError(
                f"reshape: cannot view shape {a.shape} ({a.size} elements) as {tuple(shape)}"
            ) from None

    def backward(self, g):
        return (g.reshape(self.shape),)


class Permute(Function):
    # out = a with axes reordered by p  =>  da = g with axes reordered by p^-1
    native = True

    def forward(self, a, dims):
        if sorted(d % a.ndim for d in dims) != list(range(a.ndim)):
            raise ValueError(f"permute: {tuple(dims)} is not a permutation of {a.ndim} dims")
        self.inverse = tuple(np.argsort([d % a.ndim for d in dims]))
        return a.transpose(dims)

    def backward(self, g):
        return (g.transpose(self.inverse),)


class Expand(Function):
    # out = a broadcast to a bigger shape  =>  da = g summed over the broadcast axes
    native = True

    def forward(self, a, shape):
        self.shape = a.shape
        return xp.broadcast_to(a, shape)

    def backward(self, g):
        return (_unbroadcast(g, self.shape),)


class GetItem(Function):
    # out = a[idx]  =>  da = zeros like a, with g scattered back at idx; np.add.at
    # accumulates when an integer index repeats (a gather's adjoint is a scatter-add)
    native = True

    def forward(self, a, idx):
        self.shape, self.dtype, self.idx = a.shape, a.dtype, idx
        return a[idx]

    def backward(self, g):
        if _is_basic_index(self.idx):
            # a slice's gradient is g placed at idx and zero elsewhere; the engine adds it
            # into the input's gradient buffer in place (split/chunk would otherwise make
            # one full-size zero array per piece)
            return (SliceGrad(self.shape, self.idx, g),)
        da = xp.zeros(self.shape, dtype=g.dtype)
        xp.add.at(da, self.idx, g)
        return (da,)


class SliceGrad:
    """A gradient that is ``values`` at ``index`` of an otherwise-zero array of ``shape``."""

    __slots__ = ("shape", "index", "values")

    def __init__(self, shape: tuple[int, ...], index: Any, values: Any) -> None:
        self.shape, self.index, self.values = shape, index, values

    def dense(self) -> Any:
        out = xp.zeros(self.shape, dtype=self.values.dtype)
        out[self.index] = self.values
        return out


def _is_basic_index(idx: Any) -> bool:
    items = idx if isinstance(idx, tuple) else (idx,)
    return all(i is None or i is Ellipsis or isinstance(i, int | slice) for i in items)


class Cat(Function):
    # out = [a_1; a_2; ...] along dim  =>  da_k = the slice of g where a_k sits
    native = True

    def forward(self, *arrays, dim):
        self.dim = dim
        self.bounds = np.cumsum([a.shape[dim] for a in arrays])[:-1].tolist()
        try:
            return xp.concatenate(arrays, axis=dim)
        except ValueError:
            shapes = [a.shape for a in arrays]
            raise ValueError(f"cat: shapes {shapes} differ outside dim {dim}") from None

    def backward(self, g):
        return tuple(xp.split(g, self.bounds, axis=self.dim))


class Stack(Function):
    # out = stack of a_k along a new dim  =>  da_k = g[..., k, ...]
    native = True

    def forward(self, *arrays, dim):
        self.dim = dim
        if len({a.shape for a in arrays}) > 1:
            raise ValueError(
                f"stack: all tensors need the same shape, got {[a.shape for a in arrays]}"
            )
        return xp.stack(arrays, axis=dim)

    def backward(self, g):
        return tuple(xp.moveaxis(g, self.dim, 0))


class Where(Function):
    # out = cond ? a : b  =>  da = g * cond, db = g * (1 - cond)
    def forward(self, cond, a, b):
        self.cond, self.sa, self.sb = cond, a.shape, b.shape
        return xp.where(cond, a, b)

    def backward(self, g):
        zero = xp.zeros((), dtype=g.dtype)
        da = (
            _unbroadcast(xp.where(self.cond, g, zero), self.sa)
            if self.needs_input_grad[1]
            else None
        )
        db = (
            _unbroadcast(xp.where(self.cond, zero, g), self.sb)
            if self.needs_input_grad[2]
            else None
        )
        return None, da, db


# ----------------------------------------------------------------------------------------
# Tensor


def _infer_array(data: Any, dtype: Any) -> Any:
    """Convert ``data`` to a backend array; Python floats default to float32, ints to int64."""
    if isinstance(data, Tensor):
        data = data.data
    if dtype is not None:
        dtype = B.to_dtype(dtype)
        return xp.array(data, dtype=dtype)
    if isinstance(data, np.ndarray | np.generic) or hasattr(data, "__array_interface__"):
        arr = xp.array(data)
    else:
        arr = xp.array(data)
        if arr.dtype == np.float64:
            arr = arr.astype(B.default_float)
        elif arr.dtype.kind in "iu":
            arr = arr.astype(B.default_int)
    if arr.dtype.kind in "US" or arr.dtype == object:
        raise TypeError(f"cannot make a tensor from data of dtype {arr.dtype}")
    B.to_dtype(arr.dtype)  # raises on unsupported dtypes such as complex
    return arr


class Tensor:
    """An n-dimensional array that records the ops applied to it for ``backward()``."""

    __slots__ = ("data", "grad", "_requires_grad", "_ctx", "__weakref__")
    __array_priority__ = 1000  # make ``ndarray * Tensor`` defer to Tensor.__rmul__

    def __init__(self, data: Any, dtype: Any = None, requires_grad: bool = False) -> None:
        self.data = _infer_array(data, dtype)
        self.grad: Tensor | None = None
        self._ctx: Function | None = None
        self._requires_grad = False
        self.requires_grad = requires_grad

    @classmethod
    def _make(cls, array: Any, requires_grad: bool = False) -> Tensor:
        t = cls.__new__(cls)
        t.data, t.grad, t._ctx = array, None, None
        t._requires_grad = requires_grad
        return t

    # ---- basic properties
    @property
    def requires_grad(self) -> bool:
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        if value and not B.is_floating(self.data.dtype):
            raise TypeError(
                f"only floating point tensors can require gradients; this tensor is "
                f"{B.dtype_name(self.data.dtype)} with shape {self.shape}"
            )
        self._requires_grad = bool(value)

    def requires_grad_(self, value: bool = True) -> Tensor:
        self.requires_grad = value
        return self

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    @property
    def T(self) -> Tensor:
        return self.permute(*reversed(range(self.ndim)))

    def size(self, dim: int | None = None) -> tuple[int, ...] | int:
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return self.ndim

    def numel(self) -> int:
        return int(self.data.size)

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def item(self) -> float | int | bool:
        if self.data.size != 1:
            raise ValueError(
                f"item(): only one-element tensors can be converted, shape is {self.shape}"
            )
        return self.data.reshape(()).item()

    def numpy(self) -> np.ndarray:
        if self.requires_grad:
            raise RuntimeError("numpy(): call .detach() first on a tensor that requires grad")
        return B.to_numpy(self.data)

    def tolist(self) -> Any:
        return self.data.tolist()

    def detach(self) -> Tensor:
        return Tensor._make(self.data)

    def clone(self) -> Tensor:
        return self * 1 if self.requires_grad else Tensor._make(self.data.copy())

    def retain_grad(self) -> None:
        """Keep ``.grad`` on this non-leaf tensor after backward (leaves always keep it)."""
        if self._ctx is not None:
            self._ctx._retained = weakref.ref(self)

    def __repr__(self) -> str:
        body = np.array2string(
            B.to_numpy(self.data).astype(B.compute_dtype(self.dtype)), separator=", "
        )
        extra = f", dtype={B.dtype_name(self.dtype)}" if self.dtype != B.float32 else ""
        if self._ctx is not None:
            extra += f", grad_fn=<{type(self._ctx).__name__}>"
        elif self.requires_grad:
            extra += ", requires_grad=True"
        return f"tensor({body}{extra})"

    def __bool__(self) -> bool:
        return bool(self.item())

    def __float__(self) -> float:
        return float(self.item())

    def __int__(self) -> int:
        return int(self.item())

    def __iter__(self) -> Iterator[Tensor]:
        for i in range(len(self)):
            yield self[i]

    # ---- dtype
    def to(self, dtype: Any) -> Tensor:
        dtype = B.to_dtype(dtype)
        if dtype == self.dtype:
            return self
        if self.requires_grad and not B.is_floating(dtype):
            return Tensor._make(self.data.astype(dtype))
        return Cast.apply(self, dtype=dtype)

    def float(self) -> Tensor:
        return self.to(B.float32)

    def double(self) -> Tensor:
        return self.to(B.float64)

    def bfloat16(self) -> Tensor:
        return self.to(B.bfloat16)

    def long(self) -> Tensor:
        return self.to(B.int64)

    # ---- autograd
    def backward(self, gradient: Tensor | Any | None = None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) * gradient into ``leaf.grad`` for every leaf that
        requires grad. ``gradient`` defaults to 1 for a one-element tensor."""
        if not self.requires_grad:
            raise RuntimeError(
                "backward(): this tensor does not require grad and has no graph "
                "(were its inputs created with requires_grad=True, outside no_grad()?)"
            )
        if gradient is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward(): grad can be implicitly created only for scalar outputs; "
                    f"this tensor has shape {self.shape}, pass gradient= of that shape"
                )
            g = xp.ones(self.shape, dtype=B.compute_dtype(self.dtype))
        else:
            g = gradient.data if isinstance(gradient, Tensor) else xp.asarray(gradient)
            if g.shape != self.shape:
                raise RuntimeError(
                    f"backward(): gradient has shape {g.shape} but the tensor has shape {self.shape}"
                )
            g = g.astype(B.compute_dtype(self.dtype), copy=False)
        _run_backward(self, g, retain_graph)

    # ---- operator overloading
    def _other(self, other: Any) -> Tensor:
        if isinstance(other, Tensor):
            return other
        # Python and NumPy scalars take this tensor's dtype (no silent float64 promotion).
        if isinstance(other, int | float | bool | np.number):
            dtype = (
                self.dtype
                if B.is_floating(self.dtype) or isinstance(other, int | bool)
                else B.default_float
            )
            return Tensor._make(xp.asarray(other, dtype=dtype))
        return Tensor(other)

    def __add__(self, o: Any) -> Tensor:
        return _binary(Add, self, self._other(o))

    def __radd__(self, o: Any) -> Tensor:
        return _binary(Add, self._other(o), self)

    def __sub__(self, o: Any) -> Tensor:
        return _binary(Sub, self, self._other(o))

    def __rsub__(self, o: Any) -> Tensor:
        return _binary(Sub, self._other(o), self)

    def __mul__(self, o: Any) -> Tensor:
        return _binary(Mul, self, self._other(o))

    def __rmul__(self, o: Any) -> Tensor:
        return _binary(Mul, self._other(o), self)

    def __truediv__(self, o: Any) -> Tensor:
        return _binary(Div, self, self._other(o))

    def __rtruediv__(self, o: Any) -> Tensor:
        return _binary(Div, self._other(o), self)

    def __pow__(self, o: Any) -> Tensor:
        return _binary(Pow, self, self._other(o))

    def __rpow__(self, o: Any) -> Tensor:
        return _binary(Pow, self._other(o), self)

    def __neg__(self) -> Tensor:
        return Neg.apply(self)

    def __matmul__(self, o: Any) -> Tensor:
        return MatMul.apply(self, self._other(o))

    def __rmatmul__(self, o: Any) -> Tensor:
        return MatMul.apply(self._other(o), self)

    def __getitem__(self, idx: Any) -> Tensor:
        return GetItem.apply(self, idx=_index_arrays(idx))

    def __setitem__(self, idx: Any, value: Any) -> None:
        if self.requires_grad and _GradMode.enabled:
            raise RuntimeError(
                "in-place assignment to a tensor that requires grad; wrap it in handgrad.no_grad()"
            )
        self.data[_index_arrays(idx)] = value.data if isinstance(value, Tensor) else value

    # comparisons give boolean tensors and are not differentiable
    def _cmp(self, o: Any, fn: Any) -> Tensor:
        return Tensor._make(fn(self.data, self._other(o).data))

    def __eq__(self, o: Any) -> Tensor:  # type: ignore[override]
        return self._cmp(o, xp.equal)

    def __ne__(self, o: Any) -> Tensor:  # type: ignore[override]
        return self._cmp(o, xp.not_equal)

    def __lt__(self, o: Any) -> Tensor:
        return self._cmp(o, xp.less)

    def __le__(self, o: Any) -> Tensor:
        return self._cmp(o, xp.less_equal)

    def __gt__(self, o: Any) -> Tensor:
        return self._cmp(o, xp.greater)

    def __ge__(self, o: Any) -> Tensor:
        return self._cmp(o, xp.greater_equal)

    __hash__ = object.__hash__

    # ---- methods mirroring torch
    def exp(self) -> Tensor:
        return Exp.apply(self)

    def log(self) -> Tensor:
        return Log.apply(self)

    def sqrt(self) -> Tensor:
        return Sqrt.apply(self)

    def tanh(self) -> Tensor:
        return Tanh.apply(self)

    def sigmoid(self) -> Tensor:
        return Sigmoid.apply(self)

    def relu(self) -> Tensor:
        return Relu.apply(self)

    def abs(self) -> Tensor:
        return Abs.apply(self)

    def sum(self, dim: int | Sequence[int] | None = None, keepdim: bool = False) -> Tensor:
        return Sum.apply(self, axes=_norm_axes(dim, self.ndim), keepdim=keepdim)

    def mean(self, dim: int | Sequence[int] | None = None, keepdim: bool = False) -> Tensor:
        if not B.is_floating(self.dtype):
            raise TypeError(
                f"mean(): needs a floating point tensor, got {B.dtype_name(self.dtype)}"
            )
        return Mean.apply(self, axes=_norm_axes(dim, self.ndim), keepdim=keepdim)

    def max(self, dim: int | Sequence[int] | None = None, keepdim: bool = False) -> Tensor:
        """Maximum over ``dim`` (all dims if None). Returns values only (no indices)."""
        if self.data.size == 0:
            raise ValueError("max(): the tensor is empty")
        return Max.apply(self, axes=_norm_axes(dim, self.ndim), keepdim=keepdim)

    def var(
        self,
        dim: int | Sequence[int] | None = None,
        keepdim: bool = False,
        unbiased: bool | None = None,
        correction: int | None = None,
    ) -> Tensor:
        """Variance with Bessel's correction by default (``correction=1``), as torch."""
        if correction is None:
            correction = 1 if unbiased is None or unbiased else 0
        return Var.apply(
            self, axes=_norm_axes(dim, self.ndim), keepdim=keepdim, correction=correction
        )

    def argmax(self, dim: int | None = None, keepdim: bool = False) -> Tensor:
        if dim is None:
            return Tensor._make(xp.asarray(self.data.argmax(), dtype=B.int64))
        return Tensor._make(self.data.argmax(axis=dim, keepdims=keepdim).astype(B.int64))

    def reshape(self, *shape: Any) -> Tensor:
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple | list) else shape
        return Reshape.apply(self, shape=shape)

    view = reshape

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> Tensor:
        if self.ndim == 0:
            return self.reshape(1)
        s, e = start_dim % self.ndim, end_dim % self.ndim
        return self.reshape(*self.shape[:s], -1, *self.shape[e + 1 :])

    def unsqueeze(self, dim: int) -> Tensor:
        dim = dim % (self.ndim + 1)
        return self.reshape(*self.shape[:dim], 1, *self.shape[dim:])

    def squeeze(self, dim: int | None = None) -> Tensor:
        if dim is None:
            return self.reshape(*(n for n in self.shape if n != 1))
        dim = dim % self.ndim
        if self.shape[dim] != 1:
            return self
        return self.reshape(*self.shape[:dim], *self.shape[dim + 1 :])

    def permute(self, *dims: Any) -> Tensor:
        dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], tuple | list) else dims
        return Permute.apply(self, dims=dims)

    def transpose(self, dim0: int, dim1: int) -> Tensor:
        dims = list(range(self.ndim))
        dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
        return Permute.apply(self, dims=tuple(dims))

    def expand(self, *shape: Any) -> Tensor:
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple | list) else shape
        lead = len(shape) - self.ndim
        full = tuple(self.shape[i - lead] if n == -1 else n for i, n in enumerate(shape))
        return Expand.apply(self, shape=full)

    def contiguous(self) -> Tensor:
        return self

    def split(
        self, split_size_or_sections: int | Sequence[int], dim: int = 0
    ) -> tuple[Tensor, ...]:
        return split(self, split_size_or_sections, dim)

    def chunk(self, chunks: int, dim: int = 0) -> tuple[Tensor, ...]:
        n = self.shape[dim]
        return split(self, -(-n // chunks), dim)

    def masked_fill(self, mask: Tensor | Any, value: float) -> Tensor:
        return masked_fill(self, mask, value)

    def softmax(self, dim: int = -1) -> Tensor:
        from handgrad.nn.functional import softmax

        return softmax(self, dim)

    def log_softmax(self, dim: int = -1) -> Tensor:
        from handgrad.nn.functional import log_softmax

        return log_softmax(self, dim)

    def zero_(self) -> Tensor:
        self.data[...] = 0
        return self


def _binary(fn: type[Function], a: Tensor, b: Tensor) -> Tensor:
    """Apply a broadcasting binary op with torch's promotion for mixed integer/float inputs:
    the integer side takes the float side's dtype (NumPy would go to float64)."""
    fa, fb = B.is_floating(a.dtype), B.is_floating(b.dtype)
    if fa and not fb:
        b = Tensor._make(b.data.astype(a.dtype))
    elif fb and not fa:
        a = Tensor._make(a.data.astype(b.dtype))
    return fn.apply(a, b)


def _index_arrays(idx: Any) -> Any:
    """Unwrap Tensors used as indices (integer-array gather, boolean masks)."""
    if isinstance(idx, Tensor):
        return idx.data
    if isinstance(idx, tuple):
        return tuple(i.data if isinstance(i, Tensor) else i for i in idx)
    if isinstance(idx, list):
        return xp.asarray(idx)
    return idx


# ----------------------------------------------------------------------------------------
# the backward pass


def _topological_order(root: Function) -> list[Function | Tensor]:
    """Graph nodes reachable from ``root``, inputs before outputs.

    Nodes are ops (``Function``) and the leaf tensors that require grad. An explicit stack
    replaces recursion so that deep graphs (a 1,000-layer chain) do not hit Python's
    recursion limit.
    """
    order: list[Function | Tensor] = []
    seen: set[int] = set()
    stack: list[tuple[Function | Tensor, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        if isinstance(node, Tensor):
            continue
        if getattr(node, "_freed", False):
            raise RuntimeError(
                "backward(): trying to go through the graph a second time; its saved "
                "values were freed by the first backward(). Call backward(retain_graph=True) "
                "the first time if you need to backpropagate twice."
            )
        for p in node.parents:
            if p is not None and id(p) not in seen:
                stack.append((p, False))
    return order


def _accumulate(t: Tensor, g: Any, owned: bool = False) -> None:
    """Add ``g`` into ``t.grad``. An ``owned`` array (nobody else holds it) is adopted as the
    gradient without a copy."""
    if isinstance(g, SliceGrad):
        g, owned = g.dense(), True
    if g.shape != t.shape:  # a bug in some op's backward, never a user error
        raise RuntimeError(
            f"internal error: gradient of shape {g.shape} for a tensor of shape {t.shape}"
        )
    gdtype = B.compute_dtype(t.dtype)
    if t.grad is None:
        adopt = owned and g.dtype == gdtype and g.flags.writeable
        t.grad = Tensor._make(g if adopt else xp.array(g, dtype=gdtype, copy=True))
    else:
        t.grad.data += g


def _add_grad(grads: dict[int, tuple[Any, bool]], key: int, g: Any, fresh: bool) -> None:
    """Sum ``g`` into the pending gradient of a node. An "owned" buffer (allocated here, or a
    fresh array nobody else holds) is updated in place; any other array may be shared (Add
    passes the same ``g`` to both inputs), so it is never written to."""
    prev = grads.get(key)
    if prev is None:
        grads[key] = (g, fresh) if not isinstance(g, SliceGrad) else (g.dense(), True)
        return
    buf, owned = prev
    if isinstance(g, SliceGrad):
        buf = buf if owned else buf.copy()
        buf[g.index] += g.values
    elif owned:
        buf += g
    else:
        buf = buf + g
    grads[key] = (buf, True)


def _run_backward(root: Tensor, g: Any, retain_graph: bool) -> None:
    if root._ctx is None:
        _accumulate(root, g)
        return
    order = _topological_order(root._ctx)
    grads: dict[int, tuple[Any, bool]] = {id(root._ctx): (g, False)}
    for node in reversed(order):
        entry = grads.pop(id(node), None)
        if entry is None:
            continue
        g, owned = entry
        if isinstance(node, Tensor):
            _accumulate(node, g, owned)
            continue
        retained = getattr(node, "_retained", None)
        if retained is not None and retained() is not None:
            _accumulate(retained(), g)
        in_grads = node.backward(g)
        returned = [id(a) for a in in_grads if a is not None]
        for p, pg in zip(node.parents, in_grads):
            if p is not None and pg is not None:
                # a new allocation handed to one input only can be written in place later
                fresh = (
                    not isinstance(pg, SliceGrad)
                    and pg.base is None
                    and pg is not g
                    and returned.count(id(pg)) == 1
                )
                _add_grad(grads, id(p), pg, fresh)
        if not retain_graph:
            parents = node.parents
            node.__dict__.clear()
            node.parents, node._freed = parents, True


# ----------------------------------------------------------------------------------------
# creation functions


def tensor(data: Any, dtype: Any = None, requires_grad: bool = False) -> Tensor:
    """Make a tensor from a list, scalar or array. Floats default to float32, ints to int64."""
    return Tensor(data, dtype=dtype, requires_grad=requires_grad)


def _shape(size: tuple[Any, ...]) -> tuple[int, ...]:
    if len(size) == 1 and isinstance(size[0], tuple | list):
        return tuple(size[0])
    return tuple(size)


def zeros(*size: Any, dtype: Any = None, requires_grad: bool = False) -> Tensor:
    dtype = B.to_dtype(dtype or B.default_float)
    return Tensor._make(xp.zeros(_shape(size), dtype=dtype)).requires_grad_(requires_grad)


def ones(*size: Any, dtype: Any = None, requires_grad: bool = False) -> Tensor:
    dtype = B.to_dtype(dtype or B.default_float)
    return Tensor._make(xp.ones(_shape(size), dtype=dtype)).requires_grad_(requires_grad)


def empty(*size: Any, dtype: Any = None, requires_grad: bool = False) -> Tensor:
    dtype = B.to_dtype(dtype or B.default_float)
    return Tensor._make(xp.empty(_shape(size), dtype=dtype)).requires_grad_(requires_grad)


def full(
    size: Sequence[int], fill_value: float, dtype: Any = None, requires_grad: bool = False
) -> Tensor:
    if dtype is None:
        dtype = (
            B.default_int
            if isinstance(fill_value, int) and not isinstance(fill_value, bool)
            else B.default_float
        )
    arr = xp.full(tuple(size), fill_value, dtype=B.to_dtype(dtype))
    return Tensor._make(arr).requires_grad_(requires_grad)


def zeros_like(t: Tensor, dtype: Any = None, requires_grad: bool = False) -> Tensor:
    return zeros(t.shape, dtype=dtype or t.dtype, requires_grad=requires_grad)


def ones_like(t: Tensor, dtype: Any = None, requires_grad: bool = False) -> Tensor:
    return ones(t.shape, dtype=dtype or t.dtype, requires_grad=requires_grad)


def randn(
    *size: Any,
    dtype: Any = None,
    requires_grad: bool = False,
    generator: np.random.Generator | None = None,
) -> Tensor:
    """Standard normal samples from the global generator (see ``manual_seed``)."""
    dtype = B.to_dtype(dtype or B.default_float)
    gen = generator or _RNG.gen
    arr = gen.standard_normal(
        _shape(size),
        dtype=B.compute_dtype(dtype)
        if B.compute_dtype(dtype) in (B.float32, B.float64)
        else B.float64,
    )
    return Tensor._make(xp.asarray(arr.astype(dtype, copy=False))).requires_grad_(requires_grad)


def rand(
    *size: Any,
    dtype: Any = None,
    requires_grad: bool = False,
    generator: np.random.Generator | None = None,
) -> Tensor:
    """Uniform samples in [0, 1) from the global generator."""
    dtype = B.to_dtype(dtype or B.default_float)
    gen = generator or _RNG.gen
    arr = gen.random(_shape(size), dtype=B.float32 if dtype != B.float64 else B.float64)
    return Tensor._make(xp.asarray(arr.astype(dtype, copy=False))).requires_grad_(requires_grad)


def arange(start: float, end: float | None = None, step: float = 1, dtype: Any = None) -> Tensor:
    if end is None:
        start, end = 0, start
    if dtype is None:
        ints = all(isinstance(v, int) for v in (start, end, step))
        dtype = B.default_int if ints else B.default_float
    return Tensor._make(xp.arange(start, end, step, dtype=B.to_dtype(dtype)))


# ----------------------------------------------------------------------------------------
# functional forms of multi-input ops


def cat(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    if not tensors:
        raise ValueError("cat: expected a non-empty sequence of tensors")
    return Cat.apply(*tensors, dim=dim)


def stack(tensors: Sequence[Tensor], dim: int = 0) -> Tensor:
    if not tensors:
        raise ValueError("stack: expected a non-empty sequence of tensors")
    return Stack.apply(*tensors, dim=dim)


def split(
    t: Tensor, split_size_or_sections: int | Sequence[int], dim: int = 0
) -> tuple[Tensor, ...]:
    """Split along ``dim`` into chunks of ``split_size`` (the last may be smaller) or the given
    section sizes. Each piece is a slice, so its gradient flows back into place."""
    n = t.shape[dim]
    if isinstance(split_size_or_sections, int):
        step = split_size_or_sections
        sizes = [min(step, n - s) for s in range(0, n, step)]
    else:
        sizes = list(split_size_or_sections)
        if sum(sizes) != n:
            raise ValueError(
                f"split: sections {sizes} sum to {sum(sizes)}, but dim {dim} has size {n}"
            )
    pieces, start = [], 0
    lead = (slice(None),) * (dim % t.ndim)
    for size in sizes:
        pieces.append(t[(*lead, slice(start, start + size))])
        start += size
    return tuple(pieces)


def where(condition: Tensor | Any, input: Tensor | Any, other: Tensor | Any) -> Tensor:
    cond = condition.data if isinstance(condition, Tensor) else xp.asarray(condition)
    if cond.dtype != B.bool_:
        raise TypeError(f"where: condition must be a bool tensor, got {cond.dtype}")
    a = input if isinstance(input, Tensor) else None
    b = other if isinstance(other, Tensor) else None
    if a is None and b is None:
        a = Tensor(input)
    a = a if a is not None else b._other(input)  # type: ignore[union-attr]
    b = b if b is not None else a._other(other)
    return Where.apply(Tensor._make(cond), a, b)


def masked_fill(t: Tensor, mask: Tensor | Any, value: float) -> Tensor:
    """``value`` where ``mask`` is True, ``t`` elsewhere; no gradient flows to filled spots."""
    return where(mask, t._other(value), t)


def matmul(a: Tensor, b: Tensor) -> Tensor:
    return MatMul.apply(a, b)


def exp(t: Tensor) -> Tensor:
    return t.exp()


def log(t: Tensor) -> Tensor:
    return t.log()


def sqrt(t: Tensor) -> Tensor:
    return t.sqrt()


def tanh(t: Tensor) -> Tensor:
    return t.tanh()


def relu(t: Tensor) -> Tensor:
    return t.relu()
